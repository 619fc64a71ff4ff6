"""A crash costs seconds, not a lease (real gunicorn processes): a dead reply process's work
is taken back by the next one at once, a kept answer is not asked of the model again, a
send under way at the kill is not repeated, and a slow but live owner is never taken over."""
import os
import signal
import sqlite3
import time

from tests.support import PSID, Bot, reply_process_pid, text_body, wait_until


def deaths(bot) -> list[int]:
    """events.deaths of every stored message: how many of its claims died with their process."""
    with sqlite3.connect(os.path.join(bot.env["DATA_DIR"], "bot.sqlite3")) as db:
        return [row[0] for row in db.execute("SELECT deaths FROM events")]


def kill_reply_process(bot) -> float:
    pid = reply_process_pid(bot)
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def test_a_killed_reply_process_is_replaced_and_its_work_answered_within_3_s(graph, model, tmp_path):
    bot = Bot(graph, model, tmp_path, LEASE_SECONDS="30").start()  # a lease could not explain a fast recovery
    try:
        assert wait_until(lambda: bool(reply_process_pid(bot)))
        model.delay = 5.0
        assert bot.post(text_body("m_in_flight", "Still there?")).status_code == 200
        assert wait_until(lambda: len(model.requests) == 1)
        killed_at = kill_reply_process(bot)
        model.delay = 0
        assert wait_until(lambda: graph.sent_texts(PSID) == ["Hello from the model."], 10), bot.log_text()
        recovery = time.monotonic() - killed_at
        print(f"recovery after a reply-process kill: {recovery:.2f} s")
        assert recovery < 3.0, bot.log_text()
        assert "took back 1 message(s)" in bot.log_text()
        assert deaths(bot) == [1]  # it died under a living master: what a poison message does, counted
    finally:
        bot.stop()


def test_a_restart_after_the_whole_bot_was_killed_answers_within_3_s(graph, model, tmp_path):
    bot = Bot(graph, model, tmp_path, LEASE_SECONDS="30").start()
    try:
        model.delay = 5.0
        assert bot.post(text_body("m_group", "Hello?")).status_code == 200
        assert wait_until(lambda: len(model.requests) == 1)
        bot.kill_9()
        model.delay = 0
        started = time.monotonic()
        bot.start()
        assert wait_until(lambda: graph.sent_texts(PSID) == ["Hello from the model."], 10), bot.log_text()
        print(f"answered {time.monotonic() - started:.2f} s after the restart began")
        assert time.monotonic() - started < 3.0 + 3.0  # gunicorn's own start (~1-2 s), then < 3 s
        assert deaths(bot) == [0]  # it died with the whole bot: not its message's doing, not counted
    finally:
        bot.stop()


def test_an_answer_already_given_and_a_send_under_way_are_not_repeated(graph, model, tmp_path):
    """Killed while the Send API call is in flight: the answer was kept (the model is not asked
    again) and the send did go out (Graph shows it), so nothing is sent twice."""
    bot = Bot(graph, model, tmp_path, LEASE_SECONDS="30").start()
    try:
        assert wait_until(lambda: bool(reply_process_pid(bot)))
        # Long enough to kill it mid-send; short enough that the send has landed before the new
        # reply process (after the supervisor's 1 s pause) looks for it.
        graph.delays["send"] = 0.6
        assert bot.post(text_body("m_sending", "Do you deliver?")).status_code == 200
        assert wait_until(lambda: any(c.path.endswith("/messages") and "message" in (c.body or {})
                                      for c in graph.calls), 10)
        kill_reply_process(bot)  # mid-send: the emulator still delivers it
        graph.delays["send"] = 0
        assert wait_until(lambda: bot.states() == {"m_sending": "done"}, 15), bot.log_text()
        time.sleep(0.5)
        assert graph.sent_texts(PSID) == ["Hello from the model."]
        assert len(model.requests) == 1
        assert "it went out, not sending it again" in bot.log_text()
    finally:
        bot.stop()


def test_a_slow_but_live_owner_is_not_taken_over_by_another_host(graph, model, tmp_path, pg_url):
    hosts = two_hosts(graph, model, tmp_path, pg_url, LEASE_SECONDS="2", OPENAI_TIMEOUT="20")
    try:
        for host in hosts:
            host.start()
        model.delay = 7.0  # three and a half leases
        assert hosts[0].post(text_body("m_slow", "A long question")).status_code == 200
        assert wait_until(lambda: graph.sent_texts(PSID) == ["Hello from the model."], 15)
        time.sleep(1.0)
        assert graph.sent_texts(PSID) == ["Hello from the model."] and len(model.requests) == 1
    finally:
        for host in hosts:
            host.stop()


def test_a_dead_hosts_work_is_taken_over_within_10_s(graph, model, tmp_path, pg_url):
    hosts = two_hosts(graph, model, tmp_path, pg_url, LEASE_SECONDS="8")
    try:
        for host in hosts:
            host.start()
        model.delay = 30.0
        assert hosts[0].post(text_body("m_lost_host", "Anyone?")).status_code == 200
        assert wait_until(lambda: len(model.requests) == 1)
        _holder(hosts, pg_url).kill_9()  # whichever host claimed it, the whole host
        killed_at = time.monotonic()
        model.delay = 0
        assert wait_until(lambda: graph.sent_texts(PSID) == ["Hello from the model."], 15)
        takeover = time.monotonic() - killed_at
        print(f"takeover after losing a host: {takeover:.2f} s (LEASE_SECONDS=8)")
        assert takeover < 10.0
    finally:
        for host in hosts:
            host.stop()


def two_hosts(graph, model, tmp_path, pg_url, **settings):
    for i in range(2):
        (tmp_path / f"host{i}").mkdir()
    return [Bot(graph, model, tmp_path / f"host{i}", DATABASE_URL=pg_url, **settings) for i in range(2)]


def _holder(hosts, pg_url):
    """The host whose reply process holds the claim (by its DATA_DIR's instance id)."""
    import psycopg

    from bot.storage.instance import owner_prefix

    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT owner FROM events WHERE state = 'working'").fetchone()
    return next(host for host in hosts if row[0].startswith(owner_prefix(host.env["DATA_DIR"])))


def test_a_reply_process_stopped_for_8_s_resumes_and_answers_once(graph, model, tmp_path):
    """SIGSTOP (a frozen VM, a debugger) is not a death: nothing is taken over twice, and the
    reply goes out once the process runs again."""
    bot = Bot(graph, model, tmp_path, LEASE_SECONDS="8", OPENAI_TIMEOUT="20").start()
    try:
        assert wait_until(lambda: bool(reply_process_pid(bot)))
        model.delay = 1.0
        assert bot.post(text_body("m_frozen", "Hello?")).status_code == 200
        assert wait_until(lambda: len(model.requests) == 1)
        pid = reply_process_pid(bot)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(8.0)
        os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        assert wait_until(lambda: graph.sent_texts(PSID) == ["Hello from the model."], 10), bot.log_text()
        print(f"answered {time.monotonic() - resumed:.2f} s after SIGCONT")
        time.sleep(1.0)
        assert graph.sent_texts(PSID) == ["Hello from the model."] and len(model.requests) == 1
        assert reply_process_pid(bot) == pid  # the same process: it was never taken for dead
    finally:
        bot.stop()
