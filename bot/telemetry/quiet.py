"""An error that repeats (a corrupt database, a full disk) is logged once, then at most once
per period with how many times it happened in between: the log stays readable and the
disk is not filled by the same line five times a second."""
from __future__ import annotations

import logging
import threading
from typing import Callable


REPEAT_LOG_EVERY_S = 60.0


class QuietRepeats:
    """Logs an error the first time, then at most once per period while it repeats.
    Shared by the claim, upkeep and reply threads."""

    def __init__(self, clock: Callable[[], float], period: float = REPEAT_LOG_EVERY_S, *,
                 log: logging.Logger = logging.getLogger(__name__)):
        self.clock = clock
        self.period = period
        self.log = log
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
        self.log.error(message + suffix, *args, exc_info=exc_info)
