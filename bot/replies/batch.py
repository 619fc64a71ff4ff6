"""One claimed batch, answered exactly once if it can be: compose the answer (or reuse the
one stored by an earlier attempt), send the parts not sent yet, record the outcome.

Nothing here raises: a batch ends done, pending again (with backoff) or failed, and
never stays 'working', where it would hold back the user's next messages until its
lease ran out.
"""
from __future__ import annotations

import collections
import logging
import random
import threading
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable

from bot.replies.activity import Activity
from bot.replies.answer import Answer, Outcome
from bot.replies.composer import CannotTell, Composer, Composers, WindowClosed
from bot.storage.exchanges import Exchange
from bot.storage.queue import Batch, LostLease, PausedByPerson, Queue
from bot.telemetry import metrics
from messenger.graph import GraphAPIError, explain, is_rate_limited, is_retryable, is_window_closed

logger = logging.getLogger(__name__)

# The answers under which the "Talk to a person" button goes (HANDOFF_BUTTON): the model's.
OFFERS_A_PERSON = frozenset({Outcome.ANSWERED, Outcome.FALLBACK, Outcome.CACHED, Outcome.UNKNOWN})
# A send in doubt that nothing could confirm (no Graph read slot in time, Graph failing) is
# looked for again every LOOK_AGAIN_S-2×LOOK_AGAIN_S, without spending the batch's tries, for
# LOOK_FOR_SENT_S after it was first tried; then it is sent without knowing.
LOOK_AGAIN_S = 5.0
LOOK_FOR_SENT_S = 120.0
# Sends in doubt whose first look this process has logged at WARNING (the looks after it: INFO),
# at most this many remembered.
WARNED_LOOKS = 1024
# Meta's rate limits last minutes: a send refused for one waits this long (to twice it), untried.
THROTTLED_S = 60.0


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(attempt-1)))."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


@dataclass
class Progress:
    """How far one batch got: the answer (once composed), how many parts went out, (id, text) of each."""

    answer: Answer | None
    sent: int
    parts: list[tuple[str, str]] = field(default_factory=list)
    in_doubt: bool = False  # the part under way failed without an answer: it may have gone out
    # The user state the fresh answer changes, until a write that keeps the answer carries it
    # (the first send's, the outcome's - or a retry's: the retry reuses the answer, no gate again).
    updates: dict | None = None


class BatchReplier:
    """Answers the batches a dispatcher claims, in the dispatcher's reply threads."""

    def __init__(self, store: Queue, composers: Composers, actions: Executor, *,
                 retry_base: float = 1.0, retry_cap: float = 60.0, lease_seconds: float = 30.0):
        self.store = store
        self.lease_seconds = lease_seconds
        self.composers = composers
        self._actions = actions  # sender actions (seen, typing) run beside the reply thread
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self._warned_looks: collections.OrderedDict[tuple[int, int | None], None] = collections.OrderedDict()
        self._warned_lock = threading.Lock()  # reply threads share it

    def process(self, batch: Batch) -> None:
        """Compose (or reuse) the reply, send the parts not sent yet, record the outcome.
        Never raises: the batch ends done, pending again or failed - never left 'working',
        where it would hold back the user's next messages until its lease ran out."""
        progress = Progress(None, batch.sent_parts)
        composer = self.composers.for_account(batch.messages[0].page_id)
        if composer is None:
            self._record_failure(batch, f"no Page or Instagram account {batch.messages[0].page_id} in the settings",
                                 progress, "unknown_page")
            return
        activity = composer.activity(batch.psid)
        try:
            if batch.reply:
                progress.answer = Answer.from_json(batch.reply)
            self._answer(batch, progress, activity, composer)
        except LostLease as exc:
            # Another process took the batch over (this one stalled past its lease): its
            # outcome stands, and nothing more is sent from here.
            metrics.FAILED.labels("lease_lost").inc()
            logger.warning("stopped answering psid=%r mids=%r: %s", batch.psid, _mids(batch), exc)
        except CannotTell as exc:  # no try spent on it: the send keeps every one of its tries
            self._look_again(batch, str(exc))
        except PausedByPerson as exc:
            self._paused(batch, progress, str(exc))
        except WindowClosed as exc:  # as Meta's own refusal would: never sent, never retried
            self._record_failure(batch, str(exc), progress, "window_closed", Outcome.WINDOW_CLOSED)
            if progress.answer is not None and progress.answer.outcome == Outcome.HANDOFF:
                self._hand_over_unanswered(batch, composer)
        except GraphAPIError as exc:
            metrics.GRAPH_ERRORS.labels(str(exc.code)).inc()
            error = f"{exc}: {why}" if (why := explain(exc)) else str(exc)
            if is_rate_limited(exc) and not exc.in_doubt and progress.answer is not None:
                self._throttled(batch, error)
            elif is_window_closed(exc):  # Meta counts the window itself: the reply can never go now
                self._record_failure(batch, error, progress, "window_closed", Outcome.WINDOW_CLOSED)
            else:
                self._record_failure(batch, error, progress, None if is_retryable(exc) else f"graph_{exc.code}")
            if not is_retryable(exc) and progress.answer is not None and progress.answer.outcome == Outcome.HANDOFF:
                self._hand_over_unanswered(batch, composer)
        except Exception as exc:  # noqa: BLE001 - a bug must cost one message, not the thread
            logger.exception("unexpected error answering batch=%s psid=%r mids=%r", batch.batch_id, batch.psid,
                             _mids(batch))
            self._record_failure(batch, f"{type(exc).__name__}: {exc}", progress)
        finally:
            activity.finish()

    def _answer(self, batch: Batch, progress: Progress, activity: Activity, composer: Composer) -> None:
        if progress.answer is None:
            progress.answer = composer.compose(batch.messages, lambda: self._actions.submit(activity.run),
                                               composer.model_deadline(activity.started), patient=batch.attempts == 1,
                                               received_at=batch.received_at, defer_updates=True)
            progress.updates = progress.answer.user_updates
        activity.finish()  # waits for a slow-reply notice in flight: it must arrive first
        if activity.notice_sent:
            progress.parts.append(activity.notice_sent)
        answer = progress.answer
        parts = composer.parts(answer.text) if answer.text else []
        while progress.sent < len(parts):
            part = parts[progress.sent]
            offer = progress.sent == len(parts) - 1 and answer.outcome in OFFERS_A_PERSON
            # A send in doubt is looked for first (reads only, up to ~20 s); then the write that
            # proves the batch is still this owner's comes right before the send. That write keeps
            # the answer with the batch before the first send (a takeover sends it, the model is
            # not paid twice) and records the send as under way.
            mid = self._delivered_before(batch, part, progress, composer)
            if not mid:
                composer.check_window(batch.messages, batch.received_at)
                # The user state written with the answer: a crash before it changes nothing (a request
                # for a person is not left as a pause that silences its own reply).
                # A person who answered meanwhile has the conversation (a handoff reply carries its own pause).
                self.store.sending(batch, answer.to_json(), progress.sent, self.lease_seconds, progress.updates,
                                   unless_paused=answer.outcome != Outcome.HANDOFF)
                progress.updates = None
                try:
                    mid = composer.send_part(batch.psid, part, offer_person=offer)
                except GraphAPIError as exc:
                    progress.in_doubt = exc.in_doubt  # then the retry looks for it before sending it again
                    raise
            if mid:
                progress.parts.append((mid, part))
            progress.sent += 1
            if progress.sent < len(parts):
                self.store.mark_sent(batch, answer.to_json(), progress.sent)
        if answer.outcome == Outcome.HANDOFF and composer.hand_over(batch.messages):
            # The reply first: the inbox's thread takes no sends from the bot. Remembered, so the bot
            # takes the thread back if its pause ends with nobody passing it back (bot/replies/threads.py).
            progress.updates = {**(progress.updates or {}), **self._thread_away(batch)}
        # Marked done (and logged) right after the last send and the hand-over: a crash before
        # this repeats no send (the last one is found), only the hand-over (with the same id).
        self.store.complete(batch, self._exchange(batch, progress), progress.updates)
        metrics.EXCHANGES.labels(answer.outcome, batch.messages[0].page_id).inc()
        if parts:
            metrics.REPLY_LATENCY.observe(self.store.clock() - batch.received_at)
        logger.info("%s psid=%r mids=%r in %d part(s)", answer.outcome, batch.psid, _mids(batch), len(parts))

    def _delivered_before(self, batch: Batch, part: str, progress: Progress, composer: Composer) -> str | None:
        """When the previous owner died with this very send under way, or the send failed without
        an answer (a timeout after sending): did it go out? (its echo in the mirror, or the Page's
        message in Graph) - then it is not sent again. Looked for from the moment it was first
        tried: a Page message from before (the same canned text, answering an earlier message
        whose own attempts failed) is not it."""
        index = progress.sent
        if batch.sending != index:
            return None
        since = batch.sending_since if batch.sending_since is not None else batch.received_at
        try:
            mid = composer.find_sent(batch.psid, part, since_ms=int(since * 1000))
        except CannotTell:
            if self.store.clock() - since < LOOK_FOR_SENT_S:
                metrics.SENDS_IN_DOUBT.labels("cannot-tell").inc()
                raise  # looked for again a little later: a Graph read slot, or Graph, is back by then
            metrics.SENDS_IN_DOUBT.labels("sent-unknowing").inc()
            logger.warning("psid=%r part %d was being sent when its process died or its send went unanswered, and"
                           " for %.0f s nothing could say whether it went out: sending it", batch.psid, index,
                           LOOK_FOR_SENT_S)
            return None  # sending it again beats never sending it
        metrics.SENDS_IN_DOUBT.labels("went-out" if mid else "not-sent").inc()
        logger.warning("psid=%r part %d was being sent when its process died or its send went unanswered: %s",
                       batch.psid, index, "it went out, not sending it again" if mid else "it did not go out, sending it")
        return mid

    def _hand_over_unanswered(self, batch: Batch, composer: Composer) -> None:
        """The reply to a request for a person can never go (the window closed, the Page
        restricted): the person is told all the same - they may still reach the user."""
        try:
            if composer.hand_over(batch.messages):
                self.store.conversations.update_user(batch.psid, **self._thread_away(batch))
        except Exception:  # noqa: BLE001 - the batch's outcome is recorded already
            logger.exception("psid=%r mids=%r: could not hand over", batch.psid, _mids(batch))

    def _thread_away(self, batch: Batch) -> dict:
        """The user state saying the thread went to the Page inbox, and when (bot/replies/threads.py)."""
        return {"thread_away": batch.messages[0].page_id, "thread_away_ms": int(self.store.clock() * 1000)}

    def _paused(self, batch: Batch, progress: Progress, why: str) -> None:
        """A person answered while this reply was on its way: what is left of it is not sent."""
        logger.info("psid=%r mids=%r: %s; %d part(s) sent, the rest dropped", batch.psid, _mids(batch), why,
                    progress.sent)
        try:
            self.store.complete(batch, self._exchange(batch, progress, Outcome.PAUSED), progress.updates)
        except LostLease as exc:
            logger.warning("psid=%r mids=%r: %s", batch.psid, _mids(batch), exc)
            return
        except Exception as exc:  # noqa: BLE001 - retried: the next try finds the pause again
            self._record_failure(batch, f"{type(exc).__name__}: {exc}", progress)
            return
        metrics.EXCHANGES.labels(Outcome.PAUSED, batch.messages[0].page_id).inc()

    def _throttled(self, batch: Batch, error: str) -> None:
        """Meta refused the send for a rate limit: tried again in THROTTLED_S-2×THROTTLED_S
        (jittered: the Page's other replies were refused too), the try not counted."""
        delay = random.uniform(THROTTLED_S, 2 * THROTTLED_S)
        if self._put_back(batch, lambda: self.store.throttled(batch, delay, error)):
            logger.warning("psid=%r mids=%r: Meta's rate limit (%s); sending again in %.0f s", batch.psid,
                           _mids(batch), error, delay)

    def _look_again(self, batch: Batch, error: str) -> None:
        """Back in the queue, still in doubt, to be looked for again in LOOK_AGAIN_S (jittered: a
        dead host leaves many such looks at once); the try is not counted."""
        delay = random.uniform(LOOK_AGAIN_S, 2 * LOOK_AGAIN_S)
        if self._put_back(batch, lambda: self.store.look_again(batch, delay, error)):
            level = logging.WARNING if self._first_look(batch) else logging.INFO
            logger.log(level, "psid=%r mids=%r: %s; looking again in %.0f s (for up to %.0f s)", batch.psid,
                       _mids(batch), error, delay, LOOK_FOR_SENT_S)

    def _first_look(self, batch: Batch) -> bool:
        """True the first time this process puts this send in doubt back: a Graph outage leaves
        many such sends looked for every 5-10 s for two minutes, one WARNING each is enough."""
        key = (batch.batch_id, batch.sending)
        with self._warned_lock:
            if key in self._warned_looks:
                return False
            self._warned_looks[key] = None
            if len(self._warned_looks) > WARNED_LOOKS:
                self._warned_looks.popitem(last=False)
            return True

    @staticmethod
    def _put_back(batch: Batch, write: Callable[[], None]) -> bool:
        """The write that puts the batch back in the queue untried; False (logged) if it failed."""
        try:
            write()
        except LostLease as exc:
            logger.warning("psid=%r mids=%r: %s", batch.psid, _mids(batch), exc)
            return False
        except Exception:  # noqa: BLE001 - then its lease brings it back
            logger.exception("psid=%r mids=%r left to its lease: could not put it back", batch.psid, _mids(batch))
            return False
        return True

    def _exchange(self, batch: Batch, progress: Progress, outcome: str | None = None) -> Exchange:
        """The exchange-log record of this batch, as it ends (on the store's clock, as the gates and
        the disclosure read it back)."""
        answer = progress.answer or Answer(None, Outcome.FAILED)
        now = self.store.clock()
        sent = progress.sent > 0
        return Exchange(
            psid=batch.psid, messages=batch.messages, outcome=outcome or answer.outcome,
            bot_message=answer.text if sent else None, sent_parts=progress.parts,
            bot_timestamp_ms=int(now * 1000) if sent else None, model=answer.model, usage=answer.usage,
            latency_ms=int((now - batch.received_at) * 1000), synced=answer.synced, history=answer.history,
            said=answer.said, attachments=answer.media,
            disclosed_at=now if sent and answer.disclosed else None, knowledge=answer.knowledge,
            restarted=answer.restarted,
        )

    def _record_failure(self, batch: Batch, error: str, progress: Progress, final: str | None = None,
                        outcome: Outcome = Outcome.FAILED) -> None:
        """Retry the batch, or fail it for good when `final` names why (a metric label).

        Its exchange record is written with it when it fails; if that record cannot be
        written (what it holds cannot be stored), a bare one is, and if not even that,
        none - nor the user-state change the answer carries (then logged as dropped). Only a
        database that takes no writes at all leaves the batch to its lease.
        """
        error = error[:300]
        records = (lambda: self._exchange(batch, progress, outcome),
                   lambda: Exchange(psid=batch.psid, messages=batch.messages, outcome=outcome),
                   lambda: None)
        for level, record in enumerate(records):
            if level == len(records) - 1 and progress.updates:
                logger.error("psid=%r mids=%r: the user-state change %s is dropped: it could not be written",
                             batch.psid, _mids(batch), sorted(progress.updates))
                progress.updates = None
            try:
                self._retry_or_fail(batch, error, progress, record(), final)
            except LostLease as exc:  # the process that took it over records its outcome
                logger.warning("psid=%r mids=%r: %s", batch.psid, _mids(batch), exc)
                return
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
            self.store.fail(batch, error, exchange, progress.updates)
            metrics.FAILED.labels(final).inc()
            logger.error("send failed for good psid=%r mids=%r: %s", batch.psid, _mids(batch), error)
            return
        failed_tries = batch.attempts - batch.deaths  # this one included; deaths have their own bound
        delay = backoff_delay(failed_tries, self.retry_base, self.retry_cap)
        stored = progress.answer.to_json() if progress.answer else None
        # Still in doubt when this attempt's look for it failed too: the next one looks again.
        in_doubt = progress.in_doubt or batch.sending == progress.sent
        if self.store.retry(batch, delay, error, stored, progress.sent, exchange,
                            sending=progress.sent if in_doubt else None, user_updates=progress.updates):
            logger.warning("retrying psid=%r in %.1fs (failed try %d): %s", batch.psid, delay, failed_tries, error)
            return
        metrics.FAILED.labels("attempts_exhausted").inc()
        logger.error("gave up on psid=%r mids=%r after %d failed tries: %s",
                     batch.psid, _mids(batch), failed_tries, error)


def _mids(batch: Batch) -> list[str | None]:
    """The batch's message ids, to log with %r (escaped: an id cannot forge a log line)."""
    return [m.mid for m in batch.messages]
