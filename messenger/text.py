"""Strings from outside (webhooks, Graph answers) made safe to store and to log.

JSON may spell a lone UTF-16 surrogate (`"\\udfff"`); Python decodes it into a
str that cannot be encoded as UTF-8, so every later write (SQLite, a file, a
socket) raises UnicodeEncodeError - for as long as the string is kept.
"""
from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
PREVIEW_CHARS = 32


def clean_text(value: str) -> str:
    """`value` with each lone surrogate replaced by U+FFFD, so it always encodes as UTF-8,
    and each NUL too: PostgreSQL's text cannot hold one (SQLite's can, but the two backends
    must store the same).

    A high surrogate followed by a low one is a pair, not lone: it becomes the
    character it spells. Nothing else changes.
    """
    if "\x00" in value:  # memchr: cheap
        value = value.replace("\x00", REPLACEMENT)
    if value.isascii():  # O(1) in CPython: most ids and many texts stop here
        return value
    try:
        value.encode()
        return value
    except UnicodeEncodeError:
        # UTF-16 round trip: surrogatepass writes each surrogate as its code unit,
        # the decoder joins the pairs and replaces what is left alone.
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def preview(value: Any) -> str:
    """A short, escaped, log-safe view of an untrusted value: never raw, never long."""
    if isinstance(value, str):
        suffix = "..." if len(value) > PREVIEW_CHARS else ""
        return repr(value[:PREVIEW_CHARS]) + suffix  # repr escapes \n, NUL and surrogates
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<int of {value.bit_length()} bits>"  # str() of a huge int is slow or raises
    if isinstance(value, (int, float, bool)) or value is None:
        return repr(value)
    return f"<{type(value).__name__}>"  # a dict or list could be huge or deeply nested
