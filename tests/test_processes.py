"""Guarantees about processes, checked on real gunicorn processes: several
workers, kill -9 after the 200, a restart, SIGTERM."""
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.support import (PAGE_ID, PAGE_TOKEN, PSID, ROOT, Bot, base_env, echo_body, reply_process_pid, text_body,
                           wait_until)
from tests.support.processes import worker_pids


@pytest.fixture
def make_bot(graph, model, tmp_path):
    bots = []

    def make(**settings):
        bots.append(Bot(graph, model, tmp_path, **settings))
        return bots[-1]
    yield make
    for bot in bots:
        bot.stop()


def test_redeliveries_landing_on_different_workers_are_answered_once(make_bot, graph, model):
    bot = make_bot(WEB_CONCURRENCY="3").start()
    model.delay = 0.3
    body = text_body("m_redelivered", "Are you open today?")
    statuses = []
    threads = [threading.Thread(target=lambda: statuses.append(bot.post(body).status_code)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 8
    assert wait_until(lambda: bot.states() == {"m_redelivered": "done"})
    time.sleep(1.0)  # room for a wrong second reply to show up
    assert graph.sent_texts(PSID) == ["Hello from the model."]
    assert len(model.requests) == 1


def test_kill_9_right_after_the_200_loses_nothing(make_bot, graph, model):
    bot = make_bot().start()
    model.delay = 3.0  # the reply is still being prepared when the bot dies
    assert bot.post(text_body("m_survivor", "Do you deliver?")).status_code == 200
    bot.kill_9()
    assert graph.sent_texts(PSID) == []
    # stored (drained into the queue, or still in the inbox file), not answered
    assert bot.states().get("m_survivor") in ("pending", "working") or bot.backlog() == 1

    model.delay = 0
    bot.start()  # the next start picks the message up once its lease has expired
    assert wait_until(lambda: graph.sent_texts(PSID) == ["Hello from the model."], 15)
    assert wait_until(lambda: bot.states() == {"m_survivor": "done"})
    time.sleep(1.0)
    assert graph.sent_texts(PSID) == ["Hello from the model."]


def test_kill_9_mid_burst_then_restart_answers_every_message_exactly_once(make_bot, graph, model):
    bot = make_bot(WEB_CONCURRENCY="2").start()
    model.delay = 0.4
    users = [f"30000000000{i:05d}" for i in range(30)]
    for i, psid in enumerate(users):
        assert bot.post(text_body(f"m_burst_{i}", f"question {i}", psid=psid)).status_code == 200
    time.sleep(0.5)  # some replies are out, some in flight, some waiting
    bot.kill_9()
    answered_before = len(graph.sent_texts())
    states_at_kill = bot.states()
    model.delay = 0
    bot.start()
    # Exactly once, not how fast (tests/test_recovery.py times a takeover): after the restart the
    # sends that were under way are looked for in Graph, each in its turn of the Page's 2 reads a
    # second, beside the new users' history reads - on a busy CI machine that took over 20 s once.
    assert wait_until(lambda: set(bot.states().values()) == {"done"}, 60), bot.log_text()
    sent_to = [psid for psid, _ in graph.delivered]
    assert set(sent_to) == set(users), "nothing lost"
    # A send that Meta accepted just before the kill, not yet marked done, goes out again:
    # only messages in flight at that moment, never one already marked done.
    repeated = {psid for psid in sent_to if sent_to.count(psid) > 1}
    assert all(states_at_kill[f"m_burst_{users.index(psid)}"] == "working" for psid in repeated), (
        repeated, answered_before)


@pytest.mark.parametrize("reloaded", [False, True], ids=["as-started", "after-a-reload"])
def test_sigterm_finishes_the_reply_in_flight(make_bot, graph, model, reloaded):
    """The master waits for the reply process's replies in flight - also after a reload (SIGHUP),
    which reads gunicorn.conf.py again: a probe found the master no longer knew its processes then,
    exited at once, and systemd or docker killed the reply mid-answer."""
    bot = make_bot().start()
    if reloaded:
        old = worker_pids(bot)
        bot.process.send_signal(signal.SIGHUP)
        # The new workers up, the old ones gone: a connection queued at an old one's socket is reset.
        assert wait_until(lambda: len(worker_pids(bot) - old) >= 1 and not worker_pids(bot) & old, 20), bot.log_text()
    model.delay = 1.5
    assert bot.post(text_body("m_graceful", "Last question")).status_code == 200
    assert wait_until(lambda: len(model.requests) == 1)
    bot.process.send_signal(signal.SIGTERM)
    assert bot.process.wait(timeout=30) == 0
    assert graph.sent_texts(PSID) == ["Hello from the model."]  # before the master was gone
    with pytest.raises(ProcessLookupError):  # and nothing of it is left
        os.killpg(bot.process.pid, 0)
    assert bot.states() == {"m_graceful": "done"}


def test_a_reload_with_bad_settings_keeps_the_bot_on_those_it_runs_with(make_bot, graph, model):
    """`.env` edited with a mistake, then SIGHUP: the master says what is wrong and its new
    workers run on the settings it had; a good edit and SIGHUP then take effect."""
    bot = make_bot()
    env_file = bot.tmp_path / ".env"
    env_file.write_text(f"FB_VERIFY_TOKEN={bot.env.pop('FB_VERIFY_TOKEN')}\n")
    token = env_file.read_text()
    old_token = token.split("=", 1)[1].strip()
    bot.start()
    assert wait_until(lambda: "reply process ready" in bot.log_text(), 15), bot.log_text()
    replying = reply_process_pid(bot)

    def verifies(verify_token: str) -> bool:
        query = {"hub.mode": "subscribe", "hub.verify_token": verify_token, "hub.challenge": "4242"}
        response = requests.get(bot.url + "/webhook", params=query, timeout=5)
        return response.status_code == 200 and response.text == "4242"

    def reload() -> None:
        old = worker_pids(bot)
        bot.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: len(worker_pids(bot) - old) >= 1 and not worker_pids(bot) & old, 20), bot.log_text()

    env_file.write_text(token.replace("FB_VERIFY_TOKEN=", "FB_VERIFY_TOKEN=new-") + "RATE_LIMIT=often\n")
    reload()
    assert bot.process.poll() is None, bot.log_text()
    assert "RATE_LIMIT" in bot.log_text() and "not taken" in bot.log_text()
    assert verifies(old_token) and not verifies("new-" + old_token)
    # gunicorn's own lines (the access log here) are still scrubbed of the settings' secrets.
    assert requests.get(f"{bot.url}/{old_token}", timeout=5).status_code == 404
    assert bot.post(text_body("m_after_a_bad_reload", "Still there?")).status_code == 200
    assert wait_until(lambda: graph.sent_texts(PSID) == ["Hello from the model."]), bot.log_text()
    assert reply_process_pid(bot) == replying  # not started again: it would read the bad `.env`
    # What only a start checks (a free port here) is not taken by a reload either.
    env_file.write_text(token.replace("FB_VERIFY_TOKEN=", "FB_VERIFY_TOKEN=new-") + "WEBCHAT=on\n")
    reload()
    assert "WEBCHAT change only with a restart" in bot.log_text()
    assert verifies(old_token) and reply_process_pid(bot) == replying

    # A good edit reaches the reply process too: started again, it reads it.
    env_file.write_text(token.replace("FB_VERIFY_TOKEN=", "FB_VERIFY_TOKEN=new-") + "OPENAI_MODEL=model-after-reload\n")
    reload()
    assert verifies("new-" + old_token), bot.log_text()
    assert wait_until(lambda: reply_process_pid(bot) not in (None, replying), 20), bot.log_text()
    assert bot.post(text_body("m_after_a_good_reload", "And now?", timestamp=1763893300000)).status_code == 200
    assert wait_until(lambda: len(graph.sent_texts(PSID)) == 2), bot.log_text()
    assert [r["json"]["model"] for r in model.requests] == ["gpt-4.1-mini", "model-after-reload"]
    # A SIGHUP with nothing changed (logrotate's) leaves it be: its stop would pause the replies.
    replying = reply_process_pid(bot)
    reload()
    assert not wait_until(lambda: reply_process_pid(bot) != replying, 3), bot.log_text()
    bot.log.flush()
    log = (bot.tmp_path / "gunicorn.log").read_text()
    assert '"GET /[redacted] HTTP/1.1" 404' in log and old_token not in log


def test_a_reply_process_started_again_runs_on_the_settings_the_master_checked(make_bot, graph, model, tmp_path):
    """`.env` and the Pages file edited (here with mistakes) and no SIGHUP, or a SIGHUP refused: a
    reply process started again - after a crash, a freeze, a reload - takes the settings the
    master validated, not the files. Before, it read the file, failed, and was started again every second or two
    while the messages acknowledged meanwhile waited."""
    pages_file = tmp_path / "pages.toml"
    bot = make_bot(PAGES_FILE=str(pages_file), FB_PAGE_ID="", FB_PAGE_ACCESS_TOKEN="")
    pages_file.write_text(f'[[pages]]\nid = "{PAGE_ID}"\naccess_token = "{PAGE_TOKEN}"\n')
    env_file = tmp_path / ".env"
    env_file.write_text("OPENAI_MODEL=checked-model\n")
    bot.start()
    assert wait_until(lambda: reply_process_pid(bot) is not None, 15), bot.log_text()
    first = reply_process_pid(bot)
    env_file.write_text("OPENAI_MODEL=unchecked-model\nRATE_LIMIT=often\n")
    pages_file.write_text("[[pages]]\nid = 'not a number'\n")
    os.kill(first, signal.SIGKILL)  # a crash
    assert wait_until(lambda: reply_process_pid(bot) not in (None, first), 15), bot.log_text()
    assert bot.post(text_body("m_after_a_crash", "Still there?")).status_code == 200
    assert wait_until(lambda: graph.sent_texts(PSID) == ["Hello from the model."]), bot.log_text()
    assert [r["json"]["model"] for r in model.requests] == ["checked-model"]
    assert "RATE_LIMIT" not in bot.log_text() and "PAGES_FILE" not in bot.log_text()


def test_replies_to_one_user_go_out_in_order_across_workers(make_bot, graph, model):
    # Six messages from one user: over the default RATE_LIMIT (5/minute), whose notice is no echo.
    bot = make_bot(WEB_CONCURRENCY="2", RATE_LIMIT="off").start()
    model.echo = True
    model.delay = 0.3
    for i in range(6):
        bot.post(text_body(f"m_order_{i}", f"message {i}", timestamp=1763893200000 + i))
        time.sleep(0.1)
    assert wait_until(lambda: set(bot.states().values()) == {"done"} and len(bot.states()) == 6, 15)
    answered = [int(text.rsplit(" ", 1)[1]) for text in graph.sent_texts(PSID)]
    assert answered == sorted(answered) and answered[-1] == 5
    assert len(answered) < 6, "messages written while a reply was prepared are answered together"


def test_a_dead_reply_process_is_replaced_and_its_work_resumed(make_bot, graph, model):
    bot = make_bot().start()
    assert wait_until(lambda: bool(reply_process_pid(bot)))
    alive = os.path.join(bot.env["DATA_DIR"], "reply-process.alive")  # the master replaces it if frozen
    touching = reply_process_pid(bot)
    for _ in range(2):  # touched again and again by the same process, not by each new one's start
        seen = os.stat(alive).st_mtime_ns
        assert wait_until(lambda: os.stat(alive).st_mtime_ns != seen, 5)
    assert reply_process_pid(bot) == touching
    model.delay = 3.0
    assert bot.post(text_body("m_orphaned", "Still there?")).status_code == 200
    assert wait_until(lambda: len(model.requests) == 1)
    first = reply_process_pid(bot)
    os.kill(first, signal.SIGKILL)
    model.delay = 0
    assert wait_until(lambda: graph.sent_texts(PSID) == ["Hello from the model."], 15), bot.log_text()
    assert reply_process_pid(bot) not in (None, first)
    assert bot.states() == {"m_orphaned": "done"}


def test_metrics_and_health_sum_every_process(make_bot, graph, model):
    bot = make_bot(WEB_CONCURRENCY="2").start()
    for i in range(3):
        assert bot.post(text_body(f"m_metrics_{i}", "hi", psid=f"70000000000000{i:02d}")).status_code == 200
    bot.post(text_body("m_metrics_0", "hi", psid="7000000000000000"))  # a redelivery
    assert wait_until(lambda: len(graph.sent_texts()) == 3)

    def scrape():
        metrics = requests.get(bot.url + "/metrics", timeout=5).text
        return dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))
    # The reply process counts a reply once it is recorded, just after its send.
    assert wait_until(lambda: float(scrape().get("messenger_reply_latency_seconds_count", 0)) == 3, 10)
    values = scrape()
    # counted in the webhook workers ...
    assert float(values['messenger_events_total{outcome="accepted"}']) == 3
    assert float(values['messenger_events_total{outcome="duplicate"}']) == 1
    # ... and in the reply process, served together
    assert float(values["messenger_replies_sent_total"]) == 3
    assert float(values["messenger_reply_latency_seconds_count"]) == 3
    health = requests.get(bot.url + "/healthz", timeout=5).json()
    assert (health["queue_depth"], health["in_flight"]) == (0, 0)
    assert 0 <= health["dispatcher_seen_s_ago"] < 5  # the reply process is alive


def test_rate_limit_and_takeover_hold_across_workers(make_bot, graph, model):
    bot = make_bot(WEB_CONCURRENCY="2", RATE_LIMIT="2/minute").start()
    now = int(time.time() * 1000)
    for n, replies in ((1, 1), (2, 2), (3, 3)):  # each POST on a new connection: any worker takes it
        assert bot.post(text_body(f"m_limit_{n}", f"question {n}", PSID, now + n)).status_code == 200
        assert wait_until(lambda: len(graph.sent_texts(PSID)) == replies), bot.log_text()
    assert bot.post(text_body("m_limit_4", "question 4", PSID, now + 4)).status_code == 200
    other = "2000000000000002"
    assert bot.post(echo_body("m_person", "A person answers", other, app_id=1, timestamp=now)).status_code == 200
    assert bot.post(text_body("m_other", "Thanks!", other, now + 5)).status_code == 200
    assert wait_until(lambda: bot.states().get("m_limit_4") == "done" and bot.states().get("m_other") == "done")
    assert len(model.requests) == 2  # two answers; the notice, the 4th and the paused user cost no model call
    assert graph.sent_texts(PSID)[2].startswith("You are writing faster")
    assert graph.sent_texts(other) == [] and len(graph.sent_texts()) == 3


# Finishes its work for 2 s after SIGTERM, as the reply process and the website chat do.
GRACEFUL_CHILD = """
import signal, sys, time
def stop(*_):
    open(sys.argv[1], 'a').write(f'{time.monotonic()}\\n')
    time.sleep(2)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[1], 'a').write('up\\n')
while True:
    time.sleep(1)
"""


def test_the_master_stops_its_processes_together_not_one_after_the_other(tmp_path):
    """The website chat and the reply process each get their graceful time at once: in turn, the
    reply process went on claiming while the chat finished, and the stop took both times added up."""
    from bot.runtime.supervisor import ReplySupervisor, stop_together

    notes = [tmp_path / "webchat", tmp_path / "replies"]
    kept = [ReplySupervisor(command=("-c", GRACEFUL_CHILD, str(note))) for note in notes]
    for process in kept:
        process.start()
    assert wait_until(lambda: all(n.exists() and n.read_text().startswith("up") for n in notes))
    started = time.monotonic()
    stop_together([(process, 10.0) for process in kept])
    took = time.monotonic() - started
    asked = [float(note.read_text().split()[1]) for note in notes]
    assert abs(asked[0] - asked[1]) < 0.5, asked  # the second was not kept waiting for the first
    assert 1.9 < took < 3.5, took  # one graceful time, not two (4 s)


STUBBORN_CHILD = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], 'a').write('up\\n')
while True:
    time.sleep(1)
"""


def test_a_process_that_ignores_sigterm_is_killed_at_its_time_and_the_others_still_finish(tmp_path):
    from bot.runtime.supervisor import ReplySupervisor, stop_together

    stubborn = ReplySupervisor(command=("-c", STUBBORN_CHILD, str(tmp_path / "stubborn")), name="stubborn")
    graceful = ReplySupervisor(command=("-c", GRACEFUL_CHILD, str(tmp_path / "graceful")), name="graceful")
    for process in (stubborn, graceful):
        process.start()
    assert wait_until(lambda: all((tmp_path / n).exists() for n in ("stubborn", "graceful")))
    assert wait_until(lambda: stubborn.pid and graceful.pid)
    pids = [stubborn.pid, graceful.pid]
    started = time.monotonic()
    stop_together([(stubborn, 1.0), (graceful, 10.0)])
    assert 1.9 < time.monotonic() - started < 3.5  # the graceful one's 2 s, begun with the other's 1 s
    for pid in pids:
        assert wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
                          open(f"/proc/{pid}/stat").read().split()[2] == "Z", 5)


# Says it is alive as the reply process and the website chat do, and notes each start.
ALIVE_CHILD = f"""
import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
from bot.runtime.liveness import keep_saying_alive
open(sys.argv[1], 'a').write(f'{{os.getpid()}}\\n')
keep_saying_alive()
while True:
    time.sleep(1)
"""


def test_a_frozen_kept_process_is_killed_and_a_fresh_one_started_and_a_live_one_is_left_alone(tmp_path):
    """SIGSTOP (or a debugger, or a wedge in native code) freezes the whole process: its own
    health check cannot run, so the master's look at its alive file must end it."""
    from bot.runtime.supervisor import ReplySupervisor

    kept = {name: ReplySupervisor(command=("-c", ALIVE_CHILD, str(tmp_path / name)), name=name, restart_pause=0.1,
                                  alive_file=str(tmp_path / f"{name}.alive"), frozen_after=3.0)
            for name in ("frozen", "live")}
    for process in kept.values():
        process.start()
    try:
        assert wait_until(lambda: all((tmp_path / name).exists() for name in kept))
        first = int((tmp_path / "frozen").read_text().split()[0])
        os.kill(first, signal.SIGSTOP)
        assert wait_until(lambda: len((tmp_path / "frozen").read_text().split()) == 2, 15)
        assert not os.path.exists(f"/proc/{first}") or open(f"/proc/{first}/stat").read().split()[2] == "Z"
        assert len((tmp_path / "live").read_text().split()) == 1  # 3 s and more, touched: never killed
    finally:
        for process in kept.values():
            process.stop(5)


def test_a_restart_starts_a_new_process_at_once_and_a_crash_after_it_is_still_a_crash(tmp_path, caplog):
    """SIGHUP's restart: the process is stopped and a new one started without the pause a crash
    gets (the webhooks are up, replies wait meanwhile). Asked between two processes it does
    nothing, and the next crash is logged as one."""
    from bot.runtime.supervisor import ReplySupervisor

    starts = tmp_path / "starts"
    kept = ReplySupervisor(command=("-c", ALIVE_CHILD, str(starts)), restart_pause=3.0)
    started = lambda: starts.read_text().split() if starts.exists() else []  # noqa: E731
    caplog.set_level(logging.INFO)
    kept.start()
    try:
        assert wait_until(lambda: len(started()) == 1 and kept.pid)
        first = kept.pid
        asked = time.monotonic()
        kept.restart()
        assert wait_until(lambda: len(started()) == 2, 10)
        assert time.monotonic() - asked < 2.5  # not the 3 s pause
        assert "stopped for the new settings" in caplog.text
        assert not os.path.exists(f"/proc/{first}") or open(f"/proc/{first}/stat").read().split()[2] == "Z"
        os.kill(int(started()[1]), signal.SIGKILL)  # a crash
        assert wait_until(lambda: kept.pid is None, 5)
        kept.restart()  # in the crash's pause: nothing to stop, and nothing is left to mislabel
        assert wait_until(lambda: len(started()) == 3, 10)
        os.kill(int(started()[2]), signal.SIGKILL)  # another crash: logged as one, after the pause
        assert wait_until(lambda: len(started()) == 4, 10)
        crashes = [r for r in caplog.records if "exited" in r.getMessage()]
        assert [r.levelno for r in crashes] == [logging.ERROR, logging.ERROR], caplog.text
        assert caplog.text.count("stopped for the new settings") == 1
    finally:
        kept.stop(5)


@pytest.mark.parametrize("command, settings", [
    ("bot.runtime.reply_process", {}),
    ("bot.webchat.serve", {"WEBCHAT": "on"}),
], ids=["reply-process", "website-chat"])
def test_a_process_whose_master_died_while_it_started_stops(graph, model, tmp_path, command, settings):
    """Found by a probe: a master killed (kill -9) during its reply process's start-up left that
    process watching init, answering beside the next start's for ever. The master's pid is
    given to it (BOT_MASTER_PID): here one already gone."""
    from tests.support.processes import free_port

    gone = subprocess.Popen(["true"])
    gone.wait()
    env = {**base_env(graph, model, tmp_path), "PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT),
           "HOST": "127.0.0.1", "PORT": str(free_port()), "WEBCHAT_PORT": str(free_port()),
           "BOT_MASTER_PID": str(gone.pid), **settings}
    os.makedirs(env["DATA_DIR"], exist_ok=True)
    process = subprocess.Popen([sys.executable, "-m", command], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = process.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
        pytest.fail(f"{command} outlived its master:\n{output[-2000:]}")
    assert process.returncode == 0 and "Traceback" not in output, output[-2000:]
