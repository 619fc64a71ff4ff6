"""Issue 9, F2 and F4: nothing stops the reply machinery, and a loop that stops anyway is seen."""
import logging
import sqlite3
import threading
import time

import pytest

from bot.storage.conversations import PRUNE_CHUNK, PRUNED_KINDS, Conversations
from bot.telemetry.quiet import QuietRepeats
from bot.replies.wiring import build_dispatcher
from bot.storage.queue import SQLiteQueue
from bot.runtime.reply_process import watch
from config import load_config
from devtools.emulator.http import json_response
from devtools.emulator.model import completion
from messenger.events import ATTACHMENT, TEXT, IncomingMessage
from tests.support import PSID, text_body, post_signed, wait_for


def incoming(mid, text, psid=PSID):
    return IncomingMessage(psid=psid, page_id="1", mid=mid, kind=TEXT, text=text, timestamp_ms=int(time.time() * 1000))


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FlakyDrainStore(SQLiteQueue):
    """Our own store whose drain raises what no one planned for, a few times."""

    failures = 3

    def drain(self, directory):
        if self.failures:
            self.failures -= 1
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return super().drain(directory)


def test_an_unexpected_drain_error_is_logged_once_and_replies_go_on(env, graph, model, caplog):
    config = load_config(env, env_file=None)
    store = FlakyDrainStore(config.database_path)
    dispatcher = build_dispatcher(config, store)
    store.add([incoming("m_canary", "still there?")])
    with caplog.at_level(logging.ERROR):
        dispatcher.start()
        try:
            assert wait_for(lambda: graph.sent_texts(PSID) == ["Hello from the model."], 10)
            assert wait_for(lambda: store.failures == 0, 10)  # the drain is tried again, and again
        finally:
            dispatcher.stop(timeout=5)
    assert caplog.text.count("inbox drain failed, replies to what is queued go on: OverflowError") == 1  # not per poll


def test_the_running_dispatcher_takes_back_a_thread_whose_pause_is_over(env, graph, model):
    config = load_config({**env, "HANDOFF_THREAD_CONTROL": "on"}, env_file=None)
    dispatcher = build_dispatcher(config)
    dispatcher.take_back_every = 0.05
    dispatcher.store.conversations.update_user(PSID, thread_away=config.fb_page_id, thread_away_ms=1,
                                               pause=[time.time() - 1, 1])  # passed on, its pause over
    dispatcher.start()
    try:
        assert wait_for(lambda: [c for c in graph.calls if c.path.endswith("me/take_thread_control")], 10)
        assert wait_for(lambda: dispatcher.store.conversations.user(PSID).thread_away is None, 10)
    finally:
        dispatcher.stop(timeout=5)


class CountedSteps(Conversations):
    """Our own conversation store, noting each retention step it is asked for."""

    def __init__(self, *args, after_first_step=lambda: None, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []
        self.after_first_step = after_first_step  # runs between the first step and the second

    def prune(self, older_than_days, limit=PRUNE_CHUNK, kinds=PRUNED_KINDS):
        step = super().prune(older_than_days, limit, kinds)
        self.steps.append(step)
        if len(self.steps) == 1:
            self.after_first_step()
        return step


def test_the_running_dispatcher_prunes_soon_after_start_a_step_at_a_time_while_it_answers(env, graph, model):
    """RETENTION_DAYS: the first pass comes soon after start (a bot restarted often still prunes),
    on a thread of its own, in short steps; a message that comes in the middle of the pass is
    answered before the pass goes on (the pass waits for that answer between two steps: were
    the replies held up by the pass, the answer would never come)."""
    config = load_config({**env, "RETENTION_DAYS": "30"}, env_file=None)
    dispatcher = build_dispatcher(config)
    store = dispatcher.store
    plain = store.conversations
    answered_mid_pass = []

    def a_message_comes_in():
        store.add([incoming("m_new", "still open?")])
        answered_mid_pass.append(wait_for(lambda: graph.sent_texts(PSID) == ["Hello from the model."], 10))
    store.conversations = CountedSteps(plain.database, plain.tracking, plain.clock, after_first_step=a_message_comes_in)
    store.conversations.channels = plain.channels
    long_ago = int(time.time() * 1000) - 40 * 86400 * 1000
    with sqlite3.connect(config.database_path) as db:
        db.executemany("INSERT INTO interactions (psid, user_message, user_timestamp, outcome) VALUES (?, ?, ?, ?)",
                       [(f"u{n}", "old", long_ago + n, "answered") for n in range(10)])
        db.executemany("INSERT INTO mirror (mid, psid, author, text, at_ms) VALUES (?, ?, ?, ?, ?)",
                       [(f"m.old{n}", f"u{n}", "user", "old", long_ago + n) for n in range(10)])
    dispatcher.prune_first, dispatcher.prune_chunk = 0.2, 3
    dispatcher.start()
    try:
        assert wait_for(lambda: store.conversations.steps and not store.conversations.steps[-1].more, 15)
    finally:
        dispatcher.stop(timeout=5)
    assert answered_mid_pass == [True]
    assert [step.exchanges for step in store.conversations.steps] == [3, 3, 3, 1]
    with sqlite3.connect(config.database_path) as db:
        assert db.execute("SELECT COUNT(*) FROM mirror WHERE text = 'old'").fetchone()[0] == 0
        assert [row[0] for row in db.execute("SELECT user_message FROM interactions")] == ["still open?"]


def test_a_lone_surrogate_in_a_stored_text_ends_done_with_an_exchange_record(env, graph, model):
    """F4: the fallback went out, then the mirror write failed 5x and the row sat in 'working'."""
    config = load_config(env, env_file=None)
    dispatcher = build_dispatcher(config)
    store = dispatcher.store
    store.add([incoming("m_bad", "broken \udfff text")])
    store.add([incoming("m_next", "hello", psid="2000000000000002")])
    dispatcher.run_pending()
    assert store.states() == {"m_bad": "done", "m_next": "done"}
    with sqlite3.connect(config.database_path) as db:
        rows = db.execute("SELECT psid, user_message FROM interactions ORDER BY psid").fetchall()
    assert rows[0] == (PSID, "broken \ufffd text") and len(rows) == 2


def test_a_reply_finishing_during_a_graceful_stop_keeps_its_lease(env, graph, model):
    """The stop waits for the reply in flight: its lease is renewed all the while, so no other
    host takes it over (and sends it too) before it is done."""
    config = load_config({**env, "LEASE_SECONDS": "2", "OPENAI_TIMEOUT": "20"}, env_file=None)
    dispatcher = build_dispatcher(config)
    model.delay = 4.5  # the model answers more than two leases after the claim
    dispatcher.store.add([incoming("m_slow", "Anything new?")])
    dispatcher.start()
    other_host = SQLiteQueue(config.database_path)
    try:
        assert wait_for(lambda: dispatcher.in_flight == 1, 5)
        stopping = threading.Thread(target=dispatcher.stop, args=(10,))
        stopping.start()
        taken = []
        while stopping.is_alive():
            if batch := other_host.claim("another-host", 30):
                taken.append(batch)
            time.sleep(0.1)
        stopping.join()
        assert taken == [], "another host took the reply over during the stop"
        assert graph.sent_texts(PSID) == ["Hello from the model."]
        assert dispatcher.store.states() == {"m_slow": "done"}
    finally:
        other_host.close()


class BlockingClaimStore(SQLiteQueue):
    """claim() blocks until released: a claim loop stuck in a call that never returns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.entered, self.release = threading.Event(), threading.Event()
        self.die = False

    def claim(self, owner, lease_seconds, answering=()):
        if self.die:
            raise SystemExit("the claim thread dies")  # not an Exception: nothing catches it
        self.entered.set()
        self.release.wait(10)
        return None


def seen_at(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT MAX(seen_at) FROM dispatchers").fetchone()[0]


def test_a_stuck_claim_loop_stops_the_heartbeat_and_fails_health(env, caplog):
    config = load_config({**env, "LEASE_SECONDS": "3"}, env_file=None)
    clock = FakeClock()
    store = BlockingClaimStore(config.database_path)
    dispatcher = build_dispatcher(config, store)
    dispatcher.clock = clock
    dispatcher.start()
    try:
        assert store.entered.wait(5)
        assert dispatcher.healthy(clock()) == (True, "")
        clock.now += 61  # a minute without a turn of the claim loop
        healthy, reason = dispatcher.healthy(clock())
        assert not healthy and "has not turned for 61 s" in reason
        before = seen_at(config.database_path)
        # The upkeep loop (alive) decides on its next turn and says so: no heartbeat.
        with caplog.at_level(logging.ERROR):
            assert wait_for(lambda: "no heartbeat" in caplog.text, 5)
        assert seen_at(config.database_path) == before
        assert watch(dispatcher, lambda: False, lambda: False, clock, every=0.01) == 1  # the reply process exits
    finally:
        store.release.set()
        dispatcher.stop(timeout=5)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_claim_thread_fails_health(env, caplog):
    config = load_config(env, env_file=None)
    store = BlockingClaimStore(config.database_path)
    store.die = True
    dispatcher = build_dispatcher(config, store)
    dispatcher.start()
    try:
        assert wait_for(lambda: not dispatcher.healthy(time.monotonic())[0], 5)
        assert "dispatcher died" in dispatcher.healthy(time.monotonic())[1]
        before = seen_at(config.database_path)
        # The upkeep loop (alive) decides on its next turn and says so: no heartbeat.
        with caplog.at_level(logging.ERROR):
            assert wait_for(lambda: "no heartbeat" in caplog.text, 5)
        assert seen_at(config.database_path) == before
    finally:
        dispatcher.stop(timeout=1)


def test_watch_returns_zero_on_sigterm_or_orphan(env):
    dispatcher = build_dispatcher(load_config(env, env_file=None))
    assert watch(dispatcher, lambda: True, lambda: False) == 0
    assert watch(dispatcher, lambda: False, lambda: True, every=0.01) == 0


def test_repeated_errors_are_logged_once_per_period(caplog):
    clock = FakeClock()
    repeats = QuietRepeats(clock, period=60)
    with caplog.at_level(logging.ERROR):
        for _ in range(5):
            repeats.error("k", "database disk image is malformed")
            clock.now += 1
        clock.now += 60
        repeats.error("k", "database disk image is malformed")
    assert caplog.text.count("malformed") == 2
    assert "malformed (and 4 more time(s) in the 65 s before)" in caplog.text  # since it was logged


def test_a_poisoned_delivery_does_not_stop_replies_to_anyone(client, graph, model):
    """F2 end to end: the surrogate mid is refused at the edge; the next user is answered."""
    poison = text_body("m_\udfff_x", "hi")  # json.dumps writes the escape Meta-style: \udfff
    assert b"\\udfff" in poison
    assert post_signed(client, poison).status_code == 200
    assert post_signed(client, text_body("m_canary", "hello", psid="2000000000000009")).status_code == 200
    client.application.extensions["dispatcher"].run_pending()
    assert graph.sent_texts("2000000000000009") == ["Hello from the model."]


# -- a batch always ends: done, pending again, or failed - never left 'working' ----------------------
def answer_until_settled(dispatcher, seconds: float = 10.0) -> None:
    """Answer the queue, retries included, until no row is pending or working."""
    deadline = time.monotonic() + seconds
    while {"pending", "working"} & set(dispatcher.store.states().values()) and time.monotonic() < deadline:
        dispatcher.run_pending()
        time.sleep(0.02)


def exchanges(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT user_message, bot_message, model, prompt_tokens, completion_tokens,"
                          " total_tokens, outcome FROM interactions ORDER BY id").fetchall()


class BrokenLog(Conversations):
    """An exchange log that cannot be written at all (a damaged index, say)."""

    def finish(self, db, exchange):
        raise sqlite3.DatabaseError("database disk image is malformed")


class BrokenLogStore(SQLiteQueue):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conversations = BrokenLog(self._database)


def test_a_batch_whose_outcome_cannot_be_logged_still_ends_failed(env, graph, model, caplog):
    config = load_config({**env, "MAX_ATTEMPTS": "2", "RETRY_BASE_SECONDS": "0.01"}, env_file=None)
    store = BrokenLogStore(config.database_path, max_attempts=config.max_attempts)
    dispatcher = build_dispatcher(config, store)
    store.add([incoming("m_lost_log", "hi")])
    with caplog.at_level(logging.ERROR):
        answer_until_settled(dispatcher)
    assert store.states() == {"m_lost_log": "failed"}  # not 'working' until its lease runs out
    assert graph.sent_texts(PSID) == ["Hello from the model."]  # sent once: the retry did not send it again
    assert f"psid={PSID!r}" in caplog.text and "recorded without its exchange" in caplog.text


def test_a_stored_reply_that_cannot_be_read_ends_failed_with_an_exchange_record(env, graph, model):
    config = load_config({**env, "MAX_ATTEMPTS": "2", "RETRY_BASE_SECONDS": "0.01"}, env_file=None)
    dispatcher = build_dispatcher(config)
    store = dispatcher.store
    store.add([incoming("m_odd_reply", "hi")])
    store.retry(store.claim("earlier-owner", 30), 0, "timeout", '{"outcome": "answered"}')  # no "text"
    answer_until_settled(dispatcher)
    assert store.states() == {"m_odd_reply": "failed"}
    assert exchanges(config.database_path) == [("hi", None, None, None, None, None, "failed")]


def test_odd_model_name_and_token_counts_from_the_server_do_not_cost_the_exchange(env, graph, model):
    """The openai client does not validate responses: a proxy's odd fields reach us as they are."""
    odd = completion("Hello from the model.")
    odd["model"] = {"not": "a name"}
    odd["usage"] = {"prompt_tokens": 10 ** 30, "completion_tokens": "five", "total_tokens": -3}
    model.scripted.append(json_response(odd))
    config = load_config(env, env_file=None)
    dispatcher = build_dispatcher(config)
    dispatcher.store.add([incoming("m_odd_usage", "hi")])
    dispatcher.run_pending()
    assert dispatcher.store.states() == {"m_odd_usage": "done"}
    assert exchanges(config.database_path) == [
        ("hi", "Hello from the model.", config.openai_model, None, None, None, "answered")]


def test_error_and_reply_text_with_a_lone_surrogate_can_be_stored(env):
    store = SQLiteQueue(load_config(env, env_file=None).database_path, max_attempts=2)
    store.add([incoming("m_err", "hi")])
    assert store.retry(store.claim("me", 30), 0, "ValueError: bad \udfff", "part \udfff")
    store.fail(store.claim("me", 30), "ValueError: worse \udfff")
    assert store.states() == {"m_err": "failed"}
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT error, reply FROM events").fetchone() == ("ValueError: worse \ufffd", "part \ufffd")


def test_ids_are_logged_escaped_never_as_a_forged_line(env, graph, model, caplog):
    """F10: a psid holding a newline (stored before the edge checked ids) cannot start a log line."""
    config = load_config(env, env_file=None)
    dispatcher = build_dispatcher(config)
    forged = "2000000000000003\n2026-01-01 00:00:00 ERROR forged"
    photo = IncomingMessage(psid=forged, page_id="1", mid="m_photo", kind=ATTACHMENT, text="",
                            timestamp_ms=int(time.time() * 1000), attachment_types=("image",))
    dispatcher.store.add([photo])
    with caplog.at_level(logging.INFO):
        dispatcher.run_pending()
    assert "unsupported psid=" in caplog.text
    assert "\n2026-01-01 00:00:00 ERROR forged" not in caplog.text
