"""Property tests for the webhook edge: whatever arrives, the parser returns a Delivery
that storage can hold, or refuses with BadPayload (a 400) - never another exception."""
import dataclasses
import json
import re

from hypothesis import given, settings, strategies as st

from messenger.events import (EARLIEST_MS, MAX_CLOCK_SKEW_MS, MAX_ID_CHARS, MAX_MID_CHARS, BadPayload, Delivery,
                              parse_body, parse_delivery)

NOW = 1_764_000_000_000
PAGE = "1000000000000001"
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
BOUNDED = settings(max_examples=300, deadline=None, derandomize=True)

# -- Strategies: Messenger's shapes, with any field swapped for junk -------------------------------
CHARS = st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr), st.sampled_from("\n\r\x00\x1b\x85"))
TEXTS = st.one_of(st.lists(CHARS, max_size=20).map("".join),
                  st.sampled_from(["", " ", "page", "m_\udfff_x", "\udfff", "2000\n1", PAGE, "x" * 65]))
INTS = st.one_of(st.integers(), st.sampled_from([0, -1, 2 ** 53 + 1, 10 ** 20, 10 ** 64, 10 ** 400, 1763893200]))
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXTS)
KEYS = st.one_of(st.sampled_from(["object", "entry", "messaging", "standby", "sender", "recipient", "id",
                                  "timestamp", "message", "mid", "text", "postback", "title", "is_echo",
                                  "attachments", "type", "app_id", "metadata"]), TEXTS)
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                    max_leaves=20)


def mostly(good, bad=JUNK, odds=12):
    """`good` `odds` times out of odds+1, else `bad`: most deliveries get deep enough to build records."""
    return st.integers(0, odds).flatmap(lambda pick: bad if pick == 0 else good)


GOOD_IDS = st.sampled_from(["2000000000000001", 2000000000000001, PAGE, "m_1"])
# Nearly right ids: a good one with a control character, a surrogate or too many digits added.
BAD_IDS = st.one_of(st.tuples(GOOD_IDS, CHARS).map(lambda pair: f"{pair[0]}{pair[1]}"),
                    st.sampled_from(["2" * 65, 10 ** 64, 10 ** 400, "m_" + "x" * 511, True, 1.5]), TEXTS, INTS, JUNK)
IDS = mostly(GOOD_IDS, BAD_IDS, odds=3)
ENTRY_IDS = mostly(st.sampled_from([PAGE, int(PAGE)]), st.one_of(st.just("999"), IDS))
WORDS = mostly(st.one_of(st.text(min_size=1), TEXTS))  # surrogates in texts are cleaned, not refused
TIMESTAMPS = mostly(st.one_of(st.integers(1_600_000_000_000, NOW), st.integers(1_600_000_000, NOW // 1000)),
                    st.one_of(INTS, FLOATS, JUNK))
ATTACHMENT = st.fixed_dictionaries({"type": mostly(st.sampled_from(["image", "sticker"]), TEXTS)},
                                   optional={"payload": JUNK})
MESSAGE = st.fixed_dictionaries({"mid": IDS}, optional={
    "text": WORDS, "is_echo": mostly(st.booleans()), "attachments": mostly(st.lists(ATTACHMENT, max_size=3)),
    "app_id": IDS, "metadata": WORDS, "quick_reply": st.fixed_dictionaries({"payload": WORDS})})
POSTBACK = st.fixed_dictionaries({"title": WORDS}, optional={"payload": WORDS, "mid": IDS})
PARTY = mostly(st.fixed_dictionaries({"id": IDS}))
WHO = {"sender": PARTY, "recipient": PARTY, "timestamp": TIMESTAMPS}
EVENT = mostly(st.one_of(st.fixed_dictionaries({**WHO, "message": mostly(MESSAGE)}),
                         st.fixed_dictionaries({**WHO, "postback": mostly(POSTBACK)}),
                         st.fixed_dictionaries(WHO, optional={"delivery": JUNK, "read": JUNK})))
ENTRY = st.fixed_dictionaries({"messaging": mostly(st.lists(EVENT, max_size=3))},
                              optional={"id": ENTRY_IDS, "time": TIMESTAMPS,
                                        "standby": mostly(st.lists(EVENT, max_size=2))})
PAYLOAD = mostly(st.fixed_dictionaries({"object": mostly(st.just("page")),
                                        "entry": mostly(st.lists(ENTRY, max_size=3))}))
# Bodies: Meta's ASCII JSON (json.dumps escapes lone surrogates as \udfff, writes NaN and Infinity
# for non-finite floats), hand-written literals JSON forbids, and plain noise.
BODIES = st.one_of(
    PAYLOAD.map(lambda payload: json.dumps(payload).encode()),
    PAYLOAD.map(lambda payload: json.dumps(payload).encode().replace(b"1763893200", b"1e400")),
    st.binary(max_size=200),
    st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b'"', b":", b",", b"1e400", b"-Infinity", b"NaN", b"\\udfff",
                              b'"object"', b'"page"', b'"entry"', b"\xff", b"0"]), max_size=40).map(b"".join),
)


# -- Properties ----------------------------------------------------------------------------------
def assert_storable(delivery: Delivery) -> None:
    assert isinstance(delivery.ignored, int) and delivery.ignored >= 0
    for message in delivery.messages + delivery.watched:
        assert_id(message.psid)
        assert_id(message.page_id)
        assert message.mid is None or assert_id(message.mid, MAX_MID_CHARS)
        assert_time(message.timestamp_ms)
        message.text.encode()
        assert all(isinstance(kind, str) and kind.encode() for kind in message.attachment_types)
        assert_serialisable(message)
    for echo in delivery.echoes:
        assert_id(echo.psid)
        assert_id(echo.mid, MAX_MID_CHARS)
        assert echo.app_id is None or assert_id(echo.app_id)
        assert_time(echo.timestamp_ms)
        echo.text.encode()
        if echo.metadata is not None:
            echo.metadata.encode()  # no lone surrogate
        assert_serialisable(echo)
    for page_id in delivery.foreign_pages:
        assert_id(page_id)


def assert_id(value, max_chars=MAX_ID_CHARS) -> bool:
    assert isinstance(value, str) and 0 < len(value) <= max_chars
    assert not CONTROL.search(value)
    value.encode()
    return True


def assert_time(value) -> None:
    assert type(value) is int and EARLIEST_MS <= value <= NOW + MAX_CLOCK_SKEW_MS


def assert_serialisable(record) -> None:
    fields = dataclasses.asdict(record)
    json.dumps(fields).encode()
    json.dumps(fields, ensure_ascii=False).encode()  # no lone surrogate hiding behind an escape


@BOUNDED
@given(BODIES)
def test_parse_body_returns_a_storable_delivery_or_bad_payload(body):
    try:
        delivery = parse_body(body, now_ms=NOW, accounts={PAGE})
    except BadPayload as refused:
        assert len(str(refused)) < 80  # sent back and logged: a short reason, never the body
        return
    assert_storable(delivery)


@BOUNDED
@given(PAYLOAD, st.sampled_from([None, {PAGE}]))
def test_parse_delivery_returns_a_storable_delivery_or_bad_payload(payload, page_id):
    try:
        delivery = parse_delivery(payload, now_ms=NOW, accounts=page_id)
    except BadPayload:
        return
    assert_storable(delivery)
    if page_id is not None:
        assert PAGE not in delivery.foreign_pages


# A well-formed delivery (Meta's own shape, any text): taken whole. The two properties above hold
# for a parser that refuses everything; this one does not.
USER_IDS = st.integers(10 ** 15, 10 ** 16 - 1).map(str)
WORDS_SAID = st.text(min_size=1, max_size=50).filter(str.strip)  # blank text is no message (events.py)
WELL_FORMED = st.lists(st.tuples(USER_IDS, st.integers(EARLIEST_MS, NOW), WORDS_SAID),
                       min_size=1, max_size=5).map(lambda events: {"object": "page", "entry": [{
                           "id": PAGE, "time": NOW, "messaging": [
                               {"sender": {"id": psid}, "recipient": {"id": PAGE}, "timestamp": at,
                                "message": {"mid": f"m_{n}", "text": text}}
                               for n, (psid, at, text) in enumerate(events)]}]})


@BOUNDED
@given(WELL_FORMED)
def test_a_well_formed_delivery_is_taken_whole(payload):
    delivery = parse_delivery(payload, now_ms=NOW, accounts={PAGE})
    sent = payload["entry"][0]["messaging"]
    assert [(m.psid, m.mid, m.timestamp_ms) for m in delivery.messages] == \
        [(event["sender"]["id"], event["message"]["mid"], event["timestamp"]) for event in sent]
    assert delivery.ignored == 0
    assert_storable(delivery)
