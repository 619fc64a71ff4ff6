"""What a batch of messages ends with: the text sent (if any) and the outcome logged."""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

from bot.media.prepare import MediaFact
from bot.storage.mirror import MirrorRow


class Outcome(StrEnum):
    """The exchange log's `outcome` (stored as its text, and a metric label)."""

    ANSWERED = "answered"          # the model's answer
    FALLBACK = "fallback"          # the model failed: FALLBACK_REPLY
    UNSUPPORTED = "unsupported"    # nothing the model can read (a video, a file): UNSUPPORTED_REPLY
    STICKER = "sticker"            # stickers only (the "like" too): STICKER_REPLY or nothing, no model call
    MEDIA_FAILED = "media-failed"  # a photo or voice note that could not be fetched or heard: a clear reply
    PAUSED = "paused"              # a person answers from the Page inbox: nothing sent
    RESET = "reset"                # RESET_WORD: the context starts afresh
    RATE_LIMITED = "rate-limited"  # over RATE_LIMIT: one notice per window
    OVER_BUDGET = "over-budget"    # DAILY_TOKEN_BUDGET spent: one notice per day
    CACHED = "cached"              # ANSWER_CACHE_TTL: the same request's answer, no model call
    HANDOFF = "handoff"            # the user asked for a person: told one will answer, the bot pauses
    WINDOW_CLOSED = "window-closed"  # Meta's messaging window closed before the reply could go: dropped
    FAILED = "failed"              # could not be sent
    UNKNOWN = "unknown"            # KNOWLEDGE_MODE=only, nothing in the knowledge base answers: KNOWLEDGE_UNKNOWN_REPLY
    CANCELLED = "cancelled"        # website chat: the visitor left mid-answer and the model call was closed


@dataclass(frozen=True)
class Answer:
    """What to send for a batch (None: nothing) and what the exchange log says of it."""

    text: str | None
    outcome: Outcome
    model: str | None = None
    usage: tuple[int | None, int | None, int | None] = (None, None, None)
    # Graph history read for this answer, as mirror rows: written with the exchange, so the
    # read costs no write of its own on the way to the reply. Not kept across a retry.
    synced: tuple[MirrorRow, ...] | None = None
    history: str | None = None  # mirror, graph or mirror-only (bot/replies/history.py)
    # What each message with attachments said (mid -> "[voice note] its transcript"...), and the
    # attachments' kinds, sizes and fates: kept with the answer, so a takeover logs them too.
    said: dict[str, str] | None = None
    media: tuple[MediaFact, ...] = ()
    refused_images: bool = False  # the model server takes no images: ask again without them (not stored)
    disclosed: bool = False  # the text starts with the bot disclosure
    knowledge: tuple[tuple[int, float], ...] = ()  # (chunk id, score) of the excerpts its prompt carried
    # The messages written after a reset word it answers: mirrored just after the reset's moment
    # (Exchange.restarted), so later prompts keep them.
    restarted: tuple[str, ...] = ()
    # The user's state this answer changes (the pause after a request for a person, a notice
    # sent): written with the answer, so a crash before it is stored leaves neither (not stored).
    user_updates: dict | None = None

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "outcome": self.outcome, "model": self.model, "usage": self.usage,
                           "history": self.history, "said": self.said, "media": self.media,
                           "disclosed": self.disclosed, "knowledge": self.knowledge, "restarted": self.restarted})

    @classmethod
    def from_json(cls, stored: str) -> "Answer":
        try:
            data = json.loads(stored)
        except ValueError:
            data = None
        if not isinstance(data, dict):  # a reply stored as plain text by schema version 2
            return cls(stored, Outcome.ANSWERED)
        return cls(data["text"], Outcome(data["outcome"]), data.get("model"), tuple(data.get("usage") or (None,) * 3),
                   history=data.get("history"), said=data.get("said"),
                   media=tuple(MediaFact(*fact) for fact in data.get("media") or ()),
                   disclosed=bool(data.get("disclosed")),
                   knowledge=tuple(tuple(item) for item in data.get("knowledge") or ()),
                   restarted=tuple(data.get("restarted") or ()))
