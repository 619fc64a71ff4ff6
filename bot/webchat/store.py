"""The website chat's rows: the conversations the server issued, and the counters of its limits.
SQL written once for SQLite and PostgreSQL, like every storage module (bot/storage/sql.py)."""
from __future__ import annotations

import math


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


def hit(db, key: str, window: float, now: float) -> tuple[int, float]:
    """Count one request against `key` in the fixed window holding `now`: (count so far, seconds
    until the window ends)."""
    start = math.floor(now / window) * window
    count = db.execute(
        "INSERT INTO webchat_counters (key, window_start, count) VALUES (?, ?, 1) ON CONFLICT (key) DO UPDATE SET"
        " count = CASE WHEN webchat_counters.window_start = excluded.window_start THEN webchat_counters.count + 1"
        " ELSE 1 END, window_start = excluded.window_start RETURNING count", (key, start)).fetchone()[0]
    return count, start + window - now


def prune(db, now: float) -> int:
    """Counters whose window ended more than a day ago."""
    return db.execute("DELETE FROM webchat_counters WHERE window_start < ?", (now - 2 * 86400,)).rowcount
