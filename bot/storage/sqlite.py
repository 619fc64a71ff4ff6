"""SQLite as a multi-process store: one connection per thread, short write
transactions that queue fairly, migrations at start-up."""
from __future__ import annotations

import logging
import os
import random
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

from bot.storage.sql import SchemaTooNew, min_code_version, newer_schema_note

logger = logging.getLogger(__name__)

LOCK_WAIT_SECONDS = 30.0


def make_private(path: str) -> None:
    """The database holds every user's messages: 0600, whatever the umask. SQLite gives
    the -wal and -shm files the database file's mode, so creating it 0600 covers them;
    files left 0644 by an older version are tightened."""
    # Created only when missing: opening and closing a file the process already has open
    # through SQLite would drop every POSIX lock the process holds on it (a second store on
    # the same file in one process then lets another process delete the WAL under it).
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    for name in (path, path + "-wal", path + "-shm"):
        try:
            if os.stat(name).st_mode & 0o077 and os.stat(name).st_uid == os.getuid():
                os.chmod(name, 0o600)
        except FileNotFoundError:
            pass


class Database:
    """One SQLite file in WAL mode, shared by the threads and processes of one host."""

    backend = "sqlite"
    SKIP_LOCKED = ""  # one writer at a time: no row is ever locked by another transaction
    IDS_IN_JSON = "SELECT value FROM json_each(?)"  # the ids of a JSON array, e.g. '[3, 5]'

    def __init__(self, path: str, schema: Sequence[str], *, read_only: bool = False):
        self.path = path
        self.read_only = read_only
        self._local = threading.local()
        # One write transaction per process at a time: its threads wait here, not in SQLite.
        self.writer = threading.Lock()
        if read_only:  # a reader (the export) neither creates nor migrates: that is the bot's to do
            self._check_version(len(schema))
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        make_private(path)
        self._migrate(schema)

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections are not shared between threads)."""
        db = getattr(self._local, "db", None)
        if db is None and self.read_only:
            db = self._local.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            _switch_to_wal(db)
            # NORMAL in WAL mode survives a killed process; only power loss can drop the last commits.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=0")  # _begin waits, in finer steps
            # No checkpoint on commit (it syncs the files and would stall whichever webhook
            # happened to commit): checkpoint() does it, off that path.
            db.execute("PRAGMA wal_autocheckpoint=0")
            self._local.db = db
        return db

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, for reads outside a write transaction."""
        yield self.connection()

    def notify(self, db: sqlite3.Connection) -> None:
        """The doorbell (bot/storage/doorbell.py) wakes this host's reply process."""

    def close(self) -> None:
        """Connections are per thread and closed with it."""

    @contextmanager
    def claiming(self) -> Iterator[sqlite3.Connection]:
        """A claim's transaction: BEGIN IMMEDIATE already serialises claims on one host."""
        with self.write() as db:
            yield db

    def claimed(self, db: sqlite3.Connection, sql: str, params: Sequence) -> None:
        """A claim's last statement (committed as the claim's block ends)."""
        db.execute(sql, params)

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, after this process's other writers. BEGIN IMMEDIATE takes
        the write lock up front, so concurrent claims never deadlock."""
        with self.writer:
            db = self.connection()
            _begin(db)
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def checkpoint(self) -> None:
        """Fold the WAL back into the database without waiting for readers."""
        self.connection().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _check_version(self, expected: int) -> None:
        version = self.connection().execute("PRAGMA user_version").fetchone()[0]
        if version > expected:
            logger.warning(newer_schema_note(self.path, version, expected, file_min_code_version(self.connection())))
            return
        if version != expected:
            raise SchemaTooNew(f"{self.path} is at schema version {version}, this code reads version "
                               f"{expected}: start the bot once on it (without DATABASE_URL) to bring it up to date")

    def _migrate(self, schema: Sequence[str]) -> None:
        """Run the scripts this file has not seen yet; PRAGMA user_version counts them."""
        with self.write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(schema):
                logger.warning(newer_schema_note(self.path, version, len(schema), file_min_code_version(db)))
                return
            for number, script in enumerate(schema[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={number}")
            if version < len(schema) and _has_table(db, "schema_compat"):
                db.execute("DELETE FROM schema_compat")
                db.execute("INSERT INTO schema_compat (min_code_version) VALUES (?)", (min_code_version(schema),))


def file_min_code_version(db: sqlite3.Connection) -> int | None:
    """The oldest schema version whose code may use this file (None: not said, so only its own)."""
    if not _has_table(db, "schema_compat"):
        return None
    row = db.execute("SELECT MIN(min_code_version) FROM schema_compat").fetchone()
    return row[0] if row else None


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def _switch_to_wal(db: sqlite3.Connection) -> None:
    """On a new file, the first connection of each process asks for WAL at once. Switching
    needs the exclusive lock, and a connection holding its read lock while another waits to
    write is refused at once, busy timeout or not (SQLite's deadlock rule): gunicorn's
    workers and the reply process all open a first start's file in the same millisecond."""
    _while_locked(db, "PRAGMA journal_mode=WAL", pause=(0.001, 0.005))


def _begin(db: sqlite3.Connection) -> None:
    """Wait for the write lock in short steps: SQLite's busy handler sleeps 1, 2, 5, 10...
    ms between tries, far longer than another process holds the lock (~0.1 ms)."""
    _while_locked(db, "BEGIN IMMEDIATE", pause=(0.0001, 0.0005))


def _while_locked(db: sqlite3.Connection, statement: str, pause: tuple[float, float]) -> None:
    """Run statement, trying again after a random pause in that range while the database is
    locked, for up to LOCK_WAIT_SECONDS."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            db.execute(statement)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(*pause))
