"""Issue 9, point 6: kill -9 at random - a webhook worker, the reply process, or the whole
process group (then a restart) - during a stream of messages. Nothing acknowledged is lost;
a repeat is possible only for a send in flight at a kill, and is counted and printed."""
import os
import random
import signal
import threading
import time

import requests

from tests.support import Bot, text_body, wait_until

MESSAGES = 300
REPLY_THREADS = 8


def children(pid: int) -> list[int]:
    """Every thread's children: the reply process is spawned by the master's supervisor thread."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    except FileNotFoundError:
        pass
    return found


def is_reply_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"bot.runtime.reply_process" in f.read()
    except FileNotFoundError:
        return False


def stream(bot: Bot, acknowledged: list[str], done: threading.Event) -> None:
    """One message per user, each retried as Meta retries until it gets its 200."""
    for i in range(MESSAGES):
        psid = f"3{i:015d}"
        body = text_body(f"m_chaos_{i}", f"question {i}", psid=psid)
        for _ in range(100):
            try:
                if bot.post(body).status_code == 200:
                    acknowledged.append(psid)
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        time.sleep(0.05)
    done.set()


def traces(bot: Bot, psids: list[str]) -> str:
    """The log lines about these users (the whole log is too long to read in a failure)."""
    log = (bot.tmp_path / "gunicorn.log").read_text()
    marks = [p for p in psids] + [f"m_chaos_{int(p[1:])}'" for p in psids]
    return "\n".join(line for line in log.splitlines() if any(m in line for m in marks))


def test_random_kill_9_loses_nothing_acknowledged(graph, model, tmp_path):
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    bot = Bot(graph, model, tmp_path, LEASE_SECONDS="2", RATE_LIMIT="off", REPLY_THREADS=str(REPLY_THREADS)).start()
    model.delay = 0.2
    acknowledged: list[str] = []
    done = threading.Event()
    sender = threading.Thread(target=stream, args=(bot, acknowledged, done), daemon=True)
    sender.start()
    kills: list[str] = []
    try:
        while not done.wait(rng.uniform(0.5, 1.5)):
            kind = rng.choice(["webhook worker", "reply process", "process group"])
            pids = children(bot.process.pid)
            if kind == "process group":
                bot.kill_9()
                bot.start()
            else:
                targets = [p for p in pids if is_reply_process(p) == (kind == "reply process")]
                if not targets:
                    continue  # being restarted right now
                os.kill(rng.choice(targets), signal.SIGKILL)
            kills.append(kind)
        sender.join(timeout=60)
        everyone = wait_until(lambda: all(graph.sent_texts(p) for p in acknowledged), 90)
        lost = [p for p in acknowledged if not graph.sent_texts(p)]
        repeats = {p: len(graph.sent_texts(p)) - 1 for p in acknowledged if len(graph.sent_texts(p)) > 1}
        reply_kills = sum(kind != "webhook worker" for kind in kills)
        report = (f"chaos seed={seed}: {len(acknowledged)} of {MESSAGES} acknowledged, kills={kills}, "
                  f"lost={len(lost)}, repeats={sum(repeats.values())} {repeats}")
        print(report)
        assert everyone and not lost, report + f" lost={lost}\n" + traces(bot, lost + list(repeats))
        assert len(acknowledged) == MESSAGES, report  # Meta's retries got every one in
        assert sum(repeats.values()) <= REPLY_THREADS * reply_kills, report
        assert kills, report
    finally:
        done.set()
        if bot.process.poll() is None:
            bot.kill_9()
