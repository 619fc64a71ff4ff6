"""Split a long reply into Send API sized parts without losing a word."""
from __future__ import annotations

import re
from typing import Callable

from messenger.platforms import MESSENGER, utf16_length

# Preferred places to cut, best first: paragraph, line, sentence end, word.
_BOUNDARIES = (re.compile(r"\n\s*\n"), re.compile(r"\n"), re.compile(r"[.!?…](?=\s)"), re.compile(r"\s"))


text_length = utf16_length  # Messenger's measure


def split_text(text: str, limit: int = MESSENGER.max_text, measure: Callable[[str], int] = utf16_length) -> list[str]:
    """Parts of at most `limit` units of `measure`, in order, cut at the best boundary available."""
    parts: list[str] = []
    rest = text.strip()
    while measure(rest) > limit:
        cut = _cut_point(rest, limit, measure)
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        parts.append(rest)
    return parts


def _cut_point(text: str, limit: int, measure: Callable[[str], int]) -> int:
    window = text[:limit]
    while measure(window) > limit:  # only when the window holds wide characters
        window = window[:-1]
    for boundary in _BOUNDARIES:
        ends = [m.end() for m in boundary.finditer(window)]
        # A cut in the first half would leave a stub part; try a finer boundary instead.
        good = [end for end in ends if end > len(window) // 2]
        if good:
            return good[-1]
    return len(window)  # one unbroken run of characters: a hard cut is all that is left
