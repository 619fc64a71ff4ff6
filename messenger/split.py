"""Split a long reply into Send API sized parts without losing a word."""
from __future__ import annotations

import re

from messenger.graph import MAX_TEXT_LENGTH

# Preferred places to cut, best first: paragraph, line, sentence end, word.
_BOUNDARIES = (re.compile(r"\n\s*\n"), re.compile(r"\n"), re.compile(r"[.!?…](?=\s)"), re.compile(r"\s"))


def text_length(text: str) -> int:
    """Length in UTF-16 code units: the safe reading of Meta's limit (an emoji counts 2)."""
    return len(text.encode("utf-16-le")) // 2


def split_text(text: str, limit: int = MAX_TEXT_LENGTH) -> list[str]:
    """Parts of at most `limit` units, in order, cut at the best boundary available."""
    parts: list[str] = []
    rest = text.strip()
    while text_length(rest) > limit:
        cut = _cut_point(rest, limit)
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        parts.append(rest)
    return parts


def _cut_point(text: str, limit: int) -> int:
    window = text[:limit]
    while text_length(window) > limit:  # only when the window holds astral characters
        window = window[:-1]
    for boundary in _BOUNDARIES:
        ends = [m.end() for m in boundary.finditer(window)]
        # A cut in the first half would leave a stub part; try a finer boundary instead.
        good = [end for end in ends if end > len(window) // 2]
        if good:
            return good[-1]
    return len(window)  # one unbroken run of characters: a hard cut is all that is left
