"""Issue 9, F2 and F4: nothing stops the reply machinery, and a loop that stops anyway is seen."""
import logging
import sqlite3
import threading
import time

import pytest

from bot.dispatcher import QuietRepeats
from bot.replies import build_dispatcher
from bot.store import SQLiteStore
from bot.worker import watch
from config import load_config
from messenger.events import TEXT, IncomingMessage
from tests.conftest import PSID, text_body, post_signed, wait_for


def incoming(mid, text, psid=PSID):
    return IncomingMessage(psid=psid, page_id="1", mid=mid, kind=TEXT, text=text, timestamp_ms=int(time.time() * 1000))


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FlakyDrainStore(SQLiteStore):
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
        finally:
            dispatcher.stop(timeout=5)
    assert store.failures == 0
    assert caplog.text.count("claim failed, will poll again: OverflowError") == 1  # not once per poll


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


class BlockingClaimStore(SQLiteStore):
    """claim() blocks until released: a claim loop stuck in a call that never returns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.entered, self.release = threading.Event(), threading.Event()
        self.die = False

    def claim(self, owner, lease_seconds):
        if self.die:
            raise SystemExit("the claim thread dies")  # not an Exception: nothing catches it
        self.entered.set()
        self.release.wait(10)
        return None


def seen_at(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT MAX(seen_at) FROM dispatchers").fetchone()[0]


def test_a_stuck_claim_loop_stops_the_heartbeat_and_fails_health(env):
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
        time.sleep(1.5)  # the upkeep loop runs every second: it must not write the heartbeat now
        assert seen_at(config.database_path) == before
        stop = threading.Event()
        assert watch(dispatcher, stop, lambda: False, clock, every=0.01) == 1  # the reply process exits
    finally:
        store.release.set()
        dispatcher.stop(timeout=5)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_claim_thread_fails_health(env):
    config = load_config(env, env_file=None)
    store = BlockingClaimStore(config.database_path)
    store.die = True
    dispatcher = build_dispatcher(config, store)
    dispatcher.start()
    try:
        assert wait_for(lambda: not dispatcher.healthy(time.monotonic())[0], 5)
        assert "dispatcher died" in dispatcher.healthy(time.monotonic())[1]
    finally:
        dispatcher.stop(timeout=1)


def test_watch_returns_zero_on_sigterm_or_orphan(env):
    dispatcher = build_dispatcher(load_config(env, env_file=None))
    stop = threading.Event()
    stop.set()
    assert watch(dispatcher, stop, lambda: False) == 0
    assert watch(dispatcher, threading.Event(), lambda: True, every=0.01) == 0


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
    assert "and 4 more time(s) in the last 60 s" in caplog.text


def test_a_poisoned_delivery_does_not_stop_replies_to_anyone(client, graph, model):
    """F2 end to end: the surrogate mid is refused at the edge; the next user is answered."""
    poison = text_body("m_\udfff_x", "hi")  # json.dumps writes the escape Meta-style: \udfff
    assert b"\\udfff" in poison
    assert post_signed(client, poison).status_code == 200
    assert post_signed(client, text_body("m_canary", "hello", psid="2000000000000009")).status_code == 200
    client.application.extensions["dispatcher"].run_pending()
    assert graph.sent_texts("2000000000000009") == ["Hello from the model."]
