"""History to chat messages: one row per conversion rule."""
import pytest

from gpt.prompt import to_chat_messages
from messenger.graph import HistoryMessage

PAGE = "100"
USER = "200"
P = "Answer polite and concisely in a single sentence : "


def h(mid, text, from_id):
    return HistoryMessage(mid=mid, text=text, from_id=from_id)


def convert(history, text="new?", mid="m_new", max_turns=10, system_prompt="", earlier=()):
    return to_chat_messages(history, [*earlier, (mid, text)], page_id=PAGE, prefix=P,
                            max_turns=max_turns, system_prompt=system_prompt)


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


# History is newest first, as the Conversations API returns it.
CASES = [
    ("empty-history", [], {}, [u(P + "new?")]),
    ("chronological-roles", [h("m3", "Hi! How can I help?", PAGE), h("m2", "hello", USER)], {},
     [u("hello"), a("Hi! How can I help?"), u(P + "new?")]),
    ("answered-message-replaced", [h("m_new", "new?", USER), h("m2", "Sure.", PAGE), h("m1", "hi", USER)], {},
     [u("hi"), a("Sure."), u(P + "new?")]),
    ("not-indexed-keeps-page-reply", [h("m2", "Sure.", PAGE), h("m1", "hi", USER)], {},
     [u("hi"), a("Sure."), u(P + "new?")]),
    ("newer-messages-after-answered-left-out", [h("m9", "later", USER), h("m_new", "new?", USER), h("m1", "hi", USER)],
     {}, [u("hi"), u(P + "new?")]),
    ("empty-texts-skipped", [h("m3", "", USER), h("m2", "  ", PAGE), h("m1", "hi", USER)], {},
     [u("hi"), u(P + "new?")]),
    ("at-most-max-turns", [h(f"m{i}", f"t{i}", USER if i % 2 else PAGE) for i in range(9, 0, -1)], {"max_turns": 3},
     [a("t8"), u("t9"), u(P + "new?")]),
    ("one-turn-only", [h("m1", "hi", USER)], {"max_turns": 1}, [u(P + "new?")]),
    ("no-mid-postback", [h("m1", "hi", USER)], {"mid": None, "text": "Get Started"},
     [u("hi"), u(P + "Get Started")]),
    ("several-new-messages", [h("m1", "hi", USER)], {"earlier": [("m_a", "first"), ("m_b", "second")]},
     [u("hi"), u("first"), u("second"), u(P + "new?")]),
    ("several-new-indexed-not-repeated",
     [h("m_new", "new?", USER), h("m_b", "second", USER), h("m_a", "first", USER), h("m2", "Sure.", PAGE)],
     {"earlier": [("m_a", "first"), ("m_b", "second")]},
     [a("Sure."), u("first"), u("second"), u(P + "new?")]),
    ("several-new-capped-newest-kept", [h("m1", "hi", USER)],
     {"earlier": [("m_a", "first"), ("m_b", "second")], "max_turns": 2}, [u("second"), u(P + "new?")]),
    ("system-prompt-first", [h("m1", "hi", USER)], {"system_prompt": "You are Bob's Bakery."},
     [{"role": "system", "content": "You are Bob's Bakery."}, u("hi"), u(P + "new?")]),
]


@pytest.mark.parametrize("history, options, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_to_chat_messages(history, options, expected):
    assert convert(history, **options) == expected


def test_always_ends_with_prefixed_user_turn():
    history = [h("m2", "last page reply", PAGE)]
    assert convert(history)[-1] == u(P + "new?")
    assert convert(history)[-2] == a("last page reply")
