"""A message the user edited before the bot answered it: the waiting message takes the new text,
so the answer is to what the user now says. One the user unsent is not answered at all."""
from __future__ import annotations

import json
from typing import Sequence

from messenger.text import clean_text

# A message waiting with no answer under way: an edit still changes it, an unsend still withdraws it
# (column names of `events` alone: `edited` and `unsent`, joined to it, have none of them).
STILL_WAITING = "state = 'pending' AND reply IS NULL AND sending IS NULL AND sent_parts = 0"
UNSENT_ERROR = "unsent by the user"  # the error of a waiting message the user unsent (mirror.UNSENT: its row)


def remember_edit(db, psid: str, mid: str, text: str, at_ms: int) -> str:
    """The user edited this message: kept, so the message takes the text even when stored after
    the edit. Of several edits the latest stands, in whatever order they came; returns its text.
    Kept by user and mid: an edit naming another user's message is applied to nothing."""
    db.execute("INSERT INTO edited (psid, mid, text, at_ms) VALUES (?, ?, ?, ?) ON CONFLICT (psid, mid) DO UPDATE"
               " SET text = excluded.text, at_ms = excluded.at_ms WHERE excluded.at_ms >= edited.at_ms",
               (psid, mid, clean_text(text), at_ms))
    return db.execute("SELECT text FROM edited WHERE psid = ? AND mid = ?", (psid, mid)).fetchone()[0]


def apply_edits(db, mids: Sequence[str]) -> dict[str, str]:
    """Of these messages, those still waiting whose user edited them take the edit's text; returns
    their mids and new message JSON. Called when the edit is stored and again when a batch is
    claimed, so a message stored after its edit (Meta delivering it again, or another worker's
    inbox file drained later) is answered as edited too. One whose answer is under way keeps the
    words that answer was made from."""
    if not mids:
        return {}
    marks = ",".join("?" * len(mids))
    rows = db.execute(f"SELECT e.id, e.dedupe_key, e.message, d.text FROM events e"
                      f" JOIN edited d ON d.mid = e.dedupe_key AND d.psid = e.psid"
                      f" WHERE e.dedupe_key IN ({marks}) AND {STILL_WAITING}", tuple(mids)).fetchall()
    changed = {}
    for row in rows:
        row_id, mid, text = row[0], row[1], row[3]
        message = json.loads(row[2])
        if message.get("text") == text:
            continue
        message["text"] = text
        if message.get("kind") == "attachment" and text.strip():
            message["kind"] = "text"  # words now: answered as words
        # The conditions again: on PostgreSQL a claim may have taken the row since it was read,
        # and this UPDATE, having waited for it, checks them afresh.
        if db.execute(f"UPDATE events SET message = ? WHERE id = ? AND {STILL_WAITING}",
                      (json.dumps(message), row_id)).rowcount:
            changed[mid] = json.dumps(message)
    return changed


def latest_texts(db, psid: str, mids: Sequence[str]) -> dict[str, str]:
    """The latest edit of each of these messages of the user's that has one: what the mirror
    keeps of a message edited while its answer was being made (the answer is to the words it was
    made from)."""
    if not mids:
        return {}
    marks = ",".join("?" * len(mids))
    return dict(db.execute(f"SELECT mid, text FROM edited WHERE psid = ? AND mid IN ({marks})",
                           (psid, *mids)).fetchall())


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
                      f" WHERE e.dedupe_key IN ({marks}) AND {STILL_WAITING}", tuple(mids)).fetchall()
    withdrawn = set()
    for row in rows:
        message = json.loads(row[2])
        message.update(text="", attachments=[], attachment_types=[])
        # Checked again, as in apply_edits: a row claimed in between is answered, not withdrawn.
        if db.execute(f"UPDATE events SET state = 'done', finished_at = ?, error = ?, message = ? WHERE id = ?"
                      f" AND {STILL_WAITING}", (at, UNSENT_ERROR, json.dumps(message), row[0])).rowcount:
            withdrawn.add(row[1])
    return withdrawn


def prune(db, table: str, before_ms: int, limit: int, skip_locked: str = "") -> int:
    """At most `limit` unsends or edits (`table`) older than `before_ms` (retention)."""
    assert table in ("unsent", "edited")
    return db.execute(f"DELETE FROM {table} WHERE mid IN (SELECT mid FROM {table} WHERE at_ms < ? LIMIT ?{skip_locked})",
                      (before_ms, limit)).rowcount
