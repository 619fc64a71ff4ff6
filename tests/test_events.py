"""Parsing recorded deliveries into records: every entry, every event."""
import json
import logging
import time

import pytest

from messenger.events import (ATTACHMENT, POSTBACK, TEXT, BadPayload, parse_body, parse_delivery,
                              to_timestamp_ms)
from tests.support import fixture_bytes


def parse(name):
    return parse_delivery(json.loads(fixture_bytes(name)))


@pytest.mark.parametrize("name, kind, text, mid", [
    ("text", TEXT, "What are your opening hours?", "m_text_0001"),
    ("quick_reply", TEXT, "Opening hours", "m_quick_0001"),
    ("postback", POSTBACK, "Get Started", "m_postback_0001"),
    ("image", ATTACHMENT, "", "m_image_0001"),
    ("sticker", ATTACHMENT, "", "m_sticker_0001"),
    ("non_ascii", TEXT, "Bonjour à tous 👋 ça va? 1/2 你好", "m_nonascii_0001"),
])
def test_messages_to_answer(name, kind, text, mid):
    delivery = parse(name)
    assert delivery.ignored == 0
    [message] = delivery.messages
    assert (message.kind, message.text, message.mid) == (kind, text, mid)
    assert message.psid == "2000000000000001"
    assert message.page_id == "1000000000000001"


@pytest.mark.parametrize("name", ["echo", "delivery", "read", "reaction", "standby"])
def test_events_only_watched(name):
    delivery = parse(name)
    assert delivery.messages == ()
    assert delivery.ignored == 1


def test_batch_reads_every_entry_and_event():
    delivery = parse("batch")
    assert [(m.psid, m.mid, m.kind) for m in delivery.messages] == [
        ("2000000000000001", "m_batch_0001", TEXT),
        ("2000000000000002", "m_batch_0002", TEXT),
        ("2000000000000003", "m_batch_0003", POSTBACK),
    ]
    assert delivery.ignored == 1
    # the second message carried its timestamp in seconds
    assert delivery.messages[1].timestamp_ms == 1763893211000


def test_image_attachment_types():
    assert parse("image").messages[0].attachment_types == ("image",)


NOW = 1_764_000_000_000  # 2025-11-24T16:00:00Z, after every fixture
DAY_MS = 24 * 3600 * 1000


@pytest.mark.parametrize("value, expected", [
    (1763893200001, 1763893200001),
    (1763893200, 1763893200000),
    (1763893200001.7, 1763893200001),
    (1763893200.5, 1763893200500),
    (NOW + DAY_MS, NOW + DAY_MS),
    (None, NOW), ("1763893200001", 1763893200001), ("1e3", NOW), (True, NOW), ({}, NOW),
    (100000000000000000000, NOW), (10 ** 400, NOW), (-1, NOW), (0, NOW),
    (1072915199999, NOW), (NOW + DAY_MS + 1, NOW),
    (float("inf"), NOW), (float("-inf"), NOW), (float("nan"), NOW),
], ids=["ms", "seconds", "float-ms", "float-seconds", "a-day-ahead", "missing", "digit-string", "float-string", "bool", "object",
        "1e20", "huge-int", "negative", "zero", "before-2004", "over-a-day-ahead", "inf", "-inf", "nan"])
def test_timestamps(value, expected):
    """A plausible time is kept; anything else becomes the receive time, so storage never overflows."""
    assert to_timestamp_ms(value, NOW) == expected


@pytest.mark.parametrize("payload, reason", [
    ([], "JSON object"),
    ({"object": 5, "entry": []}, "object must be 'page'"),
    ({"entry": []}, "object must be 'page'"),
    ({"object": "page"}, "entry must be a list"),
    ({"object": "page", "entry": {"id": "1"}}, "entry must be a list"),
    ({"object": "page", "entry": ["x"]}, "entry must be a list"),
    ({"object": "page", "entry": [{"messaging": {}}]}, "messaging must be a list"),
    ({"object": "page", "entry": [{"messaging": [{"message": "hi"}]}]}, "message must be an object"),
    ({"object": "page", "entry": [{"messaging": [{"message": {"mid": "m1", "text": "hi"}}]}]}, "sender.id"),
    ({"object": "page", "entry": [{"messaging": [{"sender": {"id": "1"}, "recipient": {"id": "2"},
                                                  "message": {"text": "hi"}}]}]}, "mid"),
    ({"object": "page", "entry": [{"messaging": [{"sender": {"id": "1"}, "recipient": {"id": "2"},
                                                  "message": {"mid": "m", "attachments": {}}}]}]}, "attachments"),
], ids=["array", "object-number", "no-object", "no-entry", "entry-object", "entry-strings", "messaging-object",
        "message-string", "no-sender", "no-mid", "attachments-object"])
def test_bad_shapes(payload, reason):
    with pytest.raises(BadPayload, match=reason):
        parse_delivery(payload)


def test_a_malformed_event_is_skipped_and_counted_when_others_are_usable():
    good = {"sender": {"id": "1"}, "recipient": {"id": "2"}, "message": {"mid": "m1", "text": "hi"}}
    no_mid = {"sender": {"id": "3"}, "recipient": {"id": "2"}, "message": {"text": "hi"}}
    read = {"sender": {"id": "3"}, "recipient": {"id": "2"}, "read": {"watermark": 1}}
    delivery = parse_delivery({"object": "page", "entry": [{"messaging": [no_mid, good]}]})
    assert [m.mid for m in delivery.messages] == ["m1"] and delivery.ignored == 1
    delivery = parse_delivery({"object": "page", "entry": [{"messaging": [read, no_mid]}]})
    assert delivery.messages == () and delivery.ignored == 2  # the read is usable: not refused
    with pytest.raises(BadPayload, match="mid"):
        parse_delivery({"object": "page", "entry": [{"messaging": [no_mid]}, {"messaging": [no_mid]}]})


def test_standby_events_are_watched_never_answered():
    """A thread another app owns (the Page inbox): the user's message is watched, a person's
    echo and a handback are kept as from `messaging`."""
    user = {"sender": {"id": "1"}, "recipient": {"id": "2"}, "message": {"mid": "m1", "text": "anyone?"}}
    person = {"sender": {"id": "2"}, "recipient": {"id": "1"}, "timestamp": 1763893200001,
              "message": {"mid": "m2", "is_echo": True, "app_id": 263902037430900, "text": "Ana here"}}
    no_mid = {"sender": {"id": "1"}, "recipient": {"id": "2"}, "message": {"text": "no mid"}}
    delivery = parse_delivery({"object": "page", "entry": [{"id": "2", "standby": [user, person, no_mid]}]})
    assert delivery.messages == () and [m.mid for m in delivery.watched] == ["m1"]
    assert [e.mid for e in delivery.echoes] == ["m2"] and delivery.ignored == 3  # a bad one there refuses nothing


# -- Validation at the edge (issue 9) -----------------------------------------------------------
PAGE = "1000000000000001"
PSID = "2000000000000001"


def event(psid=PSID, mid="m_1", text="hi", timestamp=1763893200001, **message):
    return {"sender": {"id": psid}, "recipient": {"id": PAGE}, "timestamp": timestamp,
            "message": {"mid": mid, "text": text, **message}}


def echo(app_id=263902037430900, mid="m_echo", text="from the inbox", **message):
    return {"sender": {"id": PAGE}, "recipient": {"id": PSID}, "timestamp": 1763893200001,
            "message": {"mid": mid, "is_echo": True, "app_id": app_id, "text": text, **message}}


def body(*events, entry_id=PAGE):
    return {"object": "page", "entry": [{"id": entry_id, "time": 1763893200001, "messaging": list(events)}]}


def parse_events(*events, **kwargs):
    return parse_delivery(body(*events), now_ms=NOW, **kwargs)


@pytest.mark.parametrize("bad_event, shown", [
    (event(mid="m_\udfff_x"), "'m_\\udfff_x'"),
    (event(psid="2000\udfff"), "'2000\\udfff'"),
    (event(psid="2000\nINFO forged"), "'2000\\nINFO forged'"),
    (event(psid="2000\x00\x00"), "'2000\\x00\\x00'"),
    (event(psid="9" * 65), "'" + "9" * 32 + "'..."),
    (event(psid=10 ** 70), "<int of 233 bits>"),
    (event(psid=10 ** 5000), "<int of 16610 bits>"),
    (event(psid=True), "True"),
    (event(psid=2.5), "2.5"),
    (event(psid={"id": 1}), "<dict>"),
    (event(mid="m_" + "x" * 511), "..."),
    ({**event(), "recipient": {"id": "1\u0085"}}, "'1\\x85'"),
    ({"sender": {"id": PSID}, "recipient": {"id": PAGE}, "postback": {"title": "Go", "mid": "\ud800"}}, "ud800"),
], ids=["mid-surrogate", "psid-surrogate", "psid-newline", "psid-nul", "psid-65-chars", "psid-huge-int",
        "psid-int-over-4300-digits", "psid-bool", "psid-float", "psid-object", "mid-513-chars",
        "recipient-c1-control",
        "postback-mid-surrogate"])
def test_an_event_with_an_unsafe_id_is_ignored_and_logged_escaped(caplog, bad_event, shown):
    """Never a 400 for the batch: the other events are still answered; the log shows the value escaped."""
    with caplog.at_level(logging.WARNING, logger="messenger.events"):
        delivery = parse_events(bad_event, event(mid="m_good"))
    assert [m.mid for m in delivery.messages] == ["m_good"]
    assert delivery.ignored == 1
    [record] = caplog.records
    assert record.levelno == logging.WARNING and shown in record.getMessage()
    assert "\n" not in record.getMessage() and "\x00" not in record.getMessage()
    record.getMessage().encode()  # no lone surrogate in the log line
    assert len(record.getMessage()) < 200


def test_one_warning_per_event_even_with_several_bad_ids(caplog):
    with caplog.at_level(logging.WARNING, logger="messenger.events"):
        delivery = parse_events(event(psid="\udfff", mid="\udfff"))
    assert delivery.ignored == 1 and len(caplog.records) == 1


def test_ids_may_be_integers_and_arrive_as_strings():
    payload = {"object": "page", "entry": [{"id": int(PAGE), "messaging": [
        {"sender": {"id": int(PSID)}, "recipient": {"id": int(PAGE)}, "timestamp": 1763893200001,
         "message": {"mid": "m_1", "text": "hi"}}, echo(app_id=2 ** 53 + 1)]}]}
    delivery = parse_delivery(payload, now_ms=NOW, accounts={PAGE})
    [message] = delivery.messages
    assert (message.psid, message.page_id) == (PSID, PAGE)
    assert delivery.echoes[0].app_id == "9007199254740993"  # above 2**53: exact, not rounded


def test_real_length_mids_are_kept():
    messenger = "m_dUbr3n22bB5lu3yw12_U1AE_CMJRAw0ScbMqUb2EAOjmxmRMyKgip04DehusAun1K57iI4JUil3XkDzOcuZi7w"
    instagram = "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQxNDc2MjYzMTIwNzk5OjM0MDI4MjM2Njg0MTcxMDMwMTI0NDI1" * 2
    delivery = parse_events(event(mid=messenger), event(mid=instagram))
    assert [m.mid for m in delivery.messages] == [messenger, instagram]


def test_an_echo_with_an_unsafe_app_id_is_dropped():
    delivery = parse_events(echo(app_id="263902037430900\n"), echo(mid="m_echo_2"))
    assert [e.mid for e in delivery.echoes] == ["m_echo_2"]
    assert delivery.ignored == 2  # echoes are counted as ignored either way


def test_lone_surrogates_in_texts_become_replacement_characters():
    postback = {"sender": {"id": PSID}, "recipient": {"id": PAGE}, "timestamp": 1763893200001,
                "postback": {"title": "Go \udfff", "payload": "GO", "mid": "m_pb"}}
    attachment = event(mid="m_att", text=None, attachments=[{"type": "im\ud800age"}, {"type": 7}, {"type": " "}])
    delivery = parse_events(event(text="hi \udfff"), postback, attachment,
                            echo(text="by hand \ud800", metadata="meta\udc00"))
    assert [m.text for m in delivery.messages] == ["hi \ufffd", "Go \ufffd", ""]
    assert delivery.messages[2].attachment_types == ("im\ufffdage", "unknown", "unknown")
    [sent] = delivery.echoes
    assert (sent.text, sent.metadata) == ("by hand \ufffd", "meta\ufffd")


@pytest.mark.parametrize("timestamp, expected", [
    (1763893200001, 1763893200001), (100000000000000000000, NOW), (None, NOW), ("soon", NOW),
], ids=["kept", "1e20", "missing", "string"])
def test_event_timestamps_fall_back_to_the_receive_time(timestamp, expected):
    [message] = parse_events(event(timestamp=timestamp)).messages
    assert message.timestamp_ms == expected


def test_now_defaults_to_the_current_time():
    before = int(time.time() * 1000)
    [message] = parse_delivery(body(event(timestamp=None))).messages
    assert before <= message.timestamp_ms <= int(time.time() * 1000)


def test_entries_of_other_pages_are_ignored_and_reported():
    payload = {"object": "page", "entry": [
        {"id": "999", "messaging": [event(mid="m_foreign_1"), event(mid="m_foreign_2")]},
        {"id": 999, "messaging": [event(mid="m_foreign_3")], "standby": [event(mid="m_standby")]},
        {"id": "998", "messaging": [event(mid="m_foreign_4")]},
        {"id": PAGE, "messaging": [event(mid="m_ours")]},
    ]}
    delivery = parse_delivery(payload, now_ms=NOW, accounts={PAGE})
    assert [m.mid for m in delivery.messages] == ["m_ours"]
    assert delivery.foreign_pages == ("999", "998")
    assert delivery.ignored == 5
    # Without a page_id every entry is read, as before.
    unfiltered = parse_delivery(payload, now_ms=NOW)
    assert len(unfiltered.messages) == 5 and unfiltered.foreign_pages == ()


def test_an_entry_with_an_unsafe_id_is_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="messenger.events"):
        delivery = parse_delivery(body(event(), entry_id="1\udfff"), now_ms=NOW, accounts={PAGE})
    assert delivery.messages == () and delivery.ignored == 1 and delivery.foreign_pages == ()
    assert "entry.id" in caplog.text


# -- parse_body: the raw bytes --------------------------------------------------------------------
def test_parse_body_reads_a_recorded_delivery():
    assert parse_body(fixture_bytes("batch"), now_ms=NOW, accounts={PAGE}) == parse("batch")


@pytest.mark.parametrize("raw", [
    b'{"object":"page","entry":[{"messaging":[{"timestamp":1e400}]}]}',
    b'{"object":"page","entry":[{"messaging":[{"timestamp":-1e400}]}]}',
    b'{"object":"page","entry":[{"messaging":[{"timestamp":Infinity}]}]}',
    b'{"object":"page","entry":[{"messaging":[{"timestamp":-Infinity}]}]}',
    b'{"object":"page","entry":[{"messaging":[{"timestamp":NaN}]}]}',
    b'{"object":"page","entry":[{"messaging":[{"timestamp":1' + b"0" * 5000 + b'}]}]}',
    b'{"object":"page","entry":[{"id":"\xff"}]}',
    b'\xef\xbb\xbf{"object":"page","entry":[]}',
    b"[" * 100_000 + b"]" * 100_000,
    b"",
], ids=["1e400", "-1e400", "Infinity", "-Infinity", "NaN", "5000-digit-int", "invalid-utf8", "utf8-bom",
        "deeply-nested", "empty"])
def test_parse_body_refuses_what_json_cannot_hold(raw):
    with pytest.raises(BadPayload, match="not valid JSON") as refused:
        parse_body(raw, now_ms=NOW)
    assert len(str(refused.value)) < 80  # the reason is sent back and logged: never the body


def test_parse_body_keeps_the_attack_bodies_of_issue_9_out_of_storage():
    raw = json.dumps(body(event(mid="m_\udfff_x"), event(psid="\udfff"), event(psid="1\n2"),
                          event(mid="m_ok", timestamp=100000000000000000000))).encode()
    assert b"\\udfff" in raw  # the JSON escape, as the tester sent it
    delivery = parse_body(raw, now_ms=NOW, accounts={PAGE})
    [message] = delivery.messages
    assert (message.mid, message.timestamp_ms) == ("m_ok", NOW)
    assert delivery.ignored == 3


def test_an_instagram_unsend_is_a_touch_on_its_mid_and_never_a_message_to_answer():
    from messenger.events import UNSEND

    unsent = {"sender": {"id": "3000000000000001"}, "recipient": {"id": "17841400000000001"}, "timestamp": 1763894010001,
              "message": {"mid": "ig_m_text_0001", "is_deleted": True}}
    no_mid = {**unsent, "message": {"is_deleted": True}}
    delivery = parse_delivery({"object": "instagram", "entry": [{"id": "17841400000000001", "messaging": [unsent, no_mid]}]})
    assert delivery.messages == () and delivery.ignored == 2
    assert [(t.kind, t.psid, t.mid, t.value) for t in delivery.touches] == [
        (UNSEND, "3000000000000001", "ig_m_text_0001", "")]
