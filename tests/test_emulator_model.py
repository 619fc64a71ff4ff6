"""The emulator's model server over real HTTP, with the real openai client: streamed chat completions
(the stand-in, its scripted answers, the recording proxy, and the website chat's SSE route on top)."""
from __future__ import annotations

import time

import openai
import pytest
import requests

from devtools.emulator import ModelProxy, ModelStandIn, Timeline, completion, json_response
from tests.support import wait_for
from tests.support.webchat import WebchatProcess, parse_events

REPLY = "Fresh sourdough every morning from seven, and croissants until they run out at noon."
MESSAGES = [{"role": "system", "content": "You answer for a bakery."},
            {"role": "user", "content": "Answer politely : when is the bread ready?"}]


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(api_key=ModelStandIn.API_KEY, base_url=server.base_url, max_retries=0, timeout=10)


@pytest.fixture
def stand_in():
    server = ModelStandIn(REPLY).start()
    yield server
    server.stop()


def timed_chunks(stream) -> list[tuple[float, object]]:
    return [(time.monotonic(), chunk) for chunk in stream]


def content_times(timed) -> list[float]:
    return [at for at, chunk in timed if chunk.choices and chunk.choices[0].delta.content]


def test_a_stream_is_shaped_as_openai_streams(stand_in):
    stream = client_of(stand_in).chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                                        stream_options={"include_usage": True})
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    deltas = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == REPLY and len(deltas) == 5  # 14 words, three at a time
    assert all(1 <= len(d.split()) <= 3 for d in deltas)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"] and chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 5
    plain = client_of(stand_in).chat.completions.create(model="m", messages=MESSAGES)
    assert plain.choices[0].message.content == REPLY  # the same answer, in one piece


def test_the_wire_is_server_sent_events_ending_with_done(stand_in):
    answer = requests.post(f"{stand_in.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES,
                           "stream": True}, headers={"Authorization": f"Bearer {ModelStandIn.API_KEY}"}, timeout=5)
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    blocks = answer.text.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""] and all(b.startswith("data: {") for b in blocks[:-2])
    assert '"usage"' not in answer.text  # only when stream_options.include_usage asks


def test_the_deltas_are_spaced_by_the_stream_delay(stand_in):
    stand_in.stream_delay = 0.2
    started = time.monotonic()
    timed = timed_chunks(client_of(stand_in).chat.completions.create(model="m", messages=MESSAGES, stream=True))
    arrivals = content_times(timed)
    assert len(arrivals) == 5 and arrivals[0] - started < 0.15  # the first piece is not held back
    assert arrivals[-1] - arrivals[0] >= 4 * 0.2 * 0.9


def test_scripted_answers_stream_and_scripted_errors_stay_errors(stand_in):
    stand_in.scripted.append(json_response(completion("A scripted answer in a few words.", "length")))
    stand_in.scripted.append(json_response({"error": {"message": "overloaded", "type": "server_error"}}, 503))
    chunks = list(client_of(stand_in).chat.completions.create(model="m", messages=MESSAGES, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "A scripted answer in a few words." and chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.InternalServerError) as failed:
        client_of(stand_in).chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert failed.value.status_code == 503


def test_a_refused_key_is_refused_before_any_stream(stand_in):
    wrong = openai.OpenAI(api_key="sk-wrong", base_url=stand_in.base_url, max_retries=0, timeout=5)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="m", messages=MESSAGES, stream=True)


def test_a_streamed_call_is_on_the_timeline_once_it_has_ended(stand_in):
    list(client_of(stand_in).chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert wait_for(lambda: stand_in.timeline.of_kind("model"), 2)  # written as the server closes the stream
    [event] = stand_in.timeline.of_kind("model")
    assert (event["reply"], event["finish_reason"], event["stream"], event["status"]) == (REPLY, "stop", True, 200)
    assert event["messages"] == MESSAGES


def test_the_proxy_forwards_a_stream_piece_by_piece():
    upstream = ModelStandIn(REPLY).start()
    upstream.stream_delay = 0.25
    timeline = Timeline()
    proxy = ModelProxy(upstream.base_url, timeline=timeline).start()
    try:
        started = time.monotonic()
        timed = timed_chunks(client_of(proxy).chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
        arrivals = content_times(timed)
        assert len(arrivals) == 5 and arrivals[0] - started < 0.2  # not held until the upstream ends
        assert arrivals[-1] - arrivals[0] >= 4 * 0.25 * 0.9
        assert timed[-1][1].usage.completion_tokens == 5
        assert upstream.requests[0]["json"]["stream"] is True
        assert wait_for(lambda: timeline.of_kind("model"), 2)
        [event] = timeline.of_kind("model")
        assert (event["mode"], event["reply"], event["stream"]) == ("real", REPLY, True)
    finally:
        proxy.stop()
        upstream.stop()


def test_the_website_chat_streams_from_the_emulator(graph, stand_in, tmp_path):
    stand_in.stream_delay = 0.15
    web = WebchatProcess(graph, stand_in, tmp_path)
    try:
        response = requests.post(web.url + "/api/chat", json={"message": "When is the bread ready?"},
                                 headers={"Accept": "text/event-stream"}, stream=True, timeout=15)
        arrivals, text = [], ""
        for piece in response.iter_content(chunk_size=None):
            arrivals.append(time.monotonic()) if b"event: delta" in piece else None
            text += piece.decode()
        events = parse_events(text)
    finally:
        web.stop()
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "done" and names.count("delta") == 5
    deltas = "".join(data["text"] for name, data in events if name == "delta")
    assert deltas == REPLY == events[-1][1]["answer"]
    assert arrivals[-1] - arrivals[0] >= 4 * 0.15 * 0.8  # piece by piece, as the model wrote them
    assert stand_in.requests[-1]["json"]["stream"] is True
