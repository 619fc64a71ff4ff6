"""The tracking outbox: exchange records waiting to be POSTed to TRACKING_URL, with backoff."""
from __future__ import annotations

from bot.storage.exchanges import EXPORT_COLUMNS
from bot.storage.times import iso


# The tracking contract's optional ip_address and user_url: kept for web turns only, and sent, never exported.
TRACKED_COLUMNS = (*EXPORT_COLUMNS, "ip_address", "user_url")


def waiting(db, now: float, limit: int = 50) -> list[tuple[int, dict]]:
    rows = db.execute(f"SELECT id, {', '.join(TRACKED_COLUMNS)} FROM interactions WHERE tracking = ?"
                      " AND track_after <= ? ORDER BY id LIMIT ?", ("waiting", now, limit)).fetchall()
    return _records(rows)


def claim(db, now: float, lease: float, limit: int) -> list[tuple[int, dict]]:
    """The oldest records due, each this caller's for `lease` seconds: another host's tracker
    passes them by meanwhile, so a record is posted again only when its poster never said how
    it went (it died). One statement: a tracker that picked the same rows at the same moment
    finds them leased once the first one commits, and skips them."""
    rows = db.execute(
        "UPDATE interactions SET track_after = ? WHERE id IN (SELECT id FROM interactions WHERE tracking = ?"
        " AND track_after <= ? ORDER BY id LIMIT ?) AND tracking = ? AND track_after <= ?"
        f" RETURNING id, {', '.join(TRACKED_COLUMNS)}", (now + lease, "waiting", now, limit, "waiting", now)).fetchall()
    return _records(sorted(rows, key=lambda row: row[0]))  # RETURNING keeps no order


def release(db, record_ids: list[int], now: float) -> None:
    """Claimed records not tried after all (the endpoint failed on an earlier one): due again."""
    db.execute(f"UPDATE interactions SET track_after = ? WHERE tracking = ? AND id IN ({', '.join('?' * len(record_ids))})",
               (now, "waiting", *record_ids))


def sent(db, record_id: int) -> None:
    db.execute("UPDATE interactions SET tracking = ? WHERE id = ?", ("sent", record_id))


def failed(db, record_id: int, now: float, base_delay: float, cap: float) -> int:
    """Count the failure; the record waits base * 2**attempts (at most `cap`) before the next try."""
    attempts = db.execute("UPDATE interactions SET track_attempts = track_attempts + 1 WHERE id = ?"
                          " RETURNING track_attempts", (record_id,)).fetchone()[0]
    db.execute("UPDATE interactions SET track_after = ? WHERE id = ?",
               (now + min(cap, base_delay * 2 ** (attempts - 1)), record_id))
    return attempts


def _records(rows) -> list[tuple[int, dict]]:
    """(id, the record to post) of each row of `id, *TRACKED_COLUMNS`."""
    return [(row[0], _tracking_record(dict(zip(TRACKED_COLUMNS, row[1:])))) for row in rows]


def _tracking_record(record: dict) -> dict:
    """The source documents' analytics contract (session_id ... engine), plus what else the log knows."""
    return {
        "session_id": record["psid"], "user_message": record["user_message"],
        "user_timestamp": iso(record["user_timestamp"]), "bot_message": record["bot_message"],
        "bot_timestamp": iso(record["bot_timestamp"]), "engine": record["model"],
        "outcome": record["outcome"], "prompt_tokens": record["prompt_tokens"],
        "completion_tokens": record["completion_tokens"], "total_tokens": record["total_tokens"],
        "latency_ms": record["latency_ms"], "channel": record["channel"],
        **({"ip_address": record["ip_address"], "user_url": record["user_url"]} if record["channel"] == "web" else {}),
    }
