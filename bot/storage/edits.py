"""A message the user edited before the bot answered it: the waiting message takes the new text,
so the answer is to what the user now says. One the user unsent is not answered at all."""
from __future__ import annotations

import json
from typing import Sequence

from messenger.text import clean_text

UNSENT_ERROR = "unsent by the user"  # the error of a waiting message the user unsent (mirror.UNSENT: its row)


def edit_waiting_message(db, mid: str, text: str) -> bool:
    """True when a message still waiting (pending) had its text replaced."""
    row = db.execute("SELECT id, message FROM events WHERE dedupe_key = ? AND state = ?", (mid, "pending")).fetchone()
    if row is None:
        return False
    message = json.loads(row[1])
    message["text"] = clean_text(text)
    if message.get("kind") == "attachment" and text.strip():
        message["kind"] = "text"  # words now: answered as words
    db.execute("UPDATE events SET message = ? WHERE id = ?", (json.dumps(message), row[0]))
    return True


def remember_unsent(db, mid: str, at_ms: int) -> None:
    """The user unsent this message: kept, so it is not answered even when stored after this."""
    db.execute("INSERT INTO unsent (mid, at_ms) VALUES (?, ?) ON CONFLICT (mid) DO NOTHING", (mid, at_ms))


def withdraw_unsent(db, mids: Sequence[str], at: float) -> set[str]:
    """Of these messages, those still waiting whose user unsent them: finished unanswered, words
    and attachments dropped; returns their mids. Called when the unsend is stored and again when
    a batch is claimed, so a message stored after its unsend (Meta delivering it again, or
    another worker's inbox file drained later) is not answered either. A message whose answer
    is under way (a reply stored, a part sent or being sent) is left to finish: its send is not
    cut in half."""
    if not mids:
        return set()
    marks = ",".join("?" * len(mids))
    rows = db.execute(f"SELECT e.id, e.dedupe_key, e.message FROM events e JOIN unsent u ON u.mid = e.dedupe_key"
                      f" WHERE e.dedupe_key IN ({marks}) AND e.state = 'pending'"
                      f" AND e.reply IS NULL AND e.sending IS NULL AND e.sent_parts = 0", tuple(mids)).fetchall()
    for row in rows:
        message = json.loads(row[2])
        message.update(text="", attachments=[], attachment_types=[])
        db.execute("UPDATE events SET state = 'done', finished_at = ?, error = ?, message = ? WHERE id = ?",
                   (at, UNSENT_ERROR, json.dumps(message), row[0]))
    return {row[1] for row in rows}


def prune(db, before_ms: int, limit: int, skip_locked: str = "") -> int:
    """At most `limit` unsends older than `before_ms` (retention)."""
    return db.execute(f"DELETE FROM unsent WHERE mid IN (SELECT mid FROM unsent WHERE at_ms < ? LIMIT ?{skip_locked})",
                      (before_ms, limit)).rowcount
