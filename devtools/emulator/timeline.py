"""What happened, in order: the sandbox page draws its conversation and side panel from it."""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque


class Timeline:
    """A bounded, thread-safe list of events, each numbered so a reader asks for what is new."""

    def __init__(self, keep: int = 5000, enabled: bool = True):
        self.enabled = enabled  # off for the benchmark: recording costs the emulator CPU
        self._events: deque[dict] = deque(maxlen=keep)
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, kind: str, psid: str | None = None, **details) -> dict | None:
        if not self.enabled:
            return None
        with self._lock:
            event = {"seq": next(self._numbers), "at": round(time.time() * 1000), "kind": kind,
                     "psid": psid, **details}
            self._events.append(event)
        return event

    def after(self, seq: int) -> list[dict]:
        with self._lock:
            return [event for event in self._events if event["seq"] > seq]

    def of_kind(self, kind: str) -> list[dict]:
        with self._lock:
            return [event for event in self._events if event["kind"] == kind]
