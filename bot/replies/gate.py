"""Whether a user's waiting messages go to the model at all: the human pause, a request for a
person, the reset word, the per-user rate limit and the daily token budget.

`decide` is pure: the composer reads the facts first, passes the time, and writes back
what the decision says to remember. Tests state the facts and move `now` instead of sleeping.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from bot.replies.answer import Answer, Outcome
from bot.storage.times import utc_day, utc_day_start_ms
from bot.storage.users import UserState
from messenger.attachments import STICKER
from messenger.events import IncomingMessage


@dataclass(frozen=True, kw_only=True)
class Policy:
    """Per-user limits, the reset word and where history comes from (see config.py)."""

    rate_limit: tuple[int, float] | None = None  # (messages, per seconds)
    rate_limit_reply: str = ""
    daily_token_budget: int = 0
    budget_reply: str = ""
    reset_word: str = ""
    reset_reply: str = ""
    mirror_max_age: float = 86400.0
    graph_reads_per_second: float = 2.0
    history_wait: float = 2.0  # a user the mirror does not know waits this long at most for a Graph read
    handoff_words: tuple[str, ...] = ()  # a whole message that is one of these asks for a person
    handoff_reply: str = ""
    human_pause: float = 1800.0  # how long the bot stays silent after a person takes over


@dataclass(frozen=True)
class Facts:
    """What the gate needs to know of the user, read before deciding."""

    user: UserState
    recent_messages: int = 0  # the user's messages in the rate window ending at the first waiting one
    tokens_today: int = 0     # model tokens spent on the user since midnight UTC


@dataclass(frozen=True)
class Gated:
    """The answer instead of the model's, the user-state columns to write, and why (for the log)."""

    answer: Answer
    updates: dict[str, object] = field(default_factory=dict)
    why: str = ""


def rate_window_ms(messages: Sequence[IncomingMessage], policy: Policy) -> tuple[int, int] | None:
    """The (start, end) of the window whose messages count against the rate limit, if one is set."""
    if not policy.rate_limit:
        return None
    first = messages[0].timestamp_ms
    return first - int(policy.rate_limit[1] * 1000), first


def budget_day_start_ms(policy: Policy, now: float) -> int | None:
    """Since when tokens count against the daily budget, if one is set."""
    return utc_day_start_ms(now) if policy.daily_token_budget else None


HANDOFF_PAYLOAD = "HANDOFF"  # the "Talk to a person" quick reply's and menu item's payload


def is_handoff(message: IncomingMessage, words: Sequence[str]) -> bool:
    """The user asked for a person: the button, or a message that is just one of the words."""
    return message.payload == HANDOFF_PAYLOAD or message.text.strip().strip("!?.¡¿ ").lower() in words


def after_reset(messages: Sequence[IncomingMessage], policy: Policy) -> list[IncomingMessage] | None:
    """The messages after the last reset word, when they hold something to answer (words, a
    photo...: not just a sticker); else None. The reset itself is `decide`'s."""
    word = policy.reset_word.lower()
    last = max((n for n, m in enumerate(messages) if word and m.text.strip().lower() == word), default=None)
    later = [] if last is None else list(messages[last + 1:])
    if any(m.text.strip() or any(a.kind != STICKER for a in m.attachments) for m in later):
        return later
    return None


def decide(messages: Sequence[IncomingMessage], facts: Facts, policy: Policy, now: float) -> Gated | None:
    """None: go on to the model. Otherwise what to send instead (None text: nothing)."""
    user = facts.user
    if user.paused_until and user.paused_until > now:
        return Gated(Answer(None, Outcome.PAUSED), why="a human is answering")
    asking = next((m for m in messages if is_handoff(m, policy.handoff_words)), None)
    if asking is not None:
        pause = {"pause": [now + policy.human_pause, asking.timestamp_ms]} if policy.human_pause else {}
        return Gated(Answer(policy.handoff_reply, Outcome.HANDOFF), pause, "asked for a person")
    word = policy.reset_word.lower()
    if word and any(m.text.strip().lower() == word for m in messages):
        reset_at = max(int(now * 1000), max(m.timestamp_ms for m in messages) + 1)
        return Gated(Answer(policy.reset_reply, Outcome.RESET), {"reset_at_ms": reset_at}, "context reset")
    if policy.rate_limit and facts.recent_messages > policy.rate_limit[0]:
        window = policy.rate_limit[1]
        notice = not user.rate_notice_at or now - user.rate_notice_at >= window
        return Gated(Answer(policy.rate_limit_reply if notice else None, Outcome.RATE_LIMITED),
                     {"rate_notice_at": now} if notice else {}, "rate limit")
    if policy.daily_token_budget and facts.tokens_today >= policy.daily_token_budget:
        today = utc_day(now)
        notice = user.budget_notice_day != today
        return Gated(Answer(policy.budget_reply if notice else None, Outcome.OVER_BUDGET),
                     {"budget_notice_day": today} if notice else {}, "daily token budget spent")
    return None
