"""The gunicorn master keeps one reply process (`python -m bot.runtime.reply_process`) alive.

It lives here rather than in gunicorn.conf.py so it can be read and tested as code.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from typing import Callable

from bot.runtime.liveness import ALIVE_FILE_ENV, FROZEN_AFTER_S, Silence
from bot.storage.instance import LINEAGE_ENV, MASTER_PID_ENV
from config import CHECKED_SETTINGS_ENV

WATCH_EVERY_S = 1.0


# What the gunicorn master holds for its life (the supervisors, the DATA_DIR lock), by name:
# here, not in gunicorn.conf.py, which a reload (SIGHUP) reads again as a new module - its own
# dict began empty, and a stop after a reload no longer waited for the replies in flight.
MASTER_STATE: dict[str, object] = {}


class ReplySupervisor:
    """Keeps one process running: started again when it exits, killed first when `alive_file`
    (bot/runtime/liveness.py) shows it frozen for `frozen_after` seconds of `clock`."""

    def __init__(self, log: logging.Logger | None = None, command: tuple[str, ...] = ("-m", "bot.runtime.reply_process"),
                 on_exit: Callable[[int], None] = lambda pid: None, restart_pause: float = 1.0,
                 name: str = "reply process", alive_file: str | None = None, frozen_after: float = FROZEN_AFTER_S,
                 clock: Callable[[], float] = time.monotonic,
                 settings: Callable[[], str | None] | None = None):
        self.log = log or logging.getLogger(__name__)
        self.name = name
        self.argv = [sys.executable, *command]
        self.on_exit = on_exit
        self.restart_pause = restart_pause
        self.pid: int | None = None
        self.stopping = threading.Event()
        self._restarting: int | None = None  # the pid restart() asked to stop, to be started again
        self.environment = {**os.environ, LINEAGE_ENV: uuid.uuid4().hex[:12],  # this master start's
                            MASTER_PID_ENV: str(os.getpid())}
        self.settings = settings  # what the master validated last (JSON), read at each start
        self.silence = Silence(alive_file, clock) if alive_file else None
        self.frozen_after = frozen_after
        self.clock = clock
        if alive_file:
            self.environment[ALIVE_FILE_ENV] = alive_file

    def start(self) -> None:
        threading.Thread(target=self._run, name="reply-supervisor", daemon=True).start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                # posix_spawn, not subprocess: Popen waits on a pipe that a gunicorn worker
                # forked at the same moment would inherit and hold open, forever. SIGINT is
                # blocked in the child: Ctrl-C reaches the whole terminal group, but the
                # reply process must stop the orderly way - SIGTERM from stop(), after the
                # webhook workers - so it can finish the replies in flight.
                self._new_alive_file()
                pid = os.posix_spawn(self.argv[0], self.argv, self._environment(), setsigmask={signal.SIGINT})
                self.pid = pid
                status = self._wait(pid)
                self.pid = None  # gone: nothing to signal any more (its pid may be another's soon)
                self.on_exit(pid)
            except Exception:  # noqa: BLE001 - the supervisor must outlive any one failure
                self.log.exception("%s supervisor", self.name)
                pid, status = None, None
            restarted = pid is not None and self._restarting == pid
            # A group-wide SIGTERM (systemd, docker) reaches the reply process before the
            # master: give the master a moment to say it is stopping before calling this a crash.
            if self.stopping.wait(0 if restarted else self.restart_pause):
                return
            if restarted:
                self.log.info("%s stopped for the new settings (status %s); starting a new one", self.name, status)
            elif status in (0, -signal.SIGTERM):
                self.log.warning("%s stopped (status %s); starting a new one", self.name, status)
            else:
                self.log.error("%s exited (status %s); starting a new one", self.name, status)

    def _environment(self) -> dict[str, str]:
        """The process's environment: with `settings`, what the master validated last (read
        instead of `.env` and the Pages file: config.CHECKED_SETTINGS_ENV), so a file edited
        since, or refused at a SIGHUP, cannot reach it."""
        handed = self.settings() if self.settings else None
        return self.environment if handed is None else {**self.environment, CHECKED_SETTINGS_ENV: handed}

    def _new_alive_file(self) -> None:
        if self.silence is None:
            return
        try:
            os.close(os.open(self.silence.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            os.utime(self.silence.path)
        except OSError as error:
            self.log.warning("cannot write %s (%s): a frozen %s will not be replaced", self.silence.path,
                             error.strerror, self.name)
        self.silence.restart()

    def _wait(self, pid: int) -> int | str:
        """Its exit status; a frozen process is killed on the way (not while stopping: its
        graceful stop may be long, and a stop ends in a kill anyway)."""
        killed = False
        while True:
            try:
                return wait_for_exit(pid, WATCH_EVERY_S)
            except TimeoutError:
                pass
            if self.silence is not None and not killed and not self.stopping.is_set() \
                    and self.silence.frozen(self.clock(), self.frozen_after):
                killed = True  # once: a process stuck in the kernel dies when it leaves it
                self.log.error("%s (pid %d) has not said it is alive for %.0f s - frozen (stopped, or stuck in native "
                               "code): killing it so a fresh one starts", self.name, pid, self.frozen_after)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def restart(self) -> None:
        """SIGTERM, to be started again at once (a SIGHUP took new settings, which a new process
        reads). It finishes the replies in flight first, as at any stop; the new one starts when
        it has exited, so two never answer side by side. Between two processes (a crash's pause)
        there is nothing to stop: the next one reads the new settings anyway."""
        pid = self.pid
        if pid is None or self.stopping.is_set():
            return
        self._restarting = pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def stop(self, timeout: float) -> None:
        """Let the reply process finish what is in flight (it releases the rest), then return."""
        self.ask_to_stop()
        self.wait_stopped(timeout)

    def ask_to_stop(self) -> None:
        """SIGTERM, without waiting (stop_together)."""
        self.stopping.set()
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def wait_stopped(self, timeout: float) -> None:
        pid = self.pid
        if pid is None:
            return
        try:
            wait_for_exit(pid, timeout)
        except ProcessLookupError:
            pass
        except TimeoutError:
            self.log.error("%s did not stop in %.0f s; killing it", self.name, timeout)
            with contextlib.suppress(ProcessLookupError):  # it ended in the last moment after all
                os.kill(pid, signal.SIGKILL)


def stop_together(processes: list[tuple[ReplySupervisor, float]]) -> None:
    """Stop every kept process at once, each within its own timeout. One after the other, the
    reply process went on claiming while the website chat finished, and the worst stop took the
    timeouts added up: past `docker stop`'s wait."""
    for process, _ in processes:
        process.ask_to_stop()
    started = time.monotonic()
    for process, timeout in processes:
        process.wait_stopped(max(0.0, timeout - (time.monotonic() - started)))


def wait_for_exit(pid: int, timeout: float | None = None) -> int | str:
    """The exit code (negative: killed by that signal). gunicorn's arbiter reaps every
    child with waitpid(-1), so it may collect ours first: poll, and say so if it did."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return "reaped by gunicorn"
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.2)
    raise TimeoutError
