"""The conversation store: a mirror of every message, per-user state, the exchange log.

Same SQLite file and schema as the queue (bot/storage/schema.py). The mirror lets the
bot build prompts without asking Graph, whose Conversations API allows about
2 calls per second per Page; Graph is read once per user (and again only when
the mirror is older than MIRROR_MAX_AGE), within a budget shared by every
process of the host.
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator, Sequence

from bot.storage.inbox import ClassifiedEcho
from bot.storage.sqlite import Database
from messenger.events import IncomingMessage
from messenger.graph import HistoryMessage
from messenger.text import clean_text

USER, BOT, HUMAN = "user", "bot", "human"
MirrorRow = tuple[str, str, str, int]  # mid, author, text, at_ms
# Columns of the exchange log, in export order; timestamps are exported as ISO 8601 UTC.
EXPORT_COLUMNS = ("psid", "user_message", "user_timestamp", "bot_message", "bot_timestamp", "model",
                  "prompt_tokens", "completion_tokens", "total_tokens", "latency_ms", "outcome")
# Jitter between taking a read from the budget and its arrival at Meta (a busy
# machine, the network) must never tip a read over the limit: reads are spaced
# 1.5 / GRAPH_READS_PER_SECOND apart. Measured: gaps of 0.625 s arrived as
# close as 0.56 s apart on a saturated 2-core machine.
BUDGET_MARGIN = 1.5
RATE_LIMIT_BACKOFF_S = 10.0


@dataclass(frozen=True)
class UserState:
    synced_at: float | None = None
    reset_at_ms: int | None = None
    paused_until: float | None = None
    rate_notice_at: float | None = None
    budget_notice_day: str | None = None


@dataclass
class Exchange:
    """One answered batch, written with its completion: the log record and the mirror rows."""

    psid: str
    messages: Sequence[IncomingMessage]
    outcome: str  # answered, fallback, unsupported, rate-limited, over-budget, paused, reset, failed
    bot_message: str | None = None
    sent_parts: list[tuple[str, str]] = field(default_factory=list)  # (Meta's message id, text) of each part
    bot_timestamp_ms: int | None = None
    model: str | None = None
    usage: tuple[int | None, int | None, int | None] = (None, None, None)
    latency_ms: int | None = None
    synced: Sequence[MirrorRow] | None = None  # Graph history read for it: the mirror now covers the user


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def created_ms(created_time: str) -> int:
    """Graph's `2026-11-23T10:15:00+0000` in ms (0 when absent or odd)."""
    try:
        return int(datetime.strptime(created_time, "%Y-%m-%dT%H:%M:%S%z").timestamp() * 1000)
    except ValueError:
        return 0


def utc_day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d")


def utc_day_start_ms(seconds: float) -> int:
    day = datetime.fromtimestamp(seconds, timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return int(day.timestamp() * 1000)


def _clean(text: str | None) -> str | None:
    return None if text is None else clean_text(text)


def user_text(message: IncomingMessage) -> str:
    return message.text if message.text else f"[{', '.join(message.attachment_types) or 'attachment'}]"


class Conversations:
    """Mirror, user state, exchange log and Graph budget over the bot's Database."""

    def __init__(self, database: Database, tracking: bool = False, clock: Callable[[], float] = time.time):
        self._database = database
        self.clock = clock
        self._db = database.connection
        self.tracking = tracking  # new records wait for TRACKING_URL

    # -- echoes, written inside the drain's transaction (bot/storage/queue.py) -------------------
    @staticmethod
    def record_echoes(db: sqlite3.Connection, echoes: Sequence[ClassifiedEcho]) -> None:
        """(echo, by_a_human, pause_until) each: mirror it; a human's pauses the bot for that user."""
        for echo, human, pause_until in echoes:
            db.execute("INSERT OR IGNORE INTO mirror (mid, psid, author, text, at_ms) VALUES (?, ?, ?, ?, ?)",
                       (_clean(echo.mid), echo.psid, HUMAN if human else BOT, _clean(echo.text), echo.timestamp_ms))
            if human and pause_until:
                db.execute("INSERT INTO users (psid, paused_until) VALUES (?, ?) ON CONFLICT (psid) DO UPDATE"
                           " SET paused_until = MAX(COALESCE(paused_until, 0), excluded.paused_until)",
                           (echo.psid, pause_until))

    # -- the reply side -------------------------------------------------------------------------
    def user(self, psid: str) -> UserState:
        row = self._db().execute("SELECT synced_at, reset_at_ms, paused_until, rate_notice_at, budget_notice_day"
                                 " FROM users WHERE psid = ?", (psid,)).fetchone()
        return UserState(*row) if row else UserState()

    def update_user(self, psid: str, **columns: object) -> None:
        """Set columns of the user's row (reset_at_ms, rate_notice_at, budget_notice_day...)."""
        names = list(columns)
        with self._database.write() as db:
            db.execute(f"INSERT INTO users (psid, {', '.join(names)}) VALUES (?{', ?' * len(names)})"
                       f" ON CONFLICT (psid) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in names)}",
                       (psid, *columns.values()))

    def history(self, psid: str, page_id: str, limit: int, after_ms: int | None) -> list[HistoryMessage]:
        """The newest `limit` mirrored messages after `after_ms`, newest first, as Graph gives them."""
        rows = self._db().execute(
            "SELECT mid, text, author, at_ms FROM mirror WHERE psid = ? AND at_ms > ?"
            " ORDER BY at_ms DESC, rowid DESC LIMIT ?", (psid, after_ms or 0, limit)).fetchall()
        return [HistoryMessage(mid, text, psid if author == USER else page_id, iso(at_ms) or "")
                for mid, text, author, at_ms in rows]

    def take_graph_read(self, per_second: float) -> bool:
        """One Conversations API read from the Page's budget, or False when it is spent for now."""
        now = self.clock()
        row = self._db().execute("SELECT next_at FROM graph_budget WHERE id = 1").fetchone()
        if row and row[0] > now:
            return False  # spent: no write lock taken (a burst of new users asks many times a second)
        with self._database.write() as db:
            row = db.execute("SELECT next_at FROM graph_budget WHERE id = 1").fetchone()
            if row and row[0] > now:
                return False
            db.execute("INSERT OR REPLACE INTO graph_budget (id, next_at) VALUES (1, ?)",
                       (now + BUDGET_MARGIN / per_second,))
            return True

    def hold_graph_reads(self, seconds: float = RATE_LIMIT_BACKOFF_S) -> None:
        """Meta said "rate limited" (another tool may share the Page's quota): no reads for a while."""
        with self._database.write() as db:
            db.execute("INSERT OR REPLACE INTO graph_budget (id, next_at) VALUES (1, ?)", (self.clock() + seconds,))

    def messages_between(self, psid: str, start_ms: int, end_ms: int) -> int:
        """How many messages this user sent in (start, end] - every one the webhook took in."""
        return self._db().execute("SELECT COUNT(*) FROM events WHERE psid = ? AND timestamp_ms > ?"
                                  " AND timestamp_ms <= ?", (psid, start_ms, end_ms)).fetchone()[0]

    def tokens_since(self, psid: str, since_ms: int) -> int:
        return self._db().execute("SELECT COALESCE(SUM(total_tokens), 0) FROM interactions"
                                  " WHERE psid = ? AND user_timestamp >= ?", (psid, since_ms)).fetchone()[0]

    def finish(self, db: sqlite3.Connection, exchange: Exchange) -> None:
        """Inside the transaction that completes the batch: log, mirror, user state - all or nothing.
        Text and Graph's ids are cleaned once more here: a lone surrogate (from a model, a
        proxy, Graph, old data) cannot be stored, and this record must be written whatever it holds."""
        messages = exchange.messages
        if exchange.synced is not None:  # what Graph returned; from now on the mirror covers this user
            for mid, author, text, at_ms in exchange.synced:
                db.execute("INSERT OR IGNORE INTO mirror (mid, psid, author, text, at_ms) VALUES (?, ?, ?, ?, ?)",
                           (_clean(mid), exchange.psid, author, _clean(text), at_ms))
            db.execute("INSERT INTO users (psid, synced_at) VALUES (?, ?)"
                       " ON CONFLICT (psid) DO UPDATE SET synced_at = excluded.synced_at", (exchange.psid, self.clock()))
        for message in messages:
            if message.mid:
                db.execute("INSERT OR IGNORE INTO mirror (mid, psid, author, text, at_ms) VALUES (?, ?, ?, ?, ?)",
                           (message.mid, exchange.psid, USER, _clean(message.text), message.timestamp_ms))
        # After what it answers even if Meta's clock (user messages) runs ahead of ours.
        replied_at = max(exchange.bot_timestamp_ms or 0, max(m.timestamp_ms for m in messages) + 1)
        for mid, text in exchange.sent_parts:
            db.execute("INSERT OR IGNORE INTO mirror (mid, psid, author, text, at_ms) VALUES (?, ?, ?, ?, ?)",
                       (_clean(mid), exchange.psid, BOT, _clean(text), replied_at))
        db.execute(
            "INSERT INTO interactions (psid, user_message, user_timestamp, bot_message, bot_timestamp, model,"
            " prompt_tokens, completion_tokens, total_tokens, latency_ms, outcome, tracking)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (exchange.psid, clean_text("\n".join(user_text(m) for m in messages)), min(m.timestamp_ms for m in messages),
             _clean(exchange.bot_message), exchange.bot_timestamp_ms, _clean(exchange.model), *exchange.usage,
             exchange.latency_ms, exchange.outcome, "waiting" if self.tracking else None))

    # -- the log: export, tracking, retention ---------------------------------------------------
    def export(self, since_ms: int = 0, until_ms: int | None = None) -> Iterator[dict]:
        rows = self._db().execute(
            f"SELECT {', '.join(EXPORT_COLUMNS)} FROM interactions WHERE user_timestamp >= ?"
            " AND user_timestamp < ? ORDER BY user_timestamp, id", (since_ms, until_ms or 2**62))
        for row in rows:
            record = dict(zip(EXPORT_COLUMNS, row))
            record["user_timestamp"], record["bot_timestamp"] = iso(row[2]), iso(row[4])
            yield record

    def waiting_for_tracking(self, limit: int = 50) -> list[tuple[int, dict]]:
        rows = self._db().execute(
            f"SELECT id, {', '.join(EXPORT_COLUMNS)} FROM interactions WHERE tracking = 'waiting'"
            " AND track_after <= ? ORDER BY id LIMIT ?", (self.clock(), limit)).fetchall()
        return [(row[0], _tracking_record(dict(zip(EXPORT_COLUMNS, row[1:])))) for row in rows]

    def tracked(self, record_id: int) -> None:
        with self._database.write() as db:
            db.execute("UPDATE interactions SET tracking = 'sent' WHERE id = ?", (record_id,))

    def tracking_failed(self, record_id: int, base_delay: float, cap: float = 300.0) -> int:
        """Count the failure; the record waits base * 2**attempts (at most `cap`) before the next try."""
        with self._database.write() as db:
            attempts = db.execute("UPDATE interactions SET track_attempts = track_attempts + 1 WHERE id = ?"
                                  " RETURNING track_attempts", (record_id,)).fetchone()[0]
            db.execute("UPDATE interactions SET track_after = ? WHERE id = ?",
                       (self.clock() + min(cap, base_delay * 2 ** (attempts - 1)), record_id))
        return attempts

    def prune(self, older_than_days: int) -> int:
        """Delete exchanges, mirror rows and finished queue rows older than the retention.
        Records still waiting for the tracking endpoint are kept until they are sent."""
        cutoff_s = self.clock() - older_than_days * 86400
        with self._database.write() as db:
            deleted = db.execute("DELETE FROM interactions WHERE user_timestamp < ? AND tracking IS NOT 'waiting'",
                                 (int(cutoff_s * 1000),)).rowcount
            db.execute("DELETE FROM mirror WHERE at_ms < ?", (int(cutoff_s * 1000),))
            db.execute("DELETE FROM events WHERE state IN ('done', 'failed') AND finished_at < ?", (cutoff_s,))
        return deleted


def _tracking_record(record: dict) -> dict:
    """The seed's analytics contract (session_id ... engine), plus what else the log knows."""
    return {
        "session_id": record["psid"], "user_message": record["user_message"],
        "user_timestamp": iso(record["user_timestamp"]), "bot_message": record["bot_message"],
        "bot_timestamp": iso(record["bot_timestamp"]), "engine": record["model"],
        "outcome": record["outcome"], "prompt_tokens": record["prompt_tokens"],
        "completion_tokens": record["completion_tokens"], "total_tokens": record["total_tokens"],
        "latency_ms": record["latency_ms"],
    }
