"""A way to a person: when a user asks for one, the Page inbox gets the thread (Meta's handover
protocol, when enabled) and the owner's system gets a note (HANDOFF_WEBHOOK) with a summary of
the conversation from the mirror - no model call."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import requests

from bot.storage.conversations import Conversations
from messenger.graph import GraphAPIError, GraphClient

logger = logging.getLogger(__name__)

SUMMARY_MESSAGES = 10
WEBHOOK_TIMEOUT = (3.05, 5.0)


@dataclass(frozen=True, kw_only=True)
class HandoffSettings:
    thread_control: bool = False  # HANDOFF_THREAD_CONTROL
    inbox_app_id: str = "263902037430900"  # Meta's Page inbox
    webhook: str | None = None  # HANDOFF_WEBHOOK
    page_name: str = ""


class Handoff:
    def __init__(self, graph: GraphClient, conversations: Conversations, settings: HandoffSettings, *,
                 page_id: str, clock: Callable[[], float] = time.time):
        self.graph = graph
        self.conversations = conversations
        self.settings = settings
        self.page_id = page_id  # the account: the Page, or its Instagram account
        self.clock = clock
        self._session = requests.Session() if settings.webhook else None

    def hand_over(self, psid: str, request_id: str) -> bool:
        """Pass the thread and tell the owner; a failure of either is logged, never raised: the
        user has been told a person will answer, and the bot stays paused either way.
        `request_id` (the asking message's) is the same if a takeover hands over again.
        True when the thread may now be the Page inbox's: even when the pass failed - a takeover
        passing it again after a crash may be refused for a thread passed already - so the bot
        takes it back when the pause ends (taking a thread it owns does no harm)."""
        if self.settings.thread_control:
            try:
                self.graph.pass_thread_control(psid, self.settings.inbox_app_id, "the user asked for a person")
            except GraphAPIError as exc:
                logger.error("could not pass psid=%r's thread to the Page inbox: %s", psid, exc)
        if self._session is not None:
            self._notify(psid, request_id)
        return self.settings.thread_control

    def take_back(self, psid: str) -> None:
        """The pause is over and the inbox never passed the thread back (a person forgot to mark
        the conversation done): the bot takes it, so the user's next message reaches it, not
        `standby`. Raises GraphAPIError."""
        self.graph.take_thread_control(psid, "the pause for a person is over")

    def summary(self, psid: str) -> list[dict]:
        """The conversation's last messages, oldest first, from the mirror."""
        history = self.conversations.history(psid, self.page_id, SUMMARY_MESSAGES, None)
        return [{"from": "user" if h.from_id == psid else "page", "text": h.text, "at": h.created_time}
                for h in reversed(history) if h.text]

    def _notify(self, psid: str, request_id: str) -> None:
        body = {"event": "handoff", "id": request_id, "psid": psid, "page_id": self.page_id,
                "page_name": self.settings.page_name, "at": int(self.clock()), "messages": self.summary(psid)}
        for attempt in (1, 2):
            try:
                response = self._session.post(self.settings.webhook, json=body, timeout=WEBHOOK_TIMEOUT)
                if response.status_code < 300:
                    return
                error = f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                error = type(exc).__name__  # its text may hold the URL, with a token in it
            logger.warning("HANDOFF_WEBHOOK for psid=%r failed (%s, try %d of 2)", psid, error, attempt)
