"""The conversation mirror: every message of every conversation the bot has seen - users',
its own replies, a person's from the Page inbox - so history costs no Graph read."""
from __future__ import annotations

from typing import Collection, Iterable, Sequence

from bot.storage.times import iso
from messenger.graph import HistoryMessage
from messenger.text import clean_text

USER, BOT, HUMAN = "user", "bot", "human"
UNSENT = "unsent"  # the row of a message its user unsent: no words, in no history
MirrorRow = tuple[str, str, str, int]  # mid, author, text, at_ms


# A message already mirrored keeps its row, but a time Graph gave it (created_time: whole seconds)
# yields to the webhook's millisecond timestamp of the same second. Otherwise a message Graph
# reported first sorted before an earlier one of that second, and prompts read them swapped.
# (An UPDATE apart, not ON CONFLICT DO UPDATE: PostgreSQL locks every conflicting row for that,
# even where its WHERE is false.)
ADD_ROW = ("INSERT INTO mirror (mid, psid, author, text, at_ms) VALUES (?, ?, ?, ?, ?)"
           " ON CONFLICT (mid) DO NOTHING")
TO_WEBHOOK_TIME = ("UPDATE mirror SET at_ms = ? WHERE mid = ? AND at_ms % 1000 = 0 AND at_ms / 1000 = ?")


def add_rows(db, psid: str, rows: Iterable[MirrorRow]) -> None:
    """Mirror these messages; one already mirrored (same mid) keeps its text (TO_WEBHOOK_TIME: its
    time). Text and ids are cleaned: a lone surrogate (from a model, Graph, old data) cannot be stored."""
    for mid, author, text, at_ms in rows:
        mid = clean_text(mid)
        added = db.execute(ADD_ROW, (mid, psid, author, clean_text(text or ""), at_ms)).rowcount
        if not added and at_ms % 1000:
            db.execute(TO_WEBHOOK_TIME, (at_ms, mid, at_ms // 1000))


def history(db, psid: str, page_id: str, limit: int, after_ms: int | None) -> list[HistoryMessage]:
    """The newest `limit` mirrored messages after `after_ms`, newest first, as Graph gives them
    (`rowid` breaks ties of whole seconds: PostgreSQL's table has a column of that name)."""
    rows = db.execute("SELECT mid, text, author, at_ms FROM mirror WHERE psid = ? AND at_ms > ? AND author <> ?"
                      " ORDER BY at_ms DESC, rowid DESC LIMIT ?", (psid, after_ms or 0, UNSENT, limit)).fetchall()
    return [HistoryMessage(mid, text, psid if author == USER else page_id, iso(at_ms) or "")
            for mid, text, author, at_ms in rows]


def find_own(db, psid: str, text: str, since_ms: int, exclude: Collection[str] = ()) -> str | None:
    """The mid of a message the bot sent this user with exactly this text, at or after `since_ms`
    (its echo, mirrored when Meta delivered it), other than those in `exclude`."""
    rows = db.execute("SELECT mid FROM mirror WHERE psid = ? AND author = ? AND text = ? AND at_ms >= ?"
                      " ORDER BY at_ms, rowid", (psid, BOT, clean_text(text), since_ms)).fetchall()
    return next((row[0] for row in rows if row[0] not in exclude), None)


def activity(db, psid: str, before_ms: int) -> tuple[int | None, int | None]:
    """The newest message of the conversation before `before_ms`, and the newest a person sent
    from the Page (for the disclosure rule)."""
    # One statement: on PostgreSQL each is a round trip, and this one is made between the model's
    # answer and its send.
    previous, person = db.execute(
        "SELECT (SELECT MAX(at_ms) FROM mirror WHERE psid = ? AND at_ms < ? AND author <> ?),"
        " (SELECT MAX(at_ms) FROM mirror WHERE psid = ? AND author = ?)",
        (psid, before_ms, UNSENT, psid, HUMAN)).fetchone()
    return previous, person


def move_after(db, mids: Sequence[str], after_ms: int) -> None:
    """These messages, in this order, just after `after_ms` (history is what comes after it)."""
    for n, mid in enumerate(mids, start=1):
        db.execute("UPDATE mirror SET at_ms = ? WHERE mid = ? AND at_ms <= ?", (after_ms + n, mid, after_ms))


def after(db, psid: str, mids: Sequence[str], after_ms: int) -> set[str]:
    return {row[0] for row in db.execute(f"SELECT mid FROM mirror WHERE psid = ? AND at_ms > ? AND mid IN"
                                         f" ({','.join('?' * len(mids))})", (psid, after_ms, *mids))}


def edit(db, psid: str, mid: str, text: str) -> None:
    """The user edited one of their messages: the mirror (and so later prompts) reads the new text."""
    db.execute("UPDATE mirror SET text = ? WHERE mid = ? AND psid = ? AND author = ?", (clean_text(text), mid, psid, USER))


def forget(db, psid: str, mid: str, at_ms: int) -> None:
    """The user unsent a message: its words leave the mirror (and so later prompts). Its row stays,
    without them: an answer already being made then cannot mirror the message again (add_rows
    keeps a row it finds)."""
    if not db.execute("UPDATE mirror SET author = ?, text = '', reaction = NULL WHERE mid = ? AND psid = ?"
                      " AND author = ?", (UNSENT, mid, psid, USER)).rowcount:
        db.execute(ADD_ROW, (mid, psid, UNSENT, "", at_ms))  # not mirrored yet; a row of another author stays


def react(db, mid: str, emoji: str | None) -> None:
    """The user's reaction to a message (None: taken back)."""
    db.execute("UPDATE mirror SET reaction = ? WHERE mid = ?", (emoji, mid))


def prune(db, before_ms: int, limit: int, skip_locked: str = "") -> int:
    """At most `limit` rows older than `before_ms` (retention); `skip_locked`: the database's
    SKIP_LOCKED, so several hosts pruning at once delete different rows."""
    return db.execute(f"DELETE FROM mirror WHERE mid IN (SELECT mid FROM mirror WHERE at_ms < ? LIMIT ?{skip_locked})",
                      (before_ms, limit)).rowcount
