"""What users send, on the emulator's side: real media bytes, Meta's CDN, and a model stand-in that
sees images and hears voice notes. Real HTTP on 127.0.0.1: `requests` and the real `openai` client."""
import base64
import io
import struct
import time
import wave
import zlib

import openai
import pytest
import requests

from devtools.emulator import ModelProxy, ModelStandIn, Timeline, json_response
from devtools.emulator.model import offline_reply
from devtools.emulator.media import audio_seconds, image_size, png_bytes, png_of_size, wav_bytes
from tests.support import PSID

JPEG = bytes.fromhex("ffd8ffe000104a46494600010100000100010000"  # SOI, APP0 (JFIF)
                     "ffc0001108"  "01e0" "0280" "03012200021101031101")  # SOF0: 8 bits, 480 high, 640 wide
GIF = b"GIF89a" + struct.pack("<HH", 320, 200) + b"\x00\x00\x00;"
WEBP_LOSSY = b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8 " + struct.pack("<I", 10) + bytes(3) + \
    b"\x9d\x01\x2a" + struct.pack("<HH", 400, 300)
WEBP_EXTENDED = b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8X" + struct.pack("<I", 10) + bytes(4) + \
    (1023).to_bytes(3, "little") + (767).to_bytes(3, "little")


def mp4(seconds: float, version: int = 0, timescale: int = 44100) -> bytes:
    """An M4A's boxes written out here, apart from the emulator's: ftyp, a free box, moov holding mvhd."""
    def box(kind, payload):
        return struct.pack(">I", 8 + len(payload)) + kind + payload
    if version == 1:
        mvhd = struct.pack(">B3xQQIQ", 1, 0, 0, timescale, round(seconds * timescale))
    else:
        mvhd = struct.pack(">B3xIIII", 0, 0, 0, timescale, round(seconds * timescale))
    return box(b"ftyp", b"M4A \0\0\0\0") + box(b"free", bytes(12)) + box(b"moov", box(b"mvhd", mvhd + bytes(80)))


@pytest.mark.parametrize("data, expected", [
    (png_bytes(64, 48), (64, 48, "PNG")),
    (png_bytes(300, 7, noise=True), (300, 7, "PNG")),
    (JPEG, (640, 480, "JPEG")),
    (GIF, (320, 200, "GIF")),
    (WEBP_LOSSY, (400, 300, "WEBP")),
    (WEBP_EXTENDED, (1024, 768, "WEBP")),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", None),
    (b"", None),
], ids=["png", "png-noise", "jpeg", "gif", "webp-lossy", "webp-extended", "svg", "empty"])
def test_image_size_reads_the_header(data, expected):
    assert image_size(data) == expected


@pytest.mark.parametrize("data, expected", [
    (wav_bytes(2.0), 2.0),
    (wav_bytes(0.5, rate=8000), 0.5),
    (mp4(3.25), 3.25),
    (mp4(61.5, version=1), 61.5),
    (b"OggS" + bytes(40), None),
    (b"", None),
], ids=["wav", "wav-8k", "m4a", "m4a-v1", "ogg", "empty"])
def test_audio_seconds_reads_the_header(data, expected):
    assert audio_seconds(data) == expected


def test_png_is_a_valid_file_and_noise_sets_its_weight():
    data = png_bytes(20, 10)
    at, chunks = 8, []
    while at < len(data):  # every chunk's CRC checks, and the pixels inflate to rows of filter byte + RGB
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body, crc = data[at + 8:at + 8 + length], struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0]
        assert zlib.crc32(kind + body) == crc
        chunks.append((kind, body))
        at += 12 + length
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert len(zlib.decompress(chunks[1][1])) == 10 * (1 + 20 * 3)
    started = time.monotonic()
    heavy = png_of_size(8_000_000)
    assert abs(len(heavy) - 8_000_000) < 20_000 and time.monotonic() - started < 2
    assert len(zlib.compress(heavy)) > 0.99 * len(heavy)  # noise: a photo's weight, not compressible


def test_wav_is_a_tone_of_the_asked_length():
    with wave.open(io.BytesIO(wav_bytes(1.5, rate=8000))) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()) == (1, 2, 8000, 12000)
        samples = struct.unpack("<100h", wav.readframes(100))
    assert max(samples) > 5000 and min(samples) < -5000  # a sound, not silence


# -- Meta's CDN ---------------------------------------------------------------------------------------

def test_an_attachment_url_serves_its_bytes_like_metas_cdn_without_a_token(graph):
    photo = png_bytes(64, 48)
    url = graph.add_attachment(photo, "image/png", name="photo")
    assert url.startswith(graph.url + "/cdn/v/t59/") and "_nc_sig=" in url and "oe=" in url
    got = requests.get(url, timeout=5)
    assert got.status_code == 200 and got.content == photo
    assert got.headers["Content-Type"] == "image/png" and got.headers["Content-Length"] == str(len(photo))
    head = requests.head(url, timeout=5)
    assert head.status_code == 200 and head.content == b"" and head.headers["Content-Length"] == str(len(photo))
    requests.get(url, headers={"Authorization": "Bearer EAA-page-token"}, timeout=5)
    requests.get(url + "&access_token=EAA-page-token", timeout=5)
    assert [(f.method, f.status, f.had_token) for f in graph.attachment_fetches] == [
        ("GET", 200, False), ("HEAD", 200, False), ("GET", 200, True), ("GET", 200, True)]
    assert all("?" not in f.path and f.path.endswith(".png") for f in graph.attachment_fetches)
    assert graph.calls == []  # the CDN is not the Graph API


def test_a_content_type_can_lie_and_urls_expire_unknown_and_tampered_ones_are_refused(graph):
    svg = b"<svg xmlns='http://www.w3.org/2000/svg'/>"
    lying = graph.add_attachment(svg, "image/png")
    assert requests.get(lying, timeout=5).headers["Content-Type"] == "image/png"
    tampered = lying.replace("_nc_sig=", "_nc_sig=0")
    assert requests.get(tampered, timeout=5).status_code == 403
    unknown = graph.url + "/cdn/v/t59/999/x.png?_nc_sig=00"
    assert requests.get(unknown, timeout=5).status_code == 404
    graph.expire_attachments()
    expired = requests.get(lying, timeout=5)
    assert expired.status_code == 403 and expired.text == "URL signature expired"
    fresh = graph.add_attachment(b"new", "text/plain")  # only what was handed out before expires
    assert requests.get(fresh, timeout=5).content == b"new"


def test_redirects_delay_and_a_slow_trickle(graph):
    data = png_bytes(10, 10)
    redirected = graph.add_attachment(data, "image/png", redirects=2)
    got = requests.get(redirected, timeout=5)
    assert got.content == data and [r.status_code for r in got.history] == [302, 302]
    assert [f.status for f in graph.attachment_fetches] == [302, 302, 200]
    no_follow = requests.get(redirected, allow_redirects=False, timeout=5)
    assert no_follow.status_code == 302 and no_follow.headers["Location"].startswith(graph.url + "/cdn/")
    slow = graph.add_attachment(data, "image/png", delay=0.3)
    with pytest.raises(requests.ReadTimeout):
        requests.get(slow, timeout=(2, 0.1))
    started = time.monotonic()
    assert requests.get(slow, timeout=5).content == data and time.monotonic() - started >= 0.3
    heavy = png_of_size(64 * 1024)  # four or five chunks of 16 KB
    trickle = graph.add_attachment(heavy, "image/png", chunk_delay=0.1)
    started = time.monotonic()
    response = requests.get(trickle, stream=True, timeout=5)
    first_headers = time.monotonic() - started
    assert response.raw.read() == heavy
    whole = time.monotonic() - started
    assert whole >= 0.4 and whole - first_headers >= 0.2  # headers with the first chunk, the rest trickles


# -- the model stand-in sees images ----------------------------------------------------------------------

def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def photo_turn(text: str, *images: bytes) -> list[dict]:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": data_url(i)}}
                                                for i in images]
    return [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": parts}]


@pytest.fixture
def client(model):
    return openai.OpenAI(base_url=model.base_url, api_key=ModelStandIn.API_KEY, max_retries=0)


def test_the_offline_stand_in_says_what_image_it_got_and_counts_its_tokens(client, model):
    model.reply = offline_reply
    answer = client.chat.completions.create(model="gpt-4o-mini",
                                            messages=photo_turn("Be kind : What is this?", png_bytes(640, 480)))
    assert answer.choices[0].message.content.startswith(
        "[offline stand-in] You said \u201cWhat is this?\u201d. I can see 1 image (640\u00d7480 PNG, ")
    assert "and 2 earlier messages of this conversation" in answer.choices[0].message.content
    text_only = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert answer.usage.prompt_tokens == text_only.usage.prompt_tokens + 85
    two = client.chat.completions.create(model="m", messages=photo_turn("", png_bytes(8, 8), png_bytes(9, 9)))
    assert "2 images (8\u00d78 PNG, 1 KB; 9\u00d79 PNG, 1 KB)" in two.choices[0].message.content


def test_a_model_without_vision_refuses_images_as_openai_does(client, model):
    model.vision = False
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", messages=photo_turn("look", png_bytes(4, 4)))
    error = refused.value.body
    assert refused.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["message"] == "Invalid content type. image_url is only supported by certain models."
    assert error["param"] == "messages.[2].content.[1].type" and error["code"] is None
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).choices


def test_bytes_that_are_no_image_are_refused(client):
    svg = b"<svg xmlns='http://www.w3.org/2000/svg'/>"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", messages=photo_turn("look", svg))
    assert refused.value.body["code"] == "invalid_image_format"


def test_the_timeline_keeps_a_small_image_as_a_thumbnail_and_only_the_size_of_a_large_one(client, model):
    small, large = png_bytes(16, 16), png_of_size(100_000)
    client.chat.completions.create(model="m", messages=photo_turn("two photos", small, large))
    shown = model.timeline.of_kind("model")[0]["messages"][-1]["content"]
    assert shown[0] == {"type": "text", "text": "two photos"}
    assert shown[1] == {"type": "image_url", "image_url": {"url": data_url(small)}, "about": "16\u00d716 PNG, 1 KB"}
    assert shown[2]["image_url"] == {"url": None} and shown[2]["about"].startswith("182\u00d7182 PNG, 9")


# -- the model stand-in hears voice notes -------------------------------------------------------------

def test_transcription_with_the_real_client_scripted_then_offline(client, model):
    model.transcripts = ["What time do you open on Sundays?"]
    voice = wav_bytes(2.0)
    first = client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("voice.wav", voice, "audio/wav"))
    assert first.text == "What time do you open on Sundays?"
    assert first.usage.input_tokens == 20 and first.usage.output_tokens == 7 and first.usage.total_tokens == 27
    second = client.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=("clip.mp4", mp4(3.0)),
                                                response_format="json")
    assert second.text.startswith("[offline stand-in] a voice note of 3.0 s (")
    upload = model.transcriptions[0]
    assert (upload.model, upload.filename, upload.content_type, upload.size, upload.response_format) == (
        "gpt-4o-transcribe", "voice.wav", "audio/wav", len(voice), "json")
    plain = client.audio.transcriptions.create(model="whisper-1", file=("v.wav", voice), response_format="text")
    assert plain.strip().startswith("[offline stand-in] a voice note of 2.0 s")
    heard = model.timeline.of_kind("transcription")[0]
    assert (heard["status"], heard["seconds"], heard["text"]) == (200, 2.0, "What time do you open on Sundays?")


def test_transcription_failures_key_format_and_scripted(client, model):
    voice = wav_bytes(1.0)
    with pytest.raises(openai.BadRequestError) as bad_format:
        client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("voice.xyz", voice))
    assert bad_format.value.body["message"].startswith("Invalid file format. Supported formats: ['flac'")
    model.scripted_transcriptions.append(json_response({"error": {"message": "boom", "type": "server_error"}}, 500))
    with pytest.raises(openai.InternalServerError):
        client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("voice.wav", voice))
    wrong_key = openai.OpenAI(base_url=model.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.audio.transcriptions.create(model="gpt-4o-transcribe", file=("voice.wav", voice))
    raw = requests.post(f"{model.base_url}/audio/transcriptions", data={"model": "gpt-4o-transcribe"},
                        headers={"Authorization": f"Bearer {ModelStandIn.API_KEY}"}, timeout=5)
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "file"
    assert [e["status"] for e in model.timeline.of_kind("transcription")] == [400, 500, 401, 400]


def test_the_proxy_forwards_images_and_voice_notes_to_the_real_model():
    timeline = Timeline()
    upstream = ModelStandIn("I see a gradient.").start()
    upstream.transcripts = ["Do you deliver?"]
    proxy = ModelProxy(upstream.base_url, timeline=timeline).start()
    try:
        client = openai.OpenAI(base_url=proxy.base_url, api_key=ModelStandIn.API_KEY, max_retries=0)
        photo = png_bytes(32, 32)
        client.chat.completions.create(model="gpt-4o", messages=photo_turn("what is it?", photo))
        assert upstream.requests[0]["json"]["messages"][-1]["content"][1]["image_url"]["url"] == data_url(photo)
        heard = client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("voice.wav", wav_bytes(1.0)))
        assert heard.text == "Do you deliver?" and upstream.transcriptions[0].filename == "voice.wav"
        event = timeline.of_kind("transcription")[0]
        assert (event["mode"], event["text"], event["seconds"]) == ("real", "Do you deliver?", 1.0)
    finally:
        proxy.stop()
        upstream.stop()


def test_a_model_call_is_filed_under_the_user_whose_photo_or_voice_note_it_carries(graph, model, client):
    model.psid_of, model.psid_of_media = graph.psid_for_prompt, graph.psid_for_media
    graph.add_user(PSID, "Ana")
    photo, voice = png_bytes(12, 12), wav_bytes(1.0)
    graph.user_sends_photo(PSID, photo)
    graph.user_sends_voice(PSID, voice)
    client.chat.completions.create(model="m", messages=photo_turn("", photo))
    model.transcripts = ["Are you open today?"]
    client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("audioclip.wav", voice))
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "[voice] Are you open today?"}])
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "someone else"}])
    assert [e["psid"] for e in model.timeline.of_kind("model")] == [PSID, PSID, None]
    assert model.timeline.of_kind("transcription")[0]["psid"] == PSID
