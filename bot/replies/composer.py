"""What a reply is made of: the user's limits and state, history, prompt and model in;
Send API and sender actions out."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from bot.telemetry import metrics
from bot.replies.activity import TYPING_REFRESH_S, Activity
from bot.storage.conversations import BOT, USER, Conversations, MirrorRow, UserState, created_ms, utc_day, utc_day_start_ms
from gpt.prompt import to_chat_messages
from gpt.model import ReplyGenerator
from messenger.events import IncomingMessage
from messenger.graph import RATE_LIMIT_CODES, GraphAPIError, GraphClient, HistoryMessage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSettings:
    page_id: str
    prefix: str
    message_count: int
    system_prompt: str
    unsupported_reply: str


@dataclass(frozen=True)
class Policy:
    """Per-user limits, the reset word and where history comes from (see config.py)."""

    rate_limit: tuple[int, float] | None = None
    rate_limit_reply: str = ""
    daily_token_budget: int = 0
    budget_reply: str = ""
    reset_word: str = ""
    reset_reply: str = ""
    mirror_max_age: float = 86400.0
    graph_reads_per_second: float = 2.0


@dataclass(frozen=True)
class Timing:
    """Meta's 30-second rule (see config.py): the model has until `reply_deadline` after the reply
    thread took the message; with `slow_notice` set, the notice goes then and the model has
    until `slow_limit`."""

    reply_deadline: float = 21.0
    slow_notice: str = ""
    slow_limit: float = 120.0
    typing_refresh: float = TYPING_REFRESH_S


@dataclass(frozen=True)
class Answer:
    """What to send for a batch (None: nothing) and what the exchange log says of it."""

    text: str | None
    outcome: str
    model: str | None = None
    usage: tuple[int | None, int | None, int | None] = (None, None, None)
    # Graph history read for this answer, as mirror rows: written with the exchange, so the
    # read costs no write of its own on the way to the reply. Not kept across a retry.
    synced: tuple[MirrorRow, ...] | None = None

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "outcome": self.outcome, "model": self.model, "usage": self.usage})

    @classmethod
    def from_json(cls, stored: str) -> "Answer":
        try:
            data = json.loads(stored)
        except ValueError:
            data = None
        if not isinstance(data, dict):  # a reply stored as plain text by schema version 2
            return cls(stored, "answered")
        return cls(data["text"], data["outcome"], data.get("model"), tuple(data.get("usage") or (None,) * 3))


class Responder:
    """Composes one answer for a user's waiting messages and sends its parts."""

    def __init__(self, graph: GraphClient, generator: ReplyGenerator, prompt: PromptSettings,
                 conversations: Conversations, policy: Policy = Policy(), timing: Timing = Timing(),
                 clock: Callable[[], float] = time.monotonic):
        self.graph = graph
        self.generator = generator
        self.prompt = prompt
        self.conversations = conversations
        self.policy = policy
        self.timing = timing
        self.clock = clock

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
        user = self.conversations.user(psid)
        now = time.time()
        if user.paused_until and user.paused_until > now:
            logger.info("a human is answering psid=%r: %d message(s) logged, not answered", psid, len(messages))
            return Answer(None, "paused")
        gate = self._gate(psid, messages, user, now)
        if gate is not None:
            return gate
        texts = [m for m in messages if not m.is_attachment_only]
        if not texts:
            thinking()  # "seen"; the typing indicator is skipped once the reply is out
            logger.info("attachment-only message(s) psid=%r mids=%r", psid, [m.mid for m in messages])
            return Answer(self.prompt.unsupported_reply, "unsupported")
        history, synced = self._history(psid, user, now)
        thinking()
        chat = to_chat_messages(
            history, [(m.mid, m.text) for m in texts],
            page_id=self.prompt.page_id, prefix=self.prompt.prefix,
            max_turns=self.prompt.message_count, system_prompt=self.prompt.system_prompt,
        )
        reply = self.generator.generate_reply(chat, deadline)
        if reply.error_class:
            metrics.MODEL_ERRORS.labels(reply.error_class).inc()
        return Answer(reply.text, "fallback" if reply.error_class else "answered", reply.model, reply.usage, synced)

    def _gate(self, psid: str, messages: Sequence[IncomingMessage], user: UserState, now: float) -> Answer | None:
        """Reset, the per-user rate limit and the daily token budget, before any model call."""
        policy = self.policy
        word = policy.reset_word.lower()
        if word and any(m.text.strip().lower() == word for m in messages):
            reset_at = max(int(now * 1000), max(m.timestamp_ms for m in messages) + 1)
            self.conversations.update_user(psid, reset_at_ms=reset_at)
            logger.info("context reset psid=%r", psid)
            return Answer(policy.reset_reply, "reset")
        if policy.rate_limit:
            count, window = policy.rate_limit
            first = messages[0].timestamp_ms
            if self.conversations.messages_between(psid, first - int(window * 1000), first) > count:
                notice = not user.rate_notice_at or now - user.rate_notice_at >= window
                if notice:
                    self.conversations.update_user(psid, rate_notice_at=now)
                logger.info("rate limit psid=%r: %d message(s) not answered", psid, len(messages))
                return Answer(policy.rate_limit_reply if notice else None, "rate-limited")
        if policy.daily_token_budget:
            today = utc_day(now)
            if self.conversations.tokens_since(psid, utc_day_start_ms(now)) >= policy.daily_token_budget:
                notice = user.budget_notice_day != today
                if notice:
                    self.conversations.update_user(psid, budget_notice_day=today)
                logger.info("daily token budget spent psid=%r", psid)
                return Answer(policy.budget_reply if notice else None, "over-budget")
        return None

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
