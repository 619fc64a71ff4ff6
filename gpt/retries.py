"""When a failed model call is worth another try, and after how long.

The openai client's own retries are switched off (max_retries=0): they know
nothing of the reply's deadline, and under a proxy that retries too they
multiply. This is the same policy as the client's - timeouts, connection
errors, 408, 409, 429 and 5xx, `x-should-retry` and `retry-after` obeyed,
exponential backoff with jitter - bounded by the time the reply has left.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Callable, TypeVar

import openai

logger = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE_STATUSES = frozenset({408, 409, 429})
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 8.0
# A retry-after beyond this is a server asking to be left alone: not worth waiting for.
MAX_RETRY_AFTER_S = 60.0
# An attempt with less time than this left is not started: no model answers that fast.
MIN_ATTEMPT_S = 1.0


class DeadlineExceeded(Exception):
    """No time was left for (another) model attempt."""


@dataclass
class Tries:
    """How many attempts a call made, for its failure line."""

    count: int = 0


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    attempt_timeout: float  # OPENAI_TIMEOUT: one attempt, never past the deadline
    max_retries: int
    clock: Callable[[], float]
    sleep: Callable[[float], object]

    def call(self, attempt: Callable[[float], T], deadline: float | None, tries: Tries) -> T:
        """`attempt(timeout)` until it answers, fails in a way no retry fixes, the retries run
        out or the deadline (on `clock`; None: none) would pass before another could finish."""
        while True:
            remaining = math.inf if deadline is None else deadline - self.clock()
            if remaining < MIN_ATTEMPT_S:
                raise DeadlineExceeded(f"{remaining:.1f} s left of the reply's deadline")
            tries.count += 1
            try:
                return attempt(min(self.attempt_timeout, remaining))
            except openai.APIError as exc:
                delay = retry_delay(exc, tries.count)
                if delay is None or tries.count > self.max_retries:
                    raise
                if deadline is not None and self.clock() + delay + MIN_ATTEMPT_S > deadline:
                    raise
                logger.info("model attempt %d failed (%s), retrying in %.1f s", tries.count, type(exc).__name__, delay)
                self.sleep(delay)


def retry_delay(exc: Exception, attempt: int, rng: Callable[[], float] = random.random) -> float | None:
    """Seconds to wait before attempt `attempt + 1` after `exc` ended attempt `attempt`, or
    None when another try cannot help (a bad request, a wrong key, an exhausted quota)."""
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        return _backoff(attempt, rng)
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    should = headers.get("x-should-retry")
    if should == "false":
        return None
    # OpenAI answers 429 for a spent quota too: no retry brings the money back.
    if exc.status_code == 429 and getattr(exc, "code", None) == "insufficient_quota":
        return None
    if should != "true" and exc.status_code not in RETRYABLE_STATUSES and exc.status_code < 500:
        return None
    after = _retry_after(headers)
    if after is not None:
        return after if after <= MAX_RETRY_AFTER_S else None
    return _backoff(attempt, rng)


def _backoff(attempt: int, rng: Callable[[], float]) -> float:
    """0.5 s, 1 s, 2 s ... at most 8 s, each up to a quarter shorter (jitter)."""
    return min(FIRST_DELAY_S * 2 ** (attempt - 1), MAX_DELAY_S) * (1 - 0.25 * rng())


def _retry_after(headers) -> float | None:
    """`retry-after-ms` or `retry-after` in seconds (numbers only; a date is ignored)."""
    for name, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            value = float(headers.get(name, ""))
        except ValueError:
            continue
        if math.isfinite(value) and value >= 0:
            return value / divisor
    return None
