"""The website chat's rows: the conversations the server issued, and the counters of its limits.
SQL written once for SQLite and PostgreSQL, like every storage module (bot/storage/sql.py)."""
from __future__ import annotations

import math
from typing import Callable


def conversation(db, conversation_id: str) -> tuple[str | None] | None:
    """(user_key,) of an issued conversation, or None when the server never issued this id."""
    row = db.execute("SELECT user_key FROM webchat_conversations WHERE id = ?", (conversation_id,)).fetchone()
    return (row[0],) if row else None


def conversation_of(db, user_key: str) -> str | None:
    row = db.execute("SELECT id FROM webchat_conversations WHERE user_key = ?", (user_key,)).fetchone()
    return row[0] if row else None


def add_conversation(db, conversation_id: str, user_key: str | None, label: str | None, now: float) -> str:
    """Issue `conversation_id`; for a signed user who got one meanwhile (another tab), theirs."""
    db.execute("INSERT INTO webchat_conversations (id, user_key, label, created_at) VALUES (?, ?, ?, ?)"
               " ON CONFLICT DO NOTHING", (conversation_id, user_key, label, now))
    return conversation_of(db, user_key) if user_key else conversation_id


def hit(db, key: str, window: float, now: float, *, calendar: bool = False) -> tuple[int, float]:
    """Count one request against `key`: (count so far in its window, seconds until that window
    ends). A window starts at the first request after the last one ended, so "3 a minute" means
    within a minute of the first - one aligned to the clock's minutes would start afresh at :00
    and let a fourth through. `calendar`: windows of the clock instead (the daily cap's UTC days)."""
    start = math.floor(now / window) * window if calendar else now
    count, start = db.execute(
        "INSERT INTO webchat_counters (key, window_start, count) VALUES (?, ?, 1) ON CONFLICT (key) DO UPDATE SET"
        " count = CASE WHEN webchat_counters.window_start > ? THEN webchat_counters.count + 1 ELSE 1 END,"
        " window_start = CASE WHEN webchat_counters.window_start > ? THEN webchat_counters.window_start"
        " ELSE excluded.window_start END RETURNING count, window_start",
        (key, start, now - window, now - window)).fetchone()
    return count, start + window - now


def spend(db, key: str, amount: int, now: float) -> None:
    """Add `amount` to `key`'s count of this UTC day (a new day starts from nothing)."""
    start = math.floor(now / 86400) * 86400
    db.execute("INSERT INTO webchat_counters (key, window_start, count) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE"
               " SET count = CASE WHEN webchat_counters.window_start = excluded.window_start"
               " THEN webchat_counters.count + excluded.count ELSE excluded.count END,"
               " window_start = excluded.window_start", (key, start, amount))


def spent(db, key: str, now: float) -> int:
    """`key`'s count of this UTC day (spend())."""
    row = db.execute("SELECT count FROM webchat_counters WHERE key = ? AND window_start = ?",
                     (key, math.floor(now / 86400) * 86400)).fetchone()
    return row[0] if row else 0


# A reservation is a row of its own (webchat_reservations): given back when its answer is logged,
# and counted for RESERVATION_S at most - one whose answer never got logged (a process killed,
# the database down at that moment) stops counting by itself instead of holding the cap until
# midnight. No answer takes this long (REPLY_DEADLINE, then the stream).
RESERVATION_S = 300.0


def take_turn(db, now: float) -> None:
    """Admissions that reserve take turns: this row's lock is held to the transaction's end, so
    on PostgreSQL (which reads only committed rows) the next one sees this one's reservation."""
    hit(db, "reserve-turn", 86400, now)


def reserve(db, request_id: str, client: str, tokens: int, now: float) -> None:
    db.execute("INSERT INTO webchat_reservations (request_id, client, tokens, at) VALUES (?, ?, ?, ?)",
               (request_id, client, tokens, now))


def release(db, request_id: str) -> None:
    db.execute("DELETE FROM webchat_reservations WHERE request_id = ?", (request_id,))


def reserved(db, now: float, client: str | None = None) -> int:
    """Tokens reserved by answers in progress: all of them, or one client's."""
    mine = "" if client is None else " AND client = ?"
    return db.execute("SELECT CAST(COALESCE(SUM(tokens), 0) AS BIGINT) FROM webchat_reservations WHERE at > ?"
                      + mine, (now - RESERVATION_S, *(() if client is None else (client,)))).fetchone()[0]


def prune(db, now: float, conversations_before: float | None = None,
          psid_of: Callable[[str], str] | None = None) -> int:
    """Counters whose window ended more than a day ago and reservations past RESERVATION_S; with
    `conversations_before`, the conversations issued before then with no exchange left
    (RETENTION_DAYS pruned them: their label may be a visitor's e-mail address). `psid_of`: a
    conversation's psid in the log."""
    deleted = db.execute("DELETE FROM webchat_counters WHERE window_start < ?", (now - 2 * 86400,)).rowcount
    deleted += db.execute("DELETE FROM webchat_reservations WHERE at < ?", (now - RESERVATION_S,)).rowcount
    if conversations_before is None or psid_of is None:
        return deleted
    old = [row[0] for row in db.execute("SELECT id FROM webchat_conversations WHERE created_at < ?",
                                        (conversations_before,)).fetchall()]
    for conversation in old:  # the psid is a hash of the id: matched here, not in SQL
        if db.execute("SELECT 1 FROM interactions WHERE psid = ? LIMIT 1", (psid_of(conversation),)).fetchone() is None:
            deleted += db.execute("DELETE FROM webchat_conversations WHERE id = ?", (conversation,)).rowcount
    return deleted
