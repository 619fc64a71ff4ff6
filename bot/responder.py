"""What a reply is made of: history, prompt and model in; Send API and sender actions out."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from bot import metrics
from gpt.prompt import to_chat_messages
from gpt.reply import Reply, ReplyGenerator
from messenger.events import IncomingMessage
from messenger.graph import GraphAPIError, GraphClient, HistoryMessage

logger = logging.getLogger(__name__)

ACTIVITY_PAUSE_S = 0.015


@dataclass(frozen=True)
class PromptSettings:
    page_id: str
    prefix: str
    message_count: int
    system_prompt: str
    unsupported_reply: str


class Responder:
    """Composes one reply for a user's waiting messages and sends its parts."""

    def __init__(self, graph: GraphClient, generator: ReplyGenerator, prompt: PromptSettings):
        self.graph = graph
        self.generator = generator
        self.prompt = prompt

    def compose(self, messages: Sequence[IncomingMessage], thinking: Callable[[], object] = lambda: None) -> Reply:
        """One reply to everything the user wrote since the last one (oldest first).

        `thinking` is called once the history is in, as the model starts: the
        moment to show "seen" and the typing indicator without slowing the read.
        """
        texts = [m for m in messages if not m.is_attachment_only]
        if not texts:
            thinking()  # "seen"; the typing indicator is skipped once the reply is out
            logger.info("attachment-only message(s) psid=%s mids=%s", messages[0].psid, [m.mid for m in messages])
            return Reply(self.prompt.unsupported_reply)
        history = self._history(texts[0].psid)
        thinking()
        chat = to_chat_messages(
            history, [(m.mid, m.text) for m in texts],
            page_id=self.prompt.page_id, prefix=self.prompt.prefix,
            max_turns=self.prompt.message_count, system_prompt=self.prompt.system_prompt,
        )
        reply = self.generator.generate_reply(chat)
        if reply.error_class:
            metrics.MODEL_ERRORS.labels(reply.error_class).inc()
        return reply

    def send_part(self, psid: str, text: str) -> None:
        """One Send API call; GraphAPIError is the caller's to classify."""
        self.graph.send_text(psid, text)
        metrics.REPLIES.inc()

    def show_activity(self, psid: str, replied: threading.Event) -> None:
        """mark_seen then typing_on, unless the reply already went out (typing would linger 20 s).

        Called as the model call starts; the short pause lets that request leave
        first, so these calls never compete with it for the interpreter.
        """
        replied.wait(ACTIVITY_PAUSE_S)
        for action in ("mark_seen", "typing_on"):
            if action == "typing_on" and replied.is_set():
                return
            try:
                self.graph.send_action(psid, action)
            except GraphAPIError as exc:
                metrics.GRAPH_ERRORS.labels(str(exc.code)).inc()
                logger.info("sender action %s failed for psid=%s: %s", action, psid, exc)

    def _history(self, psid: str) -> list[HistoryMessage]:
        try:
            return self.graph.fetch_history(psid, self.prompt.message_count)
        except GraphAPIError as exc:
            metrics.GRAPH_ERRORS.labels(str(exc.code)).inc()
            # Answering without context beats not answering at all.
            logger.warning("history unavailable for psid=%s, answering without it: %s", psid, exc)
            return []
