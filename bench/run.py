"""Delivery benchmark: the bot as the README runs it, against local fakes with latency.

    .venv/bin/python bench/run.py [--graph-ms 50] [--model-ms 1000] [--only burst,overhead]
    .venv/bin/python bench/run.py --database-url postgresql://postgres@127.0.0.1:5432/test \\
        --backends sqlite,postgres --only floor,sustained,burst,overhead --repeat 3

Prints one JSON line per scenario (floor, sustained, burst, overhead, graph_rate_limit,
slow_clients; on PostgreSQL also burst_three_hosts and three_hosts_sustained), each naming
the backend it ran on, then - after more than one run - a summary line: medians, and the
ratios to the floor of the same round. On PostgreSQL each scenario gets a fresh schema
(created, set with ?options=-csearch_path=..., dropped after it), so no run sees another's
rows. Every request goes to 127.0.0.1; every loop is bounded in count and time.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.storage.instance import owner_pid  # noqa: E402
from bot.storage.queue import SQLiteQueue  # noqa: E402
from devtools.emulator import GraphEmulator, ModelStandIn, Timeline  # noqa: E402
from messenger.signature import sign  # noqa: E402

PAGE_ID = "1000000000000001"
PAGE_TOKEN = "EAAbench-page-token"
APP_SECRET = "bench-app-secret"

CONNECTIONS = 16
HOSTS = 3  # the multi-host scenarios: gunicorn instances with their own port and DATA_DIR, one database


def text_body(n: int, psid: str, text: str | None = None) -> bytes:
    """A webhook body shaped like Meta's, for message number n."""
    now = int(time.time() * 1000)
    event = {"sender": {"id": psid}, "recipient": {"id": PAGE_ID}, "timestamp": now + n,
             "message": {"mid": f"m_bench_{n}_{now}", "text": text or f"Question number {n}, are you open?"}}
    return json.dumps({"object": "page", "entry": [{"id": PAGE_ID, "time": now, "messaging": [event]}]}).encode()


# -- where the bot keeps its messages ------------------------------------------------------------------
@dataclass(frozen=True)
class Store:
    """One scenario's database: SQLite in each host's DATA_DIR (url None), or a fresh PostgreSQL schema."""

    backend: str  # "sqlite" | "postgres"
    url: str | None = None  # DATABASE_URL for the bot, search_path set to the schema
    schema: str | None = None


def with_options(url: str, options: list[str]) -> str:
    """The URL with server options (-c name=value) for every connection, e.g. the search_path."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(' '.join(f'-c{o}' for o in options))}"


@contextmanager
def fresh_store(backend: str, args) -> Iterator[Store]:
    if backend == "sqlite":
        yield Store("sqlite")
        return
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(args.database_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield Store("postgres", with_options(args.database_url, [f"search_path={schema}", *args.pg_option]), schema)
    finally:
        try:
            with psycopg.connect(args.database_url, autocommit=True, connect_timeout=5) as conn:
                conn.execute("SET lock_timeout = '30s'")
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        except psycopg.Error as exc:
            print(f"bench: schema {schema} not dropped: {exc}", file=sys.stderr)


def pg_rows(store: Store, sql: str, params: tuple = ()) -> list[tuple]:
    import psycopg

    with psycopg.connect(store.url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


def event_states(store: Store, server: "Gunicorn") -> dict[str, str]:
    """dedupe key -> state, read from the scenario's database."""
    if store.url:
        return dict(pg_rows(store, "SELECT dedupe_key, state FROM events"))
    return SQLiteQueue(str(server.work / "data" / "bot.sqlite3")).states()


class Gunicorn:
    """`gunicorn -c gunicorn.conf.py APP` in its own session, from a scratch folder."""

    extra_env: dict[str, str] = {}  # --bot-env KEY=VALUE settings, for experiments
    stopped_pids: set[int] = set()  # every process of a stopped instance: once killed, init is their parent

    def __init__(self, app: str, graph: GraphEmulator, model: ModelStandIn, port: int, store: Store | None = None,
                 work: Path | None = None):
        self.app = app
        self.store = store or Store("sqlite")
        self.work = work or Path(tempfile.mkdtemp(prefix="bench-"))  # an old one: a restart on its DATA_DIR
        self.url = f"http://127.0.0.1:{port}"
        env = {
            "PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOST": "127.0.0.1", "PORT": str(port),
            "FB_VERIFY_TOKEN": "bench-verify-token", "FB_APP_SECRET": APP_SECRET,
            "FB_PAGE_ACCESS_TOKEN": PAGE_TOKEN, "FB_PAGE_ID": PAGE_ID, "FB_API_URL": graph.api_url,
            "OPENAI_API_KEY": ModelStandIn.API_KEY, "OPENAI_BASE_URL": model.base_url,
            "DATA_DIR": str(self.work / "data"), "ERROR_LOG_FILE": str(self.work / "errors.log"),
            # The pipeline is measured, not the per-user limit (one user writes 20 times in overhead).
            "LOG_LEVEL": "WARNING", "RATE_LIMIT": "off", **self.extra_env,
        }
        if self.store.url and app == "server:app":
            env["DATABASE_URL"] = self.store.url
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), app],
            cwd=self.work, env=env, stdout=subprocess.DEVNULL, stderr=open(self.work / "gunicorn.log", "w"),
            start_new_session=True)
        try:
            self._wait_up()
        except BaseException:  # a bot that never became ready (or a Ctrl-C) must not outlive the benchmark
            self.stop(keep_folder=True)  # its gunicorn.log says why
            raise

    def _wait_up(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                response = requests.get(self.url + "/healthz", timeout=0.5)
                # The bot is ready when its reply process has started working the queue.
                if self.app != "server:app" or self._reply_process_up(response.json()):
                    time.sleep(0.3)  # let every webhook worker finish booting too
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not start; see {self.work / 'gunicorn.log'}")

    def _reply_process_up(self, health: dict) -> bool:
        if not self.store.url:
            return health.get("dispatcher_seen_s_ago") is not None
        # Several hosts share the database (and, here, the host name): this instance's own
        # reply process - a child of its master - must have said it is alive.
        try:
            owners = [row[0] for row in pg_rows(self.store, "SELECT owner FROM dispatchers")]
        except Exception:  # noqa: BLE001 - not migrated yet
            return False
        pids = {str(pid) for pid in _children(self.process.pid)}
        return any(owner_pid(owner) in pids for owner in owners)

    def pids(self) -> list[int]:
        return [self.process.pid] + _children(self.process.pid)

    def rss_mb(self) -> float:
        """Resident memory of the master and all its workers."""
        total_kb = 0
        for pid in self.pids():
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
            except OSError:
                pass
        return total_kb / 1024

    def stop(self, keep_folder: bool = False) -> None:
        Gunicorn.stopped_pids.update(self.pids())
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the backlog is not the benchmark's business
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        if not keep_folder:
            shutil.rmtree(self.work, ignore_errors=True)


def start_hosts(count: int, graph, model, store: Store) -> list[Gunicorn]:
    hosts: list[Gunicorn] = []
    try:
        for _ in range(count):
            hosts.append(Gunicorn("server:app", graph, model, free_port(), store))
    except BaseException:
        for host in hosts:
            host.stop()
        raise
    return hosts


def _children(pid: int) -> list[int]:
    return [child for child, (_, parent, _) in _processes().items() if parent == pid]


def _reply_processes(server: "Gunicorn") -> list[int]:
    """The instance's reply process (a child of its master running bot.runtime.reply_process)."""
    found = []
    for pid in _children(server.process.pid):
        try:
            if b"bot.runtime.reply_process" in open(f"/proc/{pid}/cmdline", "rb").read():
                found.append(pid)
        except OSError:
            pass
    if not found:
        raise RuntimeError("--hold-replies: no reply process found")
    return found


def _processes() -> dict[int, tuple[str, int, float]]:
    """pid -> (name, parent pid, CPU seconds so far) of every process on the machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            found[int(entry)] = (name, int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return found


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot."""
    values = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def wait_for_quiet(max_wait: float, busy_below: float = 0.25) -> float:
    """Other work on this machine (tests...) skews every figure: wait, at most `max_wait` s,
    for two seconds in which the CPUs are less than `busy_below` busy. Returns the time waited."""
    started = time.monotonic()
    while True:
        before = _machine_busy()
        time.sleep(2.0)
        after = _machine_busy()
        busy = (after[0] - before[0]) / max(1, after[1] - before[1])
        if busy < busy_below or time.monotonic() - started >= max_wait:
            return round(time.monotonic() - started - 2.0, 1)


class CpuMeter:
    """Where the machine's CPU went between start() and stop(): the bot's webhook workers and
    reply processes, PostgreSQL, this benchmark process (the fakes and the clients) and its other
    children (wrk), and anything else on the machine ("foreign": other people's tests, say)."""

    def __init__(self, hosts: list[Gunicorn] = ()):
        self.hosts = list(hosts)

    def start(self) -> "CpuMeter":
        self._before, self._busy0, self._t0 = _processes(), _machine_busy(), time.monotonic()
        self._reaped0 = _reaped_children_cpu()
        return self

    def stop(self) -> dict:
        after, busy1, elapsed = _processes(), _machine_busy(), time.monotonic() - self._t0
        used = {pid: cpu - (self._before[pid][2] if pid in self._before else 0.0)
                for pid, (_, _, cpu) in after.items()}
        groups = collections.Counter()
        for host in self.hosts:
            for pid in _children(host.process.pid):
                try:
                    cmd = open(f"/proc/{pid}/cmdline").read()
                except OSError:
                    cmd = ""
                groups["reply_process" if "reply_process" in cmd else "webhook_workers"] += used.pop(pid, 0.0)
            groups["gunicorn_master"] += used.pop(host.process.pid, 0.0)
        groups["bench_and_fakes"] += used.pop(os.getpid(), 0.0)
        # Children that exited and were waited for (wrk) leave their CPU in ours.
        groups["bench_children"] += _reaped_children_cpu() - self._reaped0
        foreign = collections.Counter()
        for pid, cpu in used.items():
            if after[pid][0] == "postgres":
                groups["postgres"] += cpu
            elif pid in Gunicorn.stopped_pids or _descends_from(pid, os.getpid(), after):
                groups["bench_children"] += cpu
            else:
                groups["foreign"] += cpu
                foreign[after[pid][0]] += cpu
        busy = (busy1[0] - self._busy0[0]) / max(1, busy1[1] - self._busy0[1])
        self.foreign_top = {name: round(cpu, 1) for name, cpu in foreign.most_common(3) if cpu >= 0.1}
        return {"elapsed_s": round(elapsed, 1), "machine_busy_pct": round(busy * 100, 1),
                **{f"{k}_cpu_s": round(v, 1) for k, v in sorted(groups.items())}}


def _reaped_children_cpu() -> float:
    fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def _descends_from(pid: int, ancestor: int, table: dict) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid not in table or pid <= 1:
            return False
        pid = table[pid][1]
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_wrk(url: str, seconds: float, bodies: int) -> dict:
    """wrk with pre-signed bodies, CONNECTIONS connections, 2 threads."""
    with tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False) as file:
        for n in range(bodies):
            body = text_body(n, f"4{n:015d}")
            file.write(f"{sign(body, APP_SECRET)}\t{body.decode()}\n")
    try:
        output = subprocess.run(
            ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "5s", "-s", str(ROOT / "bench" / "post.lua"),
             url + "/webhook", "--", file.name, "2"], capture_output=True, text=True, timeout=seconds + 60, check=True)
    finally:
        os.unlink(file.name)
    result = json.loads(output.stdout.strip().splitlines()[-1])
    return {"rps": round(result["requests"] / (result["duration_us"] / 1e6), 1),
            "ack_p50_ms": round(result["p50_us"] / 1000, 2), "ack_p99_ms": round(result["p99_us"] / 1000, 2),
            "non_2xx": result["non_2xx"], "socket_errors": result["socket_errors"]}


def signed_poster(url: str):
    """post(body) -> status, signed as Meta signs, one keep-alive session per thread."""
    sessions = threading.local()

    def post(body: bytes) -> int:
        session = getattr(sessions, "s", None) or requests.Session()
        sessions.s = session
        return session.post(url + "/webhook", data=body, timeout=10,
                            headers={"X-Hub-Signature-256": sign(body, APP_SECRET)}).status_code
    return post


def skipped(name: str, store: Store, why: str) -> dict:
    return {"scenario": name, "backend": store.backend, "skipped": why}


def scenario_floor(graph, model, args, store) -> dict:
    server = Gunicorn("bench.floor_app:app", graph, model, free_port())
    try:
        return {"scenario": "floor", "backend": "none", **run_wrk(server.url, args.seconds, 20000)}
    finally:
        server.stop()


def scenario_sustained(graph, model, args, store) -> dict:
    server = Gunicorn("server:app", graph, model, free_port(), store)
    try:
        before = len(graph.delivered)
        held = _reply_processes(server) if args.hold_replies else []
        for pid in held:  # a diagnosis, not a figure to quote: what the acknowledgements cost alone
            os.kill(pid, signal.SIGSTOP)
        meter = CpuMeter([server]).start()
        try:
            result = run_wrk(server.url, args.seconds, 60000)
        finally:
            for pid in held:
                os.kill(pid, signal.SIGCONT)
        cpu = meter.stop()
        acks = max(1.0, result["rps"] * args.seconds)
        # Where the CPU went, per acknowledgement: the webhook workers, PostgreSQL, wrk, the replies.
        per_ack = {k.removesuffix("_cpu_s"): round(v * 1000 / acks, 3) for k, v in cpu.items() if k.endswith("_cpu_s")}
        return {"scenario": "sustained", "backend": store.backend, **result,
                "replies_during": len(graph.delivered) - before, "replies_held": bool(held),
                "machine_busy_pct": cpu["machine_busy_pct"],
                "cpu_ms_per_ack": per_ack}
    finally:
        server.stop()


def scenario_burst(graph, model, args, store) -> dict:
    return _burst("burst", graph, model, store, hosts=1)


def scenario_burst_three_hosts(graph, model, args, store) -> dict:
    if not store.url:
        return skipped("burst_three_hosts", store, "SQLite is one host's store; needs --database-url")
    return _burst("burst_three_hosts", graph, model, store, hosts=HOSTS)


def _burst(name: str, graph, model, store: Store, hosts: int) -> dict:
    """200 users, one message each, 16 in flight, spread round-robin over the hosts."""
    servers = start_hosts(hosts, graph, model, store)
    users = [f"5{n:015d}" for n in range(200)]
    posters = [signed_poster(server.url) for server in servers]
    jobs = [(posters[n % hosts], text_body(n, psid)) for n, psid in enumerate(users)]
    peak = [sum(server.rss_mb() for server in servers)]
    sampling = threading.Event()

    def sample():
        while not sampling.wait(0.05):
            peak.append(sum(server.rss_mb() for server in servers))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start_index = len(graph.delivered)
    try:
        meter = CpuMeter(servers).start()
        started = time.monotonic()
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            statuses = list(pool.map(lambda job: job[0](job[1]), jobs))
        acked = time.monotonic() - started
        graph.wait_for_deliveries(start_index + len(users), timeout=180)
        done = graph.delivered_at[start_index + len(users) - 1] if len(graph.delivered) - start_index >= len(users) else None
        cpu = meter.stop()  # what one reply costs each part of the machine (the fakes' own share included)
        time.sleep(1.0)  # room for duplicates to show
        sampling.set()
        delivered = [psid for psid, _ in graph.delivered[start_index:]]
        return {"scenario": name, "backend": store.backend, "hosts": hosts,
                "drain_s": round(done - started, 2) if done else None, "acked_s": round(acked, 2),
                "replies": len(set(delivered) & set(users)), "duplicates": len(delivered) - len(set(delivered)),
                "non_2xx": sum(s != 200 for s in statuses), "peak_rss_mb": round(max(peak), 1),
                "cpu_ms_per_reply": {k.removesuffix("_cpu_s"): round(v * 1000 / len(users), 2)
                                     for k, v in cpu.items() if k.endswith("_cpu_s") and v}}
    finally:
        sampling.set()
        for server in servers:
            server.stop()


def scenario_overhead(graph, model, args, store) -> dict:
    server = Gunicorn("server:app", graph, model, free_port(), store)
    psid = "6000000000000001"
    for n in range(10):
        graph.add_message(psid, f"earlier message {n}", from_page=bool(n % 2))
    history_before = len(graph.history_calls())
    overheads, split = [], collections.defaultdict(list)
    try:
        for n in range(args.overhead_messages):
            count = len(graph.delivered)
            body = text_body(10_000 + n, psid)
            posted = time.monotonic()
            requests.post(server.url + "/webhook", data=body, timeout=10,
                          headers={"X-Hub-Signature-256": sign(body, APP_SECRET)})
            acked = time.monotonic()
            graph.wait_for_deliveries(count + 1, timeout=30)
            overheads.append((graph.delivered_at[count] - posted - args.model_ms / 1000) * 1000)
            if n:  # where a known user's overhead went, from when the fakes heard each request
                asked = next(r["at"] for r in reversed(model.requests) if r["at"] > posted)
                sent = next(c.at for c in reversed(graph.calls) if c.at > posted and "message" in (c.body or {}))
                for part, ms in (("ack", acked - posted), ("to_model", asked - posted),
                                 ("model_to_send", sent - asked - args.model_ms / 1000),
                                 ("send", graph.delivered_at[count] - sent - args.graph_ms / 1000)):
                    split[part].append(ms * 1000)
            time.sleep(0.2)  # one user at a time: let the sender actions settle too
        reads = len(graph.history_calls()) - history_before
        known = overheads[1:] or overheads  # the first message is the one that pays the history read
        return {"scenario": "overhead", "backend": store.backend,
                "overhead_p50_ms": round(statistics.median(overheads), 1),
                "overhead_max_ms": round(max(overheads), 1),
                "known_user_p50_ms": round(statistics.median(known), 1),
                # Its parts (p50 each, so they need not add up exactly): the post until its 200 and
                # until the model heard the question (ack, wake, claim, compose); the model's wait
                # until the Send API heard the answer (answering, parsing, the write before a send);
                # the send past the Graph latency.
                "known_user_split_ms": {part: round(statistics.median(v), 1) for part, v in split.items()},
                "first_message_ms": round(overheads[0], 1), "messages": len(overheads),
                "graph_calls_per_reply": round(reads / len(overheads), 2)}
    finally:
        server.stop()


def scenario_graph_rate_limit(graph, model, args, store) -> dict:
    """Meta's ~2 Conversations calls/s per Page, enforced by the emulator; 200 users write 3 messages each."""
    graph.conversations_per_second = 2
    server = Gunicorn("server:app", graph, model, free_port(), store)
    users = [f"7{n:015d}" for n in range(200)]
    rounds = [[text_body(r * 1000 + n, psid) for n, psid in enumerate(users)] for r in range(3)]
    post = signed_poster(server.url)
    try:
        started = time.monotonic()
        statuses = []
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            for bodies in rounds:  # three messages per user, about a second apart
                statuses += pool.map(post, bodies)
                time.sleep(1.0)
        total = sum(len(r) for r in rounds)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            states = list(event_states(store, server).values())
            if len(states) == total and all(s in ("done", "failed") for s in states):
                break
            time.sleep(0.1)
        drained = time.monotonic() - started
        reads = graph.history_calls()
        return {"scenario": "graph_rate_limit", "backend": store.backend, "messages": total,
                "answered": sum(s == "done" for s in event_states(store, server).values()),
                "replies": len(graph.delivered),
                "users_answered": len({psid for psid, _ in graph.delivered}), "graph_reads": len(reads),
                "graph_rate_limited": graph.rate_limited,
                "max_reads_per_user": max(collections.Counter(c.args["user_id"] for c in reads).values(), default=0),
                "drain_s": round(drained, 2), "non_2xx": sum(s != 200 for s in statuses)}
    finally:
        server.stop()


TAG = re.compile(r"\bq(\d+)x\b")


def answer_naming_the_new_messages(messages: list[dict]) -> str:
    """The model stand-in's answer: the tags of the user turns after the last assistant turn -
    the messages this reply answers - so the fake Graph can count sends per message."""
    tags: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "user":
            break
        tags += TAG.findall(str(message.get("content", "")))
    return "Answering " + " ".join(f"q{tag}x" for tag in sorted(set(tags), key=int)) + "." if tags else "Hello."


def scenario_three_hosts_sustained(graph, model, args, store) -> dict:
    """Three hosts on one database, `--three-hosts-rate` messages a second (3 per user, spread
    over the run) for `--three-hosts-seconds` at the model's latency, Meta's 2 reads/s enforced.
    Each message carries a tag the model repeats, so the fake Graph counts the sends of each."""
    if not store.url:
        return skipped("three_hosts_sustained", store, "SQLite is one host's store; needs --database-url")
    seconds, rate = args.three_hosts_seconds, args.three_hosts_rate
    total, users = int(seconds * rate), args.three_hosts_users
    graph.conversations_per_second = 2
    model.reply = answer_naming_the_new_messages
    servers = start_hosts(HOSTS, graph, model, store)
    posters = [signed_poster(server.url) for server in servers]
    jobs = []
    for n in range(total):  # user u writes at u/rate s, then every users/rate s
        body = text_body(n, f"8{n % users:015d}", text=f"Hello again, question q{n}x: are you open on Sunday?")
        jobs.append((posters[n % HOSTS], body))
    posted_at: list[float | None] = [None] * total
    acks: list[float | None] = [None] * total
    statuses: list[int | None] = [None] * total

    retried: list[str] = []  # deliveries sent again after a connection error, as Meta would

    def post(n: int) -> None:
        posted_at[n] = time.monotonic()
        for attempt in range(2):
            try:
                statuses[n] = jobs[n][0](jobs[n][1])
                break
            except requests.ConnectionError as error:  # e.g. a keep-alive connection the server just closed
                statuses[n] = 0
                if attempt == 0:
                    retried.append(type(error).__name__)
            except requests.RequestException:
                statuses[n] = 0
                break
        acks[n] = time.monotonic() - posted_at[n]

    seen: dict[int, list[float]] = collections.defaultdict(list)  # tag -> delivery times
    read_upto = [len(graph.delivered)]

    def collect() -> None:
        upto = len(graph.delivered)
        for index in range(read_upto[0], upto):
            for tag in TAG.findall(graph.delivered[index][1]):
                seen[int(tag)].append(graph.delivered_at[index])
        read_upto[0] = upto

    first_send = len(graph.delivered)
    history_before = len(graph.history_calls())
    limited_before = graph.rate_limited
    meter = CpuMeter(servers).start()
    lag = 0.0
    try:
        started = time.monotonic() + 0.2
        with ThreadPoolExecutor(32) as pool:
            for n in range(total):
                due = started + n / rate
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                else:
                    lag = max(lag, -wait)
                pool.submit(post, n)
        last_post = max(filter(None, posted_at), default=started)
        cpu = meter.stop()
        connections = pg_rows(store, "SELECT COUNT(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")[0][0]
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline:
            collect()
            if len(seen) >= total:
                break
            time.sleep(0.25)
        time.sleep(2.0)  # room for duplicates to show
        collect()
        states = collections.Counter(row[0] for row in pg_rows(store, "SELECT state FROM events"))
        hosts_seen = pg_rows(store, "SELECT COUNT(*) FROM dispatchers")[0][0]
        latencies = sorted(min(times) - posted_at[n] for n, times in seen.items() if n < total and posted_at[n])
        window = (started + min(10.0, seconds / 6), started + seconds)  # past the first seconds' warm-up
        in_window = sum(1 for times in seen.values() if window[0] <= min(times) < window[1])
        reads = graph.history_calls()[history_before:]
        read_times = sorted(call.at for call in reads)
        max_reads_1s = max((sum(1 for t in read_times[i:] if t - start < 1.0) for i, start in enumerate(read_times)),
                           default=0)
        first_tenth = [min(seen[n]) - posted_at[n] for n in range(0, total // 10) if n in seen and posted_at[n]]
        last_tenth = [min(seen[n]) - posted_at[n] for n in range(total - total // 10, total) if n in seen and posted_at[n]]
        done_at = max((min(times) for times in seen.values()), default=None)
        ack_ms = sorted(a * 1000 for a in acks if a is not None)
        return {
            "scenario": "three_hosts_sustained", "backend": store.backend, "hosts": HOSTS,
            "hosts_replying": hosts_seen, "seconds": seconds, "target_per_s": rate, "messages": total,
            "users": min(users, total), "posted_per_s": round(total / max(1e-9, last_post - started), 1),
            "post_lag_max_s": round(lag, 2), "non_2xx": sum(s != 200 for s in statuses),
            "non_2xx_by_status": dict(collections.Counter(str(s) for s in statuses if s != 200)),
            "non_2xx_first_at_s": [round(posted_at[n] - started, 2) for n, s in enumerate(statuses)
                                   if s != 200 and posted_at[n]][:10],
            "sent_again_after": dict(collections.Counter(retried)),
            "ack_p50_ms": _pct(ack_ms, 50), "ack_p99_ms": _pct(ack_ms, 99),
            "answered": sum(1 for n in seen if n < total), "lost": sum(1 for n in range(total) if n not in seen),
            "duplicated": sum(1 for times in seen.values() if len(times) > 1),
            "sends": len(graph.delivered) - first_send,
            "answered_per_s_steady": round(in_window / (window[1] - window[0]), 1),
            "reply_p50_s": _pct(latencies, 50, 2), "reply_p99_s": _pct(latencies, 99, 2),
            "reply_max_s": round(latencies[-1], 2) if latencies else None,
            "reply_p50_first_tenth_s": _pct(sorted(first_tenth), 50, 2),
            "reply_p50_last_tenth_s": _pct(sorted(last_tenth), 50, 2),
            "drain_after_last_post_s": round(done_at - last_post, 2) if done_at else None,
            "graph_reads": len(reads), "graph_reads_max_1s": max_reads_1s,
            "graph_reads_per_s": round(len(reads) / max(1e-9, (done_at or last_post) - started), 2),
            "graph_rate_limited": graph.rate_limited - limited_before,
            "db_states": dict(states), "pg_client_connections": connections, "cpu": cpu,
        }
    finally:
        for server in servers:
            server.stop()


def scenario_slow_clients(graph, model, args, store) -> dict:
    """Signed deliveries one after another, first alone, then while 200 connections
    trickle headers, announce a body they never send, or sit idle (issue 9, F3)."""
    server = Gunicorn("server:app", graph, model, free_port(), store)
    port = int(server.url.rsplit(":", 1)[1])
    post = signed_poster(server.url)
    try:
        alone = _ack_times(post, args.slow_deliveries, offset=0)
        slow = []
        for i in range(args.slow_connections):
            s = socket.create_connection(("127.0.0.1", port))
            if i % 3 == 0:
                s.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\n")
            elif i % 3 == 1:
                s.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            slow.append(s)
        stop = threading.Event()

        def trickle():
            while not stop.wait(1.0):
                for s in slow[::3]:
                    try:
                        s.sendall(b"X-Trickle: 1\r\n")
                    except OSError:
                        pass
        threading.Thread(target=trickle, daemon=True).start()
        try:
            crowded = _ack_times(post, args.slow_deliveries, offset=args.slow_deliveries)
        finally:
            stop.set()
            for s in slow:
                s.close()
        return {"scenario": "slow_clients", "backend": store.backend, "slow_connections": args.slow_connections,
                "deliveries": len(crowded), "failed": sum(1 for t in crowded if t is None),
                "alone_p50_ms": _pct(alone, 50), "alone_p99_ms": _pct(alone, 99),
                "crowded_p50_ms": _pct(crowded, 50), "crowded_p99_ms": _pct(crowded, 99)}
    finally:
        server.stop()


def _ack_times(post, count: int, offset: int) -> list[float | None]:
    """Milliseconds to each 200 (None: an error or a timeout), one delivery at a time."""
    times: list[float | None] = []
    for n in range(count):
        body = text_body(offset + n, f"psid-slow-{n % 50}")
        started = time.perf_counter()
        try:
            ok = post(body) == 200
        except requests.RequestException:
            ok = False
        times.append((time.perf_counter() - started) * 1000 if ok else None)
    return times


def _pct(times: list[float | None], q: int, digits: int = 2) -> float | None:
    done = sorted(t for t in times if t is not None)
    if not done:
        return None
    return round(done[min(len(done) - 1, int(len(done) * q / 100))], digits)


SCENARIOS = {"floor": scenario_floor, "sustained": scenario_sustained, "burst": scenario_burst,
             "overhead": scenario_overhead, "graph_rate_limit": scenario_graph_rate_limit,
             "slow_clients": scenario_slow_clients, "burst_three_hosts": scenario_burst_three_hosts,
             "three_hosts_sustained": scenario_three_hosts_sustained}
MULTI_HOST = ("burst_three_hosts", "three_hosts_sustained")
# What the summary line reports per scenario: the median of each over the runs.
SUMMARY_FIELDS = {
    "floor": ("rps", "ack_p99_ms"), "sustained": ("rps", "ack_p99_ms", "non_2xx"),
    "burst": ("drain_s", "duplicates", "non_2xx", "peak_rss_mb"),
    "burst_three_hosts": ("drain_s", "duplicates", "non_2xx", "peak_rss_mb"),
    "overhead": ("overhead_p50_ms", "known_user_p50_ms", "graph_calls_per_reply"),
    "graph_rate_limit": ("answered", "graph_rate_limited", "drain_s"),
    "slow_clients": ("failed", "crowded_p99_ms"),
    "three_hosts_sustained": ("answered_per_s_steady", "lost", "duplicated", "graph_reads_max_1s", "reply_p99_s"),
}


def summarize(results: list[tuple[int, dict]]) -> dict:
    """Medians per scenario and backend; sustained against the floor of its own round."""
    floors = {round_: r for round_, r in results if r["scenario"] == "floor"}
    summary: dict = {"scenario": "summary", "runs": len({round_ for round_, _ in results})}
    grouped = collections.defaultdict(list)
    for round_, r in results:
        if "skipped" not in r:
            grouped[(r["scenario"], r["backend"])].append((round_, r))
    for (name, backend), runs in grouped.items():
        entry = {}
        for field in SUMMARY_FIELDS.get(name, ()):
            values = [r[field] for _, r in runs if isinstance(r.get(field), (int, float))]
            if values:
                entry[field] = round(statistics.median(values), 2)
        if name == "sustained":
            ratios = [(r["rps"] / floors[n]["rps"], r["ack_p99_ms"] / floors[n]["ack_p99_ms"])
                      for n, r in runs if n in floors and floors[n]["rps"] and floors[n]["ack_p99_ms"]]
            if ratios:
                entry["rps_vs_floor"] = [round(a, 2) for a, _ in ratios]
                entry["p99_vs_floor"] = [round(b, 2) for _, b in ratios]
                entry["rps_vs_floor_median"] = round(statistics.median(a for a, _ in ratios), 2)
                entry["p99_vs_floor_median"] = round(statistics.median(b for _, b in ratios), 2)
        summary[f"{name}/{backend}"] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph-ms", type=float, default=50)
    parser.add_argument("--model-ms", type=float, default=1000)
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration for floor and sustained")
    parser.add_argument("--overhead-messages", type=int, default=20)
    parser.add_argument("--slow-connections", type=int, default=200)
    parser.add_argument("--slow-deliveries", type=int, default=500)
    parser.add_argument("--only", default=None,
                        help=f"comma-separated, of: {', '.join(SCENARIOS)} (default: all; the three-host "
                             "scenarios only with a PostgreSQL backend)")
    parser.add_argument("--database-url", default=None, metavar="URL",
                        help="a PostgreSQL server (postgresql://...): the bot scenarios run on it, each in a "
                             "fresh schema dropped after it")
    parser.add_argument("--backends", default=None,
                        help="sqlite, postgres or sqlite,postgres (default: postgres with --database-url, "
                             "else sqlite); every round runs the floor once and each scenario per backend")
    parser.add_argument("--pg-option", action="append", default=[], metavar="NAME=VALUE",
                        help="a PostgreSQL setting for the bot's connections, e.g. synchronous_commit=off "
                             "(experiments: it goes into DATABASE_URL's options)")
    parser.add_argument("--hold-replies", action="store_true",
                        help="sustained: stop the reply process (SIGSTOP) while wrk runs, to see what the "
                             "acknowledgements cost with no reply competing for the cores (a diagnosis: the "
                             "scenario's figure is with replies)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the whole selection (medians in the summary)")
    parser.add_argument("--three-hosts-seconds", type=float, default=60, help="three_hosts_sustained: duration")
    parser.add_argument("--three-hosts-rate", type=float, default=100, help="three_hosts_sustained: messages/s")
    parser.add_argument("--three-hosts-users", type=int, default=2000, help="three_hosts_sustained: distinct users")
    parser.add_argument("--drain-timeout", type=float, default=180,
                        help="three_hosts_sustained: longest wait for the last replies after the last post")
    parser.add_argument("--quiet-wait", type=float, default=60,
                        help="before each scenario, wait at most this long for a quiet machine (0: do not)")
    parser.add_argument("--bot-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra setting for the bot (repeatable), e.g. REPLY_THREADS=8")
    args = parser.parse_args()
    Gunicorn.extra_env = dict(item.split("=", 1) for item in args.bot_env)
    backends = (args.backends or ("postgres" if args.database_url else "sqlite")).split(",")
    if set(backends) - {"sqlite", "postgres"}:
        sys.exit("--backends takes sqlite and/or postgres")
    if "postgres" in backends and not args.database_url:
        sys.exit("the postgres backend needs --database-url postgresql://...")
    names = args.only.split(",") if args.only else [n for n in SCENARIOS
                                                    if n not in MULTI_HOST or "postgres" in backends]
    if unknown := set(names) - set(SCENARIOS):
        sys.exit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if shutil.which("wrk") is None and {"floor", "sustained"} & set(names):
        sys.exit("wrk is needed for floor and sustained: apt-get install wrk")
    results: list[tuple[int, dict]] = []
    for round_ in range(max(1, args.repeat)):
        for name in names:
            for backend in (["none"] if name == "floor" else backends):
                quiet = Timeline(enabled=False)  # the sandbox's record of every call is CPU the benchmark needs
                graph = GraphEmulator(PAGE_ID, PAGE_TOKEN, APP_SECRET, timeline=quiet).start()
                model = ModelStandIn(timeline=quiet).start()
                graph.delays.update(history=args.graph_ms / 1000, send=args.graph_ms / 1000, action=args.graph_ms / 1000)
                model.delay = args.model_ms / 1000
                try:
                    waited = wait_for_quiet(args.quiet_wait) if args.quiet_wait else 0.0
                    meter = CpuMeter().start()
                    with fresh_store("sqlite" if backend == "none" else backend, args) as store:
                        result = SCENARIOS[name](graph, model, args, store)
                    # Evidence of interference: CPU used meanwhile by processes that are neither
                    # the benchmark's nor PostgreSQL's (kernel threads included).
                    result.update(waited_for_quiet_s=waited, foreign_cpu_s=meter.stop().get("foreign_cpu_s", 0.0),
                                  foreign_top=meter.foreign_top)
                    results.append((round_, result))
                    print(json.dumps(result), flush=True)
                finally:
                    graph.stop()
                    model.stop()
    if len(results) > len(names) or len(backends) > 1:
        print(json.dumps(summarize(results)), flush=True)


if __name__ == "__main__":
    main()
