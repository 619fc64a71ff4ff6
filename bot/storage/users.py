"""What the bot knows of each user, shared by every process and host: the human pause, the
reset point, when the mirror last took Graph's history, the notices already given, when the bot
last said it is one."""
from __future__ import annotations

from dataclasses import dataclass

COLUMNS = ("synced_at", "reset_at_ms", "paused_until", "rate_notice_at", "budget_notice_day", "disclosed_at",
           "thread_back_ms", "thread_away", "thread_away_ms", "thread_take_at")


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
    thread_take_at: float | None = None  # when a take-back may next be tried (None: now)


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
               f" ELSE excluded.thread_back_ms END, thread_away = CASE WHEN {earlier} THEN users.thread_away END,"
               f" thread_take_at = CASE WHEN {earlier} THEN users.thread_take_at END"
               + (f", paused_until = CASE WHEN {earlier} THEN users.paused_until END" if resumes else ""),
               (psid, at_ms))


# A thread is due back once a pause ran out: with HUMAN_PAUSE off none is written, and the
# thread stays the Page inbox's until it is passed back, as it did before the bot took any back.
# thread_take_at: a host's claim on the take-back (or a wait after a failure) until then.
DUE = ("thread_away IS NOT NULL AND paused_until IS NOT NULL AND paused_until <= ?"
       " AND (thread_take_at IS NULL OR thread_take_at <= ?)")


def threads_due_back(db, now: float, limit: int) -> list[tuple[str, str]]:
    """(psid, account) of the threads the bot passed to the Page inbox whose pause is over:
    nobody passed them back, and no person answered for HUMAN_PAUSE. Never tried first, then
    the longest waiting."""
    return [tuple(row) for row in db.execute(
        f"SELECT psid, thread_away FROM users WHERE {DUE} ORDER BY COALESCE(thread_take_at, 0), thread_away_ms, psid"
        " LIMIT ?", (now, now, limit)).fetchall()]


def claim_thread_back(db, psid: str, account: str, now: float, hold: float) -> bool:
    """This caller takes the thread back, if it is still due: not when a person answered since
    the list was read, nor when another host claimed it. The claim lasts `hold` seconds: a
    process that dies before Graph answers leaves it to be tried again then."""
    return db.execute(f"UPDATE users SET thread_take_at = ? WHERE psid = ? AND thread_away = ? AND {DUE}",
                      (now + hold, psid, account, now, now)).rowcount == 1


def thread_taken_back(db, psid: str, account: str) -> None:
    """The bot has the thread again (or can never have it: the user is gone)."""
    db.execute("UPDATE users SET thread_away = NULL, thread_take_at = NULL WHERE psid = ? AND thread_away = ?",
               (psid, account))
