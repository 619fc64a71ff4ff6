"""The website chat's core, without HTTP: admit a visitor's message (limits and conversation, one
transaction in the store), then answer it through the Page's reply pipeline and log it.

Limits are counted in the store, so they hold across every process and, with PostgreSQL, every
host: per client address (an IPv6 /64) per WEBCHAT_RATE_LIMIT window and per UTC day, per
conversation, and the web channel's daily model tokens (a circuit breaker that never touches
Messenger). Only a request that passes them all reaches the model.
"""
from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
import traceback
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

from bot.replies.answer import Answer, Outcome
from bot.replies.composer import Composer
from bot.replies.history import FROM_MIRROR, History
from bot.storage import exchanges
from bot.storage.conversations import Conversations
from bot.storage.exchanges import WEB, Exchange
from bot.storage.times import utc_day_start_ms
from bot.storage.users import UserState
from bot.telemetry import metrics
from bot.webchat import store
from bot.webchat.requests import ChatInput, Refused, client_key, user_key
from gpt.streaming import DeltaSink, StreamCancelled, streaming_to
from messenger.events import TEXT, IncomingMessage

logger = logging.getLogger(__name__)

SORRY = "Something went wrong on our side. Please try again in a moment."

PSID_PREFIX = "web:"  # a web conversation's "user" in the mirror, the users table and the log
TIDY_EVERY_S = 3600.0
# What an answer in progress counts for against the daily token caps until its own tokens are
# known (store.reserve): without it, every request admitted at once was admitted against the same
# total (7 of 12 at once under a cap one answer from spent). A burst still overshoots by what its
# answers cost beyond this each (a long conversation's ~5,000).
RESERVED_TOKENS = 2_000


def estimated_tokens(text: str) -> int:
    """A cancelled stream's tokens without a tokenizer: a UTF-8 byte count / 3 errs high for English
    (~4 characters a token) and holds for Chinese, Japanese and emoji (~1-3 tokens a character), which
    characters / 4 counted at a tenth of their cost."""
    return math.ceil(len(text.encode()) / 3)


def web_psid(conversation: str) -> str:
    """A web conversation's "user": its id hashed. The id is all it takes to continue an unsigned
    conversation (and read its history back through the model), so the logs, the exports and the
    tracking endpoint get this instead."""
    return PSID_PREFIX + hashlib.sha256(conversation.encode()).hexdigest()[:32]


@dataclass(frozen=True, kw_only=True)
class Limits:
    per_ip: tuple[int, float] | None = (5, 60.0)
    per_conversation: tuple[int, float] | None = (5, 60.0)
    daily_per_ip: int = 200  # 0 = off
    daily_tokens: int = 1_000_000  # the whole web channel; 0 = off
    daily_tokens_per_ip: int = 200_000  # one address's share of them; 0 = off


@dataclass(frozen=True)
class Admitted:
    conversation: str
    request_id: str
    new: bool  # the conversation was issued for this request


@dataclass(frozen=True)
class WebAnswer:
    text: str | None
    outcome: str
    conversation: str
    request_id: str


class StoreHistory:
    """History for the web: the mirror only - a web conversation has nothing in Graph."""

    def __init__(self, conversations: Conversations, page_id: str, limit: int):
        self.conversations, self.page_id, self.limit = conversations, page_id, limit

    def read(self, psid: str, user: UserState, spend: float = math.inf, *_: object) -> History:
        """HistoryReader.read's call (what it takes besides: for Graph's sake, unused here)."""
        metrics.HISTORY_READS.labels(FROM_MIRROR).inc()
        return History(self.conversations.history(psid, self.page_id, self.limit, user.reset_at_ms), None, FROM_MIRROR)


class WebChat:
    def __init__(self, composer: Composer, conversations: Conversations, *, page_id: str, limits: Limits,
                 secret: str = "", expiring_signatures: bool = False, reply_deadline: float = 21.0,
                 retention_days: int = 0, clock: Callable[[], float] = time.time):
        self.composer = composer
        self.conversations = conversations
        self.page_id = page_id
        self.limits = limits
        self.secret = secret
        self.expiring_signatures = expiring_signatures  # signatures without an expiry refused
        self.reply_deadline = reply_deadline
        self.retention_days = retention_days  # 0: conversations are kept
        self.clock = clock
        self._tidy_at = 0.0  # when the limits' old counters (and old conversations) are next deleted

    def admit(self, chat: ChatInput, address: str | None) -> Admitted:
        """Count the request against every limit and find (or issue) its conversation - or Refused."""
        now = self.clock()
        key = user_key(chat, self.secret, now, self.expiring_signatures)  # a bad signature costs no write
        if now >= self._tidy_at:  # hourly, from whichever request comes first
            self._tidy_at = now + TIDY_EVERY_S
            self._tidy(now)
        with self.conversations.database.write() as db:
            outcome = self._admit(db, chat, key, client_key(address), now)
        if isinstance(outcome, Refused):
            metrics.WEBCHAT_REQUESTS.labels(outcome.code).inc()
            raise outcome
        return outcome

    def _tidy(self, now: float) -> None:
        """Old counters and conversations deleted in a transaction of their own: the admission's
        stays short (SQLite's one writer is the webhook's too), and a failure here is not the
        visitor's - the next hour tries again."""
        try:
            with self.conversations.database.write() as db:
                store.prune(db, now, now - self.retention_days * 86400 if self.retention_days else None, web_psid)
        except Exception:  # noqa: BLE001 - the chat goes on; the rows wait for the next tidy
            logger.exception("website chat: could not delete old counters and conversations")

    def _admit(self, db, chat: ChatInput, key: str | None, client: str, now: float) -> Admitted | Refused:
        """Inside one transaction: the counts of a refused request stay counted (a script hammering a
        limit stays refused), and only an admitted request issues a conversation."""
        if refused := self._over(db, f"ip:{client}", self.limits.per_ip, now, "you are sending messages"):
            return refused
        daily = self.limits.daily_per_ip
        if daily and (count := store.hit(db, f"ipday:{client}", 86400, now, calendar=True))[0] > daily:
            return Refused(429, "daily_limit", "You have reached today's number of messages. Please come back "
                                               "tomorrow.", _seconds(count[1]))
        if refused := self._tokens_left(db, client, now):
            return refused
        conversation, new = self._conversation(db, chat, key, now)
        if isinstance(conversation, Refused):
            return conversation
        if refused := self._over(db, f"conversation:{conversation}", self.limits.per_conversation, now,
                                 "this conversation is going"):
            return refused
        request_id = uuid.uuid4().hex
        if self.limits.daily_tokens_per_ip or self.limits.daily_tokens:
            # Replaced by the answer's own tokens as it is logged (_record).
            store.reserve(db, request_id, client, RESERVED_TOKENS, now)
        return Admitted(conversation, request_id, new)

    def _tokens_left(self, db, client: str, now: float) -> Refused | None:
        """The daily token caps, answers in progress counted; admissions take turns from here to the
        transaction's end, so the next one sees this one's reservation."""
        share, cap = self.limits.daily_tokens_per_ip, self.limits.daily_tokens
        if not (share or cap):
            return None
        store.take_turn(db, now)
        # Reservations first, totals after: an answer logged in between (PostgreSQL reads what is
        # committed, statement by statement) is then counted twice - never not at all.
        mine, everyone = store.reserved(db, now, client), store.reserved(db, now)
        # One address must not spend the channel's tokens for every visitor (long messages over a
        # long conversation: ~5,000 tokens a request, the whole day's million in 40 minutes).
        if share and store.spent(db, f"iptokens:{client}", now) + mine >= share:
            return Refused(429, "daily_limit", "You have reached today's share of the chat. Please come back "
                                               "tomorrow.", _seconds(86400 - now % 86400))
        if cap and exchanges.channel_tokens_since(db, WEB, utc_day_start_ms(now)) + everyone >= cap:
            logger.warning("website chat: the daily token cap (WEBCHAT_DAILY_TOKENS) is spent")
            return Refused(429, "channel_busy", "The chat has answered all it can for today. Please come back "
                                                "tomorrow.", _seconds(86400 - now % 86400))
        return None

    def _over(self, db, key: str, limit: tuple[int, float] | None, now: float, who: str) -> Refused | None:
        if not limit:
            return None
        count, left = store.hit(db, key, limit[1], now)
        if count <= limit[0]:
            return None
        wait = _seconds(left)
        return Refused(429, "rate_limited", f"Slow down: {who} faster than I can answer. Please wait {wait} "
                                            f"second{'s' if wait != 1 else ''}.", wait)

    def _conversation(self, db, chat: ChatInput, key: str | None, now: float) -> tuple[str | Refused, bool]:
        """The conversation this request continues, or a new one. Unsigned ids are labels only."""
        if key is not None:
            own = store.conversation_of(db, key)
            if chat.conversation is not None and chat.conversation != own:
                return Refused(403, "not_your_conversation", "This conversation belongs to someone else."), False
            return (own, False) if own else (store.add_conversation(db, new_id(), key, chat.user_id, now), True)
        if chat.conversation is None:
            return store.add_conversation(db, new_id(), None, chat.user_id, now), True
        row = store.conversation(db, chat.conversation)
        if row is None:
            return Refused(404, "unknown_conversation", "This conversation does not exist (any more). Start a new "
                                                        "one by sending your message without it."), False
        if row[0] is not None:  # a signed user's: only with their signature
            return Refused(403, "not_your_conversation", "This conversation belongs to someone else."), False
        return chat.conversation, False

    def answer(self, admitted: Admitted, chat: ChatInput, *, address: str | None = None, referer: str | None = None,
               sink: DeltaSink | None = None) -> WebAnswer:
        """The Page's pipeline on this message (streamed into `sink` when given), logged with channel web."""
        received = self.clock()
        message = IncomingMessage(psid=web_psid(admitted.conversation), page_id=self.page_id,
                                  mid=f"{PSID_PREFIX}{admitted.request_id}", kind=TEXT, text=chat.message,
                                  timestamp_ms=int(received * 1000))
        deadline = self.composer.clock() + self.reply_deadline
        try:
            with streaming_to(sink) if sink is not None else nullcontext():
                answer = self.composer.compose([message], deadline=deadline)
        except StreamCancelled as cancelled:  # the visitor left: what the model read and wrote, estimated
            read, wrote = math.ceil(cancelled.prompt_bytes / 3), estimated_tokens(cancelled.text)
            answer = Answer(cancelled.text or None, Outcome.CANCELLED, cancelled.model, (read, wrote, read + wrote))
        except Exception as exc:  # noqa: BLE001 - a bug costs this answer, not its log line or its reservation
            # Where, without what: an error's own message may quote the visitor's or the model's words.
            logger.error("website chat: answering failed (%s), at:\n%s", type(exc).__name__,
                         "".join(traceback.format_tb(exc.__traceback__)).rstrip())
            answer = Answer(None, Outcome.FAILED)
        self._record(message, answer, admitted, received, address, referer)
        metrics.EXCHANGES.labels(answer.outcome, self.page_id, WEB).inc()
        metrics.WEBCHAT_REQUESTS.labels(answer.outcome).inc()
        return WebAnswer(answer.text, str(answer.outcome), admitted.conversation, admitted.request_id)

    def refusal(self, answer: WebAnswer) -> Refused | None:
        """The 429 of an answer DAILY_TOKEN_BUDGET held back without a word (its one notice of the
        day was given): it starts again at midnight UTC (RATE_LIMIT is Messenger's: the website
        chat has its own limits, refused before the answer); the 500 of one that failed."""
        if answer.text is None and answer.outcome == Outcome.OVER_BUDGET:
            now = self.clock()
            wait = max(1, math.ceil((utc_day_start_ms(now) + 86_400_000) / 1000 - now))
            return Refused(429, "over_budget", "We have talked a lot today! Please come back tomorrow.", wait)
        if answer.text is None and answer.outcome == Outcome.FAILED:  # a bug (logged): not an empty answer
            return Refused(500, "internal", SORRY)
        return None

    def _record(self, message: IncomingMessage, answer: Answer, admitted: Admitted, received: float,
                address: str | None, referer: str | None) -> None:
        """The exchange logged and mirrored, and its tokens counted against the address's daily
        share, in one transaction (SQLite's one writer is the webhooks' too)."""
        now = self.clock()
        shown = answer.text is not None and answer.outcome != Outcome.CANCELLED
        exchange = Exchange(
            psid=message.psid, messages=[message], outcome=answer.outcome, bot_message=answer.text,
            sent_parts=[(f"{message.mid}:answer", answer.text)] if shown else [],
            bot_timestamp_ms=int(now * 1000) if answer.text is not None else None, model=answer.model,
            usage=answer.usage, latency_ms=int((now - received) * 1000), history=answer.history,
            disclosed_at=now if shown and answer.disclosed else None, channel=WEB, ip_address=address,
            user_url=referer, knowledge=answer.knowledge)
        tokens = (answer.usage or (None, None, None))[2]  # none for a cached answer, a fallback, a refusal...
        client = client_key(address)
        with self.conversations.database.write() as db:
            self.conversations.finish(db, exchange)  # the channel's cap counts the log's tokens
            store.release(db, admitted.request_id)
            if self.limits.daily_tokens_per_ip and tokens:
                store.spend(db, f"iptokens:{client}", tokens, now)


def new_id() -> str:
    """A conversation id: 192 random bits, URL-safe (32 characters)."""
    return secrets.token_urlsafe(24)


def _seconds(left: float) -> int:
    return max(1, math.ceil(left))
