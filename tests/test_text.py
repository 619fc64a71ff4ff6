"""Untrusted strings made safe to store (clean_text) and to log (preview)."""
import re

import pytest
from hypothesis import given, settings, strategies as st

from messenger.graph import to_history_message
from messenger.text import clean_text, preview

SURROGATE = re.compile("[\ud800-\udfff]")
PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
# st.characters() almost never draws a surrogate: mix them in on purpose.
CHARS = st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr))
TEXTS = st.lists(CHARS, max_size=30).map("".join)


@pytest.mark.parametrize("value, expected", [
    ("", ""),
    ("plain ascii", "plain ascii"),
    ("Bonjour à tous 👋 你好", "Bonjour à tous 👋 你好"),
    ("m_\udfff_x", "m_\ufffd_x"),
    ("\ud800", "\ufffd"),
    ("end\udbff", "end\ufffd"),
    ("\ud800a", "\ufffda"),
    ("\udc00\ud800", "\ufffd\ufffd"),  # low then high: two lone surrogates
    ("a\ud83d\ude00b", "a\U0001f600b"),  # a pair is not lone: it is the emoji it spells
    ("tab\tand\nnewline", "tab\tand\nnewline"),  # control characters are text, not our business here
    ("nul\x00inside", "nul\ufffdinside"),  # but PostgreSQL's text cannot hold a NUL
    ("é\x00\udfff", "é\ufffd\ufffd"),
], ids=["empty", "ascii", "non-ascii", "mid-attack", "lone-high", "trailing-high", "high-before-letter",
        "reversed-pair", "pair", "controls", "nul", "nul-and-surrogate"])
def test_clean_text(value, expected):
    assert clean_text(value) == expected
    clean_text(value).encode()


def test_clean_text_returns_the_same_object_when_nothing_to_do():
    text = "déjà vu " * 100
    assert clean_text(text) is text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(TEXTS)
def test_clean_text_only_replaces_lone_surrogates_and_nul(value):
    cleaned = clean_text(value)
    cleaned.encode()
    assert clean_text(cleaned) == cleaned and "\x00" not in cleaned
    value = value.replace("\x00", "\ufffd")
    if not SURROGATE.search(value):
        assert cleaned == value
    elif not PAIR.search(value):
        assert cleaned == SURROGATE.sub("\ufffd", value)


@pytest.mark.parametrize("value, expected", [
    ("1234", "'1234'"),
    ("evil\nINFO forged line", "'evil\\nINFO forged line'"),
    ("\x00\udfff", "'\\x00\\udfff'"),
    ("x" * 100, "'" + "x" * 32 + "'..."),
    (12, "12"),
    (10 ** 100, "<int of 333 bits>"),
    (1.5, "1.5"),
    (None, "None"),
    ({"id": "secret-ish"}, "<dict>"),
    ([[[]]], "<list>"),
], ids=["digits", "newline", "nul-surrogate", "long", "int", "huge-int", "float", "none", "dict", "list"])
def test_preview_is_short_and_escaped(value, expected):
    assert preview(value) == expected


def test_history_from_graph_is_cleaned():
    """A lone surrogate in Graph's history must not reach storage either."""
    message = to_history_message({"id": "m_\udfff", "message": "hi \ud800", "from": {"id": "2\udc00"},
                                  "created_time": "2026-11-23T10:15:00+0000"})
    assert (message.mid, message.text, message.from_id) == ("m_\ufffd", "hi \ufffd", "2\ufffd")
    assert to_history_message({"id": "m_1", "message": "ok", "from": {"id": "2"}}).text == "ok"
