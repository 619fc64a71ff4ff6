"""Reply threads fed by the durable queue.

Under gunicorn they run in one reply process beside the webhook workers
(bot/runtime/reply_process.py), so generating replies never takes the interpreter from a
webhook waiting for its 200. The webhook rings the doorbell when it stores
work; the dispatcher also polls, so work left by a dead process (its lease
expired) is picked up anyway.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from bot.replies.batch import BatchReplier
from bot.replies.composer import Composers
from bot.replies.threads import TAKE_BACK_EVERY_S, take_threads_back
from bot.storage.conversations import PRUNE_CHUNK, PRUNED_KINDS
from bot.storage.doorbell import Doorbell
from bot.storage.instance import LINEAGE_ENV, owner_prefix, take_reply_lock
from bot.storage.queue import Batch, InboxUnreadable, Queue
from bot.telemetry import metrics
from bot.telemetry.quiet import QuietRepeats

logger = logging.getLogger(__name__)

# RETENTION_DAYS: the first pass a minute after start (a bot restarted often still prunes), the
# next ten minutes after each pass ends; a pass is steps of a chunk of rows each, with a pause
# between them at least PRUNE_PAUSE_S and at least as long as the step.
PRUNE_FIRST_S = 60.0
PRUNE_EVERY_S = 600.0
PRUNE_PAUSE_S = 0.05
DRAIN_EVERY_S = 0.02
# The claim loop turns at least every second when idle: this long without a turn is stuck.
STUCK_AFTER_S = 60.0


class Dispatcher:
    """Claims batches while it has free reply threads; answers each exactly once if it can."""

    def __init__(self, store: Queue, composers: Composers, doorbell: Doorbell, *, threads: int,
                 lease_seconds: float = 30.0, retry_base: float = 1.0, retry_cap: float = 60.0,
                 poll_interval: float = 0.2, retention_days: int = 0, tracker=None, inbox_dir: str | None = None,
                 data_dir: str | None = None, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.composers = composers  # one per Page and Instagram account
        self.doorbell = doorbell
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.take_back_every = TAKE_BACK_EVERY_S  # seconds between looks for threads to take back
        self.prune_first, self.prune_every, self.prune_chunk = PRUNE_FIRST_S, PRUNE_EVERY_S, PRUNE_CHUNK
        self.retention_days = retention_days
        self.tracker = tracker  # bot.replies.tracking.Tracker, when TRACKING_URL is set
        self.inbox_dir = inbox_dir  # the webhook processes' inbox files (bot/storage/inbox.py)
        self._drained_at = 0.0
        self.data_dir = data_dir
        # This bot (DATA_DIR's instance id), this process, this start: see bot/storage/instance.py.
        self.prefix = owner_prefix(data_dir) if data_dir else f"{socket.gethostname()}:"
        # Under gunicorn, the master start that spawned this process (see Queue.take_over).
        self.lineage = os.environ.get(LINEAGE_ENV, "")
        lineage = f"{self.lineage}." if self.lineage else ""
        self.owner = f"{self.prefix}{lineage}{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._reply_lock: int | None = None
        self._slots = threading.BoundedSemaphore(threads)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reply")
        # One sender-action thread per reply thread: in a burst, "seen" must not queue behind others.
        self._actions = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sender-action")
        self.replier = BatchReplier(store, composers, self._actions, retry_base=retry_base, retry_cap=retry_cap,
                                    lease_seconds=lease_seconds)
        self._stopping = threading.Event()
        self._leases_end = threading.Event()  # set once stop() is done: replies in flight keep theirs
        self._working: set[int] = set()  # the batches this process's reply threads are answering
        self._busy_lock = threading.Lock()
        self.clock = clock
        self.last_turn = clock()  # the claim loop's last turn: readiness sees a stuck loop
        self._threads: list[threading.Thread] = []
        self._errors = QuietRepeats(clock, log=logger)

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.doorbell.listen()
        self.take_over_dead_predecessor()
        self.store.heartbeat(self.owner)
        self.last_turn = self.clock()
        loops = [(self._claim_loop, "dispatcher"), (self._upkeep_loop, "upkeep"), (self._lease_loop, "leases"),
                 (self._threads_back_loop, "threads-back")]
        if self.retention_days:
            loops.append((self._retention_loop, "retention"))
        self._threads = [threading.Thread(target=target, name=name, daemon=True) for target, name in loops]
        for thread in self._threads:
            thread.start()
        if self.tracker:
            self.tracker.start(self._stopping)

    def take_over_dead_predecessor(self) -> int:
        """With the bot's reply lock, every claim of this bot that is not ours belongs to a dead
        process (the one before us, killed): taken back now, not after LEASE_SECONDS."""
        if not self.data_dir:
            return 0
        self._reply_lock = take_reply_lock(self.data_dir)
        if self._reply_lock is None:
            logger.info("another reply process of this bot is alive: its claims are left to it")
            return 0
        taken = self.store.take_over(self.prefix, self.owner, self.lineage)
        if taken:
            logger.warning("took back %d message(s) a dead reply process of this bot had claimed", taken)
        return taken

    def stop(self, timeout: float) -> None:
        """Stop claiming, let replies in flight finish for `timeout` s (their leases renewed all the
        while: no other host takes them over), give back the rest."""
        self._stopping.set()
        self.doorbell.ring()
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            released = self.store.release(self.owner) if self.in_flight else 0
        finally:
            self._leases_end.set()
        logger.info("dispatcher stopped: %d message(s) released for the next start", released)

    def healthy(self, now: float) -> tuple[bool, str]:
        """False, with the reason, when a loop thread died or the claim loop stopped turning.
        The heartbeat is written only while healthy, so /readyz sees it; the reply process
        exits on it, so the supervisor starts a fresh one."""
        dead = [t.name for t in self._threads if not t.is_alive()]
        if dead and not self._stopping.is_set():
            return False, f"thread(s) {', '.join(dead)} died"
        if self._threads and now - self.last_turn > STUCK_AFTER_S:
            return False, f"the claim loop has not turned for {now - self.last_turn:.0f} s"
        return True, ""

    @property
    def in_flight(self) -> int:
        with self._busy_lock:
            return len(self._working)

    def _in_flight_batches(self) -> tuple[int, ...]:
        with self._busy_lock:
            return tuple(self._working)

    def run_pending(self) -> int:
        """Answer everything claimable now, in this thread (tests and one-off scripts)."""
        done = 0
        self.drain()
        while (batch := self.store.claim(self.owner, self.lease_seconds, self._in_flight_batches())) is not None:
            with self._busy_lock:
                self._working.add(batch.batch_id)
            try:
                self.process(batch)
            finally:
                with self._busy_lock:
                    self._working.discard(batch.batch_id)
            done += 1
        return done

    # -- loops ---------------------------------------------------------------------------------------
    def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            self.last_turn = self.clock()
            try:
                self._claim_once()
            except Exception:  # noqa: BLE001 - this loop is every user's replies: it must go on
                self._errors.error("claim-loop", "claim loop error, going on", exc_info=True)
                self._stopping.wait(self.poll_interval)

    def _claim_once(self) -> None:
        # Bounded, so the loop keeps turning (and proving it is alive) while every thread is busy.
        if not self._slots.acquire(timeout=1.0):
            return
        batch = None
        try:
            if not self._stopping.is_set():
                batch = self._try_claim()
        finally:
            if batch is None:
                self._slots.release()
        if batch is None:
            self.doorbell.wait(self.poll_interval)
            self._drained_at = 0.0  # woken by a webhook, or the poll: drain before the next claim
            return
        with self._busy_lock:
            self._working.add(batch.batch_id)
        try:
            self._pool.submit(self._run, batch)
        except Exception:
            with self._busy_lock:
                self._working.discard(batch.batch_id)
            self._slots.release()
            raise

    def _try_claim(self) -> Batch | None:
        # Through a backlog, one drain per DRAIN_EVERY_S rather than one per claim.
        if time.monotonic() - self._drained_at >= DRAIN_EVERY_S:
            try:
                self.drain()
            except Exception as exc:  # noqa: BLE001 - the drain quarantines bad input; what is queued goes on
                self._errors.error(f"drain:{type(exc).__name__}", "inbox drain failed, replies to what is queued "
                                   "go on: %s: %s", type(exc).__name__, exc)
        try:
            return self.store.claim(self.owner, self.lease_seconds, self._in_flight_batches())
        except Exception as exc:  # noqa: BLE001 - poll again
            self._errors.error(f"claim:{type(exc).__name__}", "claim failed, will poll again: %s: %s",
                               type(exc).__name__, exc)
            return None

    def drain(self) -> None:
        """What the webhooks acknowledged, into the queue (redeliveries dropped here)."""
        self._drained_at = time.monotonic()
        if not self.inbox_dir:
            return
        unreadable = None
        try:
            new, duplicates = self.store.drain(self.inbox_dir)
        except InboxUnreadable as exc:  # the other files were drained: counted, then reported
            new, duplicates, unreadable = exc.new, exc.duplicates, exc
        metrics.count_taken_in(new, duplicates)
        if unreadable:
            raise unreadable

    def _run(self, batch: Batch) -> None:
        try:
            self.process(batch)
        except Exception:  # noqa: BLE001 - process() does not raise; should it, the lease brings the batch back
            self._errors.error("process", "reply thread error psid=%r", batch.psid, exc_info=True)
        finally:
            with self._busy_lock:
                self._working.discard(batch.batch_id)
            self._slots.release()

    def _lease_loop(self) -> None:
        """A third of a lease apart: renew what this process's reply threads are answering - not a
        batch a thread gave up on (it could not be put back: then its lease runs out, and the next
        claim takes it back). A thread of its own, so a slow prune or checkpoint never lets a live
        owner's lease run out."""
        while not self._leases_end.wait(self.lease_seconds / 3):
            try:
                if batches := self._in_flight_batches():
                    self.store.renew(self.owner, self.lease_seconds, batches)
            except Exception as exc:  # noqa: BLE001 - leases must keep being renewed
                self._errors.error(f"lease:{type(exc).__name__}", "lease renewal failed: %s: %s",
                                   type(exc).__name__, exc)

    def _upkeep_loop(self) -> None:
        """Every second: say it is alive, checkpoint the WAL."""
        while not self._stopping.wait(1.0):
            try:
                healthy, reason = self.healthy(self.clock())
                if healthy:
                    self.store.heartbeat(self.owner)
                else:
                    self._errors.error("unhealthy", "no heartbeat: %s", reason)
                self.store.checkpoint()
            except Exception as exc:  # noqa: BLE001 - the heartbeat must go on
                self._errors.error(f"upkeep:{type(exc).__name__}", "queue upkeep failed: %s: %s",
                                   type(exc).__name__, exc)

    def _retention_loop(self) -> None:
        """RETENTION_DAYS: a loop of its own, so a long pass never holds up the heartbeat."""
        wait = self.prune_first
        while not self._stopping.wait(wait):
            wait = self.prune_every
            try:
                self.prune()
            except Exception as exc:  # noqa: BLE001 - tried again at the next pass
                self._errors.error(f"retention:{type(exc).__name__}", "retention failed: %s: %s",
                                   type(exc).__name__, exc)

    def _threads_back_loop(self) -> None:
        """Threads passed to the Page inbox whose pause is over, taken back (bot/replies/threads.py):
        a loop of its own, so a slow Graph never holds up the heartbeat."""
        while not self._stopping.wait(self.take_back_every):
            try:
                self.take_threads_back()
            except Exception as exc:  # noqa: BLE001 - tried again at the next turn
                self._errors.error(f"threads-back:{type(exc).__name__}", "taking threads back failed: %s: %s",
                                   type(exc).__name__, exc)

    def take_threads_back(self) -> int:
        return take_threads_back(self.store.conversations, self.composers, self.store.clock(), self._errors)

    def prune(self) -> int:
        """One RETENTION_DAYS pass: steps of `prune_chunk` rows of each kind that still has old
        rows, each its own transaction, with a pause between them in which the reply threads
        write (Conversations.prune)."""
        deleted, kinds = 0, PRUNED_KINDS
        while True:
            began = self.clock()
            step = self.store.conversations.prune(self.retention_days, self.prune_chunk, kinds)
            deleted += step.exchanges
            kinds = step.more
            # A pause at least as long as the step: on a large store that is not in memory a step
            # can take a few hundred ms, and the reply threads get the lock half the time at least.
            if not kinds or self._stopping.wait(max(PRUNE_PAUSE_S, self.clock() - began)):
                break
        if deleted:
            logger.info("retention: deleted %d exchange record(s) older than %d days", deleted, self.retention_days)
        return deleted

    def process(self, batch: Batch) -> None:
        """Answer one claimed batch in this thread (bot/replies/batch.py); never raises."""
        self.replier.process(batch)
