"""Issue 15, point 3: Meta's 30-second rule. The model call ends by a deadline, its retries
included; the typing indicator is kept alive while it works; a slow reply gets the
fallback, or with SLOW_REPLY_NOTICE a short notice first and the answer when it comes."""
import threading
import time

import openai
import pytest

from bot.replies.composer import Timing
from config import ConfigError, load_config
from gpt.model import ModelSettings, ChatModel
from devtools.emulator import ModelStandIn
from devtools.emulator.http import json_response
from tests.support import PSID, base_env, replay, wait_for


class FakeClock:
    """Time that moves only when the chat model sleeps between attempts."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def chat_model(model, tmp_path, clock, max_retries=10):
    client = openai.OpenAI(api_key=ModelStandIn.API_KEY, base_url=model.base_url, max_retries=0, timeout=5)
    return ChatModel(client, ModelSettings(model="gpt-4.1-mini"), fallback="please try again later",
                     error_log_file=str(tmp_path / "e.log"), attempt_timeout=20, max_retries=max_retries,
                     clock=clock, sleep=clock.sleep)


def failure(status, code=None, headers=None):
    return json_response({"error": {"message": "no", "type": "server_error", "code": code}}, status,
                         {"x-request-id": "req_fail", **(headers or {})})


HI = [{"role": "user", "content": "hi"}]


def test_retries_back_off_and_stop_before_the_deadline(model, tmp_path):
    clock = FakeClock()
    model.scripted.extend(failure(503) for _ in range(20))
    reply = chat_model(model, tmp_path, clock).reply(HI, deadline=clock() + 21)
    assert reply.error_class == "InternalServerError"
    # 0.5 s, 1 s, 2 s, 4 s, then 8 s at most, each up to a quarter shorter (jitter) ...
    expected = (0.5, 1, 2, 4, 8, 8, 8)
    assert all(0.75 * d <= s <= d for s, d in zip(clock.sleeps, expected)), clock.sleeps
    assert len(model.requests) == len(clock.sleeps) + 1
    # ... every attempt started with at least a second left, and the next wait would have passed the deadline.
    assert clock.now - 1000 + 1.0 <= 21 < clock.now - 1000 + expected[len(clock.sleeps)] + 1.0
    assert 6 <= len(model.requests) <= 7


def test_a_retry_after_is_obeyed_and_an_answer_follows(model, tmp_path):
    clock = FakeClock()
    model.scripted.append(failure(429, "rate_limit_exceeded", {"retry-after": "3"}))
    reply = chat_model(model, tmp_path, clock).reply(HI, deadline=clock() + 21)
    assert reply.text == "Hello from the model." and clock.sleeps == [3.0]


def test_a_retry_after_past_the_deadline_is_not_waited_for(model, tmp_path):
    clock = FakeClock()
    model.scripted.append(failure(429, "rate_limit_exceeded", {"retry-after": "30"}))
    reply = chat_model(model, tmp_path, clock).reply(HI, deadline=clock() + 21)
    assert reply.error_class == "RateLimitError" and clock.sleeps == [] and len(model.requests) == 1


@pytest.mark.parametrize("response", [
    failure(429, "insufficient_quota"),                 # money, not time, is missing
    failure(500, None, {"x-should-retry": "false"}),   # the server says so
    failure(401, "invalid_api_key"),
], ids=["quota", "x-should-retry-false", "bad-key"])
def test_failures_no_retry_can_fix_are_not_retried(model, tmp_path, response):
    clock = FakeClock()
    model.scripted.append(response)
    reply = chat_model(model, tmp_path, clock).reply(HI, deadline=clock() + 21)
    assert reply.error_class is not None and len(model.requests) == 1 and clock.sleeps == []


def test_no_attempt_starts_when_no_time_is_left(model, tmp_path):
    clock = FakeClock()
    reply = chat_model(model, tmp_path, clock).reply(HI, deadline=clock() + 0.5)
    assert reply.error_class == "DeadlineExceeded" and model.requests == []
    assert "attempts=0" in (tmp_path / "e.log").read_text()


def test_one_slow_attempt_is_cut_at_the_deadline_not_at_its_own_timeout(model, tmp_path):
    model.delay = 4.0
    client = openai.OpenAI(api_key=ModelStandIn.API_KEY, base_url=model.base_url, max_retries=0)
    replies = ChatModel(client, ModelSettings(model="gpt-4.1-mini"), fallback="fallback",
                        error_log_file=str(tmp_path / "e.log"), attempt_timeout=20, max_retries=2)
    started = time.monotonic()
    reply = replies.reply(HI, deadline=started + 1.5)
    took = time.monotonic() - started
    assert reply.error_class == "APITimeoutError" and 1.4 <= took < 2.5, took
    assert len(model.requests) <= 1  # no retry: less than a second was left


def test_the_whole_reply_fits_the_deadline_with_history_and_model_both_slow(make_client, graph, model, tmp_path):
    """The worst case, scaled down: history read times out, the model hangs, the send is slow.
    With REPLY_DEADLINE=2 and GRAPH_TIMEOUT=0.5 the fallback is out within 2 s + one send."""
    graph.delays.update(history=1.0, send=0.3)
    model.delay = 5.0
    client = make_client(REPLY_DEADLINE="2", GRAPH_TIMEOUT="0.5", OPENAI_TIMEOUT="20", OPENAI_MAX_RETRIES="2")
    started = time.monotonic()
    replay(client, "text")
    took = time.monotonic() - started
    assert graph.sent_texts(PSID) == ["please try again later"]
    assert took < 2 + 0.5 + 0.5, took
    assert "APITimeoutError" in (tmp_path / "openai_api_errors.log").read_text()


def test_the_typing_indicator_is_kept_alive_and_never_follows_the_answer(client, graph, model):
    for composer in client.application.extensions["dispatcher"].composers:
        composer.timing = Timing(reply_deadline=10, typing_refresh=0.4)
    model.delay = 1.5
    replay(client, "text")
    assert graph.sent_texts(PSID) == ["Hello from the model."]
    time.sleep(0.5)  # a refresh that was due would have gone by now
    kinds = ["text" if "message" in (c.body or {}) else c.body.get("sender_action")
             for c in graph.calls if c.method == "POST"]
    assert kinds[0] == "mark_seen" and kinds[-1] == "text", kinds
    assert kinds.count("typing_on") >= 3, kinds  # at 0, 0.4, 0.8, 1.2 s of a 1.5 s model call


def test_a_slow_reply_gets_the_notice_then_the_answer(make_client, graph, model, tmp_path):
    model.delay = 3.0
    client = make_client(REPLY_DEADLINE="2", SLOW_REPLY_NOTICE="One moment, please.", SLOW_REPLY_LIMIT="10",
                         OPENAI_TIMEOUT="20")
    replay(client, "text")
    assert graph.sent_texts(PSID) == ["One moment, please.", "Hello from the model."]
    assert not (tmp_path / "openai_api_errors.log").exists()
    store = client.application.extensions["dispatcher"].store
    rows = store.conversations.history(PSID, graph.page_id, 10, None)
    assert [m.text for m in rows][:2] == ["Hello from the model.", "One moment, please."]  # newest first


def test_no_notice_goes_once_a_person_answers_while_the_model_works(make_client, graph, model):
    """The person's answer (stored by the webhook while the model works) has the conversation:
    the notice would speak over them, and the reply is dropped when it is ready."""
    model.delay = 3.0
    client = make_client(REPLY_DEADLINE="2", SLOW_REPLY_NOTICE="One moment, please.", SLOW_REPLY_LIMIT="10",
                         OPENAI_TIMEOUT="20", HUMAN_PAUSE="30m")
    conversations = client.application.extensions["dispatcher"].store.conversations

    def person_answers():
        if wait_for(lambda: model.requests, 10):
            conversations.update_user(PSID, pause=[time.time() + 1800, int(time.time() * 1000)])
    person = threading.Thread(target=person_answers)
    person.start()
    replay(client, "text")
    person.join()
    assert graph.sent_texts(PSID) == []
    assert len(model.requests) == 1


def test_a_fast_reply_gets_no_notice(make_client, graph, model):
    client = make_client(REPLY_DEADLINE="2", SLOW_REPLY_NOTICE="One moment, please.")
    replay(client, "text")
    assert graph.sent_texts(PSID) == ["Hello from the model."]


def test_the_defaults_fit_metas_thirty_seconds(graph, model, tmp_path):
    env = {k: v for k, v in base_env(graph, model, tmp_path).items()
           if k not in ("OPENAI_TIMEOUT", "OPENAI_MAX_RETRIES", "GRAPH_TIMEOUT")}
    config = load_config(env, env_file=None)
    send = min(3.05, config.graph_timeout) + config.graph_timeout  # connect + read
    assert config.model_deadline_seconds + send <= 30


@pytest.mark.parametrize("settings, problem", [
    ({"REPLY_DEADLINE": "1"}, "REPLY_DEADLINE must be at least 2 s"),
    ({"SLOW_REPLY_NOTICE": "One moment", "REPLY_DEADLINE": "20", "SLOW_REPLY_LIMIT": "15"},
     "SLOW_REPLY_LIMIT must be longer than REPLY_DEADLINE"),
])
def test_bad_deadline_settings_stop_start_up(graph, model, tmp_path, settings, problem):
    with pytest.raises(ConfigError) as error:
        load_config({**base_env(graph, model, tmp_path), **settings}, env_file=None)
    assert problem in str(error.value)
