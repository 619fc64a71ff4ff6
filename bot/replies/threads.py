"""Threads the bot passed to the Page inbox (HANDOFF_THREAD_CONTROL) and nobody passed back.

While the inbox owns a thread, Meta delivers the user's messages on `standby` and refuses the
bot's sends, so a person who never marks the conversation done would leave the user unanswered
for good. When the pause for a person is over (HUMAN_PAUSE after the request, or after the
person's last answer), the bot takes the thread back - as the Page's primary receiver may - and
answers the user's next message, as it does without thread control.
"""
from __future__ import annotations

import logging

from bot.replies.composer import Composers
from bot.storage.conversations import Conversations
from bot.telemetry.quiet import QuietRepeats
from messenger.graph import GraphAPIError, explain, is_rate_limited, is_retryable

logger = logging.getLogger(__name__)

TAKE_BACK_EVERY_S = 10.0
# A host's claim on one take-back: long past Graph's timeouts. A process that dies holding it, or
# a failure that may pass (a timeout, a rate limit), leaves the take-back to be tried after it.
TAKE_BACK_HOLD_S = 60.0


def take_threads_back(conversations: Conversations, composers: Composers, now: float,
                      errors: QuietRepeats) -> int:
    """Take back every thread whose pause is over at `now`; how many were taken. Each is claimed
    in the database first, so a person who answered meanwhile keeps it and two hosts never both
    take it. A Graph failure that may pass ends this turn: it is tried again once the claim runs
    out, behind threads never tried."""
    taken = 0
    for psid, account in conversations.threads_due_back(now):
        if not conversations.claim_thread_back(psid, account, now, TAKE_BACK_HOLD_S):
            continue
        composer = composers.for_account(account)
        if composer is None or composer.handoff is None:
            logger.warning("psid=%r's thread was passed on by account %s, no longer configured: not taken back",
                           psid, account)
            conversations.thread_taken_back(psid, account)
            continue
        try:
            composer.handoff.take_back(psid)
        except GraphAPIError as exc:
            if is_retryable(exc) or is_rate_limited(exc):
                errors.error(f"take-back:{exc.code}", "could not take psid=%r's thread back, will try again: %s",
                             psid, exc)
                break
            why = explain(exc)
            logger.warning("could not take psid=%r's thread back: %s%s; it stays the Page inbox's until it "
                           "passes it back", psid, exc, f" ({why})" if why else "")
        else:
            taken += 1
            logger.info("took psid=%r's thread back from the Page inbox: the pause for a person is over", psid)
        conversations.thread_taken_back(psid, account)
    return taken
