"""The exchange log: one record per answered batch (what the user wrote, what went back,
model, tokens, latency, outcome), for export, the daily token budget and retention."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

from bot.storage.mirror import MirrorRow
from bot.storage.times import iso
from messenger.events import IncomingMessage
from messenger.text import clean_text

# Columns of the exchange log, in export order; timestamps are exported as ISO 8601 UTC.
EXPORT_COLUMNS = ("psid", "user_message", "user_timestamp", "bot_message", "bot_timestamp", "model",
                  "prompt_tokens", "completion_tokens", "total_tokens", "latency_ms", "outcome", "history", "attachments", "page_id")


@dataclass
class Exchange:
    """One answered batch, written with its completion: the log record and the mirror rows."""

    psid: str
    messages: Sequence[IncomingMessage]
    outcome: str  # an Outcome (bot/replies/answer.py)
    bot_message: str | None = None
    sent_parts: list[tuple[str, str]] = field(default_factory=list)  # (Meta's message id, text) of each part
    bot_timestamp_ms: int | None = None
    model: str | None = None
    usage: tuple[int | None, int | None, int | None] = (None, None, None)
    latency_ms: int | None = None
    synced: Sequence[MirrorRow] | None = None  # Graph history read for it: the mirror now covers the user
    history: str | None = None  # where the prompt's history came from (bot/replies/history.py)
    said: Mapping[str, str] | None = None  # mid -> what a message with attachments said ("[photo] hi")
    attachments: Sequence[tuple] = ()  # (kind, bytes, outcome) of each attachment


def user_text(message: IncomingMessage, said: Mapping[str, str] | None = None) -> str:
    """What the message said: its words, or what its attachments said (a voice note's transcript)."""
    if said and message.mid in said:
        return said[message.mid]
    return message.text if message.text else f"[{', '.join(message.attachment_types) or 'attachment'}]"


def _clean(text: str | None) -> str | None:
    return None if text is None else clean_text(text)


def record(db, exchange: Exchange, tracking: bool) -> None:
    """The log record; `tracking`: it waits for TRACKING_URL (bot/storage/outbox.py)."""
    messages = exchange.messages
    db.execute(
        "INSERT INTO interactions (psid, user_message, user_timestamp, bot_message, bot_timestamp, model,"
        " prompt_tokens, completion_tokens, total_tokens, latency_ms, outcome, history, tracking, attachments, page_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (exchange.psid, clean_text("\n".join(user_text(m, exchange.said) for m in messages)),
         min(m.timestamp_ms for m in messages), _clean(exchange.bot_message), exchange.bot_timestamp_ms,
         _clean(exchange.model), *exchange.usage, exchange.latency_ms, str(exchange.outcome), exchange.history,
         "waiting" if tracking else None,
         json.dumps([list(a) for a in exchange.attachments]) if exchange.attachments else None,
         messages[0].page_id))


def export(db, since_ms: int = 0, until_ms: int | None = None, page: str | None = None) -> Iterator[dict]:
    """The records in [since, until), oldest first; only one Page's (or Instagram account's) with `page`."""
    only_page = " AND page_id = ?" if page else ""
    rows = db.execute(f"SELECT {', '.join(EXPORT_COLUMNS)} FROM interactions WHERE user_timestamp >= ?"
                      f" AND user_timestamp < ?{only_page} ORDER BY user_timestamp, id",
                      (since_ms, until_ms or 2**62, *([page] if page else [])))
    for row in rows:
        item = dict(zip(EXPORT_COLUMNS, row))
        item["user_timestamp"], item["bot_timestamp"] = iso(row[2]), iso(row[4])
        yield item


def tokens_since(db, psid: str, since_ms: int) -> int:
    return db.execute("SELECT CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT) FROM interactions"
                      " WHERE psid = ? AND user_timestamp >= ?",
                      (psid, since_ms)).fetchone()[0]


def prune(db, cutoff_s: float) -> int:
    """Records older than the cutoff, except those still waiting for the tracking endpoint."""
    return db.execute("DELETE FROM interactions WHERE user_timestamp < ? AND (tracking IS NULL OR tracking <> ?)",
                      (int(cutoff_s * 1000), "waiting")).rowcount
