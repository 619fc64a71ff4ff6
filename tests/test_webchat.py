"""The website chat over real HTTP: `python -m bot.webchat.serve` against the Graph emulator and a
streaming OpenAI-shaped server (tests/support/streaming_model.py), on both storage backends."""
from __future__ import annotations

import os
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from bot.webchat.requests import sign_user_id
from bot.webchat.service import web_psid
from tests.support.processes import wait_until
from tests.support.streaming_model import StreamingModel
from tests.support.webchat import WebchatProcess, parse_events

SECRET = "a-site-secret-of-32-characters!!"
SITE = "https://shop.example"
PERMISSIVE = {"WEBCHAT_RATE_LIMIT": "100/minute", "WEBCHAT_CONVERSATION_LIMIT": "100/minute"}


@pytest.fixture
def stream_model():
    server = StreamingModel(lambda messages: f"You said: {messages[-1]['content'].rsplit(' : ', 1)[-1]}").start()
    yield server
    server.stop()


@pytest.fixture
def start(graph, stream_model, tmp_path):
    running = []

    def run(**settings: str) -> WebchatProcess:
        running.append(WebchatProcess(graph, stream_model, tmp_path, SYSTEM_PROMPT="You are the bakery's helper.",
                                      WEBCHAT_SECRET=SECRET, WEBCHAT_ORIGINS=SITE, **settings))
        return running[-1]
    yield run
    for process in running:
        process.stop()


@pytest.fixture
def web(start, backend):
    return start(**backend[1], **PERMISSIVE)


def test_the_documents_contracts_and_the_additive_ids(web, stream_model, graph):
    answer = web.chat("Do you bake on Sundays?", user_id="user123")
    assert answer.status_code == 200
    body = answer.json()
    assert body["answer"] == "You said: Do you bake on Sundays?"
    assert len(body["conversation"]) == 32 and len(body["request_id"]) == 32
    got = requests.get(web.url + "/chat", params={"query": "What is the capital of France?"}, timeout=10)
    assert got.status_code == 200 and got.json()["response"] == "You said: What is the capital of France?"
    assert got.json()["source"] == "api" and set(got.json()) == {"response", "source", "conversation", "request_id"}
    # One pipeline: the Page's system prompt and politeness prefix; history from the store, never Graph.
    sent = stream_model.requests[0]["messages"]
    assert sent[0] == {"role": "system", "content": "You are the bakery's helper."}
    assert sent[-1]["content"].startswith("Answer polite and concisely")
    assert not [c for c in graph.calls if c.path.endswith("/conversations")]


def test_asking_for_a_person_on_the_website_is_answered_by_the_model_not_promised_a_person(start, stream_model):
    """No person can answer a web conversation (no Page inbox there): "human" is a question like
    any other, not a promise followed by a silence of HUMAN_PAUSE."""
    web = start(HANDOFF_WORDS="human, agent", HUMAN_PAUSE="30m", **PERMISSIVE)
    first = web.chat("human").json()
    second = web.chat("hello?", conversation=first["conversation"]).json()
    assert (first["answer"], second["answer"]) == ("You said: human", "You said: hello?")
    assert [r["outcome"] for r in web.exchanges(channel="web")] == ["answered", "answered"]


def test_the_running_chat_deletes_old_counters_and_conversations_past_the_retention(start, stream_model, backend):
    web = start(RETENTION_DAYS="30", **backend[1], **PERMISSIVE)
    store = web.store()
    try:
        with store.conversations.database.write() as db:
            db.execute("INSERT INTO webchat_counters (key, window_start, count) VALUES ('ip:gone', 1.0, 1)")
            db.execute("INSERT INTO webchat_conversations (id, label, created_at) VALUES ('old', 'ana@example.com', 1.0)")
        assert web.chat("hello").status_code == 200  # the first request of the hour tidies
        with store.conversations.database.read() as db:
            assert db.execute("SELECT key FROM webchat_counters WHERE key = 'ip:gone'").fetchall() == []
            assert db.execute("SELECT id FROM webchat_conversations WHERE id = 'old'").fetchall() == []
    finally:
        store.close()


def test_the_cache_answers_the_same_question_and_says_so(start, stream_model):
    web = start(ANSWER_CACHE_TTL="1h", **PERMISSIVE)
    first = requests.get(web.url + "/chat", params={"query": "Opening hours?"}, timeout=10).json()
    second = requests.get(web.url + "/chat", params={"query": "Opening hours?"}, timeout=10).json()
    assert (first["source"], second["source"]) == ("api", "cache")
    assert second["response"] == first["response"] and len(stream_model.requests) == 1
    assert "Traceback" not in web.log() and "ERROR" not in web.log()  # a cached answer has no tokens to count


def test_a_conversation_remembers_and_is_logged_as_web(web, stream_model):
    first = web.chat("My name is Ana.", headers={"Referer": "https://shop.example/cakes"}).json()
    web.chat("What is my name?", conversation=first["conversation"])
    history = [m["content"] for m in stream_model.requests[1]["messages"]]
    assert "My name is Ana." in history and "You said: My name is Ana." in history
    records = web.exchanges(channel="web")
    assert [r["channel"] for r in records] == ["web", "web"] and records[0]["outcome"] == "answered"
    assert records[0]["psid"] == web_psid(first["conversation"]) and not web.exchanges(channel="messenger")
    # The id alone continues an unsigned conversation: the log holds its hash, never the id.
    assert first["conversation"] not in records[0]["psid"] and first["conversation"] not in web.log()


@pytest.mark.parametrize("trusted, address", [("127.0.0.1", "203.0.113.7"), ("10.0.0.1", "127.0.0.1")],
                         ids=["behind-a-trusted-proxy", "forged-header"])
def test_the_tracking_record_has_the_visitors_address_and_page(start, trusted, address):
    web = start(TRACKING_URL="http://127.0.0.1:9/track", FORWARDED_ALLOW_IPS=trusted, **PERMISSIVE)
    answer = web.chat("hi", headers={"Referer": "https://shop.example/cakes", "X-Forwarded-For": "203.0.113.7"})
    store = web.store()
    try:
        [(_, record)] = store.conversations.waiting_for_tracking()
    finally:
        store.close()
    assert (record["ip_address"], record["user_url"], record["channel"]) == (address, "https://shop.example/cakes",
                                                                            "web")
    assert record["session_id"].startswith("web:") and record["engine"] == "stream-model"
    assert record["session_id"] == web_psid(answer.json()["conversation"])  # not the conversation's id


def test_an_unsigned_user_id_is_a_label_and_reaches_no_other_conversation(web, stream_model):
    one = web.chat("My secret is 4321.", user_id="anonymous").json()
    two = web.chat("What is my secret?", user_id="anonymous").json()
    assert one["conversation"] != two["conversation"]
    assert not any("4321" in m["content"] for m in stream_model.requests[1]["messages"])


def test_a_signed_user_id_continues_on_another_device_and_a_bad_signature_is_refused(web, stream_model):
    signed = {"user_id": "customer-42", "user_signature": sign_user_id("customer-42", SECRET)}
    first = web.chat("I ordered a cake.", **signed).json()
    second = web.chat("What did I order?", **signed).json()  # no conversation id: another device
    assert second["conversation"] == first["conversation"]
    assert "I ordered a cake." in [m["content"] for m in stream_model.requests[1]["messages"]]
    until = int(time.time()) + 600  # a signature that expires: the same user, the same conversation
    third = web.chat("And when?", user_id="customer-42", user_signature_expires=until,
                     user_signature=sign_user_id("customer-42", SECRET, until)).json()
    assert third["conversation"] == first["conversation"]
    as_plain = web.chat("And when?", user_id="customer-42", user_signature=sign_user_id("customer-42", SECRET, until))
    assert (as_plain.status_code, as_plain.json()["error"]) == (403, "bad_signature")  # no time: no plain one
    forged = web.chat("What did I order?", user_id="customer-42", user_signature="0" * 64)
    assert forged.status_code == 403 and forged.json()["error"] == "bad_signature"
    stolen = web.chat("What did I order?", conversation=first["conversation"])
    assert stolen.status_code == 403 and stolen.json()["error"] == "not_your_conversation"
    assert len(stream_model.requests) == 3


def test_a_signature_can_expire_and_a_site_can_require_that_it_does(start, stream_model):
    """A signature that never expires, leaked (a proxy's log of a GET /chat, a shared screenshot),
    opens that user's conversation for good: one with `user_signature_expires` stops at that time."""
    web = start(WEBCHAT_SIGNATURES_EXPIRE="on", **PERMISSIVE)
    later = int(time.time()) + 3600

    def signed(expires, signature=None):
        return {"user_id": "customer-7", "user_signature_expires": expires,
                "user_signature": signature or sign_user_id("customer-7", SECRET, expires)}
    first = web.chat("I ordered bread.", **signed(later))
    assert first.status_code == 200
    query = {"query": "What did I order?", **signed(str(later + 60))}  # the GET form: the time as digits
    assert requests.get(web.url + "/chat", params=query, timeout=10).json()["conversation"] == \
        first.json()["conversation"]
    expired = web.chat("Still me?", **signed(int(time.time()) - 1))
    assert (expired.status_code, expired.json()["error"]) == (403, "signature_expired")
    stretched = web.chat("Still me?", **signed(later + 10**6, sign_user_id("customer-7", SECRET, later)))
    assert (stretched.status_code, stretched.json()["error"]) == (403, "bad_signature")  # the time is signed too
    forever = web.chat("Still me?", user_id="customer-7", user_signature=sign_user_id("customer-7", SECRET))
    assert (forever.status_code, forever.json()["error"]) == (403, "signature_expiry_required")
    assert len(stream_model.requests) == 2


BAD = [
    ("not json", b"hello", 400, "invalid_json"),
    ("a list", b'["hi"]', 400, "invalid_json"),
    ("a number", b'{"message": 5}', 400, "invalid_message"),
    ("missing", b'{"user_id": "x"}', 400, "invalid_message"),
    ("empty", b'{"message": "   "}', 400, "empty_message"),
    ("too long", b'{"message": "' + b"a" * 3000 + b'"}', 413, "message_too_long"),
    ("100 KB", b'{"message": "' + b"a" * 100_000 + b'"}', 413, "body_too_large"),
    ("invalid utf-8", b'{"message": "caf\xe9"}', 400, "invalid_utf8"),
    ("nested too deeply", b"[" * 60_000, 400, "invalid_json"),
    ("conversation not a string", b'{"message": "hi", "conversation": 7}', 400, "invalid_conversation"),
    ("forged conversation", b'{"message": "hi", "conversation": "not-one-of-ours"}', 400, "invalid_conversation"),
    ("unknown conversation", b'{"message": "hi", "conversation": "' + b"A" * 32 + b'"}', 404, "unknown_conversation"),
    ("bad signature", b'{"message": "hi", "user_id": "u", "user_signature": "zz"}', 403, "bad_signature"),
    ("expiry not a time", b'{"message": "hi", "user_id": "u", "user_signature": "' + b"0" * 64 +
     b'", "user_signature_expires": "tomorrow"}', 400, "invalid_user_signature_expires"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_bad_input_is_a_clear_4xx_and_no_model_call(start, stream_model, stream):
    web = start(**PERMISSIVE)
    headers = {"Content-Type": "application/json", **({"Accept": "text/event-stream"} if stream else {})}
    for name, body, status, code in BAD:
        response = requests.post(web.url + "/api/chat", data=body, headers=headers, timeout=10)
        assert (response.status_code, response.json()["error"]) == (status, code), name
        assert response.json()["message"] and not stream_model.requests, name


def test_the_pages_own_limits_are_a_429_with_when_to_come_back(start, stream_model):
    """DAILY_TOKEN_BUDGET holds the website chat back as it holds Messenger: past its one notice of
    the day, a 429 with Retry-After and retry_after, as every refusal - found without them by a probe."""
    web = start(DAILY_TOKEN_BUDGET="10", RATE_LIMIT="off", **PERMISSIVE)
    conversation = web.chat("one").json()["conversation"]  # the stream model's 10 prompt tokens and more
    assert "tomorrow" in web.chat("two", conversation=conversation).json()["answer"]  # the day's one notice
    over = web.chat("three", conversation=conversation)
    midnight = 86400 - time.time() % 86400
    assert over.status_code == 429 and over.json()["error"] == "over_budget", over.text
    assert abs(int(over.headers["Retry-After"]) - midnight) < 5 and over.json()["retry_after"] == \
        int(over.headers["Retry-After"])
    [(name, data)] = parse_events(web.chat("four", conversation=conversation, stream=True).text)[-1:]
    assert name == "error" and data["error"] == "over_budget" and abs(data["retry_after"] - midnight) < 5


def test_cors_allows_the_listed_site_with_and_without_preflight_and_refuses_others(web, stream_model):
    preflight = requests.options(web.url + "/api/chat", timeout=5, headers={
        "Origin": SITE, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200 and preflight.headers["Access-Control-Allow-Origin"] == SITE
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "content-type" in preflight.headers["Access-Control-Allow-Headers"].lower()
    other = requests.options(web.url + "/api/chat", timeout=5, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in other.headers
    allowed = web.chat("hi", headers={"Origin": SITE})
    assert allowed.status_code == 200 and allowed.headers["Access-Control-Allow-Origin"] == SITE
    streamed = web.chat("hi", stream=True, headers={"Origin": SITE})
    assert streamed.headers["Access-Control-Allow-Origin"] == SITE
    for stream in (False, True):
        refused = web.chat("hi", stream=stream, headers={"Origin": "https://evil.example"})
        assert refused.status_code == 403 and refused.json()["error"] == "origin_not_allowed"
        assert "Access-Control-Allow-Origin" not in refused.headers
    assert len(stream_model.requests) == 2


def test_a_dns_rebinding_page_does_not_pass_for_the_bots_own(web, stream_model):
    """A page on evil.example, its name pointed at this server, sends its own name as both Origin
    and Host: "the bot's own page" by that test, it spent the model through its visitors."""
    own = f"http://127.0.0.1:{web.port}"
    assert web.chat("hi", headers={"Origin": own}).status_code == 200  # the demo page, by address
    for stream in (False, True):
        rebound = web.chat("hi", stream=stream, headers={"Origin": "http://evil.example", "Host": "evil.example"})
        assert (rebound.status_code, rebound.json()["error"]) == (403, "origin_not_allowed")
    page = requests.get(web.url + "/chat", params={"query": "hi"}, timeout=5,
                        headers={"Origin": "http://evil.example", "Host": "evil.example"})
    assert page.status_code == 403
    assert len(stream_model.requests) == 1


def test_another_site_cannot_spend_the_model_through_its_visitors_browsers(web, stream_model):
    """An <img> or <script> on another site GETs /chat with no Origin, but the browser says
    Sec-Fetch-Site: cross-site; its Referer names the site, which must be listed."""
    def get(**headers):
        return requests.get(web.url + "/chat", params={"query": "hi"}, headers=headers, timeout=10)
    for headers in ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
                    {"Sec-Fetch-Site": "cross-site", "Referer": "https://evil.example/page"},
                    {"Sec-Fetch-Site": "same-site", "Referer": "https://shop.example.evil/"}):
        refused = get(**headers)
        assert (refused.status_code, refused.json()["error"]) == (403, "origin_not_allowed"), headers
    assert not stream_model.requests
    assert get(**{"Sec-Fetch-Site": "cross-site", "Referer": SITE + "/menu"}).status_code == 200
    assert get(**{"Sec-Fetch-Site": "none"}).status_code == 200  # typed in the address bar
    assert get().status_code == 200  # curl, a site's backend: no browser, counted by the limits


def test_the_per_ip_limit_holds_when_a_script_rotates_conversations_and_user_ids(start, stream_model, backend):
    web = start(WEBCHAT_RATE_LIMIT="3/minute", **backend[1])
    statuses = [web.chat(f"question {i}", user_id=f"bot-{i}").status_code for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    refused = web.chat("again", stream=True)
    assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
    assert 0 < int(refused.headers["Retry-After"]) <= 60 and "wait" in refused.json()["message"]
    assert len(stream_model.requests) == 3


def test_the_per_conversation_limit_and_the_daily_caps(start, stream_model, backend):
    web = start(WEBCHAT_RATE_LIMIT="100/minute", WEBCHAT_CONVERSATION_LIMIT="2/minute", WEBCHAT_DAILY_LIMIT="5",
                **backend[1])
    conversation = web.chat("one").json()["conversation"]
    assert web.chat("two", conversation=conversation).status_code == 200
    third = web.chat("three", conversation=conversation)
    assert third.status_code == 429 and third.json()["error"] == "rate_limited"
    assert [web.chat("new").status_code for _ in range(3)] == [200, 200, 429]  # 5 a day from this address
    daily = web.chat("new")
    assert daily.json()["error"] == "daily_limit" and int(daily.headers["Retry-After"]) <= 86400


def test_the_web_channels_daily_token_cap_stops_the_web_only(start, stream_model, backend):
    web = start(WEBCHAT_DAILY_TOKENS="20", **PERMISSIVE, **backend[1])  # the model counts 10 + words
    assert web.chat("one two three").status_code == 200
    assert web.chat("four five six").status_code == 200
    capped = web.chat("seven")
    assert capped.status_code == 429 and capped.json()["error"] == "channel_busy"
    assert len(stream_model.requests) == 2


def test_a_port_a_proxy_appends_does_not_make_a_new_client(start, stream_model):
    """Azure's Application Gateway and IIS ARR forward `address:port`: each port was a fresh bucket."""
    web = start(WEBCHAT_RATE_LIMIT="3/minute")
    statuses = [web.chat(f"q{port}", headers={"X-Forwarded-For": forwarded}).status_code
                for port, forwarded in enumerate(["203.0.113.7:1001", "203.0.113.7:1002", "203.0.113.7",
                                                  "203.0.113.7:1004"])]
    assert statuses == [200, 200, 200, 429]
    six = [web.chat(f"v{n}", headers={"X-Forwarded-For": f"[2001:db8:1::{n}]:443"}).status_code for n in range(4)]
    assert six == [200, 200, 200, 429]


def conversation_count(web) -> int:
    store = web.store()
    try:
        with store.conversations.database.read() as db:
            return db.execute("SELECT COUNT(*) FROM webchat_conversations").fetchone()[0]
    finally:
        store.close()


def test_one_address_cannot_spend_the_channels_tokens_for_every_visitor(start, stream_model, backend):
    web = start(WEBCHAT_IP_DAILY_TOKENS="20", WEBCHAT_DAILY_TOKENS="1000", **PERMISSIVE, **backend[1])
    assert web.chat("one two three").status_code == 200  # the model counts 10 + words
    assert web.chat("four five six").status_code == 200
    issued = conversation_count(web)
    capped = web.chat("seven", conversation=None)
    assert capped.status_code == 429 and capped.json()["error"] == "daily_limit"
    assert "share" in capped.json()["message"] and int(capped.headers["Retry-After"]) <= 86400
    assert conversation_count(web) == issued  # a refused request is issued no conversation
    # another visitor (behind the trusted proxy on 127.0.0.1) is still answered
    assert web.chat("eight", headers={"X-Forwarded-For": "198.51.100.9"}).status_code == 200
    assert len(stream_model.requests) == 3


def test_answers_in_progress_count_against_the_daily_token_caps(start, stream_model, backend):
    """Admitted at the same moment, every request saw the same total: a burst overshot the cap
    (7 of 12 admitted under a cap one answer from spent). An answer in progress now counts for
    RESERVED_TOKENS until its own tokens are known."""
    web = start(WEBCHAT_DAILY_TOKENS="2500", WEBCHAT_IP_DAILY_TOKENS="off", **PERMISSIVE, **backend[1])
    stream_model.first_token_delay = 1.0

    def burst(**headers):
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda n: web.chat(f"question {n}", headers=headers or {
                "X-Forwarded-For": f"198.51.100.{n}"}), range(4)))
    answered = burst()  # 0 + 2,000 reserved < 2,500: a second one; 4,000 >= 2,500: no third
    assert sorted(r.status_code for r in answered) == [200, 200, 429, 429]
    assert {r.json()["error"] for r in answered if r.status_code == 429} == {"channel_busy"}
    stream_model.first_token_delay = 0
    assert web.chat("one more").status_code == 200  # the two answers' 12 tokens each counted, the rest given back
    assert len(stream_model.requests) == 3
    shared = start(WEBCHAT_IP_DAILY_TOKENS="2500", **PERMISSIVE, **backend[1])  # and one address's share
    stream_model.first_token_delay = 1.0
    web = shared
    answered = burst(**{"X-Forwarded-For": "203.0.113.9"})
    assert sorted(r.status_code for r in answered) == [200, 200, 429, 429]
    assert {r.json()["error"] for r in answered if r.status_code == 429} == {"daily_limit"}


def test_limits_hold_across_hosts_with_postgresql(start, stream_model, pg_url):
    hosts = [start(DATABASE_URL=pg_url, WEBCHAT_RATE_LIMIT="4/minute") for _ in range(2)]
    statuses = [hosts[i % 2].chat(f"q{i}").status_code for i in range(6)]
    assert statuses == [200, 200, 200, 200, 429, 429]


def test_a_streamed_answer_comes_as_delta_events_then_done(web, stream_model):
    stream_model.piece_delay = 0.02
    response = web.chat("Is the bread fresh?", stream=True)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = parse_events(response.text)
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "done" and names.count("delta") == 6
    done = events[-1][1]
    assert "".join(data["text"] for name, data in events if name == "delta") == done["answer"]
    assert done["answer"] == "You said: Is the bread fresh?" and done["conversation"] == events[0][1]["conversation"]
    assert web.exchanges(channel="web")[0]["bot_message"] == done["answer"]


def test_a_lone_surrogate_in_a_streamed_piece_is_shown_as_a_replacement_and_the_answer_logged(web, stream_model):
    """Found by a probe: a model (or proxy) streaming a lone UTF-16 surrogate ended the stream
    with an encoding error - nothing shown, nothing logged, the model's words in a log line."""
    stream_model.reply = "smile \ud83d then more words"
    events = parse_events(web.chat("hi", stream=True).text)
    assert events[-1][0] == "done", events
    assert events[-1][1]["answer"] == "smile \ufffd then more words"
    assert "".join(data["text"] for name, data in events if name == "delta") == events[-1][1]["answer"]
    [record] = web.exchanges(channel="web")
    assert record["outcome"] == "answered" and record["bot_message"] == "smile \ufffd then more words"
    assert "Traceback" not in web.log() and "then more words" not in web.log()


def test_an_answer_that_fails_unexpectedly_is_a_500_logged_without_its_words(start, stream_model, tmp_path):
    """Any error while answering (here: the store lost a table under the running chat) is the
    documented 500 `internal` - not a 200 with an empty answer -, its reservation freed, and one
    log line saying where, without the visitor's words."""
    web = start(**PERMISSIVE)
    assert web.chat("first").status_code == 200
    with sqlite3.connect(tmp_path / "data" / "bot.sqlite3") as db:
        db.execute("ALTER TABLE users RENAME TO users_gone")
    plain = web.chat("a secret question")
    assert (plain.status_code, plain.json()["error"]) == (500, "internal"), plain.text
    events = parse_events(web.chat("another secret question", stream=True).text)
    assert events[-1] == ("error", {"error": "internal", "message": events[-1][1]["message"]})
    assert web.log().count("website chat: answering failed (OperationalError), at:") == 2
    assert "secret question" not in web.log()
    assert [r["outcome"] for r in web.exchanges(channel="web")] == ["answered", "failed", "failed"]


def test_a_surrogate_pair_split_over_two_pieces_is_joined():
    from gpt.streaming import _Pieces

    pieces = _Pieces()
    assert [pieces.clean("a \ud83d"), pieces.clean("\ude00 b"), pieces.clean("c\ud83d"), pieces.clean(None),
            pieces.clean("d"), pieces.clean("\udfff"), pieces.clean("e\ud83d"), pieces.rest()] == \
        ["a ", "\U0001f600 b", "c", "", "\ufffdd", "\ufffd", "e", "\ufffd"]


def test_a_model_failing_mid_stream_ends_with_the_fallback(web, stream_model):
    stream_model.break_after = 2
    events = parse_events(web.chat("Tell me everything", stream=True).text)
    assert events[-1][0] == "done" and events[-1][1]["answer"] == "please try again later"
    assert events[-1][1]["outcome"] == "fallback"


def test_a_visitor_leaving_mid_answer_cancels_the_model_call_and_it_is_logged(web, stream_model):
    stream_model.piece_delay = 0.5
    raw = socket.create_connection(("127.0.0.1", web.port))
    body = '{"message": "one two three four five six seven eight 🧿🧿🧿🧿"}'.encode()
    raw.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"event: delta" not in received:
        received += raw.recv(4096)
    raw.close()  # the browser tab is closed
    assert wait_until(lambda: stream_model.closed_early == [0], 5), stream_model.closed_early
    assert wait_until(lambda: [r["outcome"] for r in web.exchanges(channel="web")] == ["cancelled"], 5)
    # The model read the whole prompt whenever the visitor left: it counts toward the daily caps,
    # estimated from its UTF-8 bytes (characters / 4 counted an emoji at a tenth of its tokens).
    [record] = web.exchanges(channel="web")
    read = sum(len(m["content"].encode()) for m in stream_model.requests[0]["messages"])
    assert record["prompt_tokens"] == -(-read // 3) and record["total_tokens"] > record["prompt_tokens"]
    assert web.chat("still there?").status_code == 200 and web.process.poll() is None
    assert "Traceback" not in web.log()


def test_bodies_trickled_in_by_one_client_hold_no_thread_the_widget_needs(start, stream_model):
    """Twice as many slow bodies as WEBCHAT_THREADS, on the routes Flask serves: they are read on
    the event loop, so the widget's script and a whole JSON chat are still served at once."""
    web = start(WEBCHAT_THREADS="4", **PERMISSIVE)
    slow = []
    for _ in range(8):
        raw = socket.create_connection(("127.0.0.1", web.port))
        raw.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 60000\r\n\r\n{")  # and nothing more
        slow.append(raw)
    try:
        assert requests.get(web.url + "/webchat.js", timeout=3).status_code == 200
        assert web.chat("hello").json()["answer"] == "You said: hello"
    finally:
        for raw in slow:
            raw.close()
    chunked = requests.post(web.url + "/api/chat", data=iter([b'{"message": "', b"a" * 70_000, b'"}']),
                            headers={"Content-Type": "application/json"}, timeout=10)  # no Content-Length to go by
    assert (chunked.status_code, chunked.json()["error"]) == (413, "body_too_large")
    assert web.process.poll() is None and "Traceback" not in web.log()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_chunked_request_body_is_answered(web, stream_model, stream):
    """Found by a probe: a JSON request sent chunked (a Node fetch with a stream body, a proxy
    passing it through) was refused as "not JSON" - Flask saw an empty body."""
    response = requests.post(web.url + "/api/chat", data=iter([b'{"message": ', b'"hello"}']), timeout=10,
                             headers={"Content-Type": "application/json",
                                      **({"Accept": "text/event-stream"} if stream else {})})
    assert response.status_code == 200, response.text
    answer = parse_events(response.text)[-1][1]["answer"] if stream else response.json()["answer"]
    assert answer == "You said: hello"


def test_a_visitor_connection_that_sends_no_request_is_closed_at_the_header_deadline(start, stream_model):
    web = start(HEADER_TIMEOUT="0.5", **PERMISSIVE)
    with socket.create_connection(("127.0.0.1", web.port)) as idle:
        idle.settimeout(5)
        started = time.monotonic()
        assert idle.recv(1) == b"" and 0.4 < time.monotonic() - started < 2.0
    assert web.chat("hello").json()["answer"] == "You said: hello"


def test_off_by_default_and_started_by_the_gunicorn_master(graph, stream_model, tmp_path):
    from tests.support.processes import Bot, free_port

    for name in ("off", "on"):
        (tmp_path / name).mkdir()
    plain = Bot(graph, stream_model, tmp_path / "off").start()
    try:
        assert requests.post(plain.url + "/api/chat", json={"message": "hi"}, timeout=5).status_code == 404
    finally:
        plain.stop()
    port = free_port()
    bot = Bot(graph, stream_model, tmp_path / "on", WEBCHAT="on", WEBCHAT_PORT=str(port)).start()
    try:
        assert wait_until(lambda: _answers(f"http://127.0.0.1:{port}"), 15), bot.log_text()
        alive = os.path.join(bot.env["DATA_DIR"], "webchat-process.alive")  # the master replaces it if frozen
        seen = os.stat(alive).st_mtime_ns
        assert wait_until(lambda: os.stat(alive).st_mtime_ns != seen, 5)
    finally:
        bot.stop()
    assert wait_until(lambda: not _answers(f"http://127.0.0.1:{port}"), 10)  # stopped with the bot


def _answers(url: str) -> bool:
    try:
        return requests.post(url + "/api/chat", json={"message": "hi"}, timeout=5).status_code == 200
    except requests.RequestException:
        return False



def test_export_by_channel(web):
    import subprocess
    import sys

    web.chat("hello from the website")
    result = subprocess.run([sys.executable, "-m", "bot", "export", "--channel", "web",
                             *(["--database-url", web.env["DATABASE_URL"]] if web.env.get("DATABASE_URL")
                               else ["--data-dir", web.env["DATA_DIR"]])],
                            capture_output=True, text=True, timeout=60, cwd=str(web.log_path.parent),
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(__import__("tests.support").support.ROOT)})
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert '"channel": "web"' in line and "hello from the website" in line
