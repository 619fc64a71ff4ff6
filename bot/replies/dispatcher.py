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
import random
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from bot.telemetry import metrics
from bot.replies.activity import Activity
from bot.storage.conversations import Exchange
from bot.storage.doorbell import Doorbell
from bot.replies.composer import Answer, Responder
from bot.storage.queue import Batch, SQLiteStore
from messenger.graph import GraphAPIError, is_retryable
from messenger.split import split_text

logger = logging.getLogger(__name__)


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(attempt-1)))."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


PRUNE_EVERY_S = 600.0
DRAIN_EVERY_S = 0.02
# The claim loop turns at least every second when idle: this long without a turn is stuck.
STUCK_AFTER_S = 60.0
# A failure that repeats (a corrupt database, a full disk) is logged once per this period.
REPEAT_LOG_EVERY_S = 60.0


class QuietRepeats:
    """Logs an error the first time, then at most once per period while it repeats.
    Shared by the claim, upkeep and reply threads."""

    def __init__(self, clock: Callable[[], float], period: float = REPEAT_LOG_EVERY_S):
        self.clock = clock
        self.period = period
        self._last: dict[str, tuple[float, int]] = {}  # key -> (logged at, repeats since)
        self._lock = threading.Lock()

    def error(self, key: str, message: str, *args: object, exc_info: bool = False) -> None:
        now = self.clock()
        with self._lock:
            logged_at, repeats = self._last.get(key, (None, 0))
            quiet = logged_at is not None and now - logged_at < self.period
            self._last[key] = (logged_at, repeats + 1) if quiet else (now, 0)
        if quiet:
            return
        suffix = f" (and {repeats} more time(s) in the {now - logged_at:.0f} s before)" if repeats else ""
        logger.error(message + suffix, *args, exc_info=exc_info)


@dataclass
class Progress:
    """How far one batch got: the answer (once composed), how many parts went out, (id, text) of each."""

    answer: Answer | None
    sent: int
    parts: list[tuple[str, str]] = field(default_factory=list)


class Dispatcher:
    """Claims batches while it has free reply threads; answers each exactly once if it can."""

    def __init__(self, store: SQLiteStore, responder: Responder, doorbell: Doorbell, *, threads: int,
                 lease_seconds: float = 30.0, retry_base: float = 1.0, retry_cap: float = 60.0,
                 poll_interval: float = 0.2, retention_days: int = 0, tracker=None, inbox_dir: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.responder = responder
        self.doorbell = doorbell
        self.lease_seconds = lease_seconds
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.poll_interval = poll_interval
        self.retention_days = retention_days
        self.tracker = tracker  # bot.replies.tracking.Tracker, when TRACKING_URL is set
        self.inbox_dir = inbox_dir  # the webhook processes' inbox files (bot/storage/inbox.py)
        self._drained_at = 0.0
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._slots = threading.BoundedSemaphore(threads)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reply")
        # One sender-action thread per reply thread: in a burst, "seen" must not queue behind others.
        self._actions = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sender-action")
        self._stopping = threading.Event()
        self._busy = 0
        self._busy_lock = threading.Lock()
        self.clock = clock
        self.last_turn = clock()  # the claim loop's last turn: readiness sees a stuck loop
        self._threads: list[threading.Thread] = []
        self._errors = QuietRepeats(clock)

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.doorbell.listen()
        self.store.heartbeat(self.owner)
        self.last_turn = self.clock()
        self._threads = [threading.Thread(target=target, name=name, daemon=True)
                         for target, name in ((self._claim_loop, "dispatcher"), (self._upkeep_loop, "upkeep"))]
        for thread in self._threads:
            thread.start()
        if self.tracker:
            self.tracker.start(self._stopping)

    def stop(self, timeout: float) -> None:
        """Stop claiming, let replies in flight finish for `timeout` s, give back the rest."""
        self._stopping.set()
        self.doorbell.ring()
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        released = self.store.release(self.owner) if self.in_flight else 0
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
            return self._busy

    def run_pending(self) -> int:
        """Answer everything claimable now, in this thread (tests and one-off scripts)."""
        done = 0
        self.drain()
        while (batch := self.store.claim(self.owner, self.lease_seconds)) is not None:
            self.process(batch)
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
            self._busy += 1
        try:
            self._pool.submit(self._run, batch)
        except Exception:
            with self._busy_lock:
                self._busy -= 1
            self._slots.release()
            raise

    def _try_claim(self) -> Batch | None:
        try:
            # Through a backlog, one drain per DRAIN_EVERY_S rather than one per claim.
            if time.monotonic() - self._drained_at >= DRAIN_EVERY_S:
                self.drain()
            return self.store.claim(self.owner, self.lease_seconds)
        except Exception as exc:  # noqa: BLE001 - the drain quarantines bad input; anything else: poll again
            self._errors.error(f"claim:{type(exc).__name__}", "claim failed, will poll again: %s: %s",
                               type(exc).__name__, exc)
            return None

    def drain(self) -> None:
        """What the webhooks acknowledged, into the queue (redeliveries dropped here)."""
        self._drained_at = time.monotonic()
        if not self.inbox_dir:
            return
        new, duplicates = self.store.drain(self.inbox_dir)
        if new:
            metrics.EVENTS.labels("accepted").inc(new)
        if duplicates:
            metrics.EVENTS.labels("duplicate").inc(duplicates)
            logger.info("%d redelivered message(s) dropped", duplicates)

    def _run(self, batch: Batch) -> None:
        try:
            self.process(batch)
        except Exception:  # noqa: BLE001 - process() does not raise; should it, the lease brings the batch back
            self._errors.error("process", "reply thread error psid=%r", batch.psid, exc_info=True)
        finally:
            with self._busy_lock:
                self._busy -= 1
            self._slots.release()

    def _upkeep_loop(self) -> None:
        """Every second: say it is alive, renew its leases while it works, checkpoint the WAL."""
        last_renewal = last_prune = time.monotonic()
        while not self._stopping.wait(min(1.0, self.lease_seconds / 3)):
            try:
                if self.in_flight and time.monotonic() - last_renewal >= self.lease_seconds / 3:
                    self.store.renew(self.owner, self.lease_seconds)
                    last_renewal = time.monotonic()
                healthy, reason = self.healthy(self.clock())
                if healthy:
                    self.store.heartbeat(self.owner)
                else:
                    self._errors.error("unhealthy", "no heartbeat: %s", reason)
                self.store.checkpoint()
                if self.retention_days and time.monotonic() - last_prune >= PRUNE_EVERY_S:
                    last_prune = time.monotonic()
                    self.prune()
            except Exception as exc:  # noqa: BLE001 - leases must keep being renewed
                self._errors.error(f"upkeep:{type(exc).__name__}", "queue upkeep failed: %s: %s",
                                   type(exc).__name__, exc)

    def prune(self) -> None:
        """RETENTION_DAYS: older exchanges, mirror rows and finished queue rows are deleted."""
        deleted = self.store.conversations.prune(self.retention_days)
        if deleted:
            logger.info("retention: deleted %d exchange record(s) older than %d days", deleted, self.retention_days)

    # -- one batch ---------------------------------------------------------------------------------
    def process(self, batch: Batch) -> None:
        """Compose (or reuse) the reply, send the parts not sent yet, record the outcome.
        Never raises: the batch ends done, pending again or failed - never left 'working',
        where it would hold back the user's next messages until its lease ran out."""
        progress = Progress(None, batch.sent_parts)
        activity = self.responder.activity(batch.psid)
        try:
            if batch.reply:
                progress.answer = Answer.from_json(batch.reply)
            self._answer(batch, progress, activity)
        except GraphAPIError as exc:
            metrics.GRAPH_ERRORS.labels(str(exc.code)).inc()
            self._record_failure(batch, str(exc), progress, None if is_retryable(exc) else f"graph_{exc.code}")
        except Exception as exc:  # noqa: BLE001 - a bug must cost one message, not the thread
            logger.exception("unexpected error answering batch=%s psid=%r mids=%r", batch.batch_id, batch.psid,
                             _mids(batch))
            self._record_failure(batch, f"{type(exc).__name__}: {exc}", progress)
        finally:
            activity.finish()

    def _answer(self, batch: Batch, progress: Progress, activity: Activity) -> None:
        if progress.answer is None:
            # Not written down before the first send: a crash before it asks the model again.
            progress.answer = self.responder.compose(batch.messages, lambda: self._actions.submit(activity.run),
                                                     self.responder.model_deadline(activity.started))
        activity.finish()  # waits for a slow-reply notice in flight: it must arrive first
        if activity.notice_sent:
            progress.parts.append(activity.notice_sent)
        answer = progress.answer
        parts = split_text(answer.text) if answer.text else []
        while progress.sent < len(parts):
            mid = self.responder.send_part(batch.psid, parts[progress.sent])
            if mid:
                progress.parts.append((mid, parts[progress.sent]))
            progress.sent += 1
            if progress.sent < len(parts):
                self.store.mark_sent(batch, answer.to_json(), progress.sent)
        # Marked done (and logged) right after the last send: a crash now repeats nothing.
        self.store.complete(batch, self._exchange(batch, progress))
        metrics.EXCHANGES.labels(answer.outcome).inc()
        if parts:
            metrics.REPLY_LATENCY.observe(time.time() - batch.received_at)
        logger.info("%s psid=%r mids=%r in %d part(s)", answer.outcome, batch.psid, _mids(batch), len(parts))

    @staticmethod
    def _exchange(batch: Batch, progress: Progress, outcome: str | None = None) -> Exchange:
        """The exchange-log record of this batch, as it ends."""
        answer = progress.answer or Answer(None, "failed")
        now = time.time()
        sent = progress.sent > 0
        return Exchange(
            psid=batch.psid, messages=batch.messages, outcome=outcome or answer.outcome,
            bot_message=answer.text if sent else None, sent_parts=progress.parts,
            bot_timestamp_ms=int(now * 1000) if sent else None, model=answer.model, usage=answer.usage,
            latency_ms=int((now - batch.received_at) * 1000), synced=answer.synced,
        )

    def _record_failure(self, batch: Batch, error: str, progress: Progress, final: str | None = None) -> None:
        """Retry the batch, or fail it for good when `final` names why (a metric label).

        Its exchange record is written with it when it fails; if that record cannot be
        written (what it holds cannot be stored), a bare one is, and if not even that,
        none. Only a database that takes no writes at all leaves the batch to its lease.
        """
        error = error[:300]
        records = (lambda: self._exchange(batch, progress, "failed"),
                   lambda: Exchange(psid=batch.psid, messages=batch.messages, outcome="failed"),
                   lambda: None)
        for level, record in enumerate(records):
            try:
                self._retry_or_fail(batch, error, progress, record(), final)
            except Exception:  # noqa: BLE001 - try again with less
                logger.exception("could not record the outcome of psid=%r mids=%r (try %d of %d)",
                                 batch.psid, _mids(batch), level + 1, len(records))
                continue
            if level == len(records) - 1:
                logger.error("psid=%r mids=%r recorded without its exchange record: it could not be written",
                             batch.psid, _mids(batch))
            return
        logger.error("psid=%r mids=%r left to its lease: its outcome could not be recorded", batch.psid, _mids(batch))

    def _retry_or_fail(self, batch: Batch, error: str, progress: Progress, exchange: Exchange | None,
                       final: str | None) -> None:
        if final:
            self.store.fail(batch, error, exchange)
            metrics.FAILED.labels(final).inc()
            logger.error("send failed for good psid=%r mids=%r: %s", batch.psid, _mids(batch), error)
            return
        delay = backoff_delay(batch.attempts, self.retry_base, self.retry_cap)
        stored = progress.answer.to_json() if progress.answer else None
        if self.store.retry(batch, delay, error, stored, progress.sent, exchange):
            logger.warning("retrying psid=%r in %.1fs (attempt %d): %s", batch.psid, delay, batch.attempts, error)
            return
        metrics.FAILED.labels("attempts_exhausted").inc()
        logger.error("gave up on psid=%r mids=%r after %d attempts: %s",
                     batch.psid, _mids(batch), batch.attempts, error)


def _mids(batch: Batch) -> list[str | None]:
    """The batch's message ids, to log with %r (escaped: an id cannot forge a log line)."""
    return [m.mid for m in batch.messages]
