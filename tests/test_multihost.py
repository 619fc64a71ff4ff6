"""Several hosts as one bot on one PostgreSQL (DATABASE_URL), as real `gunicorn server:app`
processes: each host with its own port and DATA_DIR, all with the same database.

- A stream of messages, each delivered to one host and redelivered to another (as Meta
  does after a timeout), while one host is killed with kill -9: every acknowledged message
  is answered once, each user's replies in the order they wrote. A repeat is possible only
  for a reply in flight on the killed host at the kill; those are counted and printed.
- One delivery sent to all three hosts at once: one reply.
- PostgreSQL stopped for ~3 s mid-stream (a private server, tests/support/pgserver.py):
  no 200 while it is down (503, and /readyz says the database is the problem); once it is
  back, the reply processes resume by themselves and every acknowledged message is
  answered exactly once - but for a batch in flight when it went away, which cannot record
  its outcome: like a send in flight at a kill -9, its reply may repeat (counted, printed).

Each host's folder under tmp_path holds its gunicorn.log and DATA_DIR; MULTIHOST_SEED
replays the first test's stream, MULTIHOST_OUTAGE_S lengthens the outage of the last.

The model echoes ("re: <last user turn>"), so each reply names the message that ended its
batch; what each model request answered is read from its trailing user turns (a batch of
several messages is one request: the earlier messages as user turns, the last with the
politeness prefix).
"""
from __future__ import annotations

import collections
import os
import random
import threading
import time

import psycopg
import pytest
import requests

from bot.storage.instance import owner_pid
from bot.storage.postgres import CLAIM_LOCK
from messenger.signature import sign
from tests.support import APP_SECRET, Bot, echo_body, text_body, wait_until

USERS = 30
PER_USER = 5  # 150 messages
SENDERS = 6  # Meta's delivery threads; each owns some users and sends their messages in order


# -- helpers --------------------------------------------------------------------------------------
def rows(url: str, sql: str, *params) -> list[tuple]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


def psid_of(user: int) -> str:
    return f"41{user:014d}"


def text_of(user: int, k: int) -> str:
    return f"user {user} says {k}"


def mid_of(user: int, k: int) -> str:
    return f"m_multi_{user}_{k}"


def writes(user: int, k: int, last_ms: dict[int, int]) -> tuple[str, bytes]:
    """User `user`'s k-th message as Meta delivers it: (mid, body). Meta stamps the time the
    user wrote, increasing for each user (`last_ms` keeps each user's last stamp)."""
    timestamp = max(int(time.time() * 1000), last_ms.get(user, 0) + 1)
    last_ms[user] = timestamp
    mid = mid_of(user, k)
    return mid, text_body(mid, text_of(user, k), psid=psid_of(user), timestamp=timestamp)


def reply_process_pid(bot: Bot) -> int | None:
    """The host's reply process: a child of its gunicorn master (spawned by a thread of it)."""
    master = bot.process.pid
    try:
        tasks = os.listdir(f"/proc/{master}/task")
    except FileNotFoundError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{master}/task/{task}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except FileNotFoundError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"bot.runtime.reply_process" in f.read():
                        return pid
            except FileNotFoundError:
                continue
    return None


def owned_by(pid: int) -> str:
    """A LIKE pattern for the queue rows leased by reply process `pid` (owner = instance:lineage.pid:random,
    the lineage being its gunicorn master's start)."""
    return f"%.{pid}:%"


def answered_in(request: dict) -> list[str]:
    """The user messages one model request answered: its user turns after the last assistant turn
    (the last one carries the politeness prefix, which the echo strips the same way)."""
    turns = request["json"]["messages"]
    texts = []
    for turn in reversed(turns):
        if turn["role"] != "user":
            break
        texts.append(turn["content"])
    if texts:
        texts[0] = texts[0].rsplit(" : ", 1)[-1]
    return texts[::-1]


def check_answers(url: str, acknowledged: set[str], mid_by_text: dict[str, str], model, graph, *,
                  model_may_repeat: set[str], reply_may_repeat: set[str], allowed: str) -> tuple[list[str], dict]:
    """Every acknowledged message answered exactly once, in order, as the model and the Send API saw it.

    Returns (problems, figures). A message may reach the model again only if it is in
    `model_may_repeat`; a batch's reply may go out twice (back to back, never three times) only
    if one of its messages is in `reply_may_repeat`. `allowed` says when, for the problems.
    """
    problems: list[str] = []
    states = {key: (psid, batch, state) for key, psid, batch, state in
              rows(url, "SELECT dedupe_key, psid, batch_id, state FROM events")}
    not_done = {mid: states.get(mid, (None, None, "missing"))[2] for mid in acknowledged
                if states.get(mid, (None, None, None))[2] != "done"}
    if not_done:
        problems.append(f"acknowledged but not done: {not_done}")

    # What the model was asked: each message in exactly one request.
    seen = collections.Counter()
    for request in model.requests:
        for text in answered_in(request):
            if text in mid_by_text:
                seen[mid_by_text[text]] += 1
            else:
                problems.append(f"a model request answered an unknown text {text!r}")
    lost = sorted(mid for mid in acknowledged if seen[mid] == 0)
    repeated = {mid: n for mid, n in seen.items() if n > 1}
    if lost:
        problems.append(f"never sent to the model (lost): {lost}")
    if set(repeated) - model_may_repeat:
        problems.append(f"sent to the model more than once (allowed only {allowed}): "
                        f"{ {m: n for m, n in repeated.items() if m not in model_may_repeat} }")

    # What the users got: one reply per batch, to the batch's last message, in order.
    batches: dict[int, list[str]] = collections.defaultdict(list)
    for mid in acknowledged:
        if mid in states and states[mid][1] is not None:
            batches[states[mid][1]].append(mid)
    last_of_batch = {}  # the mid each batch's reply answers -> the batch's mids
    for members in batches.values():
        members.sort(key=lambda mid: int(mid.rsplit("_", 1)[1]))
        last_of_batch[members[-1]] = members
    reply_repeats = []
    for psid in sorted({states[mid][0] for mid in acknowledged if mid in states}):
        replies = graph.sent_texts(psid)
        answered = []
        for reply in replies:
            mid = mid_by_text.get(reply.removeprefix("re: "))
            if mid is None or mid not in last_of_batch:
                problems.append(f"{psid}: reply {reply!r} answers no batch (replies: {replies})")
            answered.append(mid)
        for i, mid in enumerate(answered[1:], start=1):
            if mid == answered[i - 1]:
                reply_repeats.append(mid)
                if not set(last_of_batch.get(mid, ())) & reply_may_repeat:
                    problems.append(f"{psid}: reply to {mid} sent twice (allowed only {allowed}): {replies}")
                elif i >= 2 and mid == answered[i - 2]:
                    problems.append(f"{psid}: reply to {mid} sent three times: {replies}")
        once = [m for i, m in enumerate(answered) if i == 0 or m != answered[i - 1]]
        expected = sorted((m for m in last_of_batch if states[m][0] == psid), key=lambda m: int(m.rsplit("_", 1)[1]))
        if once != expected:
            problems.append(f"{psid}: replies answer {answered}, expected one each, in order: {expected}")
    figures = {"model_requests": len(model.requests), "model_repeats": sum(n - 1 for n in repeated.values()),
               "repeated_mids": sorted(repeated), "batches": len(batches), "replies": len(graph.sent_texts()),
               "reply_repeats": reply_repeats}
    return problems, figures


def plan_stream(rng: random.Random, senders: int, users: int, per_user: int) -> list[list[tuple[int, int]]]:
    """For each sender, its users' messages (user, k) interleaved at random, each user's in order."""
    plans = []
    for s in range(senders):
        mine = list(range(s, users, senders))
        queue = [u for u in mine for _ in range(per_user)]
        rng.shuffle(queue)
        counters = collections.Counter()
        plan = []
        for u in queue:
            plan.append((u, counters[u]))
            counters[u] += 1
        plans.append(plan)
    return plans


@pytest.fixture
def make_hosts(graph, model, tmp_path):
    """Hosts of one bot: each a `gunicorn server:app` with its own port and DATA_DIR folder."""
    hosts: list[Bot] = []

    def make(count: int, database_url: str, **settings: str) -> list[Bot]:
        made = []
        for _ in range(count):
            folder = tmp_path / f"host{len(hosts)}"
            folder.mkdir()
            # GRAPH_READS_PER_SECOND: each new user's first reply reads the history from Graph; at
            # the default 2 a second, 30 new users would queue ~15 s for their reads.
            bot = Bot(graph, model, folder, **{"DATABASE_URL": database_url, "LEASE_SECONDS": "2",
                                                "RATE_LIMIT": "off", "WEB_CONCURRENCY": "2",
                                                "GRAPH_READS_PER_SECOND": "100", **settings})
            hosts.append(bot)
            made.append(bot)
        errors = []

        def start(bot):
            try:
                bot.start()
            except BaseException as exc:  # noqa: BLE001 - reported below, with the log
                errors.append(f"{bot.url}: {exc}\n{bot.log_text()}")
        threads = [threading.Thread(target=start, args=(bot,)) for bot in made]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, "\n".join(errors)
        # Every reply process claiming before the first message: its heartbeat is in the database.
        assert wait_until(lambda: all((pid := reply_process_pid(bot)) and rows(
            database_url, "SELECT COUNT(*) FROM dispatchers WHERE owner LIKE %s", owned_by(pid))[0][0]
            for bot in made), 20), "a reply process did not start\n" + "\n".join(bot.log_text() for bot in made)
        return made

    yield make
    stoppers = [threading.Thread(target=bot.stop) for bot in hosts]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()


# -- three hosts, one killed ------------------------------------------------------------------------
def test_three_hosts_answer_every_message_once_in_order_through_a_host_kill(make_hosts, graph, model, pg_url):
    seed = int(os.environ.get("MULTIHOST_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    started = time.monotonic()
    hosts = make_hosts(3, pg_url)
    startup_s = time.monotonic() - started
    model.echo = True
    model.delay = 0.1
    graph.delays["send"] = 0.1  # a reply takes ~0.2 s: the kill finds work in flight
    total = USERS * PER_USER
    mid_by_text = {text_of(u, k): mid_of(u, k) for u in range(USERS) for k in range(PER_USER)}

    lock = threading.Lock()
    in_rotation = [0, 1, 2]  # the hosts Meta sends to; the killed one leaves it a moment after the kill
    acknowledged: set[str] = set()
    failures: list[tuple[int, str, object]] = []  # (host, mid, status or error) of each failed delivery

    def deliver(sender_rng: random.Random, mid: str, body: bytes, avoid: int | None) -> int:
        """Until one host answers 200; a failed delivery is retried on another host."""
        for _ in range(100):
            with lock:
                candidates = [i for i in in_rotation if i != avoid] or list(in_rotation)
            host = sender_rng.choice(candidates)
            try:
                status: object = hosts[host].post(body).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            if status == 200:
                return host
            with lock:
                failures.append((host, mid, status))
            avoid = host
            time.sleep(0.05)
        raise AssertionError(f"{mid}: no host took it")

    def sender(index: int, plan: list[tuple[int, int]], errors: list) -> None:
        sender_rng = random.Random(seed * 100 + index)
        last_ms: dict[int, int] = {}
        try:
            for user, k in plan:
                mid, body = writes(user, k, last_ms)
                first = deliver(sender_rng, mid, body, None)
                with lock:
                    acknowledged.add(mid)
                deliver(sender_rng, mid, body, first)  # the redelivery, to another host
                time.sleep(sender_rng.uniform(0.05, 0.2))
        except BaseException as exc:  # noqa: BLE001
            errors.append(f"sender {index}: {exc!r}")

    sender_errors: list[str] = []
    threads = [threading.Thread(target=sender, args=(i, plan, sender_errors), daemon=True)
               for i, plan in enumerate(plan_stream(rng, SENDERS, USERS, PER_USER))]
    stream_started = time.monotonic()
    for thread in threads:
        thread.start()
    pids = [reply_process_pid(bot) for bot in hosts]
    victim = -1  # chosen at the kill: the host holding the most replies in flight

    def busiest() -> int | None:
        working = collections.Counter()
        for owner, count in rows(pg_url, "SELECT owner, COUNT(*) FROM events WHERE state = 'working' GROUP BY owner"):
            working.update({i: count for i, pid in enumerate(pids) if owner_pid(owner) == str(pid)})
        return max(working, key=working.get) if working else None
    try:
        assert wait_until(lambda: len(acknowledged) >= total // 2, 20), "the stream stalled"
        # Mid-burst, and the victim holding work: replies in flight die with it.
        had_work = wait_until(lambda: busiest() is not None, 5)
        victim = busiest() if had_work else rng.randrange(3)
        pid = pids[victim]
        acked_at_kill = len(acknowledged)
        # Under the claim lock, so no host takes the victim's work over before it is read.
        with psycopg.connect(pg_url, autocommit=True) as freezer:
            freezer.execute("SELECT pg_advisory_lock(%s)", (CLAIM_LOCK,))
            hosts[victim].kill_9()
            killed_at = time.monotonic() - stream_started
            in_flight = freezer.execute("SELECT dedupe_key, batch_id FROM events WHERE state = 'working'"
                                        " AND owner LIKE %s", (owned_by(pid),)).fetchall()
            freezer.execute("SELECT pg_advisory_unlock(%s)", (CLAIM_LOCK,))
        time.sleep(0.3)  # Meta notices late: deliveries to the dead host fail and are retried elsewhere
        with lock:
            in_rotation.remove(victim)
        for thread in threads:
            thread.join(timeout=30)
        assert not sender_errors, sender_errors
        stream_s = time.monotonic() - stream_started
        assert len(acknowledged) == total, f"{len(acknowledged)} of {total} acknowledged"
        done = wait_until(lambda: rows(pg_url, "SELECT COUNT(*) FROM events WHERE state = 'done'")[0][0] >= total, 25)
        drained_s = time.monotonic() - stream_started
        time.sleep(1.0)  # room for a wrong second reply to show up
        allowed = {mid for mid, _ in in_flight}
        problems, figures = check_answers(pg_url, acknowledged, mid_by_text, model, graph, model_may_repeat=allowed,
                                          reply_may_repeat=allowed, allowed="for a batch in flight on the killed host")
        reasons = collections.Counter(str(status) for _, _, status in failures)
        report = (f"multihost seed={seed}: 3 hosts, {total} messages from {USERS} users, each delivered twice; "
                  f"host {victim} killed at {killed_at:.1f} s with {acked_at_kill} acknowledged and "
                  f"{len(in_flight)} message(s) in {len({b for _, b in in_flight})} batch(es) in flight on it; "
                  f"failed deliveries retried elsewhere: {len(failures)} {dict(reasons)}; "
                  f"model repeats {figures['model_repeats']} {figures['repeated_mids']}, "
                  f"reply repeats {len(figures['reply_repeats'])} {figures['reply_repeats']}; "
                  f"{figures['batches']} batches, "
                  f"{figures['replies']} replies, {figures['model_requests']} model requests; "
                  f"start-up {startup_s:.1f} s, stream {stream_s:.1f} s, all answered at {drained_s:.1f} s")
        print(report)
        logs = "\n".join(f"--- host {i} ---\n{bot.log_text()}" for i, bot in enumerate(hosts))
        assert done, report + "\n" + "\n".join(problems) + "\n" + logs
        assert not problems, report + "\n" + "\n".join(problems) + "\n" + logs
        assert had_work, report  # the kill found replies in flight on the victim
        assert failures, report  # deliveries to the dead host failed, and another host took them
    finally:
        with lock:
            in_rotation[:] = [i for i in in_rotation if i != victim]
        for thread in threads:
            thread.join(timeout=30)


def test_one_delivery_sent_to_three_hosts_at_once_is_answered_once(make_hosts, graph, model, pg_url):
    hosts = make_hosts(3, pg_url)
    model.delay = 0.3
    body = text_body("m_everywhere", "Are you open on Sunday?")
    barrier = threading.Barrier(6)
    statuses = []

    def deliver(bot):
        barrier.wait()
        statuses.append(bot.post(body).status_code)
    threads = [threading.Thread(target=deliver, args=(bot,)) for bot in hosts for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 6
    assert wait_until(lambda: rows(pg_url, "SELECT dedupe_key, state FROM events") == [("m_everywhere", "done")], 10)
    time.sleep(1.0)  # room for a wrong second reply to show up
    assert graph.sent_texts() == ["Hello from the model."]
    assert len(model.requests) == 1
    assert answered_in(model.requests[0]) == ["Are you open on Sunday?"]  # stored once, not six times merged


# -- limits shared by every host --------------------------------------------------------------------
def test_the_rate_limit_and_a_persons_pause_hold_for_all_hosts_together(make_hosts, graph, model, pg_url):
    """RATE_LIMIT counts a user's messages whichever host took them: at 3 a minute, the 4th
    message (two of the first three taken by the other host) gets the notice and no model call,
    the 5th nothing. A person answering from the Page inbox (the echo delivered to one host)
    silences the bot for that user on the other host too. Per-host limits would answer all."""
    hosts = make_hosts(2, pg_url, RATE_LIMIT="3/minute", RATE_LIMIT_REPLY="Slow down, please.", HUMAN_PAUSE="30m")
    writer, now_ms = psid_of(1), int(time.time() * 1000)
    for k in range(5):
        mid = mid_of(1, k)
        assert hosts[k % 2].post(text_body(mid, text_of(1, k), psid=writer, timestamp=now_ms + k)).status_code == 200
        assert wait_until(lambda: rows(pg_url, "SELECT state FROM events WHERE dedupe_key = %s", mid) == [("done",)], 10)
    assert graph.sent_texts(writer) == ["Hello from the model."] * 3 + ["Slow down, please."]
    assert [answered_in(request) for request in model.requests] == [[text_of(1, k)] for k in range(3)]
    assert rows(pg_url, "SELECT outcome FROM interactions WHERE psid = %s ORDER BY user_timestamp", writer) \
        == [("answered",)] * 3 + [("rate-limited",)] * 2

    customer = psid_of(2)
    assert hosts[0].post(echo_body("m_inbox_answer", "Hi, Ana here!", psid=customer, timestamp=now_ms)).status_code == 200
    assert wait_until(lambda: rows(pg_url, "SELECT paused_until IS NOT NULL FROM users WHERE psid = %s", customer)
                      == [(True,)], 10)
    assert hosts[1].post(text_body("m_after_ana", "Thanks Ana!", psid=customer, timestamp=now_ms + 1)).status_code == 200
    assert wait_until(lambda: rows(pg_url, "SELECT state FROM events WHERE dedupe_key = %s", "m_after_ana")
                      == [("done",)], 10)
    # done is written after a reply's last send: a wrong reply would be in already
    assert graph.sent_texts(customer) == []
    assert len(model.requests) == 3
    assert rows(pg_url, "SELECT outcome FROM interactions WHERE psid = %s", customer) == [("paused",)]


# -- PostgreSQL restarted mid-traffic ---------------------------------------------------------------
@pytest.fixture
def private_pg():
    """A PostgreSQL server of this test's own, which it may stop and start."""
    from tests.support.pgserver import PgServer

    server = PgServer()  # skipped (failed under BOT_REQUIRE_POSTGRES=1) without the binaries
    try:
        yield server.start()
    finally:
        server.destroy()


def post(bot: Bot, body: bytes, timeout: float = 20) -> requests.Response:
    """As Meta delivers: signed; Meta waits longer than a pool timeout for the answer."""
    return requests.post(bot.url + "/webhook", data=body, timeout=timeout,
                         headers={"X-Hub-Signature-256": sign(body, APP_SECRET)})


def test_postgres_restart_mid_traffic_loses_nothing(make_hosts, graph, model, private_pg):
    users, per_user, senders = 10, 8, 5
    outage_s = float(os.environ.get("MULTIHOST_OUTAGE_S", "3"))  # to look closer: a longer outage
    total = users * per_user
    url = private_pg.url
    hosts = make_hosts(2, url)
    pids = [reply_process_pid(bot) for bot in hosts]
    model.echo = True
    model.delay = 0.1
    graph.delays["send"] = 0.1
    mid_by_text = {text_of(u, k): mid_of(u, k) for u in range(users) for k in range(per_user)}
    rng = random.Random()
    clock = time.monotonic

    lock = threading.Lock()
    acknowledged: set[str] = set()
    attempts: list[tuple[str, int, float, float, object]] = []  # (mid, host, sent, answered, status or error)
    readiness: list[tuple[int, float, float, object, list]] = []  # (host, sent, answered, status, problems)
    outage: dict[str, float] = {}
    restarted = threading.Event()

    def sender(plan: list[tuple[int, int]], errors: list) -> None:
        last_ms: dict[int, int] = {}
        try:
            for user, k in plan:
                mid, body = writes(user, k, last_ms)
                deadline = clock() + 60
                while True:  # Meta delivers again until it gets its 200
                    host = rng.randrange(len(hosts))
                    sent = clock()
                    try:
                        status: object = post(hosts[host], body).status_code
                    except requests.RequestException as exc:
                        status = type(exc).__name__
                    with lock:
                        attempts.append((mid, host, sent, clock(), status))
                    if status == 200:
                        break
                    assert clock() < deadline, f"{mid}: no 200 in 60 s"
                    time.sleep(0.2)
                with lock:
                    acknowledged.add(mid)
                time.sleep(rng.uniform(0.1, 0.25))
        except BaseException as exc:  # noqa: BLE001
            errors.append(f"sender: {exc!r}")

    def poll_readiness() -> None:
        while not restarted.is_set():
            for host, bot in enumerate(hosts):
                sent = clock()
                try:
                    response = requests.get(bot.url + "/readyz", timeout=20)
                    status, problems = response.status_code, response.json().get("problems", [])
                except (requests.RequestException, ValueError) as exc:
                    status, problems = type(exc).__name__, []
                readiness.append((host, sent, clock(), status, problems))
            time.sleep(0.2)

    def heartbeats() -> dict[int, float | None]:
        return {pid: rows(url, "SELECT MAX(seen_at) FROM dispatchers WHERE owner LIKE %s", owned_by(pid))[0][0]
                for pid in pids}

    errors: list[str] = []
    threads = [threading.Thread(target=sender, args=(plan, errors), daemon=True)
               for plan in plan_stream(rng, senders, users, per_user)]
    started = clock()
    for thread in threads:
        thread.start()
    poller = threading.Thread(target=poll_readiness, daemon=True)
    try:
        assert wait_until(lambda: len(acknowledged) >= total // 3, 20), "the stream stalled"
        had_work = wait_until(lambda: rows(url, "SELECT COUNT(*) FROM events WHERE state = 'working'")[0][0] > 0, 3)
        acked_at_stop = len(acknowledged)
        # What is in flight when PostgreSQL goes: read while holding the claim lock, so no host
        # claims more before the stop (it ends this session, and the lock with it).
        freezer = psycopg.connect(url, autocommit=True)
        freezer.execute("SELECT pg_advisory_lock(%s)", (CLAIM_LOCK,))
        in_flight = freezer.execute("SELECT dedupe_key, batch_id FROM events WHERE state = 'working'").fetchall()
        outage["stopping"] = clock()
        private_pg.stop("fast")
        outage["down"] = clock()
        freezer.close()
        poller.start()
        time.sleep(outage_s)
        outage["starting"] = clock()
        private_pg.start()
        outage["up"] = clock()
        up_wall = time.time()
        restarted.set()
        # The reply processes come back by themselves (the same processes, no restart of the bot):
        # each one's heartbeat is written again (/readyz cannot tell two hosts on one machine apart).
        beating_after: list[float] = []

        def watch_heartbeats() -> None:
            if wait_until(lambda: all(seen and seen > up_wall for seen in heartbeats().values()), 30):
                beating_after.append(time.time() - up_wall)
        watcher = threading.Thread(target=watch_heartbeats, daemon=True)
        watcher.start()
        for thread in threads:
            thread.join(timeout=90)
        assert not errors, errors
        stream_s = clock() - started
        assert len(acknowledged) == total, f"{len(acknowledged)} of {total} acknowledged"
        done = wait_until(lambda: rows(url, "SELECT COUNT(*) FROM events WHERE state = 'done'")[0][0] >= total, 30)
        answered_s = clock() - started
        time.sleep(1.0)  # room for a wrong second reply to show up
        # A batch in flight when PostgreSQL went away cannot record its outcome; once its lease has
        # run out, another reply process answers it again: it may reach the model again (its answer
        # was not stored), but its reply goes out once - a send under way is looked for first, and
        # a write that waited out the outage renews the lease from when it got through.
        allowed = {mid for mid, _ in in_flight}
        failures, figures = check_answers(url, acknowledged, mid_by_text, model, graph, model_may_repeat=allowed,
                                          reply_may_repeat=set(), allowed="for a batch in flight at the stop")
        repeats = rows(url, "SELECT dedupe_key, state, attempts, error FROM events WHERE dedupe_key = ANY(%s)",
                       figures["repeated_mids"])  # how each repeat ended: its attempts and last error

        down, starting = outage["down"], outage["starting"]
        # Stored before the 200: no 200 for a delivery made and answered while PostgreSQL was down
        # (a delivery held until it came back, then stored and acknowledged, is fine).
        while_down = [a for a in attempts if a[2] >= down and a[3] <= starting]
        lies = [a for a in while_down if a[4] == 200]
        if lies:
            failures.append(f"200 while PostgreSQL was down: {lies}")
        if not while_down or {str(a[4]) for a in while_down} != {"503"}:
            failures.append("webhooks did not answer 503 while PostgreSQL was down")
        sent_down = [a for a in attempts if down <= a[2] <= starting]
        ready_down = [r for r in readiness if r[1] >= down and r[2] <= starting]
        if not any(r[3] == 503 and any("database" in p for p in r[4]) for r in ready_down):
            failures.append("/readyz did not answer 503 naming the database while PostgreSQL was down")
        watcher.join(timeout=30)
        beating = bool(beating_after)
        resumed = wait_until(lambda: all(requests.get(bot.url + "/readyz", timeout=10).status_code == 200
                                         for bot in hosts), 15)
        after = [reply_process_pid(bot) for bot in hosts]
        if not beating or not resumed or after != pids:
            failures.append(f"reply processes did not resume: /readyz 200 again {resumed}, {pids} -> {after}, "
                            f"last heartbeats {heartbeats()}, restarted at {up_wall}")

        statuses = collections.Counter(str(a[4]) for a in attempts if a[4] != 200)
        answers = collections.Counter((str(a[4]), "while down" if a[3] <= starting else "after") for a in sent_down)
        report = (
            f"postgres restart: 2 hosts, {total} messages from {users} users; PostgreSQL stopped after "
            f"{acked_at_stop} acknowledged, {len(in_flight)} message(s) in {len({b for _, b in in_flight})} batch(es) "
            f"in flight, down {starting - down:.1f} s; "
            f"deliveries refused {dict(statuses)}; sent while down {len(sent_down)}, answered {sorted(answers.items())}"
            f" after up to {max((a[3] - a[2] for a in sent_down), default=0):.1f} s; /readyz sent while down: "
            f"{[(r[3], round(r[2] - r[1], 1), r[4]) for r in readiness if down <= r[1] <= starting]}; "
            f"{figures['batches']} batches, {figures['replies']} replies, {figures['model_requests']} model requests, "
            f"model repeats {figures['model_repeats']} {figures['repeated_mids']}, reply repeats "
            f"{len(figures['reply_repeats'])} {figures['reply_repeats']}; "
            f"rows {repeats}; stream {stream_s:.1f} s, all answered at {answered_s:.1f} s; reply processes {pids} -> "
            f"{after}, every one beating again {beating_after[0] if beating else float('nan'):.1f} s after the restart")
        print(report)
        logs = "\n".join(f"--- host {i} ---\n{bot.log_text()}" for i, bot in enumerate(hosts))
        assert done, report + "\n" + "\n".join(failures) + "\n" + logs
        assert had_work, report  # the stop found replies in flight
        assert not failures, report + "\n" + "\n".join(failures) + "\n" + logs
    finally:
        restarted.set()
        for thread in threads + ([poller] if poller.is_alive() else []):
            thread.join(timeout=90)
