"""Start-up checks run once by the gunicorn master, before it binds: each problem
stops start-up with one line saying what to do, instead of a traceback or - worse -
a second bot quietly sharing the port or the data with the first."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import tempfile
import time
from contextlib import closing

LOCK_FILE = "bot.lock"


class StartupProblem(Exception):
    """One sentence for the operator: what is wrong and what to do."""


def prepare_data_dir(path: str) -> None:
    """DATA_DIR exists (created if missing), is a folder we can write, and is private (0700):
    it holds every user's messages."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise StartupProblem(f"DATA_DIR {path} is a file, not a folder: point DATA_DIR at a folder")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StartupProblem(f"cannot create DATA_DIR {path} ({exc.strerror}): create it or set DATA_DIR "
                             "to a folder this user can write") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise StartupProblem(f"DATA_DIR {path} is not writable by this user ({exc.strerror}): fix its "
                             "owner or permissions, or set DATA_DIR to another folder") from None
    if os.stat(path).st_uid == os.getuid() and os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)


def lock_data_dir(path: str) -> int:
    """Hold DATA_DIR for this bot: a second one on the same data would answer twice.

    An flock, so it is gone the moment every process of this bot is, even after a kill -9.
    The returned descriptor must stay open for the life of the bot.
    """
    lock_path = os.path.join(path, LOCK_FILE)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StartupProblem(f"another bot (pid {holder}) is already running with DATA_DIR {path}: stop it "
                             "or give this one its own DATA_DIR") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_error_log(path: str) -> None:
    """ERROR_LOG_FILE can be appended to (it is created when missing): otherwise the first model
    failure, hours later, would be the first to find out - and its line would be lost."""
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        create = "create its folder, then the file" if exc.errno == errno.ENOENT else "create it"
        raise StartupProblem(f"cannot write ERROR_LOG_FILE {path} ({exc.strerror}): {create} for the bot's user "
                             f"(sudo install -o USER -m 600 /dev/null {path}) or set ERROR_LOG_FILE to a file "
                             "inside DATA_DIR") from None


def check_port_free(host: str, port: int, setting: str = "PORT") -> None:
    """gunicorn listens with SO_REUSEPORT, which would let a second bot share the port
    silently; a plain bind first tells them apart. `setting`: the one that names this port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupProblem(f"port {port} on {host} is already in use (another bot or server?): stop it "
                                     f"or set {setting} to a free port") from None
            raise StartupProblem(f"cannot listen on {host}:{port} ({exc.strerror}): check HOST and {setting}") from None


# Meta's longest messaging window (a user who came from an ad): an older message can no longer
# be answered by anyone, so one left waiting in SQLite is no reason to refuse a start.
ANSWERABLE_S = 7 * 86400


def check_database(url: str | None, sqlite_path: str | None = None, data_dir: str | None = None,
                   now: float | None = None, retention_days: int = 0) -> None:
    """With DATABASE_URL: PostgreSQL answers, and its schema is this code's (migrated here, once,
    before any worker starts); no acknowledged message is left behind in DATA_DIR's inbox files,
    nor (of the last 7 days, or of RETENTION_DAYS when shorter, and not in PostgreSQL) in its
    SQLite queue.
    Without: DATA_DIR was not moved to PostgreSQL (bot/storage/moved.py), and the SQLite file, if
    there is one, opens, can be written, and is not newer than this code (or newer only by
    migrations that keep this code working)."""
    from bot.storage.moved import MARKER, mark, moved_to

    if not url:
        if data_dir and (note := moved_to(data_dir)):
            raise StartupProblem(f"{note.rstrip('.')}: set DATABASE_URL to run on it. On this SQLite store the "
                                 "messages it still holds as waiting would be answered a second time; to go back to "
                                 f"it all the same, delete {os.path.join(data_dir, MARKER)}")
        if sqlite_path and os.path.lexists(sqlite_path):
            _check_sqlite(sqlite_path)
        return
    from bot.storage.inbox import inbox_files

    try:
        left = inbox_files(os.path.join(data_dir, "inbox")) if data_dir else []
    except OSError as exc:
        raise StartupProblem(f"cannot read {data_dir}/inbox ({exc.strerror}): check its owner and mode") from None
    if left:  # nothing reads them with DATABASE_URL set: those users would never be answered
        raise StartupProblem(f"{data_dir}/inbox holds {len(left)} inbox file(s) of messages acknowledged on SQLite, "
                             "which may not be queued yet: move this DATA_DIR with `python -m bot move-to-postgres "
                             f"--data-dir {data_dir} --database-url ...` first (it queues them, then copies the store)")
    import psycopg

    from bot.storage.database_url import Refused, describe, encoding_problem, one_line, scrub
    from bot.storage.postgres import MigrationBlocked
    from bot.storage.queue import PostgresQueue
    from bot.storage.sql import SchemaTooNew

    try:
        where = describe(url)
    except Refused as refusal:
        raise StartupProblem(f"DATABASE_URL: {refusal}") from None
    # A message answered on PostgreSQL is pruned there after RETENTION_DAYS: one older than that,
    # still waiting in a store moved before moves left a note, may have been answered long ago.
    window_s = min(ANSWERABLE_S, retention_days * 86400) if retention_days else ANSWERABLE_S
    recent_ms = int(((time.time() if now is None else now) - window_s) * 1000)
    waiting = _sqlite_waiting(sqlite_path, recent_ms) if data_dir and sqlite_path and not moved_to(data_dir) else []
    try:
        # One plain connection first: it fails fast, with the server's own reason (refused,
        # authentication, no such database), where the pool retries for seconds and says "timeout".
        with psycopg.connect(url, connect_timeout=5) as probe:
            problem = encoding_problem(probe, where)
            if problem is None:
                PostgresQueue(url, pool_size=2).close()
                held = probe.execute("SELECT COUNT(*) FROM events WHERE dedupe_key = ANY(%s)",
                                     (waiting,)).fetchone()[0] if waiting else 0
    except SchemaTooNew as exc:
        raise StartupProblem(str(exc)) from None
    except MigrationBlocked as exc:
        raise StartupProblem(f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the driver's or the pool's: say which and where
        raise StartupProblem(scrub(f"{where} cannot be used ({type(exc).__name__}: {one_line(exc)}); check "
                                   "DATABASE_URL and that the server runs", url)) from None
    if problem:
        raise StartupProblem(problem)
    if waiting and held == len(waiting):  # moved before the note existed (or before it was written)
        with contextlib.suppress(OSError):  # an unwritable DATA_DIR is refused on its own
            mark(data_dir, where)
    elif waiting:  # nothing reads them with DATABASE_URL set: those users would never be answered
        raise StartupProblem(f"{sqlite_path} holds {len(waiting)} message(s) of the last {_days(window_s)} acknowledged on "
                             f"SQLite and not answered yet, which {where} does not hold: move this DATA_DIR with "
                             f"`python -m bot move-to-postgres --data-dir {data_dir} --database-url ...` first, or "
                             "start it once "
                             "without DATABASE_URL to answer them, or move the file out of DATA_DIR to leave them "
                             "unanswered")


def _days(seconds: float) -> str:
    days = round(seconds / 86400)
    return "day" if days == 1 else f"{days} days"


def _sqlite_waiting(path: str, since_ms: int) -> list[str]:
    """The keys of the messages since `since_ms` a SQLite store holds as waiting or being
    answered; none when it is no bot's store (no queue in it). A store that cannot be read now
    (damaged, not readable by this user, locked exclusively by a process) is a StartupProblem: it
    may hold acknowledged messages nothing would ever answer, and nobody could tell."""
    import sqlite3

    if not os.path.isfile(path):
        return []
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone():
                return []
            return [row[0] for row in db.execute("SELECT dedupe_key FROM events WHERE state IN ('pending', 'working')"
                                                 " AND timestamp_ms >= ?", (since_ms,))]
    except sqlite3.Error as exc:
        raise StartupProblem(f"cannot tell whether {path} holds messages acknowledged on SQLite and not answered yet "
                             f"({exc}): make it readable to this user (or stop a process holding it locked), or move "
                             "the file out of DATA_DIR to leave whatever it holds unanswered") from None


def _check_sqlite(path: str) -> None:
    """The file opens as a SQLite database this user can write. Damage past its first page is
    left to /readyz (the bot still acknowledges into the inbox files); a file that is not a
    database at all, or cannot be written, would make every worker fail to boot, one traceback each."""
    import sqlite3

    from bot.storage.schema import SCHEMA
    from bot.storage.sql import SchemaTooNew, newer_schema_note
    from bot.storage.sqlite import file_min_code_version

    what = "restore it from a backup, or move it aside and start again (a new one is created)"
    if not os.access(path, os.R_OK | os.W_OK):
        raise StartupProblem(f"{path} is not readable and writable by this user: fix its owner or permissions")
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5)) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            oldest = file_min_code_version(db) if version > len(SCHEMA) else None
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):  # busy, not broken: the workers wait for it as they always do
            print(f"Warning: {path} stayed locked by another process for 5 s; its start-up checks are "
                  "skipped", file=sys.stderr)
            return
        raise StartupProblem(f"{path} cannot be opened ({exc}): {what}") from None
    except sqlite3.DatabaseError as exc:
        raise StartupProblem(f"{path} is not a SQLite database ({exc}): {what}") from None
    if version > len(SCHEMA):
        try:
            newer_schema_note(path, version, len(SCHEMA), oldest)  # the workers log it, once each
        except SchemaTooNew as exc:
            raise StartupProblem(str(exc)) from None
