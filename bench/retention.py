"""What a RETENTION_DAYS pass costs a large store, and how long it holds the write lock.

    .venv/bin/python bench/retention.py --rows 1000000 [--database-url postgresql://postgres@127.0.0.1:5432/test]

A store with `--rows` old mirror rows and a third as many old exchange records and finished
queue rows (200-character texts, as a busy Page's year leaves them), plus the same of each that
are recent, is pruned twice from the same contents: in steps of PRUNE_CHUNK rows (what the bot
does) and in one transaction (what it did before). One JSON line per backend and way: the
pass's wall time, the number of steps and the longest step - while a step runs, no reply can
be recorded - and the same of the next pass, which has nothing left to delete (what each pass
costs from then on, every 10 minutes). Every loop is bounded by the row count.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import fresh_store  # noqa: E402
from bot.storage.conversations import PRUNE_CHUNK, PRUNED_KINDS  # noqa: E402
from bot.storage.queue import PostgresQueue, SQLiteQueue  # noqa: E402

NOW = 1_800_000_000.0
DAY_MS = 86_400_000
TEXT = "x" * 200


class Clock:
    def __call__(self) -> float:
        return NOW


def rows(count: int, at_ms: int, tag: str):
    """(mirror rows, exchange records, finished queue rows) at `at_ms`, ids tagged by age."""
    exchanges = max(count // 3, 1)
    return ([(f"m.{tag}{n}", f"u{n % 5000}", "user", TEXT, at_ms + n) for n in range(count)],
            [(f"u{n % 5000}", TEXT, at_ms + n, TEXT, "answered") for n in range(exchanges)],
            [(f"{tag}{n}", f"u{n % 5000}", TEXT, at_ms + n, at_ms / 1000, "done", at_ms / 1000 + n / 1000)
             for n in range(exchanges)])


def fill(db, count: int, placeholder: str) -> None:
    p = placeholder
    for age, tag in ((400, "old"), (1, "new")):
        mirror, interactions, events = rows(count, int(NOW * 1000) - age * DAY_MS, tag)
        db.executemany(f"INSERT INTO mirror (mid, psid, author, text, at_ms) VALUES ({p}, {p}, {p}, {p}, {p})", mirror)
        db.executemany("INSERT INTO interactions (psid, user_message, user_timestamp, bot_message, outcome)"
                       f" VALUES ({p}, {p}, {p}, {p}, {p})", interactions)
        db.executemany("INSERT INTO events (dedupe_key, psid, message, timestamp_ms, received_at, state, finished_at)"
                       f" VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})", events)


def one_pass(queue, limit: int) -> dict:
    """The pass that deletes the old rows, then the next one (10 minutes later in the bot), which
    finds nothing left to delete: what every later pass costs."""
    first = steps_of(queue, limit)
    again = steps_of(queue, limit)
    return {"pass_s": round(sum(first), 2), "steps": len(first), "longest_step_ms": round(max(first) * 1000, 1),
            "median_step_ms": round(statistics.median(first) * 1000, 1),
            "next_pass_ms": round(sum(again) * 1000, 1), "next_pass_longest_step_ms": round(max(again) * 1000, 1)}


def steps_of(queue, limit: int) -> list[float]:
    steps, kinds = [], PRUNED_KINDS
    while kinds:  # as Dispatcher.prune steps, without its pauses
        began = time.perf_counter()
        kinds = queue.conversations.prune(90, limit, kinds).more
        steps.append(time.perf_counter() - began)
    return steps


def sqlite_pass(limit: int, template: str, workdir: str) -> dict:
    path = os.path.join(workdir, f"pass{limit}.sqlite3")
    shutil.copy(template, path)
    queue = SQLiteQueue(path, clock=Clock())
    try:
        return one_pass(queue, limit)
    finally:
        queue.close()
        os.remove(path)


def postgres_pass(count: int, limit: int, args) -> dict:
    import psycopg

    with fresh_store("postgres", args) as store:
        PostgresQueue(store.url, clock=Clock()).close()  # the schema
        with psycopg.connect(store.url) as db:
            with db.cursor() as cursor:
                fill(cursor, count, "%s")
        with psycopg.connect(store.url, autocommit=True) as db:
            db.execute("VACUUM ANALYZE")
        queue = PostgresQueue(store.url, clock=Clock())
        try:
            return one_pass(queue, limit)
        finally:
            queue.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000, help="old mirror rows (and as many recent ones)")
    parser.add_argument("--database-url", help="also PostgreSQL (a fresh schema per pass, dropped after)")
    args = parser.parse_args()
    args.pg_option = []  # bench.run's fresh_store reads it
    ways = (("steps", PRUNE_CHUNK), ("one_transaction", 10 ** 12))
    with tempfile.TemporaryDirectory() as workdir:
        template = os.path.join(workdir, "template.sqlite3")
        SQLiteQueue(template, clock=Clock()).close()
        with sqlite3.connect(template) as db:
            fill(db, args.rows, "?")
        size_mb = round(os.path.getsize(template) / 1e6)
        for way, limit in ways:
            print(json.dumps({"backend": "sqlite", "way": way, "old_mirror_rows": args.rows, "store_mb": size_mb,
                              **sqlite_pass(limit, template, workdir)}), flush=True)
    if args.database_url:
        for way, limit in ways:
            print(json.dumps({"backend": "postgres", "way": way, "old_mirror_rows": args.rows,
                              **postgres_pass(args.rows, limit, args)}), flush=True)


if __name__ == "__main__":
    main()
