"""GET /readyz: can this instance take and answer messages right now?

/healthz only says the process is alive (restart it if not). Readiness names what
stops the bot from doing its job, so a load balancer stops sending it traffic and
an operator sees why: storage it cannot write, a corrupt database, a reply process
that is dead or stuck (its heartbeat stops: bot/replies/dispatcher.py writes it only while
its claim loop is turning), or messages waiting far too long while none is answered.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from typing import Callable

from bot.storage.instance import owner_prefix
from bot.storage.queue import Queue
from config import Config

# Below this, the next deliveries may fail with ENOSPC: tell the balancer first.
MIN_FREE_BYTES = 16 * 1024 * 1024
# The reply process writes its heartbeat every second at most; 30 s of silence is not a hiccup.
HEARTBEAT_STALE_SECONDS = 30.0
# quick_check reads the whole file: run it at most this often.
INTEGRITY_EVERY_SECONDS = 60.0
# The queue figures must come within this, or the probes answer without them: a database that
# hangs (a table locked, a network that drops packets) held /healthz and /readyz for as long.
STATS_WITHIN_SECONDS = 2.0


class TimedStats:
    """store.stats() within `within` seconds, else TimeoutError. One read of each kind at a time,
    on a thread of its own: a probe that comes while one hangs waits on that one, so a hung
    database holds one thread, not one per probe (they run on the front's small thread pool)."""

    def __init__(self, store: Queue, within: float = STATS_WITHIN_SECONDS):
        self.store, self.within = store, within
        self._reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stats")
        self._reading: dict[tuple, Future] = {}
        self._lock = threading.Lock()

    def __call__(self, inbox_dir: str, owner_prefix: str | None = None) -> dict:
        key = (inbox_dir, owner_prefix)
        with self._lock:
            reading = self._reading.get(key)
            if reading is None or reading.done():
                reading = self._reading[key] = self._reader.submit(self.store.stats, inbox_dir, owner_prefix=owner_prefix)
        return reading.result(timeout=self.within)


class Readiness:
    def __init__(self, config: Config, store: Queue, clock: Callable[[], float] = time.monotonic,
                 min_free_bytes: int = MIN_FREE_BYTES, heartbeat_stale_seconds: float = HEARTBEAT_STALE_SECONDS):
        self.config = config
        self.store = store
        self.clock = clock
        self.min_free_bytes = min_free_bytes
        self.heartbeat_stale_seconds = heartbeat_stale_seconds
        self._integrity: tuple[float, str | None] | None = None  # (checked at, problem)
        self.stats = TimedStats(store)  # /healthz reads its figures through it too

    def problems(self) -> tuple[list[str], dict]:
        """Every reason this instance is not ready (none = ready), and the queue figures."""
        problems = self._storage_problems()
        try:
            # This bot's reply process: with several hosts, another host's says nothing of ours.
            stats = self.stats(self.config.inbox_dir, owner_prefix=owner_prefix(self.config.data_dir))
        except TimeoutError:
            return problems + [f"the database did not answer within {self.stats.within:g} s"], {}
        except Exception as exc:  # noqa: BLE001 - any driver's error: not ready, and why
            return problems + [f"database unreadable: {type(exc).__name__}: {str(exc)[:200]}"], {}
        if integrity := self._integrity_problem():
            problems.append(integrity)
        seen = stats.get("dispatcher_seen_s_ago")
        if seen is None:
            problems.append("the reply process has not started")
        elif seen > self.heartbeat_stale_seconds:
            problems.append(f"the reply process is dead or stuck (silent for {seen:.0f} s)")
        # A backlog the bot works through (a burst, Meta's rate limits) is no reason to take a host
        # out of the balancer: only messages waiting while no reply process, on any host, makes
        # progress (finishes one, or holds one back at Meta's word).
        waited = stats.get("oldest_pending_age_s") or 0.0
        progress = stats.get("progress_s_ago")
        limit = self.config.ready_max_wait_seconds  # 0 (off): waiting messages never make it unready
        if limit and waited > limit and (progress is None or progress > limit):
            since = "none recorded" if progress is None else f"none for {progress:.0f} s"
            problems.append(f"the oldest message has waited {waited:.0f} s for its reply, and no reply process "
                            f"made progress ({since})")
        return problems, stats

    def _storage_problems(self) -> list[str]:
        if self.config.database_url:
            return []  # DATA_DIR holds only metrics files and the lock: PostgreSQL holds the messages
        data_dir = self.config.data_dir
        if not os.access(data_dir, os.W_OK | os.X_OK):
            return [f"DATA_DIR {data_dir} is not writable"]
        disk = os.statvfs(data_dir)
        free = disk.f_bavail * disk.f_frsize
        if free < self.min_free_bytes:
            return [f"DATA_DIR {data_dir} is almost full ({free // 1024} KiB free)"]
        return []

    def _integrity_problem(self) -> str | None:
        if self.config.database_url:
            return None  # PostgreSQL checks its own pages; an unreachable one fails stats() above
        now = self.clock()
        if self._integrity is None or now - self._integrity[0] >= INTEGRITY_EVERY_SECONDS:
            self._integrity = (now, quick_check(self.config.database_path))
        return self._integrity[1]


def quick_check(path: str) -> str | None:
    """SQLite's own consistency check, on a read-only connection of its own."""
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            result = db.execute("PRAGMA quick_check(1)").fetchone()[0]
    except sqlite3.Error as exc:
        return f"database unreadable: {exc}"
    return None if result == "ok" else f"database is corrupt: {result}"
