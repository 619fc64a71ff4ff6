"""Composing one answer: the gate (bot/replies/gate.py), then history from the mirror or
Graph, the prompt and the model; and the Send API call for each part."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from bot.replies import gate
from bot.replies.activity import TYPING_REFRESH_S, Activity
from bot.replies.answer import Answer, Outcome
from bot.replies.gate import Policy
from bot.storage.conversations import Conversations
from bot.storage.mirror import BOT, USER, MirrorRow
from bot.storage.times import created_ms
from bot.storage.users import UserState
from bot.telemetry import metrics
from gpt.model import ChatModel
from gpt.prompt import to_chat_messages
from messenger.events import IncomingMessage
from messenger.graph import RATE_LIMIT_CODES, GraphAPIError, GraphClient, HistoryMessage

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PromptSettings:
    page_id: str
    prefix: str
    message_count: int
    system_prompt: str
    unsupported_reply: str


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Meta's 30-second rule (see config.py): the model has until `reply_deadline` after the reply
    thread took the message; with `slow_notice` set, the notice goes then and the model has
    until `slow_limit`."""

    reply_deadline: float = 21.0
    slow_notice: str = ""
    slow_limit: float = 120.0
    typing_refresh: float = TYPING_REFRESH_S


class Composer:
    """Composes one answer for a user's waiting messages and sends its parts."""

    def __init__(self, graph: GraphClient, model: ChatModel, prompt: PromptSettings,
                 conversations: Conversations, *, policy: Policy = Policy(), timing: Timing = Timing(),
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        self.graph = graph
        self.model = model
        self.prompt = prompt
        self.conversations = conversations
        self.policy = policy
        self.timing = timing
        self.clock = clock  # deadlines
        self.wall_clock = wall_clock  # pauses, limits, the mirror's age: compared with stored times

    def activity(self, psid: str) -> Activity:
        """The sender actions (and slow-reply notice) of a reply starting now."""
        started = self.clock()
        return Activity(self.graph, psid, started=started, notice=self.timing.slow_notice,
                        notice_at=started + self.timing.reply_deadline, refresh_every=self.timing.typing_refresh,
                        clock=self.clock)

    def model_deadline(self, started: float) -> float:
        """When the model must have answered, for a reply that started at `started`."""
        timing = self.timing
        return started + (timing.slow_limit if timing.slow_notice else timing.reply_deadline)

    def compose(self, messages: Sequence[IncomingMessage], thinking: Callable[[], object] = lambda: None,
                deadline: float | None = None) -> Answer:
        """One answer to everything the user wrote since the last one (oldest first).

        `thinking` is called once the history is in, as the model starts: the
        moment to show "seen" and the typing indicator without slowing the read.
        The model call ends by `deadline` (on `clock`), retries included.
        """
        psid = messages[0].psid
        now = self.wall_clock()
        facts = self._facts(psid, messages, now)
        gated = gate.decide(messages, facts, self.policy, now)
        if gated is not None:
            if gated.updates:
                self.conversations.update_user(psid, **gated.updates)
            logger.info("%s psid=%r: %d message(s) not sent to the model", gated.why, psid, len(messages))
            return gated.answer
        user = facts.user
        texts = [m for m in messages if not m.is_attachment_only]
        if not texts:
            thinking()  # "seen"; the typing indicator is skipped once the reply is out
            logger.info("attachment-only message(s) psid=%r mids=%r", psid, [m.mid for m in messages])
            return Answer(self.prompt.unsupported_reply, Outcome.UNSUPPORTED)
        history, synced = self._history(psid, user, now)
        thinking()
        chat = to_chat_messages(
            history, [(m.mid, m.text) for m in texts],
            page_id=self.prompt.page_id, prefix=self.prompt.prefix,
            max_turns=self.prompt.message_count, system_prompt=self.prompt.system_prompt,
        )
        reply = self.model.reply(chat, deadline)
        if reply.error_class:
            metrics.MODEL_ERRORS.labels(reply.error_class).inc()
        outcome = Outcome.FALLBACK if reply.error_class else Outcome.ANSWERED
        return Answer(reply.text, outcome, reply.model, reply.usage, synced)

    def _facts(self, psid: str, messages: Sequence[IncomingMessage], now: float) -> gate.Facts:
        """What the gate decides on; the counts are read only when their limit is set."""
        window = gate.rate_window_ms(messages, self.policy)
        since = gate.budget_day_start_ms(self.policy, now)
        return gate.Facts(self.conversations.user(psid),
                          self.conversations.messages_between(psid, *window) if window else 0,
                          self.conversations.tokens_since(psid, since) if since is not None else 0)

    def send_part(self, psid: str, text: str) -> str | None:
        """One Send API call, returning Meta's message id; GraphAPIError is the caller's to classify."""
        mid = self.graph.send_text(psid, text)
        metrics.REPLIES.inc()
        return mid

    def _history(self, psid: str, user: UserState, now: float
                 ) -> tuple[list[HistoryMessage], tuple[MirrorRow, ...] | None]:
        """From the mirror when it covers this user; else ONE Graph read, if the Page's budget
        allows (returned as mirror rows too, for the exchange to write)."""
        limit = self.prompt.message_count
        fresh = user.synced_at is not None and now - user.synced_at < self.policy.mirror_max_age
        if not fresh and self.conversations.take_graph_read(self.policy.graph_reads_per_second):
            try:
                history = self.graph.fetch_history(psid, limit)
            except GraphAPIError as exc:
                metrics.GRAPH_ERRORS.labels(str(exc.code)).inc()
                if exc.code in RATE_LIMIT_CODES:
                    self.conversations.hold_graph_reads()
                # Answering from what the mirror has beats not answering at all.
                logger.warning("history unavailable for psid=%r, answering from the mirror: %s", psid, exc)
            else:
                metrics.HISTORY_READS.labels("graph").inc()
                page_id, after = self.prompt.page_id, user.reset_at_ms or 0
                synced = tuple((h.mid, BOT if h.from_id == page_id else USER, h.text, created_ms(h.created_time))
                               for h in reversed(history))  # oldest first: rowid breaks ties of whole seconds
                return [h for h in history if created_ms(h.created_time) > after], synced
        else:
            metrics.HISTORY_READS.labels("mirror").inc()
        return self.conversations.history(psid, self.prompt.page_id, limit, user.reset_at_ms), None
