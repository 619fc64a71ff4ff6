"""What the bot knows of each user, shared by every process and host: the human pause, the
reset point, when the mirror last took Graph's history, the notices already given, when the bot
last said it is one."""
from __future__ import annotations

from dataclasses import dataclass

COLUMNS = ("synced_at", "reset_at_ms", "paused_until", "rate_notice_at", "budget_notice_day", "disclosed_at",
           "thread_back_ms", "thread_away", "thread_away_ms")


@dataclass(frozen=True)
class UserState:
    synced_at: float | None = None
    reset_at_ms: int | None = None
    paused_until: float | None = None
    rate_notice_at: float | None = None
    budget_notice_day: str | None = None
    disclosed_at: float | None = None  # when the bot last said it is a bot
    thread_back_ms: int | None = None  # Meta's time of the last thread passed back by the Page inbox
    thread_away: str | None = None  # the account that passed the thread to the Page inbox, until it is back
    thread_away_ms: int | None = None  # when (our clock)


def get(db, psid: str) -> UserState:
    row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM users WHERE psid = ?", (psid,)).fetchone()
    return UserState(*row) if row else UserState()


def update(db, psid: str, **columns: object) -> None:
    """Set these columns of the user's row, creating it if needed."""
    names = [name for name in columns if name in COLUMNS]
    if len(names) != len(columns):
        raise ValueError(f"not a user column: {sorted(set(columns) - set(COLUMNS))}")
    db.execute(f"INSERT INTO users (psid, {', '.join(names)}) VALUES (?{', ?' * len(names)})"
               f" ON CONFLICT (psid) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in names)}",
               (psid, *columns.values()))


def apply(db, psid: str, changes: dict) -> None:
    """A gate's changes to the user: columns to set, and a `pause` ([until, since_ms]) that
    follows pause()'s rules - it is written after the answer was composed, and a handback or a
    person's longer pause may have landed in between."""
    changes = dict(changes)
    held = changes.pop("pause", None)
    if held is not None:
        pause(db, psid, *held)
    if changes:
        update(db, psid, **changes)


def pause(db, psid: str, until: float, answered_ms: int) -> None:
    """A person answered from the Page at `answered_ms` (Meta's time; or the user asked for
    one then): silent until `until`, never shortening a longer pause - unless the thread was
    passed back to the bot after that answer (the two deliveries can arrive in either order)."""
    db.execute("INSERT INTO users (psid, paused_until) VALUES (?, ?) ON CONFLICT (psid) DO UPDATE SET paused_until ="
               " CASE WHEN users.thread_back_ms >= ? OR users.paused_until > excluded.paused_until"
               " THEN users.paused_until ELSE excluded.paused_until END", (psid, until, answered_ms))


def thread_back(db, psid: str, at_ms: int, person_answered_ms: int | None) -> None:
    """The Page inbox passed the thread back at `at_ms`: the pause ends - unless a person
    answered after that (`person_answered_ms`, the newest such answer), which keeps it. A
    handback from before the bot's latest hand-over, delivered late, ends neither: it gave
    back an earlier thread."""
    resumes = person_answered_ms is None or person_answered_ms <= at_ms
    earlier = "users.thread_away_ms > excluded.thread_back_ms"
    db.execute("INSERT INTO users (psid, thread_back_ms) VALUES (?, ?) ON CONFLICT (psid) DO UPDATE SET"
               " thread_back_ms = CASE WHEN users.thread_back_ms > excluded.thread_back_ms THEN users.thread_back_ms"
               f" ELSE excluded.thread_back_ms END, thread_away = CASE WHEN {earlier} THEN users.thread_away END"
               + (f", paused_until = CASE WHEN {earlier} THEN users.paused_until END" if resumes else ""),
               (psid, at_ms))


# A thread is due back once a pause ran out: with HUMAN_PAUSE off none is written, and the
# thread stays the Page inbox's until it is passed back, as it did before the bot took any back.
DUE = "thread_away IS NOT NULL AND paused_until IS NOT NULL AND paused_until <= ?"


def threads_due_back(db, now: float, limit: int) -> list[tuple[str, str]]:
    """(psid, account) of the threads the bot passed to the Page inbox whose pause is over:
    nobody passed them back, and no person answered for HUMAN_PAUSE. Longest away first (a
    take-back that failed goes to the back of the line)."""
    return [tuple(row) for row in db.execute(
        f"SELECT psid, thread_away FROM users WHERE {DUE} ORDER BY thread_away_ms, psid LIMIT ?",
        (now, limit)).fetchall()]


def claim_thread_back(db, psid: str, account: str, now: float) -> bool:
    """This caller takes the thread back, if it is still due: not when a person answered since
    the list was read, nor when another host took it first."""
    return db.execute(f"UPDATE users SET thread_away = NULL WHERE psid = ? AND thread_away = ? AND {DUE}",
                      (psid, account, now)).rowcount == 1


def thread_still_away(db, psid: str, account: str, now_ms: int) -> None:
    """The take-back failed for a while (a timeout, a rate limit): due again, behind the others."""
    db.execute("UPDATE users SET thread_away = ?, thread_away_ms = ? WHERE psid = ? AND thread_away IS NULL",
               (account, now_ms, psid))
