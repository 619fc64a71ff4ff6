"""The emulator's model server over real HTTP, with the real openai client: streamed chat completions
(the stand-in, its scripted answers, the recording proxy, and the website chat's SSE route on top)."""
from __future__ import annotations

import json
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


# -- /v1/embeddings ----------------------------------------------------------------------------------

HOURS = "Opening hours: on Sundays we open from 8 to 12."
DELIVERY = "Delivery costs 3 euros within 5 km of the shop."


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def test_embeddings_with_the_real_client_base64_by_default(stand_in):
    response = client_of(stand_in).embeddings.create(model="text-embedding-3-small",
                                                     input=["When do you open on Sundays?", HOURS, DELIVERY])
    assert stand_in.requests[-1]["json"]["encoding_format"] == "base64"  # what the client asks for, and decodes
    question, hours, delivery = (item.embedding for item in sorted(response.data, key=lambda d: d.index))
    assert len(question) == 256 and abs(cosine(question, question) - 1) < 1e-5
    assert cosine(question, hours) > 0.3 > cosine(question, delivery)  # shared words are close, others not
    assert response.model == "text-embedding-3-small" and response.usage.prompt_tokens == 8 + 14 + 14
    assert response.usage.total_tokens == response.usage.prompt_tokens


def test_float_and_base64_carry_the_same_vector_in_the_asked_dimensions(stand_in):
    def raw(**fields):
        return requests.post(f"{stand_in.base_url}/embeddings", json={"model": "e", "input": HOURS, **fields},
                             headers={"Authorization": f"Bearer {ModelStandIn.API_KEY}"}, timeout=5).json()
    plain = raw(encoding_format="float")
    assert plain["object"] == "list" and set(plain["data"][0]) == {"object", "index", "embedding"}
    decoded = client_of(stand_in).embeddings.create(model="e", input=HOURS).data[0].embedding
    assert max(abs(a - b) for a, b in zip(plain["data"][0]["embedding"], decoded)) < 1e-6
    assert len(raw(dimensions=64)["data"][0]["embedding"]) == 64
    assert len(raw()["data"][0]["embedding"]) == 256


def test_embeddings_are_the_same_in_every_process():
    """blake2b, not hash(): a vector made under another PYTHONHASHSEED is the same vector."""
    import subprocess
    import sys

    from devtools.emulator.embeddings import embed
    from tests.support import ROOT
    code = "import json; from devtools.emulator.embeddings import embed; print(json.dumps(embed('Crème Brûlée', 32)))"
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30,
                           env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}, check=True)
    assert json.loads(other.stdout) == embed("creme brulee", 32)  # accents folded, lower-cased


@pytest.mark.parametrize("text, tokens", [("one", 2), ("one two three", 4), ("a b c d e f", 8), ("  ", 1)],
                         ids=["one word", "three words", "six words", "blank"])
def test_the_token_estimate_is_words_times_four_thirds(text, tokens):
    from devtools.emulator.embeddings import tokens as estimate
    assert estimate(text) == tokens


@pytest.mark.parametrize("word, stem", [("baking", "bak"), ("bakes", "bak"), ("berries", "berry"),
                                        ("opened", "open"), ("bus", "bus"), ("daily", "dai")],
                         ids=["-ing", "-es", "-ies", "-ed", "too short to cut", "-ly"])
def test_the_light_stemming(word, stem):
    from devtools.emulator.embeddings import stem as stemmed
    assert stemmed(word) == stem


@pytest.mark.parametrize("fields, param", [({"input": ""}, "input"), ({"input": []}, "input"),
                                           ({"input": [1, 2]}, "input"), ({"model": ""}, "model"),
                                           ({"dimensions": 0}, "dimensions"), ({"encoding_format": "int8"},
                                                                                "encoding_format")],
                         ids=["empty text", "no texts", "token arrays", "no model", "no dimensions", "int8"])
def test_a_bad_embeddings_request_is_a_400_naming_the_parameter(stand_in, fields, param):
    body = {"model": "e", "input": "hello", **fields}
    with pytest.raises(openai.BadRequestError) as refused:
        client_of(stand_in).post("/embeddings", cast_to=object, body=body)
    assert refused.value.body["param"] == param


def test_a_server_without_embeddings_answers_404_as_openai_does():
    server = ModelStandIn(embeddings=False).start()
    try:
        with pytest.raises(openai.NotFoundError) as missing:
            client_of(server).embeddings.create(model="e", input="hello")
        assert missing.value.body == {"message": "Invalid URL (POST /v1/embeddings)", "type": "invalid_request_error",
                                      "param": None, "code": None}
        assert client_of(server).chat.completions.create(model="m", messages=MESSAGES).choices  # chat still there
    finally:
        server.stop()


def test_embeddings_need_the_key_and_go_on_the_timeline_without_the_texts(stand_in):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="sk-wrong", base_url=stand_in.base_url, max_retries=0).embeddings.create(
            model="e", input="hello")
    client_of(stand_in).embeddings.create(model="text-embedding-3-small", input=[HOURS, DELIVERY])
    refused, made = stand_in.timeline.of_kind("embeddings")
    assert (refused["status"], made["status"], made["model"], made["inputs"], made["tokens"]) == \
        (401, 200, "text-embedding-3-small", 2, 28)
    assert "Sundays" not in repr(made) and made["psid"] is None


def test_the_proxy_forwards_embeddings():
    upstream = ModelStandIn().start()
    timeline = Timeline()
    proxy = ModelProxy(upstream.base_url, timeline=timeline).start()
    try:
        direct = client_of(upstream).embeddings.create(model="e", input=HOURS).data[0].embedding
        forwarded = client_of(proxy).embeddings.create(model="e", input=HOURS).data[0].embedding
        assert forwarded == direct and upstream.requests[-1]["json"]["input"] == HOURS
        [event] = timeline.of_kind("embeddings")
        assert (event["mode"], event["inputs"], event["tokens"]) == ("real", 1, 14)
    finally:
        proxy.stop()
        upstream.stop()


# -- the offline model answers from the knowledge base's excerpts ----------------------------------------

HEADER = ("Excerpts from Ana's Bakery's own documents, most relevant first. Answer from them; if they do not "
          "answer the question, say you do not know rather than guess.")
FAQ = "Q: Do you have gluten-free bread?\nA: Yes: our buckwheat loaf is gluten-free and costs 6.50 euros."


def excerpts(*parts: str) -> dict:
    return {"role": "system", "content": "\n\n".join([HEADER, *parts])}


@pytest.mark.parametrize("message, top", [
    (excerpts(f"[1] Faq (faq.csv)\n{FAQ}", "[2] Delivery (delivery.md)\nWe deliver within 5 km."), ("Faq", FAQ)),
    (excerpts("[1] Prices \u203a Cakes (https://ana.example/prices)\nCheesecake: 4 euros.\n[2] is in the text\n\n"
              "more of it"), ("Prices \u203a Cakes", "Cheesecake: 4 euros.\n[2] is in the text\n\nmore of it")),
    (excerpts("[1] A title without a source\nText."), ("A title without a source", "Text.")),
    (excerpts("[1] Long (long.md)\n" + "word " * 300), ("Long", ("word " * 160).strip() + " \u2026")),
    ({"role": "system", "content": "You answer for Ana's Bakery.\n\n[1] Faq (faq.csv)\nText."}, None),
    ({"role": "user", "content": excerpts("[1] Faq (faq.csv)\nText.")["content"]}, None),
], ids=["two excerpts: the first", "a label line inside the text", "no source", "cut at 800 characters",
        "not the knowledge base's message", "not a system message"])
def test_the_top_excerpt_is_read_from_the_knowledge_message(message, top):
    from devtools.emulator.model_inputs import top_excerpt
    assert top_excerpt([{"role": "system", "content": "You answer for Ana's Bakery."}, message,
                        {"role": "user", "content": "Answer politely : gluten-free?"}]) == top


def test_the_offline_model_answers_from_the_top_excerpt_over_http():
    from devtools.emulator.model import offline_reply
    server = ModelStandIn(offline_reply).start()
    try:
        question = {"role": "user", "content": "Answer politely : Do you have gluten-free bread?"}
        system = {"role": "system", "content": "You answer for Ana's Bakery."}
        given = [system, excerpts(f"[1] Faq (faq.csv)\n{FAQ}", "[2] Delivery (delivery.md)\nWe deliver."), question]
        answer = client_of(server).chat.completions.create(model="m", messages=given).choices[0].message.content
        assert answer.startswith("[offline stand-in] From \u201cFaq\u201d: " + FAQ)
        assert "We deliver" not in answer and "Do you have gluten-free bread?\u201d" in answer
        plain = client_of(server).chat.completions.create(model="m", messages=[system, question])
        assert plain.choices[0].message.content == (
            "[offline stand-in] You said \u201cDo you have gluten-free bread?\u201d. I can see 0 earlier messages of "
            "this conversation. My instructions begin \u201cYou answer for Ana's Bakery\u201d. Set OPENAI_API_KEY to "
            "talk to a real model.")
    finally:
        server.stop()
