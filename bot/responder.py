"""Answer one incoming message: history, prompt, model, Send API."""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Executor
from dataclasses import dataclass

from gpt.prompt import to_chat_messages
from gpt.reply import ReplyGenerator
from messenger.events import IncomingMessage
from messenger.graph import GraphAPIError, GraphClient
from messenger.split import split_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSettings:
    page_id: str
    prefix: str
    message_count: int
    system_prompt: str
    unsupported_reply: str


class Responder:
    """Runs the whole pipeline for one message; never raises."""

    def __init__(self, graph: GraphClient, generator: ReplyGenerator, prompt: PromptSettings,
                 actions: Executor):
        self.graph = graph
        self.generator = generator
        self.prompt = prompt
        self.actions = actions  # sender actions run here, off the reply's path

    def handle(self, message: IncomingMessage) -> list[str]:
        """Answer `message`; returns the texts sent (for callers that want to know)."""
        replied = threading.Event()
        self.actions.submit(self._show_activity, message.psid, replied)
        try:
            return self._answer(message)
        except Exception:  # noqa: BLE001 - a bug here must not kill the worker thread
            logger.exception("unexpected error answering mid=%s psid=%s", message.mid, message.psid)
            return []
        finally:
            replied.set()

    def _answer(self, message: IncomingMessage) -> list[str]:
        if message.is_attachment_only:
            logger.info("attachment-only message mid=%s types=%s", message.mid, ",".join(message.attachment_types))
            text = self.prompt.unsupported_reply
        else:
            messages = to_chat_messages(
                self._history(message.psid), message.text, mid=message.mid,
                page_id=self.prompt.page_id, prefix=self.prompt.prefix,
                max_turns=self.prompt.message_count, system_prompt=self.prompt.system_prompt,
            )
            text = self.generator.generate_reply(messages).text
        return self._send(message, text)

    def _history(self, psid: str) -> list:
        try:
            return self.graph.fetch_history(psid, self.prompt.message_count)
        except GraphAPIError as exc:
            # Answering without context beats not answering at all.
            logger.warning("history unavailable for psid=%s, answering without it: %s", psid, exc)
            return []

    def _send(self, message: IncomingMessage, text: str) -> list[str]:
        sent: list[str] = []
        for part in split_text(text):
            try:
                self.graph.send_text(message.psid, part)
            except GraphAPIError as exc:
                logger.error("send failed for mid=%s psid=%s: %s", message.mid, message.psid, exc)
                break  # later parts would read out of order without this one
            sent.append(part)
        logger.info("answered mid=%s psid=%s in %d part(s)", message.mid, message.psid, len(sent))
        return sent

    def _show_activity(self, psid: str, replied: threading.Event) -> None:
        """mark_seen then typing_on, unless the reply already went out (typing would linger 20 s)."""
        for action in ("mark_seen", "typing_on"):
            if action == "typing_on" and replied.is_set():
                return
            try:
                self.graph.send_action(psid, action)
            except GraphAPIError as exc:
                logger.info("sender action %s failed for psid=%s: %s", action, psid, exc)
