"""The website chat next to Messenger: does a crowd of web visitors cost Meta's acknowledgements?

    .venv/bin/python bench/webchat.py [--chats 200] [--model-s 3] [--acks 1000] [--first-token-runs 20] [--together]

`gunicorn server:app` with WEBCHAT=on (the website chat's own listener, bot/webchat/serve.py),
against a streaming OpenAI-shaped server (tests/support/streaming_model.py) that takes
--model-s before its first token. Printed, one JSON line each:

- ack_baseline / ack_with_chats: signed webhook deliveries, one at a time at ~50 a second, alone
  and then while --chats server-sent-event chats stay open (each reopens as soon as its answer
  is done); p50/p99 of the 200s (1000 of them: the p99 of 400 is the 4th worst, and one hiccup of
  a shared machine moves it). Target: p99 with chats <= 1.5x without. With it, the fewest
  chats open at any sample and the chats answered a second, against what --chats chats of
  --model-s would answer if nothing slowed them (the harness runs at the lowest priority: this
  shows it was not starved into asking less). ack_baseline_after: alone again once the chats
  are closed - far from ack_baseline, something else on the machine changed meanwhile.
- first_token: for single streamed chats, the visitor's first `delta` event minus the moment
  the model wrote its first token (same host, same clock). Target: <= 20 ms.
- rss: the website chat's processes (master and worker), peak while the chats are open.
- cpu: where the CPU went while the acks were measured with the chats open - cores used by each
  of the bot's processes and by the harness (the visitors; the model and Graph stand-ins), and
  how busy the machine was - to tell the bot's cost from the load generator's. "others" (also on
  each ack line, others_cores) is the machine's busy time that none of these used: other people's
  work on a shared machine. A phase where it is high was disturbed; run again.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench.run import APP_SECRET, PAGE_ID, Gunicorn, free_port  # noqa: E402
from devtools.emulator import GraphEmulator  # noqa: E402
from bench.run import PAGE_TOKEN  # noqa: E402
from messenger.signature import sign  # noqa: E402
from tests.support.streaming_model import StreamingModel  # noqa: E402

HARNESS_NICENESS = 19  # the visitors and the model stand-in: stand-ins for other machines
ANSWER = "Thank you for asking, we are open every day from eight to six."
PIECE_S = 0.02  # between the model's pieces (a word each): 50 a second


def delivery(n: int) -> bytes:
    event = {"sender": {"id": f"bench-user-{n % 50}"}, "recipient": {"id": PAGE_ID}, "timestamp": 1763893200001 + n,
             "message": {"mid": f"m_webchat_bench_{n}_{time.time_ns()}", "text": f"hello {n}"}}
    return json.dumps({"object": "page", "entry": [{"id": PAGE_ID, "time": 1763893200001, "messaging": [event]}]}).encode()


def measure_acks(url: str, count: int) -> dict:
    """In a process of its own: the visitors and the model server live in this one,
    and their interpreter lock must not be what the acknowledgements' times measure."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(_measure_acks, (url, count))


def _measure_acks(url: str, count: int, pace: float = 0.02) -> dict:
    os.setsid()  # out of the harness's autogroup (put behind everything, see harness_behind_the_bot)
    session = requests.Session()
    times = []
    for n in range(count):
        body = delivery(n)
        started = time.perf_counter()
        response = session.post(url + "/webhook", data=body, timeout=10,
                                headers={"X-Hub-Signature-256": sign(body, APP_SECRET)})
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.status_code
        time.sleep(pace)
    times.sort()
    return {"acks": count, "p50_ms": round(statistics.median(times), 2),
            "p99_ms": round(times[int(len(times) * 0.99) - 1], 2), "measurer_cpu_s": round(sum(os.times()[:2]), 2)}


def harness_behind_the_bot() -> Callable[[], None]:
    """Put this process's whole autogroup at HARNESS_NICENESS; returns what puts it back. Where
    the kernel groups tasks by session (CONFIG_SCHED_AUTOGROUP, sched_autogroup_enabled=1: on
    here), a thread's nice ranks it only within its session's group and the groups share the
    cores equally: the bot runs in a session of its own, so the stand-ins' threads at nice 19
    took the cores from it as if at nice 0. The group is the calling shell's session too, hence
    the undo. The ack measurer leaves it (it times the bot and must not wait behind it)."""
    path = Path("/proc/self/autogroup")
    try:
        before = path.read_text().split()[-1]  # "/autogroup-85 nice 0"
        path.write_text(str(HARNESS_NICENESS))
    except (OSError, IndexError) as error:  # without autogroups the threads' own nice is what counts
        if path.exists():
            print(f"the harness is not behind the bot ({error}): the ack figures may be worse", file=sys.stderr)
        return lambda: None
    return lambda: _write_quietly(path, before)


def _write_quietly(path: Path, value: str) -> None:
    """The kernel refuses an autogroup change within 100 ms of the last one (EAGAIN): retried;
    a failure to put it back is said, never raised over the bench's own error."""
    for _ in range(20):
        try:
            path.write_text(value)
            return
        except BlockingIOError:
            time.sleep(0.1)
        except OSError:
            break
    print(f"could not put this session's autogroup back at nice {value}: echo {value} > {path}", file=sys.stderr)


class OpenChats:
    """`count` visitors, each with one streamed chat open at all times.

    Visitor n opens its first chat n/count of a chat's length after the first: independent
    visitors' questions, and so the model's first tokens, arrive spread out, not all 200 in the
    same instant every 3 s (which is what starting them together gave, wave after wave).
    Visitors are other machines in real life: here they are tasks of one event loop, each on a
    keep-alive connection of its own, on one thread at the lowest priority (200 threads with
    requests took 0.13 of the 2 cores the bot runs on)."""

    def __init__(self, url: str, count: int, chat_s: float):
        address = urlsplit(url)
        self.host, self.port, self.count, self.chat_s = address.hostname, address.port, count, chat_s
        self.stop = threading.Event()
        self.done = self.errors = 0
        self.waiting = 0  # chats admitted and waiting on the model right now
        self.threads = [threading.Thread(target=self._run, name="visitors", daemon=True)]

    def start(self) -> "OpenChats":
        self.threads[0].start()
        return self

    def _run(self) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HARNESS_NICENESS)  # per thread on Linux
        asyncio.run(self._visitors())

    async def _visitors(self) -> None:
        visitors = [asyncio.create_task(self._visitor(n)) for n in range(self.count)]
        while not self.stop.is_set():
            await asyncio.sleep(0.1)
        await asyncio.wait(visitors, timeout=60)  # each ends its chat first

    async def _visitor(self, n: int) -> None:
        await asyncio.sleep(self.chat_s * n / self.count)
        body = json.dumps({"message": f"visitor {n} asks"}).encode()
        request = (f"POST /api/chat HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAccept: text/event-stream\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        writer = None
        while not self.stop.is_set():
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                writer.write(request)
                async with asyncio.timeout(60):
                    kept = await self._chat(reader)
                self.done += 1
            except (OSError, ValueError, asyncio.IncompleteReadError):  # TimeoutError is an OSError
                self.errors += 1
                kept = False
                await asyncio.sleep(0.5)
            if not kept and writer is not None:
                writer.close()
                writer = None

    async def _chat(self, reader: asyncio.StreamReader) -> bool:
        """One streamed answer read to its end (chunked, as gunicorn sends it); True: keep-alive."""
        status = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if not status.startswith(b"HTTP/1.1 200") or headers.get("transfer-encoding") != "chunked":
            raise ValueError(f"unexpected answer: {status!r} {headers}")
        started = False
        try:
            while size := int((await reader.readline()).split(b";")[0], 16):
                if b"event: start" in await reader.readexactly(size + 2):
                    started = True
                    self.waiting += 1
            await reader.readline()
        finally:
            self.waiting -= started
        return headers.get("connection") != "close"

    def close(self) -> None:
        self.stop.set()
        self.threads[0].join(timeout=90)


class RemoteModel(StreamingModel):
    """The streaming model stand-in, each answer on a thread at the lowest priority: in real life
    the model runs on another machine, and here it must not outrank the bot it is measuring."""

    def handle(self, request):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HARNESS_NICENESS)
        return super().handle(request)


def first_token(url: str, model: StreamingModel, runs: int) -> dict:
    gaps = []
    for run in range(runs):
        question = f"how fast? {run} {time.time_ns()}"
        with requests.post(url + "/api/chat", json={"message": question}, stream=True, timeout=60,
                           headers={"Accept": "text/event-stream"}) as response:
            for line in response.iter_lines():
                if line.startswith(b"event: delta"):
                    arrived = time.time()
                    gaps.append((arrived - model.first_piece_at[request_number(model, question)]) * 1000)
                    break
        time.sleep(0.2)
    gaps.sort()
    return {"runs": runs, "added_ms_median": round(statistics.median(gaps), 2), "added_ms_max": round(gaps[-1], 2),
            "target_ms": 20}


def request_number(model: StreamingModel, question: str) -> int:
    """The model's request that carried `question` (the reply process may be asking it too)."""
    return next(n for n, body in reversed(list(enumerate(model.requests)))
                if question in json.dumps(body.get("messages"), ensure_ascii=False))


def webchat_pids(bot: Gunicorn) -> list[int]:
    pids = []
    for pid in bot.pids():
        try:
            if b"bot.webchat.serve" in open(f"/proc/{pid}/cmdline", "rb").read():
                pids.append(pid)
        except OSError:
            continue
    children = [int(c) for p in pids for c in open(f"/proc/{p}/task/{p}/children").read().split()]
    return pids + children


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, its dead threads included."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_seconds(tid: int) -> float:
    """A thread's run time from the scheduler (ns): its utime ticks miss most short wake-ups here."""
    return int(open(f"/proc/{os.getpid()}/task/{tid}/schedstat").read().split()[0]) / 1e9


def role(pid: int, master: int) -> str:
    command = open(f"/proc/{pid}/cmdline", "rb").read()
    if pid == master:
        return "gunicorn master"
    if b"bot.webchat.serve" in command or b"webchat" in open(f"/proc/{pid}/comm", "rb").read():
        return "webchat"
    if b"reply_process" in command:
        return "reply process"
    return "webhook workers"


def cpu_snapshot(bot: Gunicorn, web_pids: list[int], visitors: list[threading.Thread]) -> dict:
    """CPU seconds so far by role; the bench process split into visitors and the rest."""
    taken: dict[str, float] = {}
    for pid in set(bot.pids()) | set(web_pids):
        try:
            name = "webchat" if pid in web_pids else role(pid, bot.process.pid)
            taken[name] = taken.get(name, 0.0) + cpu_seconds(pid)
        except OSError:
            continue
    taken["harness: visitors"] = sum(thread_seconds(t.native_id) for t in visitors)
    taken["harness: model, Graph, main"] = cpu_seconds(os.getpid()) - taken["harness: visitors"]
    fields = [int(n) for n in open("/proc/stat").readline().split()[1:8]]
    taken["machine busy"] = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    return taken


def cores_used(before: dict, after: dict, seconds: float) -> dict:
    return {name: round((after[name] - before.get(name, 0.0)) / seconds, 3) for name in after}


def acks_with_cpu(bot: Gunicorn, count: int, visitors: list[threading.Thread]) -> tuple[dict, dict]:
    """The acks, and the cores each role used meanwhile; "others" is the rest of the machine (other
    people's work on a shared machine: a phase where it is high was disturbed)."""
    pids = webchat_pids(bot)
    before, started = cpu_snapshot(bot, pids, visitors), time.monotonic()
    acks = measure_acks(bot.url, count)
    seconds = time.monotonic() - started
    cores = cores_used(before, cpu_snapshot(bot, pids, visitors), seconds)
    cores["ack measurer"] = round(acks.pop("measurer_cpu_s") / seconds, 3)
    cores["others"] = round(cores["machine busy"] - sum(v for k, v in cores.items() if k != "machine busy"), 3)
    return acks, cores


def with_chats(bot: Gunicorn, chats: OpenChats, acks: int) -> list[dict]:
    """The acks measured while the chats are open, with the chats' rate, the CPU and the RSS meanwhile."""
    pids, peak, fewest = webchat_pids(bot), 0.0, chats.count
    sampler_stop = threading.Event()

    def sample() -> None:
        nonlocal peak, fewest
        while not sampler_stop.wait(0.2):
            peak, fewest = max(peak, rss_mb(pids)), min(fewest, chats.waiting)
    threading.Thread(target=sample, daemon=True).start()
    answered, started = chats.done, time.monotonic()
    loaded, cores = acks_with_cpu(bot, acks, chats.threads)
    rate = (chats.done - answered) / (time.monotonic() - started)
    sampler_stop.set()
    chats.close()
    return [{"scenario": "ack_with_chats", **loaded, "others_cores": cores["others"], "chats_open_min": fewest,
             "chats_per_s": round(rate, 1),
             "chats_per_s_unhindered": round(chats.count / chats.chat_s, 1) if chats.chat_s else None,
             "chat_errors": chats.errors},
            {"scenario": "cpu", "cores_used": cores, "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
            {"scenario": "rss", "chats": chats.count, "webchat_peak_mb": round(peak, 1), "processes": len(pids)}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--model-s", type=float, default=3.0)
    parser.add_argument("--acks", type=int, default=1000)
    parser.add_argument("--first-token-runs", type=int, default=20)
    parser.add_argument("--together", action="store_true",
                        help="start every visitor at once: their chats then go in step, wave after wave")
    args = parser.parse_args()
    undo_niceness = harness_behind_the_bot()
    try:
        measure(args)
    finally:  # the group is the calling shell's session too
        undo_niceness()


def measure(args) -> None:
    graph = GraphEmulator(PAGE_ID, PAGE_TOKEN, APP_SECRET).start()
    model = RemoteModel(ANSWER, first_token_delay=args.model_s, piece_delay=PIECE_S).start()
    web_port = free_port()
    Gunicorn.extra_env = {"WEBCHAT": "on", "WEBCHAT_PORT": str(web_port), "WEBCHAT_RATE_LIMIT": "off",
                          "WEBCHAT_CONVERSATION_LIMIT": "off", "WEBCHAT_DAILY_LIMIT": "off",
                          "WEBCHAT_DAILY_TOKENS": "off", "WEBCHAT_IP_DAILY_TOKENS": "off", "OPENAI_TIMEOUT": "30",
                          "REPLY_DEADLINE": "40s"}
    bot = Gunicorn("server:app", graph, model, free_port())
    web = f"http://127.0.0.1:{web_port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if requests.get(web + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        measure_acks(bot.url, 50)  # warm-up
        baseline, cores = acks_with_cpu(bot, args.acks, [])
        print(json.dumps({"scenario": "ack_baseline", **baseline, "others_cores": cores["others"]}), flush=True)
        chat_s = 0.0 if args.together else args.model_s + len(ANSWER.split()) * PIECE_S
        chats = OpenChats(web, args.chats, chat_s).start()
        deadline = time.monotonic() + 30 + args.model_s
        while chats.waiting < args.chats * 0.95 and time.monotonic() < deadline:
            time.sleep(0.1)
        for line in with_chats(bot, chats, args.acks):
            print(json.dumps(line), flush=True)
        after, cores = acks_with_cpu(bot, args.acks, [])
        print(json.dumps({"scenario": "ack_baseline_after", **after, "others_cores": cores["others"]}), flush=True)
        model.first_token_delay = 0.3
        print(json.dumps({"scenario": "first_token", **first_token(web, model, args.first_token_runs)}), flush=True)
    finally:
        bot.stop()
        model.stop()
        graph.stop()


if __name__ == "__main__":
    main()
