"""Parsing recorded deliveries into records: every entry, every event."""
import json

import pytest

from messenger.events import ATTACHMENT, POSTBACK, TEXT, BadPayload, parse_delivery, to_timestamp_ms
from tests.conftest import fixture_bytes


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


@pytest.mark.parametrize("value, expected", [
    (1763893200001, 1763893200001), (1763893200, 1763893200000), (None, 0), ("12", 0), (True, 0),
])
def test_timestamps(value, expected):
    assert to_timestamp_ms(value) == expected


@pytest.mark.parametrize("payload, reason", [
    ([], "JSON object"),
    ({"object": "user", "entry": []}, "object must be 'page'"),
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
], ids=["array", "object-user", "no-object", "no-entry", "entry-object", "entry-strings", "messaging-object",
        "message-string", "no-sender", "no-mid", "attachments-object"])
def test_bad_shapes(payload, reason):
    with pytest.raises(BadPayload, match=reason):
        parse_delivery(payload)
