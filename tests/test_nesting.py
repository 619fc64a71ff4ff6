"""JSON nested past MAX_DEPTH is refused before json.loads recurses towards the stack limit,
where a garbage collection would run finalizers that fail (a flaky CI failure, found in
test_webhook's deeply-nested body)."""
import gc
import json
import time

import pytest
from hypothesis import example, given, settings, strategies as st

from bot.webchat.requests import Refused, parse_json_body
from messenger.events import BadPayload, parse_body
from messenger.nesting import MAX_DEPTH, too_deep

# Strings full of what could fool a bracket count: brackets, quotes and backslashes.
TRICKY = st.text(alphabet='[]{}"\\ ab\n', max_size=8)
VALUES = st.recursive(st.none() | st.integers() | TRICKY,
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY, inner, max_size=3),
                      max_leaves=30)


def depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


@settings(max_examples=400, deadline=None, database=None)
@given(VALUES, st.integers(0, 6), st.booleans())
@example(['"[[[', {"]\\": [[]]}], 1, False)
def test_too_deep_is_the_true_depth_whatever_the_strings_hold(value, limit, spaced):
    text = json.dumps(value, indent=1 if spaced else None)
    assert too_deep(text, limit) == (depth(value) > limit)


def nested(levels: int) -> bytes:
    return b'{"object":"page","entry":' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


def test_a_delivery_past_the_limit_is_refused_though_json_could_read_it():
    json.loads(nested(MAX_DEPTH + 1))  # valid JSON, well inside Python's stack
    with pytest.raises(BadPayload, match="nested too deeply"):
        parse_body(nested(MAX_DEPTH + 1))
    with pytest.raises(BadPayload, match="entry must be a list of objects"):  # read, then refused for its shape
        parse_body(nested(MAX_DEPTH))
    with pytest.raises(Refused, match="must be JSON"):
        parse_json_body(b'{"message":' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}", 100)


def test_quotes_left_open_cost_one_pass_not_one_each():
    """A 64 KB web-chat request of 32,000 quotes that never close (past the 64 openers that make
    the guard look) took 15 s of CPU when each quote started a new search to the end."""
    attack = "[" * 65 + '"' + '\\"' * 32_000
    started = time.process_time()
    assert too_deep(attack)  # the string never closes: json.loads would stop inside it, as here
    assert time.process_time() - started < 1.0
    with pytest.raises(Refused):
        parse_json_body(attack.encode(), 100)


def _recurse(levels: int) -> None:
    if levels:
        _recurse(levels - 1)


@pytest.mark.parametrize("parse", [lambda raw: parse_body(raw), lambda raw: parse_json_body(raw, 100)],
                         ids=["webhook", "webchat"])
def test_a_body_nested_100000_deep_never_runs_a_collection_at_the_stack_limit(parse):
    """The defect itself, made certain: a collection on every allocation, and a finalizer-like
    callback that needs 100 frames. Parsed by json.loads, the body left it none."""
    starved = []

    def callback(phase, info):
        try:
            _recurse(100)
        except RecursionError:
            starved.append(phase)

    threshold = gc.get_threshold()
    gc.callbacks.append(callback)
    gc.set_threshold(1)
    try:
        with pytest.raises((BadPayload, Refused)):
            parse(b"[" * 100_000 + b"]" * 100_000)
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(callback)
    assert starved == []
