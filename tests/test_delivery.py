"""The durable queue in one process: once only, in order, retries, poison, observability."""
import json
import time

import pytest

from bot.replies.batch import backoff_delay
from bot.storage.queue import EXPIRY_EVERY_S, SQLiteQueue
from messenger.events import TEXT, IncomingMessage
from messenger.graph import GraphAPIError, is_retryable
from messenger.signature import sign
from tests.support import APP_SECRET, PAGE_ID, PSID, FakeClock, answer_queue, fixture_bytes, post_signed, replay, text_body, wait_for
from devtools.emulator import completion, graph_error, json_response


def store_states(client):
    return client.application.extensions["dispatcher"].store.states()


# -- the webhook only stores -------------------------------------------------------------------
def test_webhook_stores_and_acknowledges_without_calling_anything(client, graph, model):
    response = post_signed(client, fixture_bytes("text"))
    assert response.status_code == 200
    assert client.get("/healthz").get_json()["queue_depth"] == 1  # in the webhook's inbox file
    assert graph.calls == [] and model.requests == []
    client.application.extensions["dispatcher"].drain()
    assert store_states(client) == {"m_text_0001": "pending"}
    answer_queue(client)
    assert store_states(client) == {"m_text_0001": "done"}
    assert graph.sent_texts(PSID) == ["Hello from the model."]


# -- once only ----------------------------------------------------------------------------------
def test_redelivery_before_the_reply_is_answered_once(client, graph):
    for _ in range(3):
        assert post_signed(client, fixture_bytes("text")).status_code == 200
    answer_queue(client)
    assert graph.sent_texts(PSID) == ["Hello from the model."]


def test_redelivery_after_the_reply_is_not_answered_again(client, graph, model):
    replay(client, "text")
    replay(client, "text")
    assert graph.sent_texts(PSID) == ["Hello from the model."]
    assert len(model.requests) == 1


def test_postback_redelivery_deduped_by_its_mid(client, graph):
    replay(client, "postback")
    replay(client, "postback")
    assert graph.sent_texts(PSID) == ["Hello from the model."]


# -- in order, several messages answered together -------------------------------------------------
def test_waiting_messages_of_one_user_get_one_reply_in_order(client, graph, model):
    model.echo = True
    for i, text in enumerate(["first", "second", "third"]):
        post_signed(client, text_body(f"m_{i}", text, timestamp=1763893200000 + i))
    answer_queue(client)
    assert graph.sent_texts(PSID) == ["re: third"]
    prompt = model.requests[0]["json"]["messages"]
    assert [m["content"] for m in prompt] == [
        "first", "second", "Answer polite and concisely in a single sentence : third"]
    assert set(store_states(client).values()) == {"done"}


def test_out_of_order_delivery_is_answered_by_timestamp(client, graph, model):
    model.echo = True
    post_signed(client, text_body("m_late", "written second", timestamp=1763893200500))
    post_signed(client, text_body("m_early", "written first", timestamp=1763893200100))
    answer_queue(client)
    contents = [m["content"] for m in model.requests[0]["json"]["messages"]]
    assert contents[0] == "written first" and contents[-1].endswith("written second")


def test_users_are_answered_independently(client, graph, model):
    replay(client, "batch")
    assert len(model.requests) == 3
    assert len(graph.sent_texts()) == 3


# -- retries ----------------------------------------------------------------------------------------
TRANSIENT = {
    "temporary-1200": graph_error(1200, "Temporary send message failure", status=500),
    "unknown-2": graph_error(2, "An unexpected error has occurred. Please retry your request later.", status=500),
    "5xx-no-body": json_response({"unexpected": True}, 502),
}
RATE_LIMITED = {
    "rate-limit-613": graph_error(613, "Calls to this api have exceeded the rate limit."),
    "app-limit-4": graph_error(4, "Application request limit reached", status=403),
    "page-limit-80006": graph_error(80006, "There have been too many messenger requests to this Page."),
}
PERMANENT = {
    "token-190": graph_error(190, "Error validating access token", subcode=463),
    "window-10": graph_error(10, "outside of allowed window", subcode=2018278),
    "param-100": graph_error(100, "No matching user found", subcode=2018001),
    "unavailable-551": graph_error(551, "This person isn't available right now.", subcode=1545041),
    "permission-200": graph_error(200, "Permissions error"),
}


@pytest.fixture
def fast_retry_client(make_client):
    return make_client(RETRY_BASE_SECONDS="0.01", MAX_ATTEMPTS="3")


def answer_with_retries(client, rounds=10):
    for _ in range(rounds):
        answer_queue(client)
        time.sleep(0.03)


@pytest.mark.parametrize("error", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_transient_send_errors_are_retried_and_delivered_once(fast_retry_client, graph, model, error):
    graph.fail_next("send", error)
    post_signed(fast_retry_client, fixture_bytes("text"))
    answer_with_retries(fast_retry_client)
    assert graph.sent_texts(PSID) == ["Hello from the model."]
    assert len(model.requests) == 1, "a retry resends the stored reply, it does not ask the model again"
    assert store_states(fast_retry_client) == {"m_text_0001": "done"}


@pytest.mark.parametrize("error", RATE_LIMITED.values(), ids=RATE_LIMITED.keys())
def test_a_send_refused_for_a_rate_limit_waits_a_minute_untried_and_goes_out_once(make_client, graph, model, error):
    """Meta's limits last minutes: five refusals in a row, more than MAX_ATTEMPTS, cost no try;
    each waits a minute or two, not the seconds of a backoff that would fail the reply."""
    clock = FakeClock()
    client = make_client(clock, RETRY_BASE_SECONDS="0.01", MAX_ATTEMPTS="2")
    for _ in range(5):
        graph.fail_next("send", error)
    post_signed(client, fixture_bytes("text"))
    answer_queue(client)

    def sends():
        return len([c for c in graph.calls if c.body and "message" in c.body])
    for tried in range(1, 6):
        assert sends() == tried and store_states(client) == {"m_text_0001": "pending"}
        clock.advance(59)
        answer_queue(client)
        assert sends() == tried  # not before a minute
        clock.advance(62)
        answer_queue(client)
    assert graph.sent_texts(PSID) == ["Hello from the model."] and len(model.requests) == 1
    assert store_states(client) == {"m_text_0001": "done"}


@pytest.mark.parametrize("went_out", [True, False], ids=["it-went-out", "it-did-not"])
def test_a_send_meta_says_may_have_been_delivered_is_looked_for_then_sent_at_most_once(
        make_client, graph, model, went_out):
    clock = FakeClock()  # the retry waits until the test has put the message in Graph (or not)
    client = make_client(clock, RETRY_BASE_SECONDS="0.01", MAX_ATTEMPTS="3")
    graph.fail_next("send", graph_error(1, "received invalid JSON reply", subcode=1357046))
    post_signed(client, fixture_bytes("text"))
    answer_queue(client)  # Meta cannot say whether it went out
    assert store_states(client) == {"m_text_0001": "pending"}
    if went_out:
        graph.add_message(PSID, "Hello from the model.", from_page=True)
    clock.advance(1)  # past the retry's backoff
    answer_with_retries(client)
    sends = [c for c in graph.calls if c.body and "message" in c.body]
    assert len(sends) == (1 if went_out else 2)  # sent again only when the look did not find it
    assert store_states(client) == {"m_text_0001": "done"}
    assert len(model.requests) == 1


def test_a_send_in_doubt_is_not_taken_for_the_same_text_sent_to_the_message_before(make_client, graph, model):
    # m2 came in while m1's reply was on its way; its own answer is the very same text, and its
    # send fails in doubt without going out. The look before the retry's send must not take the
    # reply to m1 (logged with that exchange) for it: then m2 would never be answered.
    clock = FakeClock(time.time() - 10)  # the webhook's clock: both arrived before m1's reply went out
    client = make_client(clock, RETRY_BASE_SECONDS="0.01", MAX_ATTEMPTS="3")
    post_signed(client, text_body("m_first", "Open today?", timestamp=1763893200001))
    answer_queue(client)
    post_signed(client, text_body("m_second", "And tomorrow?", timestamp=1763893200002))
    graph.fail_next("send", graph_error(1, "received invalid JSON reply", subcode=1357046))
    answer_queue(client)
    clock.advance(1)  # past the retry's backoff
    answer_with_retries(client)
    assert graph.sent_texts(PSID) == ["Hello from the model.", "Hello from the model."]
    assert store_states(client) == {"m_first": "done", "m_second": "done"}


def test_a_send_in_doubt_is_looked_for_only_since_it_was_first_tried(make_client, graph, model):
    # m1's reply went out although Meta could not say so, and m1 then failed for good: its id
    # was never logged. m2 came in before that send and is answered with the very same text;
    # its own send fails in doubt without going out. The look before m2's retry must not take
    # m1's message for m2's: it is older than m2's first try, though newer than m2's arrival.
    clock = FakeClock(float(int(time.time()) - 10))  # a whole second: Graph's times lose nothing
    graph.clock = clock  # Meta's clock and the bot's agree
    client = make_client(clock, RETRY_BASE_SECONDS="0.01", MAX_ATTEMPTS="2")
    dispatcher = client.application.extensions["dispatcher"]
    in_doubt = graph_error(1, "received invalid JSON reply", subcode=1357046)
    post_signed(client, text_body("m_first", "Open today?", timestamp=1763893200001))
    graph.fail_next("send", in_doubt)
    answer_queue(client)  # m1's first send: in doubt, and it did not go out
    post_signed(client, text_body("m_second", "And tomorrow?", timestamp=1763893200002))
    dispatcher.drain()
    clock.advance(0.5)  # past m1's backoff
    graph.fail_next("send", in_doubt)
    dispatcher.process(dispatcher.store.claim("one-batch", 30))  # m1's look: not there; its second send: in doubt
    graph.add_message(PSID, "Hello from the model.", from_page=True)  # ...and this one did go out
    assert store_states(client) == {"m_first": "failed", "m_second": "pending"}
    clock.advance(2.5)  # m2's first try comes just past the look's 2 s margin
    graph.fail_next("send", in_doubt)  # m2's first send: in doubt, and it did not go out
    answer_queue(client)
    clock.advance(1)
    answer_with_retries(client)
    assert graph.sent_texts(PSID) == ["Hello from the model."]  # m2's own, sent by its retry
    assert store_states(client) == {"m_first": "failed", "m_second": "done"}


def test_a_send_in_doubt_is_found_though_the_hosts_clock_runs_a_second_ahead_of_metas(make_client, graph, model):
    # The send went out at 1763893200.999 by Meta's clock - Graph shows 1763893200, its times
    # are whole seconds - which the bot's clock, 0.95 s ahead, called 1763893201.949.
    graph.clock = FakeClock(1763893200.999)
    clock = FakeClock(1763893201.949)
    client = make_client(clock, RETRY_BASE_SECONDS="0.01")
    graph.fail_next("send", graph_error(1, "received invalid JSON reply", subcode=1357046))
    post_signed(client, text_body("m_text", "Open today?", timestamp=1763893200001))
    answer_queue(client)
    graph.add_message(PSID, "Hello from the model.", from_page=True)  # ...it did go out
    clock.advance(1)
    answer_with_retries(client)
    sends = [c for c in graph.calls if c.body and "message" in c.body]
    assert len(sends) == 1 and store_states(client) == {"m_text": "done"}  # found, not sent twice


def test_send_timeout_is_retried(make_client, graph):
    clock = FakeClock()  # the retry waits for its backoff, which only this test moves past
    client = make_client(clock, RETRY_BASE_SECONDS="0.01", GRAPH_TIMEOUT="0.3")
    graph.delays["send"] = 0.6
    post_signed(client, fixture_bytes("text"))
    answer_queue(client)
    graph.delays["send"] = 0
    assert store_states(client) == {"m_text_0001": "pending"}
    clock.advance(1)
    answer_with_retries(client)
    assert store_states(client) == {"m_text_0001": "done"}


def test_a_page_token_meta_refuses_fails_a_new_users_reply_before_the_model_is_paid(fast_retry_client, graph, model):
    graph.expire_token(PAGE_ID)
    post_signed(fast_retry_client, fixture_bytes("text"))
    answer_with_retries(fast_retry_client)
    assert model.requests == [] and store_states(fast_retry_client) == {"m_text_0001": "failed"}
    assert not [c for c in graph.calls if c.body and "message" in c.body]


def test_after_meta_refuses_the_page_token_no_model_is_paid_for_replies_that_cannot_go(fast_retry_client, graph,
                                                                                         model):
    """A user the mirror knows needs no Graph read: the send is the first to meet the dead token."""
    post_signed(fast_retry_client, text_body("m_1", "Open today?", timestamp=int(time.time() * 1000)))
    answer_with_retries(fast_retry_client)
    graph.expire_token(PAGE_ID)
    for n in (2, 3):
        post_signed(fast_retry_client, text_body(f"m_{n}", "And tomorrow?", timestamp=int(time.time() * 1000) + n))
        answer_with_retries(fast_retry_client)
    assert len(model.requests) == 2  # m_1's, and m_2's whose send met the refusal; none for m_3
    assert store_states(fast_retry_client) == {"m_1": "done", "m_2": "failed", "m_3": "failed"}


@pytest.mark.parametrize("error", PERMANENT.values(), ids=PERMANENT.keys())
def test_permanent_send_errors_fail_at_once_and_log_once(fast_retry_client, graph, caplog, error):
    graph.fail_next("send", error)
    post_signed(fast_retry_client, fixture_bytes("text"))
    answer_with_retries(fast_retry_client)
    sends = [c for c in graph.calls if c.body and "message" in c.body]
    assert len(sends) == 1
    assert store_states(fast_retry_client) == {"m_text_0001": "failed"}
    failures = [r for r in caplog.records if r.levelname == "ERROR" and "send failed for good" in r.getMessage()]
    assert len(failures) == 1
    code = json.loads(error.get_data())["error"]["code"]
    assert f"code={code}" in failures[0].getMessage() and f"fbtrace_id=trace-{code}" in failures[0].getMessage()


def test_poison_message_fails_after_the_bound_and_never_blocks_later_ones(fast_retry_client, graph, model):
    for _ in range(3):
        graph.fail_next("send", graph_error(1200, "Temporary send message failure", status=500))
    post_signed(fast_retry_client, text_body("m_poison", "first"))
    answer_with_retries(fast_retry_client)
    assert store_states(fast_retry_client) == {"m_poison": "failed"}
    replay(fast_retry_client, "text")
    assert graph.sent_texts(PSID) == ["Hello from the model."]


def test_partly_sent_reply_resumes_at_the_missing_part(fast_retry_client, graph, model):
    paragraphs = [f"Part {i}. " + "bread " * 300 for i in range(3)]
    model.scripted.append(json_response(completion("\n\n".join(paragraphs))))
    # The first part goes through, the second fails once (sender actions are counted apart).
    graph.fail_call("send", 2, graph_error(1200, "Temporary send message failure", status=500))
    post_signed(fast_retry_client, fixture_bytes("text"))
    answer_with_retries(fast_retry_client)
    sent = graph.sent_texts(PSID)
    assert len(sent) == 3 and [p.split(".")[0] for p in sent] == ["Part 0", "Part 1", "Part 2"]
    tried = [c.body["message"]["text"].split(".")[0] for c in graph.calls if "message" in (c.body or {})]
    assert tried == ["Part 0", "Part 1", "Part 1", "Part 2"]  # Part 1 failed once; Part 0 was not sent again


@pytest.mark.parametrize("error, retry", [
    (GraphAPIError("timeout"), True),
    (GraphAPIError("x", status=500), True),
    (GraphAPIError("x", status=429), True),
    (GraphAPIError("x", status=400), False),
    *[(GraphAPIError("x", status=400, code=c), True) for c in (1, 2, 4, 17, 32, 613, 1200, 80001, 80006)],
    *[(GraphAPIError("x", status=400, code=c), False) for c in (190, 10, 100, 200, 230, 551)],
    (GraphAPIError("x", status=500, code=1, subcode=1357046), True),  # in doubt: retried after a look
    (GraphAPIError("x", status=500, code=100), False),
])
def test_retry_classification(error, retry):
    assert is_retryable(error) is retry


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    samples = {attempt: [backoff_delay(attempt, 1.0, 60.0) for _ in range(300)] for attempt in (1, 3, 10)}
    assert max(samples[1]) <= 1.0 and max(samples[3]) <= 4.0 and max(samples[10]) <= 60.0
    assert max(samples[3]) > 2.0 and max(samples[10]) > 30.0
    assert len(set(samples[3])) > 250  # jittered, not a fixed schedule


# -- observability -------------------------------------------------------------------------------
def test_healthz_reports_the_queue(client):
    post_signed(client, fixture_bytes("text"))
    time.sleep(0.05)
    health = client.get("/healthz").get_json()
    assert health["status"] == "ok"
    assert health["queue_depth"] == 1 and health["in_flight"] == 0
    assert health["oldest_pending_age_s"] >= 0.05
    assert health["dispatcher_seen_s_ago"] is None  # no reply threads started in this app
    answer_queue(client)
    health = client.get("/healthz").get_json()
    assert (health["queue_depth"], health["oldest_pending_age_s"]) == (0, 0.0)


def sample(text: str, name: str) -> float:
    """One sample's value in Prometheus text format (0 when absent)."""
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return float(values.get(name, 0.0))


def test_metrics_count_what_happened(client, graph, model):
    before = client.get("/metrics").get_data(as_text=True)
    model.scripted.append(json_response({"error": {"message": "x", "code": "rate_limit_exceeded"}}, 429))
    graph.fail_next("action", graph_error(613, "limit"))
    replay(client, "text")
    post_signed(client, fixture_bytes("text"))
    replay(client, "delivery")
    client.post("/webhook", data=b"{}")
    # the failed sender action runs beside the reply: wait for it to be counted
    assert wait_for(lambda: sample(client.get("/metrics").get_data(as_text=True), 'graph_errors_total{code="613"}')
                    > sample(before, 'graph_errors_total{code="613"}'))
    response = client.get("/metrics")
    assert response.content_type.startswith("text/plain")
    after = response.get_data(as_text=True)
    for name, delta in [
        ('messenger_events_total{outcome="accepted"}', 1),
        ('messenger_events_total{outcome="duplicate"}', 1),
        ('messenger_events_total{outcome="ignored"}', 1),
        ('messenger_webhooks_received_total{result="forbidden"}', 1),
        ("messenger_replies_sent_total", 1),
        ('openai_errors_total{error_class="RateLimitError"}', 1),
        ('graph_errors_total{code="613"}', 1),
        ("messenger_reply_latency_seconds_count", 1),
    ]:
        assert sample(after, name) - sample(before, name) == delta, name


def test_signed_sha256_required_even_for_the_queue(client):
    body = fixture_bytes("text")
    response = client.post("/webhook", data=body, headers={"X-Hub-Signature-256": sign(body, "wrong")})
    assert response.status_code == 403
    assert store_states(client) == {}
    assert APP_SECRET not in response.get_data(as_text=True)


# -- the store's leases --------------------------------------------------------------------------
def incoming(mid, psid=PSID, timestamp=1):
    return IncomingMessage(psid=psid, page_id="1", mid=mid, kind=TEXT, text=mid, timestamp_ms=timestamp)


def test_release_gives_work_back_without_counting_an_attempt(tmp_path):
    store = SQLiteQueue(str(tmp_path / "q.sqlite3"))
    store.add([incoming("m1")])
    batch = store.claim("worker-a", 30)
    assert store.claim("worker-b", 30) is None  # one user, one batch at a time
    assert store.release("worker-a") == 1
    again = store.claim("worker-b", 30)
    assert again.ids == batch.ids and again.attempts == 1


def test_expired_lease_is_claimed_again_and_bounded(tmp_path):
    clock = FakeClock()
    store = SQLiteQueue(str(tmp_path / "q.sqlite3"), max_attempts=2, clock=clock)
    store.add([incoming("m1")])
    assert store.claim("dead-worker", 30).attempts == 1
    clock.advance(29.9)
    assert store.claim("live-worker", 30) is None  # the lease still holds
    clock.advance(0.2)
    # Expired, but live-worker looked 0.2 s ago: it looks again EXPIRY_EVERY_S after its last look.
    assert store.claim("live-worker", 30) is None
    clock.advance(EXPIRY_EVERY_S - 0.2)
    assert store.claim("live-worker", 30).attempts == 2
    clock.advance(30.1)
    assert store.claim("third-worker", 30) is None  # crashed twice: failed, not retried forever
    assert store.states() == {"m1": "failed"}


def test_a_first_error_after_deaths_waits_no_longer_than_any_first_error(make_client, graph, model):
    """Deaths have a bound of their own, so they do not lengthen the backoff either: after two
    bots died holding it, a user's first failed send waits at most RETRY_BASE_SECONDS, not the
    up to 4 x RETRY_BASE_SECONDS of a third failed try (for eight users: 1 chance in 65,536)."""
    clock = FakeClock()
    client = make_client(clock, RETRY_BASE_SECONDS="1")
    users = [f"u{n}" for n in range(8)]
    for n, psid in enumerate(users):
        post_signed(client, text_body(f"m{n}", "Open today?", psid=psid))
    dispatcher = client.application.extensions["dispatcher"]
    dispatcher.drain()
    store = dispatcher.store
    for death in range(2):  # two bots take every user's message and die with it
        assert sorted(store.claim(f"dead{death}", 30).psid for _ in users) == users
        clock.advance(31)
    for _ in users:
        graph.fail_next("send", TRANSIENT["temporary-1200"])
    answer_queue(client)
    assert set(store.states().values()) == {"pending"} and graph.sent_texts("u0") == []
    clock.advance(1.0)
    answer_queue(client)
    assert [graph.sent_texts(psid) for psid in users] == [["Hello from the model."]] * len(users)


def test_renewed_lease_is_not_taken(tmp_path):
    clock = FakeClock()
    store = SQLiteQueue(str(tmp_path / "q.sqlite3"), clock=clock)
    store.add([incoming("m1")])
    batch = store.claim("worker-a", 30)
    clock.advance(20)
    store.renew("worker-a", 30, [batch.batch_id])
    clock.advance(20)  # past the first lease, within the renewed one
    assert store.claim("worker-b", 30) is None
