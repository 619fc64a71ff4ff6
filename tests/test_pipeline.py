"""History -> prompt -> model -> Send API, through real clients and fake servers."""
import time

import pytest

from tests.support import APP_SECRET, PAGE_ID, PAGE_TOKEN, PSID, replay
from devtools.emulator import ModelStandIn, completion, graph_error, json_response

P = "Answer polite and concisely in a single sentence : "
QUESTION = "What are your opening hours?"


# -- history ---------------------------------------------------------------------------------------
def test_history_is_one_graph_request(client, graph):
    replay(client, "text")
    [call] = graph.history_calls()
    assert call.path == f"/v26.0/{PAGE_ID}/conversations"
    assert call.args["platform"] == "messenger"
    assert call.args["user_id"] == PSID
    assert call.args["fields"] == "messages.limit(10){message,from,created_time}"
    assert [c.method for c in graph.calls if c.method == "GET"] == ["GET"]


def test_every_graph_call_carries_token_header_and_proof(client, graph):
    """The fake refuses calls without both; the token never appears in a URL."""
    replay(client, "text")
    time.sleep(0.2)  # sender actions run beside the reply
    assert graph.sent_texts(PSID) == ["Hello from the model."]
    assert len(graph.calls) >= 3
    for call in graph.calls:
        assert call.args["appsecret_proof"] == graph.proof
        assert "access_token" not in call.args


def test_history_becomes_the_prompt(client, graph, model):
    graph.add_message(PSID, "Hi, do you deliver?")
    graph.add_message(PSID, "Yes, within 5 km.", from_page=True)
    replay(client, "text")  # not indexed by Graph yet: the Page's last reply must stay
    assert model.requests[0]["json"]["messages"] == [
        {"role": "user", "content": "Hi, do you deliver?"},
        {"role": "assistant", "content": "Yes, within 5 km."},
        {"role": "user", "content": P + QUESTION},
    ]


def test_indexed_message_is_not_duplicated(client, graph, model):
    graph.add_message(PSID, "Hi")
    graph.add_message(PSID, "Hello!", from_page=True)
    graph.add_message(PSID, QUESTION, mid="m_text_0001")
    replay(client, "text")
    contents = [m["content"] for m in model.requests[0]["json"]["messages"]]
    assert contents == ["Hi", "Hello!", P + QUESTION]


def test_message_count_limits_history(make_client, graph, model):
    for i in range(12):
        graph.add_message(PSID, f"turn {i}", from_page=bool(i % 2))
    replay(make_client(MESSAGE_COUNT="4"), "text")
    assert graph.history_calls()[0].args["fields"] == "messages.limit(4){message,from,created_time}"
    assert [m["content"] for m in model.requests[0]["json"]["messages"]] == [
        "turn 9", "turn 10", "turn 11", P + QUESTION]


def test_history_failure_still_answers(client, graph, model):
    graph.fail_next("history", graph_error(613, "Calls to this api have exceeded the rate limit."))
    replay(client, "text")
    assert model.requests[0]["json"]["messages"] == [{"role": "user", "content": P + QUESTION}]
    assert graph.sent_texts(PSID) == ["Hello from the model."]


def test_system_prompt_is_sent_first(make_client, model):
    replay(make_client(SYSTEM_PROMPT="You are the assistant of Bob's Bakery."), "text")
    assert model.requests[0]["json"]["messages"][0] == {
        "role": "system", "content": "You are the assistant of Bob's Bakery."}


# -- the model call --------------------------------------------------------------------------------
def test_model_parameters(client, model):
    replay(client, "text")
    request = model.requests[0]["json"]
    assert request["model"] == "gpt-4.1-mini"
    assert (request["temperature"], request["top_p"], request["max_tokens"]) == (0.2, 0.2, 512)


def test_empty_parameters_are_not_sent(make_client, model):
    replay(make_client(OPENAI_MODEL="o4-mini", OPENAI_TEMPERATURE="", OPENAI_TOP_P="", OPENAI_MAX_TOKENS=""), "text")
    request = model.requests[0]["json"]
    assert request["model"] == "o4-mini"
    assert not {"temperature", "top_p", "max_tokens"} & set(request)


def test_length_stop_gets_ellipsis(client, graph, model):
    model.scripted.append(json_response(completion("We open at nine and close", "length")))
    replay(client, "text")
    assert graph.sent_texts(PSID) == ["We open at nine and close..."]


def test_markdown_becomes_plain_text(client, graph, model):
    model.scripted.append(json_response(completion("**Hours:** see [our page](https://bakery.example).")))
    replay(client, "text")
    assert graph.sent_texts(PSID) == ["Hours: see our page (https://bakery.example)."]


def test_long_reply_is_split_in_order(client, graph, model):
    paragraphs = [f"Part {i}. " + "bread and butter " * 70 for i in range(4)]
    model.scripted.append(json_response(completion("\n\n".join(paragraphs))))
    replay(client, "text")
    sent = graph.sent_texts(PSID)
    assert len(sent) >= 3
    assert all(len(part) <= 2000 for part in sent)
    assert " ".join(sent).split() == "\n\n".join(paragraphs).split()


# -- model failures: fallback and one error line --------------------------------------------------
def status_error(status, code, message="error", request_id="req_fail"):
    return json_response({"error": {"message": message, "type": "error", "code": code}}, status,
                         {"x-request-id": request_id})


FAILURES = {
    "bad-request": (lambda m: m.scripted.append(status_error(400, "invalid_value")), "BadRequestError", "400"),
    "rate-limit": (lambda m: m.scripted.append(status_error(429, "rate_limit_exceeded")), "RateLimitError", "429"),
    "quota": (lambda m: m.scripted.append(status_error(429, "insufficient_quota", "You exceeded your quota")),
              "RateLimitError", "429"),
    "server-error": (lambda m: m.scripted.append(status_error(500, "server_error")), "InternalServerError", "500"),
    "bad-gateway": (lambda m: m.scripted.append(status_error(502, None)), "InternalServerError", "502"),
    "empty-content": (lambda m: m.scripted.append(json_response(completion(""))), "EmptyCompletion", "None"),
    "null-content": (lambda m: m.scripted.append(json_response(completion(None))), "EmptyCompletion", "None"),
    "no-choices": (lambda m: m.scripted.append(json_response({**completion("x"), "choices": []})),
                   "EmptyCompletion", "None"),
}


@pytest.mark.parametrize("script, error_class, status", FAILURES.values(), ids=FAILURES.keys())
def test_model_failure_sends_fallback_and_logs(client, graph, model, tmp_path, script, error_class, status):
    script(model)
    assert replay(client, "text").status_code == 200
    assert graph.sent_texts(PSID) == ["please try again later"]
    assert_one_error_line(tmp_path, error_class, status)


def test_malformed_json_response(client, graph, model, tmp_path):
    from werkzeug.wrappers import Response
    model.scripted.append(Response("{not json", status=200, mimetype="application/json"))
    replay(client, "text")
    assert graph.sent_texts(PSID) == ["please try again later"]
    line = read_error_log(tmp_path)[0]
    assert "status=None" in line


def test_authentication_error(make_client, graph, tmp_path):
    replay(make_client(OPENAI_API_KEY="sk-wrong-key-000000000000"), "text")
    assert graph.sent_texts(PSID) == ["please try again later"]
    line = assert_one_error_line(tmp_path, "AuthenticationError", "401")
    assert "request_id=req_auth" in line
    assert "sk-wrong-key" not in line


def test_timeout(make_client, graph, model, tmp_path):
    model.delay = 1.5
    replay(make_client(OPENAI_TIMEOUT="0.3"), "text")
    assert graph.sent_texts(PSID) == ["please try again later"]
    assert_one_error_line(tmp_path, "APITimeoutError", "None")


def test_connection_error(make_client, graph, tmp_path):
    replay(make_client(OPENAI_BASE_URL="http://127.0.0.1:9/v1"), "text")
    assert graph.sent_texts(PSID) == ["please try again later"]
    assert_one_error_line(tmp_path, "APIConnectionError", "None")


def test_client_retries_5xx_then_answers(make_client, graph, model):
    model.scripted.append(status_error(503, None))
    replay(make_client(OPENAI_MAX_RETRIES="1"), "text")
    assert len(model.requests) == 2
    assert graph.sent_texts(PSID) == ["Hello from the model."]


def test_custom_fallback(make_client, graph, model):
    model.scripted.append(status_error(500, None))
    replay(make_client(FALLBACK_REPLY="Our assistant is resting, a human will answer soon."), "text")
    assert graph.sent_texts(PSID) == ["Our assistant is resting, a human will answer soon."]


def read_error_log(tmp_path):
    return (tmp_path / "openai_api_errors.log").read_text().splitlines()


def assert_one_error_line(tmp_path, error_class, status):
    [line] = read_error_log(tmp_path)
    assert " ERROR " in line
    assert f"{error_class} status={status}" in line
    for secret in (ModelStandIn.API_KEY, PAGE_TOKEN, APP_SECRET, QUESTION, "opening hours"):
        assert secret not in line
    return line


# -- Send API and sender actions ---------------------------------------------------------------
def test_send_request_shape(client, graph):
    replay(client, "text")
    [send] = [c for c in graph.calls if c.body and "message" in c.body]
    assert send.method == "POST" and send.path == "/v26.0/me/messages"
    assert send.body == {"recipient": {"id": PSID}, "messaging_type": "RESPONSE",
                         "message": {"text": "Hello from the model.", "metadata": "messenger-gpt-bot"}}


def test_graph_error_carries_diagnostics(client, graph, caplog):
    graph.fail_next("send", graph_error(551, "This person isn't available right now.", subcode=1545041))
    replay(client, "text")
    assert "code=551 subcode=1545041 fbtrace_id=trace-551" in caplog.text
    assert replay(client, "quick_reply").status_code == 200  # the app keeps serving
    assert graph.sent_texts(PSID) == ["Hello from the model."]


def test_sender_actions_are_sent(client, graph, model):
    model.delay = 0.3
    replay(client, "text")
    assert graph.actions() == ["mark_seen", "typing_on"]
    first_send = next(c.at for c in graph.calls if c.body and "message" in c.body)
    assert all(c.at < first_send for c in graph.calls if c.body and "sender_action" in c.body)


def test_slow_sender_actions_do_not_delay_the_reply(client, graph):
    graph.delays["action"] = 1.0
    started = time.monotonic()
    replay(client, "text")
    assert graph.sent_texts(PSID) == ["Hello from the model."]
    assert time.monotonic() - started < 0.8
    time.sleep(1.2)
    # typing_on is skipped once the reply is out: it would linger for 20 s
    assert graph.actions() == ["mark_seen"]
