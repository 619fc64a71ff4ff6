"""A byte budget for the media held in memory at once, across every reply thread.

A photo is held several times over on its way to the model: the bytes, their base64,
the JSON body the client builds and its encoding (measured in bench/media.py: about
four times its size at the peak). Fifty 8 MB photos arriving together would take
1.6 GB; under the budget they wait their turn instead.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

# Bytes in memory per byte of photo while it is on its way to the model (see above).
EXPANSION = 4


class MemoryBudget:
    def __init__(self, limit_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.limit = limit_bytes
        self.clock = clock
        self.held = 0
        self._free = threading.Condition()

    def reserve(self, size: int, deadline: float | None = None, own: int = 0) -> int:
        """Hold `size` media bytes (times EXPANSION, at most the whole budget), waiting for
        room until `deadline` (on `clock`); the amount held, for release(). TimeoutError when late,
        and at once when the caller's `own` holding (its other attachments, not released while it
        waits) leaves no room however long it waited."""
        amount = min(size * EXPANSION, self.limit)
        if own + amount > self.limit:
            raise TimeoutError("no memory for this attachment beside the others of its reply (MEDIA_MEMORY_MB)")
        with self._free:
            while self.held + amount > self.limit:
                left = None if deadline is None else deadline - self.clock()
                if left is not None and left <= 0:
                    raise TimeoutError("no memory for this attachment before the reply's deadline")
                self._free.wait(left)
            self.held += amount
        return amount

    def release(self, amount: int) -> None:
        with self._free:
            self.held -= amount
            self._free.notify_all()
