"""Photos, voice notes, stickers, locations and links (bot/media/), end to end over real HTTP:
the emulator's CDN serves the bytes, the stand-in model sees the image parts and transcribes."""
import base64
import json
import logging
import time

import pytest
from werkzeug.wrappers import Response

from bot.media.budget import MemoryBudget
from bot.media.download import Downloader, MediaError, allowed_for, anywhere, public
from bot.media.prepare import MediaReader, MediaSettings
from devtools.emulator import LocalServer, webhooks
from devtools.emulator.media import png_bytes, wav_bytes
from devtools.emulator.model import offline_reply
from messenger.attachments import IMAGE, Attachment
from messenger.events import ATTACHMENT, IncomingMessage
from tests.support import PAGE_ID, PSID, answer_queue, post_signed
from tests.support.messages import TickingClock, Trickle
from tests.support.audio import mp3_bytes, opus_bytes

PREFIX = "Answer polite and concisely in a single sentence : "
QUESTION = "What can you tell me about this picture?"


def send(client, mid, attachments=(), text="", reply_to=None, answer=True):
    """User PSID sends `attachments` (with a caption or not); the bot answers unless told not to yet."""
    event = webhooks.user_event(PAGE_ID, PSID, mid, text=text, attachments=list(attachments), reply_to=reply_to)
    assert post_signed(client, webhooks.delivery_body(PAGE_ID, [event])).status_code == 200
    if answer:
        answer_queue(client)


def photo(graph, data=None, content_type="image/png", **serving):
    return webhooks.image_attachment(graph.add_attachment(data or png_bytes(64, 48), content_type, **serving))


def voice(graph, data=None, content_type="audio/wav"):
    return webhooks.audio_attachment(graph.add_attachment(data or wav_bytes(2.0), content_type, name="audioclip"))


def last_turn(model, index=-1):
    return model.requests[index]["json"]["messages"][-1]


def images_in(turn):
    return [part["image_url"]["url"] for part in turn["content"] if part["type"] == "image_url"]


def log(client):
    return list(client.application.extensions["dispatcher"].store.conversations.export())


def data_url(data, content_type="image/png"):
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


# -- 1. photos ----------------------------------------------------------------------------------
def test_a_photo_alone_reaches_the_model_as_a_data_url_with_the_default_question(client, graph, model):
    model.reply = offline_reply  # says what it received
    image = png_bytes(64, 48)
    send(client, "m_photo", [photo(graph, image)])
    turn = last_turn(model)
    assert turn["content"][0] == {"type": "text", "text": PREFIX + QUESTION}
    assert images_in(turn) == [data_url(image)]
    [reply] = graph.sent_texts(PSID)
    assert "1 image (64\u00d748 PNG" in reply  # what the stand-in saw in the bytes it got
    [fetch] = graph.attachment_fetches
    assert fetch.status == 200 and not fetch.had_token  # the Page token never goes to the CDN


def test_a_photo_with_words_asks_the_words(client, graph, model):
    send(client, "m_photo", [photo(graph)], text="Is this cake gluten free?")
    turn = last_turn(model)
    assert turn["content"][0]["text"] == PREFIX + "Is this cake gluten free?"
    assert len(images_in(turn)) == 1


def test_several_photos_and_messages_merge_into_one_call(client, graph, model):
    first, second, third = png_bytes(10, 10), png_bytes(20, 20), png_bytes(30, 30)
    send(client, "m_1", [photo(graph, first), photo(graph, second)], answer=False)
    send(client, "m_2", [photo(graph, third)], text="Which one is freshest?", answer=False)
    answer_queue(client)
    [request] = model.requests
    turn = request["json"]["messages"][-1]
    assert turn["content"][0]["text"] == PREFIX + "Which one is freshest?"
    assert images_in(turn) == [data_url(first), data_url(second), data_url(third)]
    assert len(graph.sent_texts(PSID)) == 1


def test_a_model_without_vision_is_detected_once_and_photos_get_the_unsupported_reply(
        client, graph, model, caplog):
    model.vision = False
    send(client, "m_1", [photo(graph)])
    assert graph.sent_texts(PSID) == ["Sorry, I can only read text messages for now. Could you type your question?"]
    calls = len(model.requests)
    assert calls == 1  # the refused call; not the fallback's "please try again later"
    send(client, "m_2", [photo(graph)])
    assert len(model.requests) == calls  # known now: no call, no fetch
    assert len(graph.attachment_fetches) == 1
    send(client, "m_3", [photo(graph)], text="What about this?")
    turn = last_turn(model)  # words are still answered, with a note
    assert turn["content"].startswith(PREFIX + "What about this?") and "photo, which you cannot see" in turn["content"]
    refusals = [r for r in caplog.records if "refused image input" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING


def test_the_refused_photo_with_words_is_answered_at_once_without_it(client, graph, model):
    model.vision, model.echo = False, True
    send(client, "m_1", [photo(graph)], text="Do you sell this?")
    assert len(model.requests) == 2 and isinstance(last_turn(model)["content"], str)  # asked again, words only
    assert graph.sent_texts(PSID) == ["re: Do you sell this?\n[The user also sent a photo, which you cannot see]"]


# -- 2. voice notes -----------------------------------------------------------------------------
def test_a_voice_note_is_transcribed_and_answered_as_if_typed(make_client, graph, model):
    client = make_client(TRANSCRIBE_MODEL="whisper-large-v3")
    model.transcripts.append("What time do you open on Sunday?")
    send(client, "m_voice", [voice(graph)])
    [upload] = model.transcriptions
    assert upload.model == "whisper-large-v3" and upload.content_type == "audio/wav" and upload.filename.endswith(".wav")
    assert last_turn(model)["content"] == PREFIX + "What time do you open on Sunday?"
    [record] = log(client)
    assert record["user_message"] == "[voice note] What time do you open on Sunday?"
    assert json.loads(record["attachments"]) == [["audio", len(wav_bytes(2.0)), "transcribed"]]


@pytest.mark.parametrize("data, content_type", [
    (wav_bytes(2.0), "audio/wav"), (mp3_bytes(2.0), "audio/mpeg"), (opus_bytes(2.0), "audio/ogg"),
], ids=["wav", "mp3", "opus"])
def test_a_voice_note_over_the_length_limit_gets_a_polite_reply_and_no_transcription(make_client, graph, model,
                                                                                     data, content_type):
    client = make_client(VOICE_MAX_LENGTH="1s")
    send(client, "m_voice", [voice(graph, data, content_type)])
    assert model.transcriptions == [] and model.requests == []
    assert graph.sent_texts(PSID) == ["Sorry, that is too large for me. Could you send something shorter or smaller, "
                                      "or type your question?"]
    assert json.loads(log(client)[0]["attachments"])[0][2] == "too_long"


def test_a_failing_transcription_is_retried_then_gets_its_own_reply(make_client, graph, model, tmp_path):
    from devtools.emulator import json_response
    client = make_client(OPENAI_MAX_RETRIES="1")
    for _ in range(2):
        model.scripted_transcriptions.append(json_response({"error": {"message": "overloaded"}}, 503))
    send(client, "m_voice", [voice(graph)])
    assert len(model.transcriptions) == 2  # one retry, as for chat
    assert graph.sent_texts(PSID) == ["Sorry, I could not make out your voice message. Could you type it?"]
    errors = (tmp_path / "openai_api_errors.log").read_text()
    assert "transcription failed: InternalServerError status=503" in errors and "attempts=2" in errors


# -- 3. history ---------------------------------------------------------------------------------
def test_earlier_photos_and_voice_notes_come_back_as_words_not_images(client, graph, model):
    send(client, "m_1", [photo(graph)], text="Look at this")
    model.transcripts.append("and how much is it")
    send(client, "m_2", [voice(graph)])
    send(client, "m_3", text="Thanks!")
    messages = model.requests[-1]["json"]["messages"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users[:2] == ["[photo] Look at this", "[voice note] and how much is it"]
    assert all(isinstance(content, str) for content in users)  # no image part is sent again


# -- 4. stickers --------------------------------------------------------------------------------
def test_a_sticker_gets_the_sticker_reply_when_one_is_set(make_client, graph, model):
    client = make_client(STICKER_REPLY="\U0001f44d")
    url = graph.add_attachment(png_bytes(8, 8), "image/png")
    send(client, "m_like", webhooks.sticker_attachments(url))
    assert graph.sent_texts(PSID) == ["\U0001f44d"] and model.requests == []
    assert graph.attachment_fetches == []  # a sticker is never downloaded
    assert log(client)[0]["outcome"] == "sticker"


def test_a_sticker_with_words_answers_the_words(client, graph, model):
    url = graph.add_attachment(png_bytes(8, 8), "image/png")
    send(client, "m_1", [webhooks.sticker_attachment(url, sticker_id=1234)], text="hello")
    assert last_turn(model)["content"] == PREFIX + "hello"


# -- 5. everything else with something to work with ----------------------------------------------
@pytest.mark.parametrize("attachment, reply_to, expected", [
    (webhooks.location_attachment(48.8584, 2.2945, "Eiffel Tower"), None,
     "[The user shared a location: 48.85840, 2.29450 (Eiffel Tower)]"),
    (webhooks.fallback_attachment("Our menu", "https://example.com/menu"), None,
     "[The user shared a link: Our menu - https://example.com/menu]"),
    (webhooks.share_attachment("https://facebook.com/p/1", "New cakes this week"), None,
     "[The user shared a post: New cakes this week - https://facebook.com/p/1]"),
    (None, webhooks.story_reply("https://cdn.example/story.jpg", "1789"), "[The user is replying to the Page's story]"),
], ids=["location", "link", "share", "story-reply"])
def test_described_attachments_go_into_the_prompt(client, graph, model, attachment, reply_to, expected):
    send(client, "m_1", [attachment] if attachment else [], text="is this right?", reply_to=reply_to)
    assert last_turn(model)["content"] == PREFIX + expected + "\nis this right?"
    assert graph.attachment_fetches == []


def test_a_video_alone_is_unsupported_and_with_a_caption_the_caption_is_answered(client, graph, model):
    url = graph.add_attachment(b"\x00" * 100, "video/mp4")
    send(client, "m_1", [webhooks.video_attachment(url)])
    assert graph.sent_texts(PSID) == ["Sorry, I can only read text messages for now. Could you type your question?"]
    assert model.requests == [] and graph.attachment_fetches == []
    send(client, "m_2", [webhooks.file_attachment(url)], text="here is my order")
    assert last_turn(model)["content"] == PREFIX + "here is my order\n[The user also sent a file, which you cannot see]"


# -- 6. failures --------------------------------------------------------------------------------
OPEN_FAILED = "Sorry, I could not open that. Could you send it again, or type your question?"
TOO_LARGE = "Sorry, that is too large for me. Could you send something shorter or smaller, or type your question?"


@pytest.mark.parametrize("settings, make, reply, reason", [
    ({"IMAGE_MAX_MB": "0.01"}, lambda g: photo(g, png_bytes(200, 200, noise=True)), TOO_LARGE, "too_large"),
    ({"MEDIA_TIMEOUT": "0.5"}, lambda g: photo(g, png_bytes(100, 100, noise=True), chunk_delay=0.3), OPEN_FAILED,
     "too_slow"),
    ({}, lambda g: photo(g, b"<html>login</html>", "text/html"), OPEN_FAILED, "wrong_type"),
    ({}, lambda g: photo(g, redirects=5), OPEN_FAILED, "unreachable"),
    ({}, lambda g: photo(g, b"notanimage" * 10, "image/jpeg"), OPEN_FAILED, "wrong_type"),
], ids=["too-large", "too-slow", "wrong-type", "redirect-loop", "not-an-image"])
def test_a_photo_that_cannot_be_fetched_gets_a_clear_reply_and_one_log_line(
        make_client, graph, model, caplog, settings, make, reply, reason):
    client = make_client(**settings)
    send(client, "m_1", [make(graph)])
    assert graph.sent_texts(PSID) == [reply] and model.requests == []
    [line] = [r.getMessage() for r in caplog.records if "was not used" in r.getMessage()]
    assert reason in line and "_nc_sig" not in line and "cdn" not in line  # the signed URL is never logged
    [record] = log(client)
    assert record["outcome"] == "media-failed" and json.loads(record["attachments"])[0][2] == reason


def test_an_expired_photo_url_gets_a_clear_reply(client, graph, model):
    attachment = photo(graph)
    graph.expire_attachments()
    send(client, "m_1", [attachment])
    assert graph.sent_texts(PSID) == [OPEN_FAILED]
    assert [f.status for f in graph.attachment_fetches] == [403]  # not retried: expired stays expired


def test_a_photo_behind_two_redirects_is_fetched(client, graph, model):
    send(client, "m_1", [photo(graph, redirects=2)])
    assert len(images_in(last_turn(model))) == 1


def test_an_unreachable_photo_is_tried_once_more_and_an_expired_one_is_not(client, graph, model):
    send(client, "m_1", [photo(graph, redirects=9)])  # followed 3 hops each time: unreachable
    assert len(graph.attachment_fetches) == 2 * 4  # (1 + 3 redirects) per try, two tries


def test_a_failed_photo_next_to_words_is_mentioned_and_the_words_answered(client, graph, model):
    attachment = photo(graph)
    graph.expire_attachments()
    send(client, "m_1", [attachment], text="see the photo")
    assert last_turn(model)["content"] == PREFIX + "see the photo\n[The user also sent a photo, which could not be opened]"


def test_bytes_that_are_no_image_next_to_words_are_a_photo_not_opened_and_the_words_answered(client, graph, model):
    """Found by a probe: they went to the model, which refused the whole turn (400), and the
    user's question got the fallback."""
    send(client, "m_1", [photo(graph, b"notanimage" * 10, "image/jpeg"), photo(graph)], text="What time do you open?")
    turn = last_turn(model)
    assert turn["content"][0]["text"] == PREFIX + "What time do you open?\n[The user also sent a photo, which could " \
                                                  "not be opened]"
    assert images_in(turn) == [data_url(png_bytes(64, 48))]
    assert log(client)[0]["outcome"] == "answered"


# -- 7. accounting --------------------------------------------------------------------------------
def test_photo_and_voice_tokens_count_toward_the_daily_budget(make_client, graph, model):
    client = make_client(DAILY_TOKEN_BUDGET="1000")
    send(client, "m_1", [photo(graph), photo(graph)])
    model.transcripts.append("hello there")
    send(client, "m_2", [voice(graph, wav_bytes(3.0))])
    first, second = log(client)
    assert first["prompt_tokens"] == 10 + 2 * 85  # the stand-in counts 85 tokens an image
    assert json.loads(first["attachments"]) == [["image", len(png_bytes(64, 48)), "read"]] * 2
    # the transcription's own tokens (the stand-in: 10 a second of audio in, words out) are added
    assert second["total_tokens"] == 15 + 30 + 2
    conversations = client.application.extensions["dispatcher"].store.conversations
    assert conversations.tokens_since(PSID, 0) == first["total_tokens"] + second["total_tokens"]


def test_attachments_are_counted_by_kind_and_outcome(client, graph, model):
    send(client, "m_1", [photo(graph)])
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'messenger_attachments_total{kind="image",outcome="read"}' in metrics


def test_a_body_trickled_a_byte_at_a_time_is_cut_at_the_fetchs_time_limit():
    """Each read gets a byte and none times out: only a clock looked at after every read sees the
    time limit pass (here a clock moving 0.25 s a reading, against a 1 s limit)."""
    server = Trickle("image/png").start()
    try:
        with pytest.raises(MediaError) as refused:
            Downloader(timeout=1.0, clock=TickingClock(0.25), allows=anywhere).fetch(server.url + "/photo.png", lambda kind: True,
                                                                   10_000)
        assert refused.value.reason == "too_slow" and server.sent < 10  # of 400: cut after a few reads
    finally:
        server.stop()


class Recorder(LocalServer):
    def __init__(self):
        super().__init__()
        self.encodings = []

    def handle(self, request):
        self.encodings.append(request.headers.get("Accept-Encoding"))
        return Response(png_bytes(4, 4), headers={"Content-Type": "image/png"})


def test_the_bytes_are_asked_for_as_sent_so_their_length_is_the_memory_they_take():
    """A gzip body's Content-Length would reserve a fraction of the memory it unpacks to."""
    server = Recorder().start()
    try:
        assert Downloader(allows=anywhere).fetch(server.url + "/photo.png", lambda kind: True, 10_000).data == png_bytes(4, 4)
        assert server.encodings == ["identity"]
    finally:
        server.stop()


class DropsOnce(LocalServer):
    """Photos; /b.png's first download is cut off mid-body (the CDN unreachable for a moment)."""

    def __init__(self):
        super().__init__()
        self.tries = 0

    def handle(self, request):
        data = png_bytes(64, 64, noise=True)
        if request.path == "/b.png":
            self.tries += 1
            if self.tries == 1:
                def cut():
                    yield data[:100]
                    raise ConnectionResetError("cut off")
                return Response(cut(), headers={"Content-Type": "image/png", "Content-Length": str(len(data))})
        return Response(data, headers={"Content-Type": "image/png"})


def test_a_photo_fetched_again_keeps_the_memory_the_batchs_other_photos_hold():
    server = DropsOnce().start()
    budget = MemoryBudget(64 * 1024 * 1024)
    settings = MediaSettings(unsupported_reply="u", media_error_reply="e", too_large_reply="l", voice_error_reply="v",
                             sticker_reply="", default_question="?")
    reader = MediaReader(settings, Downloader(allows=anywhere), transcriber=None, budget=budget)

    def message(mid, path):
        return IncomingMessage(psid=PSID, page_id=PAGE_ID, mid=mid, kind=ATTACHMENT, text="", timestamp_ms=1,
                               attachment_types=(IMAGE,), attachments=(Attachment(IMAGE, url=server.url + path),))
    try:
        one = reader.prepare([message("m0", "/a.png")], None)
        single = budget.held
        one.release()
        both = reader.prepare([message("m1", "/a.png"), message("m2", "/b.png")], None)
        assert len(both.images) == 2 and server.tries == 2
        assert budget.held == 2 * single  # the retry gave back its own failed reservation only
        both.release()
        assert budget.held == 0
    finally:
        server.stop()


class Photos(LocalServer):
    """Three photos of 100 KB, each with its length."""

    def handle(self, request):
        return Response(png_bytes(64, 48) + b"\0" * 100_000, headers={"Content-Type": "image/png"})


def test_a_photo_that_cannot_fit_beside_its_own_batchs_others_fails_at_once_not_at_the_deadline():
    """Found by a probe: three big photos in one message, more than MEDIA_MEMORY_MB together - the
    third waited for memory only its own batch held, until the reply's deadline (17 s), while
    every other user's photos and voice notes waited behind it."""
    server = Photos().start()
    budget = MemoryBudget(1_000_000)  # two of them (4 x 100 KB each) fit, three do not
    settings = MediaSettings(unsupported_reply="u", media_error_reply="e", too_large_reply="l", voice_error_reply="v",
                             sticker_reply="", default_question="?")
    reader = MediaReader(settings, Downloader(allows=anywhere), transcriber=None, budget=budget)
    photos = tuple(Attachment(IMAGE, url=f"{server.url}/{n}.png") for n in range(3))
    message = IncomingMessage(psid=PSID, page_id=PAGE_ID, mid="m1", kind=ATTACHMENT, text="look", timestamp_ms=1,
                              attachment_types=(IMAGE,) * 3, attachments=photos)
    try:
        started = time.monotonic()
        prepared = reader.prepare([message], time.monotonic() + 30)
        assert time.monotonic() - started < 5
        assert len(prepared.images) == 2 and [fact.outcome for fact in prepared.facts] == ["read", "read", "no_memory"]
        prepared.release()
        assert budget.held == 0
    finally:
        server.stop()


class Internal(LocalServer):
    """Something on this host's own network: it counts who reached it."""

    def __init__(self, redirect_to: str | None = None):
        super().__init__()
        self.redirect_to, self.requests = redirect_to, []

    def handle(self, request):
        self.requests.append(dict(request.headers))
        if self.redirect_to:
            return Response("", 302, {"Location": self.redirect_to})
        return Response(png_bytes(4, 4), headers={"Content-Type": "image/png"})


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.10", False), ("169.254.169.254", False),
    ("100.64.0.1", False), ("0.0.0.0", False), ("::1", False), ("fe80::1%eth0", False), ("fd00::1", False),
    ("::ffff:127.0.0.1", False), ("224.0.0.1", False), ("157.240.1.35", True), ("2a03:2880:f10c::1", True),
    ("64:ff9b::a00:1", False), ("64:ff9b::9df0:123", True), ("2002:a00:1::1", False), ("::10.0.0.1", False),
    ("fec0::1", False), ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", False), ("64:ff9b:1::a00:1", False),
    ("::ffff:0:a00:1", False), ("::ffff:0:9df0:123", True),
], ids=lambda value: str(value))
def test_attachments_come_only_from_public_addresses(address, expected):
    assert public(address, 443) is expected


@pytest.mark.parametrize("graph_url, expected", [
    ("https://graph.facebook.com/v21.0", public), ("http://127.0.0.1:8001", anywhere),
    ("http://localhost:8001/", anywhere), ("http://[::1]:8001", anywhere), ("https://192.168.1.5", anywhere),
    ("https://graph.example.org", public), ("http://graph-emulator:8001", anywhere),
    ("http://emulator.internal:8001", anywhere), ("http://GRAPH.local", anywhere),
])
def test_attachments_may_come_from_this_hosts_network_only_when_graph_does(graph_url, expected):
    assert allowed_for(graph_url) is expected


def test_a_link_or_a_redirect_to_this_hosts_own_network_is_never_fetched():
    """Found by a probe: a signed webhook's photo link (or a redirect) to 127.0.0.1 was fetched and
    its bytes went to the model. Each hop is checked before its request."""
    inside = Internal().start()
    gateway = Internal(redirect_to=inside.url + "/secret.png").start()
    try:
        with pytest.raises(MediaError, match="not_public"):
            Downloader().fetch(inside.url + "/secret.png", lambda kind: True, 10_000)
        only_the_gateway = Downloader(allows=lambda address, port: port == gateway.port)
        with pytest.raises(MediaError, match="not_public"):
            only_the_gateway.fetch(gateway.url + "/photo.png", lambda kind: True, 10_000)
        assert len(gateway.requests) == 1 and inside.requests == []
        with pytest.raises(MediaError, match="not_public: a link with a user name"):
            Downloader(allows=anywhere).fetch(inside.url.replace("://", "://u:p@") + "/x.png", lambda kind: True,
                                              10_000)
        assert inside.requests == []
    finally:
        inside.stop()
        gateway.stop()


def test_the_address_a_connection_reached_is_what_counts_not_the_name():
    """A name is looked at by the address its connection reached, before a byte is sent: a name
    that resolved to the internet for a check and to this host for the connection (DNS
    rebinding) would be no way round it."""
    inside = Internal().start()
    looks = []

    def refuse_and_note(address, port):
        looks.append((address, port))
        return False
    try:
        with pytest.raises(MediaError, match="not_public: it leads to this host's own network"):
            Downloader(allows=refuse_and_note).fetch(f"http://localhost:{inside.port}/x.png", lambda kind: True, 10_000)
        assert looks and all(port == inside.port and address in ("127.0.0.1", "::1") for address, port in looks)
        assert inside.requests == []
    finally:
        inside.stop()
