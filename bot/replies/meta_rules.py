"""Meta's rules for an automated chat, as pure decisions: when the bot must say it is a bot,
and whether a reply may still go out at all (the messaging window).

https://developers.facebook.com/docs/messenger-platform/policy/policy-overview (the automated
experience must be disclosed "at the beginning of any conversation or message thread, after a
significant lapse of time, or when a chat moves from human interaction to automated experience")
https://developers.facebook.com/docs/messenger-platform/send-messages#messaging_types (the
standard messaging window: 24 hours after the user's last message; a click-to-Messenger ad
opens 7 days).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from messenger.events import IncomingMessage

STANDARD_WINDOW_MS = 24 * 3600 * 1000
AD_WINDOW_MS = 7 * 24 * 3600 * 1000
FIRST, SILENCE, AFTER_PERSON = "first message", "after a silence", "after a person answered"


@dataclass(frozen=True)
class Activity:
    """What the mirror says of the conversation before the waiting messages."""

    disclosed_at_ms: int | None  # when the bot last said it is a bot (users.disclosed_at)
    previous_ms: int | None  # the newest message of the conversation before the waiting ones
    person_ms: int | None  # the newest message a person sent from the Page


def disclosure_due(activity: Activity, first_ms: int, after_ms: int) -> str | None:
    """Why the reply must start by saying the user is talking to a bot, or None."""
    if activity.disclosed_at_ms is None:
        return FIRST
    if activity.person_ms is not None and activity.person_ms > activity.disclosed_at_ms:
        return AFTER_PERSON
    if activity.previous_ms is None or first_ms - activity.previous_ms >= after_ms:
        return SILENCE
    return None


def with_disclosure(text: str, disclosure: str) -> str:
    """The disclosure as the reply's first line: one message, read before the answer."""
    return f"{disclosure}\n\n{text}"


def window_closes_ms(messages: Sequence[IncomingMessage], received_ms: int | None = None) -> int:
    """When the Page may no longer answer these messages: 24 hours after the newest, or 7 days
    after one that came from a click-to-Messenger ad.

    A message counts from the later of its timestamp and `received_ms` (when the bot took it
    in): Meta delivers within seconds, so the two agree, but a replayed recording or a skewed
    clock must not drop a reply. If Meta's own count says closed, its error 10/2018278 drops
    the reply the same way (bot/replies/batch.py)."""
    def at(message: IncomingMessage) -> int:
        return max(message.timestamp_ms, received_ms or 0)
    ads = [at(m) + AD_WINDOW_MS for m in messages if m.from_ad]
    return max([max(at(m) for m in messages) + STANDARD_WINDOW_MS, *ads])
