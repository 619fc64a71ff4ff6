"""How deeply a JSON text nests, read before `json.loads` is let near it.

The json module's C scanner recurses once per `[` or `{`. A body nested some
thousands deep used to end in RecursionError, which was caught, but any garbage
collection that ran down there ran its finalizers at the recursion limit too, and
they failed ("Exception ignored ... RecursionError": a flaky CI failure, and in
production a finalizer that never ran). So a body nested past MAX_DEPTH is refused
before it is parsed. Meta's deliveries nest about 8 deep; a web-chat request 2.
"""
from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

MAX_DEPTH = 64
# A JSON string, its escapes included: brackets inside strings do not nest. One left open runs
# to the end of the text (json.loads stops there too): were it not matched, the search would
# start again at each quote inside it, and 32,000 of them in a 64 KB web-chat request took 15 s.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def too_deep(text: str, limit: int = MAX_DEPTH) -> bool:
    """True when `text`, read as JSON, opens more than `limit` arrays or objects inside each other.

    A depth cannot exceed the count of openers, so a text with no more than `limit` of them
    costs two C-speed counts (1-2 us): a delivery of up to about 9 events. Past that, strings
    are cut out and the brackets left are walked, up to the first level past `limit`: about 3x
    what json.loads takes (measured: 97-165 us for 30 events, 346-534 us for 100), small
    beside storing them.
    Invalid JSON gets some answer here; json.loads refuses it after either way."""
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _BRACKET.findall(_STRING.sub("", text))
    return any(depth > limit for depth in accumulate(1 if bracket in "[{" else -1 for bracket in brackets))


class TooDeep(ValueError):
    """JSON nested past the limit: a ValueError, as json.loads' own refusals are."""


def loads(text: str, **kwargs) -> Any:
    """json.loads for a text from outside: refused (TooDeep) past MAX_DEPTH before it recurses."""
    if too_deep(text):
        raise TooDeep(f"JSON nested more than {MAX_DEPTH} deep")
    return json.loads(text, **kwargs)
