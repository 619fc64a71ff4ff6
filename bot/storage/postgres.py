"""PostgreSQL as the store of several hosts: a connection pool per process, the same SQL
as SQLite (bot/storage/sql.py translates the placeholders), migrations applied once.

Set DATABASE_URL=postgresql://... and every host that shares it acts as one bot: the
webhooks write each message here before answering 200, so it survives the loss of the
host that took it in; reply processes on any host claim work under one advisory lock.
"""
from __future__ import annotations

import functools
import logging
import select
import threading
import time
import weakref
from contextlib import contextmanager, suppress
from typing import Callable, Iterator, Sequence

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

from bot.storage.sql import Cursor, Row, SchemaTooNew, min_code_version, newer_schema_note, translate

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock keys: one for migrations, one that serialises claims across hosts
# (a claim is one short transaction, like SQLite's BEGIN IMMEDIATE on one host).
MIGRATION_LOCK = 71_000_001
CLAIM_LOCK = 71_000_002
# A claim holds CLAIM_LOCK for milliseconds. A process frozen inside one (SIGSTOP, a debugger, a
# paused VM) would hold it, and every host's claims, until its master kills it 90 s on; PostgreSQL
# ends the connection of a claim idle this long instead (its transaction rolled back), so the
# others go on. A live claimant that is merely slow loses only that claim (an error, polled again).
# Frozen in another write, a process holds only its own batch's rows, which claims pass by.
CLAIM_IDLE_LIMIT_S = 5
# The claim's settings last its transaction only (set_config(..., true)), so they hold behind a
# transaction pooler too. The claim (queue.NEXT_BATCH) is planned at every claim, for the table as
# it is then: a plan kept from when the table was small (PostgreSQL's generic plan) read every
# waiting row for each candidate, 7 ms a claim at 14,000 waiting. And without bitmap scans, which
# read every waiting row and sort them when the planner thinks there are few, the oldest waiting row
# is found by walking the (state, id) index, stopping at the first that can be answered.
# Its COMMIT waits for the disk, as every other does (synchronous_commit stays on): a claim that a
# crash of PostgreSQL lost would leave its messages waiting with no batch id, and the same process
# could claim them again under the same owner name while its first thread still answered them -
# both threads' writes would pass as the owner's, and both would send.
CLAIM_BEGIN = (f"BEGIN; SELECT set_config('idle_in_transaction_session_timeout', '{CLAIM_IDLE_LIMIT_S}s', true),"
               " set_config('plan_cache_mode', 'force_custom_plan', true),"
               f" set_config('enable_bitmapscan', 'off', true), pg_advisory_xact_lock({CLAIM_LOCK})")
CHANNEL = "bot_queue"  # NOTIFY on new work, LISTENed to by every reply process
CONNECT_TIMEOUT_S = 5
# psycopg_pool retries a failed connection 1, 2, 4, 8... s apart until reconnect_timeout (5 min
# by default): after a 20 s outage the first query came 10 s after PostgreSQL was back, after a
# minute's up to half a minute. Given up after this long, the next caller starts a new attempt
# at once (the pool grows again on demand), so no wait for a connection grows past a few seconds.
RECONNECT_GIVE_UP_S = 4.0
# A migration that changes a table waits at most this long for each lock it needs, then gives way
# and tries again (MIGRATION_TRIES in all). Without a limit, one long transaction on the table (an
# older host's query, a psql session left open) would hold the migration, and every statement of
# every host queued behind its request - webhooks included - for as long as it lasted.
MIGRATION_LOCK_WAIT_S = 2.0
MIGRATION_TRIES = 5
# The pools' connections' TCP settings. The intake's connection is never checked before use, the
# others only as QuietCheck says: a server that vanished without closing them (a host lost, a network
# cut) must fail a statement within seconds, not the kernel's ~15 minutes; and the probes keep a
# NAT's or load balancer's idle timeout from forgetting a connection the pool holds.
TCP_SETTINGS = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
                "tcp_user_timeout": 10_000}
# A connection the pool has not handed out for this long gets the full check before its next use.
QUIET_CHECK_S = 30.0


class MigrationBlocked(RuntimeError):
    """The schema could not be migrated: a table it changes stayed locked by another session."""


def _roll_back(conn: psycopg.Connection) -> None:
    """The transaction a claim began by its own BEGIN, ended (a broken connection: the pool replaces it)."""
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        with suppress(psycopg.Error):
            conn.execute("ROLLBACK")


class QuietCheck:
    """The pool's check of a connection it hands out (raises when it is broken). psycopg_pool's
    own check is an empty query, a round trip before every transaction (about ten per reply); this
    one runs it only when the connection may have died unseen:
    - the server said something since it was last handed out: a live server sends an idle
      connection nothing, while one that a restart of PostgreSQL, pg_terminate_backend or an idle
      timeout ended has end-of-file waiting (and usually its last message);
    - it was not handed out for QUIET_CHECK_S: a connection a network dropped without a word (a
      host rebooted, a NAT that forgot it) shows nothing until it is written to, and the empty
      query meets that here rather than the caller's statement.
    Within QUIET_CHECK_S of its last use, a connection dropped silently is found by the caller's
    statement (an error, retried as any failed statement is). README, "Benchmark".

    A connection found dead calls `when_dead` (the pool's drain): after a restart every idle
    connection is dead, and psycopg_pool waits 1, 2, 4 s before trying each next one - with 8 in
    the pool, the first two callers after a restart of PostgreSQL got PoolTimeout after 5 s."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, quiet_s: float = QUIET_CHECK_S):
        self.clock, self.quiet_s = clock, quiet_s
        self.when_dead: Callable[[], None] | None = None
        self._handed_out_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, conn: psycopg.Connection) -> None:
        now, last = self.clock(), self._handed_out_at.get(conn)
        try:
            if conn.broken or conn.closed:
                raise psycopg.OperationalError("the connection is broken")
            if last is None or now - last >= self.quiet_s or self._heard(conn):
                ConnectionPool.check_connection(conn)
        except psycopg.Error:
            if self.when_dead is not None:
                self.when_dead()
            raise
        self._handed_out_at[conn] = now

    @staticmethod
    def _heard(conn: psycopg.Connection) -> bool:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE or not hasattr(select, "poll"):
            return True  # not as the pool leaves it, or no poll() (Windows): the full check
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))


def _row_factory(cursor: psycopg.Cursor):
    # Read off the result, not cursor.description: that makes a Column object for each column at
    # every statement (bench/pg_phases.py's row_names: 16 -> 3 µs of CPU for seven columns). Per
    # reply (~11 ms of CPU) that is a fraction of a millisecond: under the burst benchmark's 0.5 ms.
    result = cursor.pgresult
    fields = result.nfields if result is not None else 0
    names = _column_numbers(tuple(result.fname(i) for i in range(fields))) if fields else {}
    return lambda values: Row(values, names)


@functools.lru_cache(maxsize=1024)
def _column_numbers(names: tuple[bytes, ...]) -> dict[str, int]:
    """Shared by the rows of every statement with these columns: Row only reads it. (A COPY's
    result has columns without names: no row is made of it.)"""
    return {name.decode(): i for i, name in enumerate(names) if name is not None}


class PostgresDatabase:
    """The pool and the schema of one PostgreSQL database."""

    backend = "postgres"
    NOTIFY_SELECT = f"SELECT pg_notify('{CHANNEL}', '')"  # NOTIFY inside another statement
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"  # rows another transaction is writing are passed by
    IDS_IN_JSON = "SELECT value::bigint FROM json_array_elements_text(?::json) AS ids(value)"  # '[3, 5]'

    def __init__(self, url: str, schema: Sequence[str], *, max_size: int = 10, read_only: bool = False,
                 wait: float = CONNECT_TIMEOUT_S, lock_wait: float = MIGRATION_LOCK_WAIT_S,
                 pause: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.url = url
        self.read_only = read_only
        # `wait`: how long a caller waits for a connection. A webhook waits 1 s, then answers 503
        # (Meta retries); a reply thread can wait longer.
        check = QuietCheck(clock)
        self.pool = ConnectionPool(
            url, min_size=1, max_size=max_size, open=False, name="bot", timeout=wait,
            reconnect_timeout=RECONNECT_GIVE_UP_S,
            kwargs={"autocommit": True, "row_factory": _row_factory, "connect_timeout": CONNECT_TIMEOUT_S,
                    **TCP_SETTINGS},
            # A connection left broken by a restart of PostgreSQL is found and replaced here.
            check=check,
        )
        check.when_dead = self.pool.drain  # the others are likely dead too (a restart): new ones for all
        self.pool.open(wait=False)
        self._intake_pool: ConnectionPool | None = None
        self._intake_lock = threading.Lock()
        self._closed = False
        try:
            if read_only:
                self._check_version(len(schema))
            else:
                self._migrate(schema, lock_wait, pause)
        except BaseException:  # refused (too new, blocked, unreachable): no pool left open behind
            self.pool.close()
            raise

    def close(self) -> None:
        self.pool.close()
        with self._intake_lock:
            self._closed = True
            if self._intake_pool is not None:
                self._intake_pool.close()

    @contextmanager
    def write(self) -> Iterator[Cursor]:
        """One transaction; committed when the block ends, rolled back if it raises."""
        with self.pool.connection() as conn, conn.transaction():
            yield Cursor(conn)

    @contextmanager
    def intake(self) -> Iterator[Cursor]:
        """The webhooks' group-commit connection (autocommit: a statement is its own transaction),
        one per process and not checked before each use - that check is a round trip per group.
        A connection a restart of PostgreSQL broke fails its one group (503, Meta delivers
        again) and is replaced."""
        with self._intake_lock:
            if self._closed:
                raise psycopg.OperationalError("the database is closed")
            if self._intake_pool is None:
                self._intake_pool = ConnectionPool(
                    self.url, min_size=1, max_size=1, open=False, name="bot-intake", timeout=1.0,
                    reconnect_timeout=RECONNECT_GIVE_UP_S,
                    kwargs={"autocommit": True, "row_factory": _row_factory, "connect_timeout": CONNECT_TIMEOUT_S,
                            **TCP_SETTINGS})
                self._intake_pool.open(wait=False)
        with self._intake_pool.connection() as conn:
            yield Cursor(conn)

    @contextmanager
    def read(self) -> Iterator[Cursor]:
        with self.pool.connection() as conn:
            yield Cursor(conn)

    @contextmanager
    def claiming(self) -> Iterator[Cursor]:
        """A claim's transaction. Claims from every host take turns under one lock, so one user's
        messages go to one reply process."""
        # BEGIN and the lock are one message (a simple query of two statements, no parameters): one
        # round trip, and PostgreSQL starts the idle limit once it has answered it (ReadyForQuery).
        # Each of a claim's other statements is answered so too, as psycopg sends them outside
        # pipeline mode (a Sync after each). Pipelined, a claimant frozen between sending a
        # statement and the Sync that follows would hold the lock - every host's claims - with no
        # limit running (tests/test_postgres.py, frozen claimant).
        with self.pool.connection() as conn:
            try:
                conn.execute(CLAIM_BEGIN)
                yield Cursor(conn)
                status = conn.info.transaction_status
                if status == TransactionStatus.INERROR:  # a COMMIT would roll back without a word
                    raise psycopg.errors.InFailedSqlTransaction("the claim's transaction failed")
                if status == TransactionStatus.INTRANS:  # not ended by claimed()
                    conn.execute("COMMIT")
            except BaseException:
                _roll_back(conn)
                raise

    def claimed(self, db: Cursor, sql: str, params: Sequence) -> None:
        """A claim's last statement and its COMMIT, as one message: one round trip fewer with the
        lock held (every host's claims wait for it). Its parameters are bound here, as psycopg's
        ClientCursor binds them (a message of two statements takes no parameters). The last
        statement of the claim's block: the transaction has ended (on SQLite, at the block's end)."""
        with psycopg.ClientCursor(db.conn) as cursor:
            statement = cursor.mogrify(translate(sql), params)
        db.conn.execute(f"{statement}; COMMIT")

    def notify(self, db: Cursor) -> None:
        """Wake the reply processes of every host, when this transaction commits."""
        db.execute(f"NOTIFY {CHANNEL}")

    def checkpoint(self) -> None:
        """PostgreSQL checkpoints by itself."""

    def _check_version(self, expected: int) -> None:
        with self.read() as db:
            version, oldest = _version(db), _min_code_version(db)
        if version > expected:
            logger.warning(newer_schema_note("the database", version, expected, oldest))
            return
        if version != expected:
            raise SchemaTooNew(f"the database is at schema version {version}, this code reads version {expected}")

    def _migrate(self, schema: Sequence[str], lock_wait: float, pause: Callable[[float], None]) -> None:
        """Missing versions, once, even when several hosts start at the same moment; tried again
        (`pause` seconds apart: 1, 2, 3...) when a table stayed locked longer than `lock_wait`."""
        for attempt in range(1, MIGRATION_TRIES + 1):
            try:
                return self._migrate_once(schema, lock_wait)
            except psycopg.errors.LockNotAvailable as error:  # rolled back: nothing was changed
                if attempt == MIGRATION_TRIES:
                    raise MigrationBlocked(
                        f"the schema could not be migrated to version {len(schema)}: another session held a table "
                        f"it changes for over {lock_wait:g} s in each of {MIGRATION_TRIES} tries (a long "
                        "transaction: see pg_stat_activity); nothing was changed, and the hosts running go on. "
                        "Start again once it has ended") from error
                logger.warning("the schema migration waited %g s for a lock another session holds: given way, "
                               "trying again (%d of %d)", lock_wait, attempt + 1, MIGRATION_TRIES)
                pause(attempt)

    def _migrate_once(self, schema: Sequence[str], lock_wait: float) -> None:
        with self.write() as db:
            # Another host migrating is waited for, however long it takes (each migrates once) ...
            db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            # ... a table's lock only so long: the wait queues every other statement on the table.
            db.execute("SELECT set_config('lock_timeout', ?, true)", (f"{int(lock_wait * 1000)}ms",))
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = _version(db)
            if version > len(schema):
                logger.warning(newer_schema_note("the database", version, len(schema), _min_code_version(db)))
                return
            for number, script in enumerate(schema[version:], start=version + 1):
                db.script(script)
                logger.info("database schema migrated to version %d", number)
            if version < len(schema):
                db.execute("DELETE FROM schema_version")
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (len(schema),))
                if _has_min_code_version(db):
                    db.execute("UPDATE schema_version SET min_code_version = ?", (min_code_version(schema),))


def _has_min_code_version(db: Cursor) -> bool:
    return db.execute("SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()"
                      " AND table_name = 'schema_version' AND column_name = 'min_code_version'").fetchone() is not None


def _min_code_version(db: Cursor) -> int | None:
    """The oldest schema version whose code may use the database (None: not said, so only its own)."""
    if not _has_min_code_version(db):
        return None
    row = db.execute("SELECT MIN(min_code_version) FROM schema_version").fetchone()
    return row[0] if row else None


def _version(db: Cursor) -> int:
    try:
        row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return row[0] or 0


class PostgresDoorbell:
    """LISTEN/NOTIFY between hosts: a commit that adds work wakes every reply process.
    The dispatcher polls as well, so a missed notification costs one poll interval."""

    def __init__(self, url: str):
        self.url = url
        self._rung = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def listen(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._listen, name="doorbell", daemon=True)
            self._thread.start()

    def ring(self) -> None:
        """The webhook side notifies inside its own transaction (PostgresDatabase.notify)."""
        self._rung.set()

    def wait(self, timeout: float) -> bool:
        rung = self._rung.wait(timeout)
        self._rung.clear()
        return rung

    def close(self) -> None:
        self._stop.set()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self._rung.set()
            except psycopg.Error as exc:  # PostgreSQL restarting: poll meanwhile, listen again
                logger.warning("doorbell: %s; listening again in 1 s", type(exc).__name__)
                self._stop.wait(1.0)
