"""A message the user edited before the bot answered it: the waiting message takes the new text,
so the answer is to what the user now says. One the user unsent is not answered at all."""
from __future__ import annotations

import json

from messenger.text import clean_text

UNSENT = "unsent by the user"  # the error of a waiting message the user unsent


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


def withdraw_waiting_message(db, mid: str, at: float) -> bool:
    """True when a message still waiting (pending) was unsent: finished unanswered, its words and
    attachments dropped (the rest of the user's batch is answered as usual)."""
    row = db.execute("SELECT id, message FROM events WHERE dedupe_key = ? AND state = ?", (mid, "pending")).fetchone()
    if row is None:
        return False
    message = json.loads(row[1])
    message.update(text="", attachments=[], attachment_types=[])
    db.execute("UPDATE events SET state = 'done', finished_at = ?, error = ?, message = ? WHERE id = ?",
               (at, UNSENT, json.dumps(message), row[0]))
    return True
