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
                  "prompt_tokens", "completion_tokens", "total_tokens", "latency_ms", "outcome", "history", "attachments", "page_id",
                  "channel", "feedback", "knowledge")
# Channels of the log's `channel` column: where the user wrote.
MESSENGER, INSTAGRAM, WEB = "messenger", "instagram", "web"


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
    disclosed_at: float | None = None  # the reply sent began with the bot disclosure (users.disclosed_at)
    channel: str | None = None  # messenger, instagram or web; None: the account's platform (Conversations)
    ip_address: str | None = None  # a web turn's client address, for the tracking endpoint
    user_url: str | None = None  # a web turn's Referer: the page the visitor wrote from
    knowledge: Sequence[tuple[int, float]] = ()  # (chunk id, score) of the knowledge excerpts the prompt carried
    restarted: Sequence[str] = ()  # mids written after a reset word: mirrored just after the reset's moment


def user_text(message: IncomingMessage, said: Mapping[str, str] | None = None) -> str:
    """What the message said: its words, or what its attachments said (a voice note's transcript)."""
    if said and message.mid in said:
        return said[message.mid]
    return message.text if message.text else f"[{', '.join(message.attachment_types) or 'attachment'}]"


def _clean(text: str | None) -> str | None:
    return None if text is None else clean_text(text)


def record(db, exchange: Exchange, tracking: bool, channel: str = MESSENGER) -> None:
    """The log record; `tracking`: it waits for TRACKING_URL (bot/storage/outbox.py); `channel` when
    the exchange does not name its own."""
    messages = exchange.messages
    db.execute(
        "INSERT INTO interactions (psid, user_message, user_timestamp, bot_message, bot_timestamp, model,"
        " prompt_tokens, completion_tokens, total_tokens, latency_ms, outcome, history, tracking, attachments, page_id,"
        " channel, ip_address, user_url, reply_mids, knowledge)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (exchange.psid, clean_text("\n".join(user_text(m, exchange.said) for m in messages)),
         min(m.timestamp_ms for m in messages), _clean(exchange.bot_message), exchange.bot_timestamp_ms,
         _clean(exchange.model), *exchange.usage, exchange.latency_ms, str(exchange.outcome), exchange.history,
         "waiting" if tracking else None,
         json.dumps([list(a) for a in exchange.attachments]) if exchange.attachments else None,
         messages[0].page_id, exchange.channel or channel, _clean(exchange.ip_address), _clean(exchange.user_url),
         json.dumps([mid for mid, _ in exchange.sent_parts]) if exchange.sent_parts else None,
         json.dumps([list(item) for item in exchange.knowledge]) if exchange.knowledge else None))


EXPORT_PAGE = 1000  # records per query


def export(db, since_ms: int = 0, until_ms: int | None = None, page: str | None = None,
           channel: str | None = None) -> Iterator[dict]:
    """The records in [since, until), oldest first; only one Page's (or Instagram account's) with `page`,
    one channel's (messenger, instagram, web) with `channel`. Read EXPORT_PAGE at a time, each page
    its own short query after the last one's (time, id): a log of any size in little memory, and no
    transaction held open while a slow reader takes its time (it would hold back PostgreSQL's vacuum
    and a migration's lock)."""
    only = (" AND page_id = ?" if page else "") + (" AND channel = ?" if channel else "")
    filters = (*([page] if page else []), *([channel] if channel else []))
    after: tuple = ()  # then: past the last record's (time, id), a range of the index on both
    while True:
        rows = db.execute(f"SELECT {', '.join(EXPORT_COLUMNS)}, id FROM interactions WHERE user_timestamp >= ?"
                          f" AND user_timestamp < ?{only}" + (" AND (user_timestamp, id) > (?, ?)" if after else "")
                          + f" ORDER BY user_timestamp, id LIMIT {EXPORT_PAGE}",
                          (since_ms, until_ms or 2**62, *filters, *after)).fetchall()
        for row in rows:
            item = dict(zip(EXPORT_COLUMNS, row))
            item["user_timestamp"], item["bot_timestamp"] = iso(row[2]), iso(row[4])
            yield item
        if len(rows) < EXPORT_PAGE:
            return
        after = (rows[-1][2], rows[-1][-1])


def reply_mids(db, psid: str, since_ms: int) -> set[str]:
    """Meta's ids of the parts of every reply sent to this user since `since_ms`, as logged."""
    rows = db.execute("SELECT reply_mids FROM interactions WHERE psid = ? AND bot_timestamp >= ?"
                      " AND reply_mids IS NOT NULL", (psid, since_ms)).fetchall()
    return {mid for row in rows for mid in json.loads(row[0])}


def tokens_since(db, psid: str, since_ms: int) -> int:
    return db.execute("SELECT CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT) FROM interactions"
                      " WHERE psid = ? AND user_timestamp >= ?",
                      (psid, since_ms)).fetchone()[0]


def channel_tokens_since(db, channel: str, since_ms: int) -> int:
    """Model tokens of one channel's exchanges since `since_ms` (the web channel's daily cap)."""
    return db.execute("SELECT CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT) FROM interactions"
                      " WHERE channel = ? AND user_timestamp >= ?", (channel, since_ms)).fetchone()[0]


def prune(db, cutoff_s: float, limit: int, skip_locked: str = "") -> int:
    """At most `limit` records older than the cutoff, except those still waiting for the
    tracking endpoint (retention deletes a chunk per transaction: bot/storage/conversations.py)."""
    return db.execute("DELETE FROM interactions WHERE id IN (SELECT id FROM interactions WHERE user_timestamp < ?"
                      f" AND (tracking IS NULL OR tracking <> ?) LIMIT ?{skip_locked})",
                      (int(cutoff_s * 1000), "waiting", limit)).rowcount


def rate(db, psid: str, mid: str, feedback: str) -> None:
    """The user's feedback on one of the bot's messages, kept with the exchange that sent it."""
    db.execute("UPDATE interactions SET feedback = ? WHERE psid = ? AND reply_mids LIKE ?",
               (clean_text(feedback)[:100], psid, f'%"{mid}"%'))
