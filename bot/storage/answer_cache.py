"""ANSWER_CACHE_TTL: an identical prompt (same model, settings and messages) within the TTL is
answered from here, shared by every process and host, without a model call."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def key(params: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """What makes two model calls the same call."""
    return hashlib.sha256(json.dumps([params, messages], sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def get(db, cache_key: str, now: float) -> tuple[str, str | None] | None:
    """(text, model) of a fresh entry, or None."""
    row = db.execute("SELECT text, model FROM answer_cache WHERE key = ? AND expires_at > ?", (cache_key, now)).fetchone()
    return (row[0], row[1]) if row else None


def put(db, cache_key: str, text: str, model: str | None, expires_at: float) -> None:
    db.execute("INSERT INTO answer_cache (key, text, model, expires_at) VALUES (?, ?, ?, ?) ON CONFLICT (key)"
               " DO UPDATE SET text = excluded.text, model = excluded.model, expires_at = excluded.expires_at",
               (cache_key, text, model, expires_at))


def prune(db, now: float, limit: int, skip_locked: str = "") -> int:
    """At most `limit` expired answers."""
    return db.execute("DELETE FROM answer_cache WHERE key IN (SELECT key FROM answer_cache WHERE expires_at <= ?"
                      f" LIMIT ?{skip_locked})", (now, limit)).rowcount
