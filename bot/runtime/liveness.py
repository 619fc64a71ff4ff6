"""A process the gunicorn master keeps (the reply process, the website chat) touches a file
every second; the master kills one whose file stopped changing, so a fresh one starts.

A process that dies, or whose claim loop stops turning, ends by itself (bot/runtime/reply_process.py's
watch). One that is frozen whole cannot: SIGSTOP, a debugger left attached, an interpreter wedged
in native code. It keeps its claims and answers nobody until someone notices. The master's
check runs on its own monotonic clock, which does not count a host's suspend, so a laptop
waking up does not look like a frozen process.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

ALIVE_FILE_ENV = "BOT_ALIVE_FILE"
TOUCH_EVERY_S = 1.0
# Longer than the reply process's own check (dispatcher.STUCK_AFTER_S, 60 s), which ends it
# more gently, releasing what it can.
FROZEN_AFTER_S = 90.0
# The master looks every second: a look this long after the last means the master itself was stopped.
MASTER_PAUSED_AFTER_S = 30.0


def keep_saying_alive(path: str | None = None, every: float = TOUCH_EVERY_S,
                      until: threading.Event | None = None) -> threading.Thread | None:
    """In the kept process: a daemon thread touches the master's file (BOT_ALIVE_FILE) until the
    process ends (or `until` is set)."""
    path = path or os.environ.get(ALIVE_FILE_ENV)
    if not path:
        return None  # started by hand, not by the master: nobody watches
    stop = until or threading.Event()

    def touch_forever() -> None:
        while True:
            try:
                os.utime(path)
            except OSError:  # gone or unwritable: the master judges by nothing it cannot read
                pass
            if stop.wait(every):
                return
    thread = threading.Thread(target=touch_forever, name="alive", daemon=True)
    thread.start()
    return thread


class Silence:
    """In the master: how long a kept process's file has not changed, on `clock` (monotonic)."""

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.clock = clock
        self._seen: int | None = None  # the file's mtime in ns when last looked at
        self._since = self._checked = clock()

    def restart(self) -> None:
        """A new process starts: its silence counts from now."""
        self._seen, self._since = self._mtime(), self.clock()
        self._checked = self._since

    def frozen(self, now: float, after: float = FROZEN_AFTER_S) -> bool:
        """True once the file has not changed for `after` seconds; never while it is missing
        (deleted by hand, or never made: nothing to judge by)."""
        mtime = self._mtime()
        if now - self._checked > MASTER_PAUSED_AFTER_S:  # this master was not running meanwhile (stopped
            self._since = now  # with its process group, say): the process gets its time to say it is alive again
        self._checked = now
        if mtime is None:
            return False
        if mtime != self._seen:
            self._seen, self._since = mtime, now
        return now - self._since > after

    def _mtime(self) -> int | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None
