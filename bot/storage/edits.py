"""A message the user edited before the bot answered it: the waiting message takes the new text,
so the answer is to what the user now says. One the user unsent is not answered at all."""
from __future__ import annotations

import json
from typing import Sequence

from messenger.text import clean_text

UNSENT_ERROR = "unsent by the user"  # the error of a waiting message the user unsent (mirror.UNSENT: its row)


def remember_edit(db, mid: str, text: str, at_ms: int) -> str:
    """The user edited this message: kept, so the message takes the text even when stored after
    the edit. Of several edits the latest stands, in whatever order they came; returns its text."""
    db.execute("INSERT INTO edited (mid, text, at_ms) VALUES (?, ?, ?) ON CONFLICT (mid) DO UPDATE"
               " SET text = excluded.text, at_ms = excluded.at_ms WHERE excluded.at_ms >= edited.at_ms",
               (mid, clean_text(text), at_ms))
    return db.execute("SELECT text FROM edited WHERE mid = ?", (mid,)).fetchone()[0]


def apply_edits(db, mids: Sequence[str]) -> dict[str, str]:
    """Of these messages, those still waiting whose user edited them take the edit's text; returns
    their mids and new message JSON. Called when the edit is stored and again when a batch is
    claimed, so a message stored after its edit (Meta delivering it again, or another worker's
    inbox file drained later) is answered as edited too. One whose answer is under way keeps the
    words that answer was made from."""
    if not mids:
        return {}
    marks = ",".join("?" * len(mids))
    rows = db.execute(f"SELECT e.id, e.dedupe_key, e.message, d.text FROM events e JOIN edited d ON d.mid = e.dedupe_key"
                      f" WHERE e.dedupe_key IN ({marks}) AND e.state = 'pending'"
                      f" AND e.reply IS NULL AND e.sending IS NULL AND e.sent_parts = 0", tuple(mids)).fetchall()
    changed = {}
    for row in rows:
        row_id, mid, text = row[0], row[1], row[3]
        message = json.loads(row[2])
        if message.get("text") == text:
            continue
        message["text"] = text
        if message.get("kind") == "attachment" and text.strip():
            message["kind"] = "text"  # words now: answered as words
        changed[mid] = json.dumps(message)
        db.execute("UPDATE events SET message = ? WHERE id = ?", (changed[mid], row_id))
    return changed


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


def prune(db, table: str, before_ms: int, limit: int, skip_locked: str = "") -> int:
    """At most `limit` unsends or edits (`table`) older than `before_ms` (retention)."""
    assert table in ("unsent", "edited")
    return db.execute(f"DELETE FROM {table} WHERE mid IN (SELECT mid FROM {table} WHERE at_ms < ? LIMIT ?{skip_locked})",
                      (before_ms, limit)).rowcount
