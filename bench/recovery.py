"""Crash recovery benchmark: how long users wait after a fault, and what the model is asked twice.

    .venv/bin/python bench/recovery.py [--runs 3] [--database-url postgresql://...]

For each fault, one JSON line per run and a summary line with medians:
  reply_process_kill  kill -9 of the reply process while a reply is being prepared
  process_group_kill  kill -9 of the whole bot, then the same start command again
  host_loss           (with --database-url) two hosts share PostgreSQL; the one holding the
                      reply is killed whole; the other takes over when the lease runs out
`recovery_s`: from the kill (for process_group_kill: from the restart) to the reply sent.
`repeated_model_calls`: model calls beyond one (a call in flight at the kill is repeated).
`duplicate_replies`: replies beyond one (must be 0). Everything runs on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import APP_SECRET, PAGE_ID, PAGE_TOKEN, Gunicorn, Store, _children, free_port, fresh_store  # noqa: E402
from bot.storage.instance import owner_pid  # noqa: E402
from devtools.emulator import GraphEmulator, ModelStandIn  # noqa: E402
from messenger.signature import sign  # noqa: E402

import requests  # noqa: E402

MODEL_DELAY_S = 3.0  # the reply is being prepared when the fault hits


def post(host: Gunicorn, psid: str) -> None:
    mid = f"m_recovery_{uuid.uuid4().hex[:8]}"
    body = json.dumps({"object": "page", "entry": [{"id": PAGE_ID, "time": int(time.time() * 1000), "messaging": [
        {"sender": {"id": psid}, "recipient": {"id": PAGE_ID}, "timestamp": int(time.time() * 1000),
         "message": {"mid": mid, "text": "Are you there?"}}]}]}).encode()
    response = requests.post(host.url + "/webhook", data=body, timeout=5,
                             headers={"X-Hub-Signature-256": sign(body, APP_SECRET)})
    response.raise_for_status()


def wait(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def reply_process(host: Gunicorn) -> int:
    for pid in _children(host.process.pid):
        try:
            if b"bot.runtime.reply_process" in open(f"/proc/{pid}/cmdline", "rb").read():
                return pid
        except OSError:
            continue
    raise RuntimeError("no reply process")


def one_run(fault: str, graph: GraphEmulator, model: ModelStandIn, store: Store) -> dict:
    psid = f"4{uuid.uuid4().int % 10**15:015d}"
    hosts = [Gunicorn("server:app", graph, model, free_port(), store) for _ in range(2 if fault == "host_loss" else 1)]
    try:
        model.delay, calls_before = MODEL_DELAY_S, len(model.requests)
        post(hosts[0], psid)
        if not wait(lambda: len(model.requests) > calls_before, 10):
            raise RuntimeError("the model was never called")
        model.delay = 0
        if fault == "reply_process_kill":
            os.kill(reply_process(hosts[0]), signal.SIGKILL)
            started = time.monotonic()
        elif fault == "process_group_kill":
            os.killpg(hosts[0].process.pid, signal.SIGKILL)
            hosts[0].process.wait(timeout=10)
            started = time.monotonic()
            hosts[0] = Gunicorn("server:app", graph, model, free_port(), store, work=hosts[0].work)
        else:  # host_loss: whichever host holds the claim dies whole
            from bench.run import pg_rows
            owner = pg_rows(store, "SELECT owner FROM events WHERE state = 'working'")[0][0]
            victim = next(h for h in hosts if any(owner_pid(owner) == str(p) for p in _children(h.process.pid)))
            os.killpg(victim.process.pid, signal.SIGKILL)
            started = time.monotonic()
        answered = wait(lambda: graph.sent_texts(psid), 40)
        recovery = time.monotonic() - started
        time.sleep(1.0)  # room for a wrong second reply
        return {"fault": fault, "backend": store.backend, "recovered": answered, "recovery_s": round(recovery, 2),
                "repeated_model_calls": len(model.requests) - calls_before - 1,
                "duplicate_replies": max(len(graph.sent_texts(psid)) - 1, 0)}
    finally:
        for host in hosts:
            host.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database-url", help="also measure host_loss on PostgreSQL (a fresh schema per run)")
    parser.add_argument("--pg-option", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    graph = GraphEmulator(PAGE_ID, PAGE_TOKEN, APP_SECRET).start()
    model = ModelStandIn().start()
    faults = [("reply_process_kill", "sqlite"), ("process_group_kill", "sqlite")]
    if args.database_url:
        faults += [("reply_process_kill", "postgres"), ("host_loss", "postgres")]
    try:
        for fault, backend in faults:
            results = []
            for _ in range(args.runs):
                with fresh_store(backend, args) as store:
                    results.append(one_run(fault, graph, model, store))
                print(json.dumps(results[-1]), flush=True)
            print(json.dumps({"fault": fault, "backend": backend, "runs": len(results),
                              "recovery_s_median": statistics.median(r["recovery_s"] for r in results),
                              "repeated_model_calls_median": statistics.median(
                                  r["repeated_model_calls"] for r in results),
                              "duplicate_replies_total": sum(r["duplicate_replies"] for r in results)}), flush=True)
    finally:
        graph.stop()
        model.stop()


if __name__ == "__main__":
    main()
