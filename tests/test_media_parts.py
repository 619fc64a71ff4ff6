"""The pure parts of reading attachments: Meta's shapes into records, durations from headers,
the memory budget, the prompt's image parts."""
import json
import struct
import threading

import pytest

from bot.media.budget import EXPANSION, MemoryBudget
from bot.media.describe import label
from bot.media.duration import audio_seconds
from devtools.emulator.media import mp4_bytes, wav_bytes
from gpt.prompt import to_chat_messages
from messenger.attachments import (AUDIO, IMAGE, LINK, LOCATION, SHARE, STICKER, STORY_REPLY, VIDEO, Attachment,
                                   parse_attachments, to_attachment)
from messenger.events import IncomingMessage, parse_body
from tests.support.audio import mp3_bytes, opus_bytes
from tests.support.messages import FIXTURES, FakeClock


@pytest.mark.parametrize("raw, expected", [
    ({"type": "image", "payload": {"url": "https://cdn/x.jpg"}}, Attachment(IMAGE, url="https://cdn/x.jpg")),
    ({"type": "image", "payload": {"url": "https://cdn/s.png", "sticker_id": 369239263222822}},
     Attachment(STICKER, sticker_id="369239263222822")),
    ({"type": "sticker", "payload": {"url": "https://cdn/s.png", "sticker_id": "42"}}, Attachment(STICKER, sticker_id="42")),
    ({"type": "audio", "payload": {"url": "https://cdn/a.mp4"}}, Attachment(AUDIO, url="https://cdn/a.mp4")),
    ({"type": "video", "payload": {"url": "javascript:alert(1)"}}, Attachment(VIDEO)),
    ({"type": "location", "title": "Home", "payload": {"coordinates": {"lat": 1.5, "long": -2.25}}},
     Attachment(LOCATION, title="Home", latitude=1.5, longitude=-2.25)),
    ({"type": "location", "payload": {"coordinates": {"lat": 91, "long": 0}}}, Attachment(LOCATION)),
    ({"type": "fallback", "title": "Menu", "url": "https://x.test/m", "payload": None},
     Attachment(LINK, url="https://x.test/m", title="Menu")),
    ({"type": "ig_reel", "payload": {"url": "https://ig/r", "title": "cake " * 200}},
     Attachment(SHARE, url="https://ig/r", title=("cake " * 200).strip()[:500])),
    ({"type": "something-new", "payload": {}}, Attachment("other")),
    ({"type": ["not", "a", "string"]}, Attachment("other")),
], ids=["image", "like", "sticker-type", "audio", "bad-url", "location", "bad-coordinates", "fallback", "reel",
        "unknown", "bad-type"])
def test_attachments_in_metas_shapes(raw, expected):
    assert to_attachment(raw) == expected


def test_a_story_reply_is_an_attachment_of_its_own():
    message = {"mid": "m", "text": "love it", "reply_to": {"story": {"url": "https://cdn/story", "id": "1"}}}
    assert parse_attachments(message) == (Attachment(STORY_REPLY, url="https://cdn/story"),)


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("attachment_*.json")))
def test_metas_documented_attachment_bodies_parse_and_survive_the_queue(name):
    [message] = parse_body((FIXTURES / f"{name}.json").read_bytes()).messages
    assert message.attachments, name
    assert IncomingMessage.from_dict(json.loads(json.dumps(message.to_dict()))) == message


def test_labels_in_the_mirror():
    assert label(Attachment(STICKER, sticker_id="369239263222822")) == "[like]"
    assert label(Attachment(STICKER, sticker_id="1")) == "[sticker]"
    assert label(Attachment(AUDIO), "hi there") == "[voice note] hi there"
    assert label(Attachment(IMAGE)) == "[photo]"


@pytest.mark.parametrize("data, seconds", [
    (wav_bytes(2.0), 2.0), (wav_bytes(0.5, rate=8000), 0.5), (mp4_bytes(61.5), 61.5), (b"ID3\x00junk", None),
    (b"RIFF\x00\x00\x00\x00WAVE", None), (b"\x00\x00\x00\x08ftyp", None),
    (b"\x00\x00\x00\x08ftyp" + b"".join(struct.pack(">I4s", 8 * (2000 - n), b"moov") for n in range(2000)), None),
    (mp3_bytes(10.0), 10.0), (mp3_bytes(30.0, kbps=32), 30.0), (mp3_bytes(3.0, claimed_frames=1148), 30.0),
    (mp3_bytes(400.0, claimed_frames=10), 400.0 * 128 / 320), (opus_bytes(42.5), 42.5), (b"OggS" + bytes(100), None),
], ids=["wav", "wav-8k", "mp4", "not-mp3", "truncated-wav", "truncated-mp4", "2000-nested-boxes", "mp3",
        "mp3-32k", "mp3-vbr", "mp3-lying-header", "opus", "damaged-ogg"])
def test_voice_note_length_from_its_header(data, seconds):
    assert audio_seconds(data) == (pytest.approx(seconds, rel=0.01) if seconds is not None else None)


def test_the_memory_budget_makes_a_photo_wait_for_room_and_gives_up_at_the_deadline():
    clock = FakeClock()
    budget = MemoryBudget(10 * EXPANSION, clock=clock)
    held = budget.reserve(8)
    assert held == 8 * EXPANSION
    got = []
    waiter = threading.Thread(target=lambda: got.append(budget.reserve(5)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and got == []  # no room until the first photo is done
    budget.release(held)
    waiter.join(5)
    assert got == [5 * EXPANSION]
    with pytest.raises(TimeoutError):
        budget.reserve(9, deadline=clock() - 1)  # no room, and no time left to wait for it


def test_a_photo_larger_than_the_whole_budget_takes_all_of_it_rather_than_never():
    budget = MemoryBudget(16)
    assert budget.reserve(100) == 16


def test_images_go_after_the_last_turns_text():
    chat = to_chat_messages([], [("m1", "first"), ("m2", "second")], page_id="p", prefix="P: ", max_turns=10,
                            images=["data:image/png;base64,AA=="])
    assert chat == [{"role": "user", "content": "first"},
                    {"role": "user", "content": [{"type": "text", "text": "P: second"},
                                                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]
