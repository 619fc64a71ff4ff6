"""What the user sees while the model works: "seen", a typing indicator kept alive, and -
with SLOW_REPLY_NOTICE set - a short notice once the reply is slower than Meta's rule allows.

Runs in a sender-action thread beside the reply thread. Messenger drops the typing
indicator after about 20 s, so it is sent again every TYPING_REFRESH_S while no answer
is ready; a typing_on that arrived after the answer would linger, so none is sent
once the reply thread has called finish().
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from bot.telemetry import metrics
from messenger.graph import GraphAPIError, GraphClient

logger = logging.getLogger(__name__)

# Lets the model request leave first, so these calls never compete with it for the interpreter.
ACTIVITY_PAUSE_S = 0.015
TYPING_REFRESH_S = 15.0


class Activity:
    """One reply's sender actions and slow-reply notice. `started` and `notice_at` are on `clock`."""

    def __init__(self, graph: GraphClient, psid: str, *, started: float, notice: str = "",
                 notice_at: float | None = None, refresh_every: float = TYPING_REFRESH_S,
                 clock: Callable[[], float] = time.monotonic, paused: Callable[[], bool] = lambda: False):
        self.graph = graph
        self.psid = psid
        # A person answered the user meanwhile: the reply will not go (bot/storage/queue.py's
        # sending), so neither do its notice and its typing - they would speak over the person.
        self.paused = paused
        self.started = started
        self.notice = notice
        self.notice_at = notice_at if notice else None
        self.refresh_every = refresh_every
        self.clock = clock
        self.notice_sent: tuple[str, str] | None = None  # (message id, text) once it went out
        self._answered = threading.Event()
        # Held while the notice is being sent: the answer waits for it, so it never comes first.
        self._notice_lock = threading.Lock()

    def finish(self) -> None:
        """The answer is ready (or the reply is over): no typing_on or notice from now on."""
        with self._notice_lock:
            self._answered.set()

    @property
    def answered(self) -> bool:
        return self._answered.is_set()

    def run(self) -> None:
        """mark_seen, typing_on, then typing_on again every refresh and the notice when it is due,
        until the answer is ready."""
        self._answered.wait(ACTIVITY_PAUSE_S)
        self._action("mark_seen")  # even when the answer is ready: the user's message was read
        next_typing = self.clock()
        first = True
        while not self._answered.is_set():
            now = self.clock()
            due_notice = self.notice_at is not None and now >= self.notice_at
            if (due_notice or (now >= next_typing and not first)) and self._person_answers():
                logger.info("psid=%r: a person answers meanwhile: no more typing or slow-reply notice", self.psid)
                return
            if due_notice:
                self._send_notice()
            if now >= next_typing:
                self._action("typing_on")
                next_typing = now + self.refresh_every
                first = False
            due = [next_typing] + ([self.notice_at] if self.notice_at is not None else [])
            self._answered.wait(max(0.0, min(due) - self.clock()))

    def _person_answers(self) -> bool:
        try:
            return self.paused()
        except Exception as exc:  # noqa: BLE001 - the database blinked: the send itself checks again
            logger.info("psid=%r: could not read the pause (%s): going on", self.psid, type(exc).__name__)
            return False

    def _send_notice(self) -> None:
        self.notice_at = None
        with self._notice_lock:
            if self._answered.is_set():
                return
            try:
                mid = self.graph.send_text(self.psid, self.notice)
            except GraphAPIError as exc:
                metrics.GRAPH_ERRORS.labels(str(exc.code)).inc()
                logger.warning("slow-reply notice failed for psid=%r: %s", self.psid, exc)
                return
            self.notice_sent = (mid or "", self.notice)
            metrics.REPLIES.inc()
            logger.info("slow reply: notice sent to psid=%r after %.1f s", self.psid, self.clock() - self.started)

    def _action(self, action: str) -> None:
        if action == "typing_on" and self._answered.is_set():
            return
        try:
            self.graph.send_action(self.psid, action)
        except GraphAPIError as exc:
            metrics.GRAPH_ERRORS.labels(str(exc.code)).inc()
            logger.info("sender action %s failed for psid=%r: %s", action, self.psid, exc)
