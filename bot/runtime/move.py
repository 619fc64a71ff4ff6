"""`python -m bot move-to-postgres`: "moving in" - a SQLite DATA_DIR's store copied into
PostgreSQL, so a Page owner moves to DATABASE_URL without losing the queue, the mirror
or the exchange log.

  1. DATA_DIR's lock is taken (bot/runtime/preflight.py), and those of the reply process and
     the website chat process: a bot still running on it would take in messages after the
     copy, and they would be lost to PostgreSQL; a reply process left finishing its replies
     by a kill -9 of gunicorn would record them in SQLite only, and PostgreSQL would answer
     them again (a website chat's answers would be missing from the log).
  2. SQLite is opened read-only (an out-of-date file is refused: the bot migrates it).
  3. PostgreSQL is opened (its schema created or migrated) and must hold no message, mirror
     row, user or exchange record: merging two stores would clash on ids and on the mirror's
     order, and replacing one would destroy a live store. Nothing is forced.
  4. Inbox files (messages the webhooks acknowledged to Meta but the reply process had not
     yet drained) are drained into SQLite first, as the bot does on start: Meta will not
     deliver them again. Starting the bot to drain them instead would take in new ones.
  5. events (every state, ids kept), mirror (SQLite's rowid kept as PostgreSQL's `rowid`,
     so same-millisecond rows keep their order), users, interactions (ids kept),
     graph_budgets, dead_letters (payload bytes as they are) and answer_cache are copied
     in ONE PostgreSQL transaction, sequences moved past the copied ids: a failure
     leaves the target as it was. dispatchers (per process) and inbox_offsets (SQLite's
     own) are not copied; a table this code does not know stops the move.

  6. Once committed, a note goes into DATA_DIR (bot/storage/moved.py): the bot then refuses to
     start on that SQLite store, whose waiting messages PostgreSQL answers.

The SQLite database stays (only the drain writes to it): a backup. Going back to it means
deleting the note, and its waiting messages are answered a second time.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys

from bot.runtime.preflight import LOCK_FILE, StartupProblem, lock_data_dir
from bot.storage import inbox
from bot.storage.database_url import Refused, describe, encoding_problem, one_line, scrub
from bot.storage.instance import REPLY_LOCK, WEBCHAT_LOCK, LockHeld, lock_if_present
from bot.storage.moved import MARKER, mark, moved_to
from bot.storage.queue import QUARANTINE, InboxUnreadable, PostgresQueue, SQLiteQueue, within_key_limit
from bot.storage.sql import SchemaTooNew
from config import database_path, read_environment

HELP = "copy a SQLite DATA_DIR (queue, mirror, exchange log, users) into an empty PostgreSQL database"
DESCRIPTION = (
    "Moving in: copy the bot's SQLite store in DATA_DIR into PostgreSQL (DATABASE_URL), in one "
    "transaction - a failure leaves PostgreSQL as it was. Stop the bot first: a bot running on DATA_DIR "
    "is refused. Inbox files the bot acknowledged but had not yet queued are drained into SQLite first. "
    "The target must hold no messages, mirror rows, users, exchange records, website conversations or "
    "knowledge base; there is no --force: "
    "merging two stores would clash on message and record ids and on the order of the mirror, and "
    "overwriting would destroy a live store - point DATABASE_URL at a new, empty database (or empty it "
    "yourself). The SQLite database stays in DATA_DIR as a backup. Then set DATABASE_URL and start the bot.")

# Copied in this order (each one SQLite's file has); the mirror's `rowid` is SQLite's
# implicit one (insertion order).
TABLES = ("events", "mirror", "users", "interactions", "graph_budgets", "dead_letters", "answer_cache",
          "webchat_conversations", "knowledge_sources", "knowledge_chunks", "knowledge_version", "unsent",
          "edited", "knowledge_translations")
# Not copied: the reply processes' heartbeats (each process's own, renewed by the new ones),
# SQLite's inbox bookkeeping (PostgreSQL's webhooks write to events directly) and the website
# chat's rate-limit counters (windows of a minute or a day: they start afresh), and SQLite's
# full-text index of the knowledge base (PostgreSQL's is a column it computes itself), and which
# code may use the file (PostgreSQL keeps its own, in schema_version), and the website chat's
# reservations (answers in progress, minutes long at most).
SKIPPED = ("dispatchers", "inbox_offsets", "webchat_counters", "knowledge_fts", "knowledge_fts_config",
           "knowledge_fts_data", "knowledge_fts_docsize", "knowledge_fts_idx", "schema_compat",
           "webchat_reservations")
# Rows in any of these mean the target is someone's store already.
MUST_BE_EMPTY = ("events", "mirror", "users", "interactions", "dead_letters", "webchat_conversations",
                 "knowledge_sources", "knowledge_chunks")
SEQUENCES = {"events": "id", "mirror": "rowid", "interactions": "id", "dead_letters": "id", "knowledge_sources": "id",
             "knowledge_chunks": "id"}
CHUNK = 1000
CONNECT_TIMEOUT = 5
LOCK_TIMEOUT = "10s"  # a target busy with a live bot is refused, not waited for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="the bot's DATA_DIR (default: DATA_DIR from the environment or .env)")
    parser.add_argument("--database-url", help="the PostgreSQL to move into (default: DATABASE_URL from the "
                        "environment or .env, which keeps the password out of the process list)")


def main(args: argparse.Namespace) -> int:
    env = read_environment()
    data_dir = args.data_dir or env.get("DATA_DIR", "data")
    url = args.database_url or env.get("DATABASE_URL") or ""
    # psycopg warns as a Ctrl-C unwinds its pipeline ("error ignored terminating ..."), through
    # logging's last-resort handler: this command says what happened in its own one line.
    logging.getLogger("psycopg").addHandler(logging.NullHandler())
    try:
        report = move(data_dir, url)
    except Refused as refusal:
        print(f"not moved: {scrub(str(refusal), url)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the copy is one transaction: rolled back with the connection
        print("not moved: interrupted; PostgreSQL is as it was (the copy is one transaction, rolled back) "
              "and the SQLite store stays as the bot left it - run this again", file=sys.stderr)
        return 130
    finally:
        late = _LateInterrupt.release()
    print(scrub(report, url))
    if late:
        print("(Ctrl-C came once every row was copied: the copy was committed, and is moved)")
    return 0


class _LateInterrupt:
    """A first Ctrl-C from the commit on is noted, not raised: raised in the moment after the
    commit, it would report "PostgreSQL is as it was" over a store that was moved. A second one
    stops the command all the same (a commit that hangs: a standby or the network gone)."""
    came = False

    @classmethod
    def hold(cls) -> None:
        cls.came = False
        signal.signal(signal.SIGINT, cls._note)

    @classmethod
    def release(cls) -> bool:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return cls.came

    @classmethod
    def _note(cls, *_args) -> None:
        if cls.came:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("stopped while committing: whether the store was moved is unknown - `python -m bot "
                  "move-to-postgres` again says (a store already there is refused)", file=sys.stderr)
            os._exit(130)
        cls.came = True
        print("every row is copied, committing: Ctrl-C again to stop without knowing whether it was moved",
              file=sys.stderr, flush=True)


def move(data_dir: str, url: str) -> str:
    """Copy DATA_DIR's store into PostgreSQL at `url`; the report to print, or Refused."""
    if not url:
        raise Refused("no PostgreSQL to move into: set DATABASE_URL (in the environment or .env) or pass "
                      "--database-url")
    where = describe(url)
    path = database_path(data_dir)
    if not os.path.isfile(path):
        raise Refused(f"no database at {path}: set DATA_DIR (or --data-dir) to the bot's data folder")
    if note := moved_to(data_dir):
        raise Refused(f"{note.rstrip('.')}: nothing to move again (delete {os.path.join(data_dir, MARKER)} to move "
                      "this store once more)")
    locks = take_lock(data_dir)
    try:
        try:
            source = SQLiteQueue(path, read_only=True)
            with source._read() as sdb:
                known_tables(sdb)  # before anything is touched
        except (sqlite3.DatabaseError, SchemaTooNew) as error:
            raise Refused(f"cannot read {path}: {error}") from None
        target = open_target(url, where)
        try:
            with target._read() as db:
                refuse_unless_empty(db, where)
            notes = drain_inbox(data_dir, path)
            counts, states, replaced = copy_all(source, target, where)
            try:
                marked = mark(data_dir, where)
            except OSError as error:
                marked = None
                notes.append(f"WARNING: could not leave the note {os.path.join(data_dir, MARKER)} "
                             f"({error.strerror}): do not start the bot on this SQLite store again, or it answers "
                             "the messages it holds as waiting a second time")
        finally:
            target.close()
    finally:
        for lock in locks:
            os.close(lock)
    lines = [f"moved {path} into {where}:"]
    width = max(map(len, counts), default=0) + 2  # the longest table name (webchat_conversations) too
    lines += [f"  {table:<{width}}{count:>9}" + (f"  ({states})" if table == "events" and states else "")
              for table, count in counts.items()]
    lines.append("  not copied: dispatchers (each process's own), inbox_offsets (SQLite's inbox bookkeeping)")
    if replaced:
        lines.append(f"  {replaced} row(s) held text with a NUL character, which PostgreSQL cannot store: "
                     "each NUL became U+FFFD")
    lines += notes
    lines.append(f"Next: set DATABASE_URL (in .env) to this database and start the bot. {path} stays as a "
                 "backup: do not run the bot on it again, or the two stores part ways"
                 + (f" ({marked} now stops a start on it without DATABASE_URL)." if marked else "."))
    return "\n".join(lines)


def take_lock(data_dir: str) -> tuple[int, ...]:
    """DATA_DIR's lock, and those of the reply process and the website chat process: either
    outlives a master killed with kill -9 while it finishes its answers, and what it records
    after the copy would be missing from PostgreSQL - where those messages would be answered again."""
    try:
        lock = lock_data_dir(data_dir)
    except StartupProblem:
        raise Refused(f"a bot (pid {lock_holder(data_dir)}) is still running on DATA_DIR {data_dir}: stop it "
                      "first, or messages it takes in after the copy would be lost to PostgreSQL") from None
    except OSError as error:
        raise Refused(f"cannot take DATA_DIR {data_dir}'s lock ({error.strerror}): run this as the bot's "
                      "user") from None
    locks = [lock]
    for name, what in ((REPLY_LOCK, "reply process"), (WEBCHAT_LOCK, "website chat process")):
        try:
            if (held := lock_if_present(data_dir, name)) is not None:
                locks.append(held)
            continue
        except LockHeld:
            problem = Refused(f"a {what} of the bot is still running on DATA_DIR {data_dir} (one whose gunicorn is "
                              "gone finishes the answers in progress, for up to a minute; one run without gunicorn, "
                              "as the sandbox's, until it is stopped): wait for it to end or stop it, then run this "
                              "again; nothing was moved")
        except OSError as error:
            problem = Refused(f"cannot take DATA_DIR {data_dir}'s {name} ({error.strerror}): run this as the bot's "
                              "user")
        for taken in locks:
            os.close(taken)
        raise problem
    return tuple(locks)


def lock_holder(data_dir: str) -> str:
    try:
        with open(os.path.join(data_dir, LOCK_FILE), encoding="utf-8", errors="replace") as file:
            return file.read(32).strip() or "unknown"
    except OSError:
        return "unknown"


def open_target(url: str, where: str) -> PostgresQueue:
    import psycopg

    from bot.storage.postgres import MigrationBlocked

    # One plain connection first: it fails fast, with the server's own reason (refused,
    # authentication, no such database), where the pool retries and says only "timeout".
    try:
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT) as probe:
            problem = encoding_problem(probe, where)
    except Exception as error:  # noqa: BLE001 - psycopg's, or a URL it cannot parse
        raise Refused(f"{where} cannot be used ({type(error).__name__}: {one_line(error)}): check "
                      "DATABASE_URL and that the server runs") from None
    if problem:  # before the schema is made there: nothing is changed
        raise Refused(problem)
    try:
        return PostgresQueue(url, pool_size=2)
    except (SchemaTooNew, MigrationBlocked) as error:
        raise Refused(f"{where}: {error}") from None
    except Exception as error:  # noqa: BLE001 - the driver's or the pool's: say which and where
        raise Refused(f"{where} cannot be used ({type(error).__name__}: {one_line(error)}): check "
                      "DATABASE_URL and that the server runs") from None


def refuse_unless_empty(db, where: str) -> None:
    held = {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in MUST_BE_EMPTY}
    if any(held.values()):
        what = ", ".join(f"{count} {table}" for table, count in held.items() if count)
        raise Refused(f"{where} already holds a store ({what} rows): move into a new, empty database; "
                      "nothing was changed")


def drain_inbox(data_dir: str, path: str) -> list[str]:
    """Acknowledged messages still in inbox files enter SQLite first, as on the bot's start."""
    directory = os.path.join(data_dir, "inbox")
    notes = []
    try:
        waiting = inbox.inbox_files(directory)
    except OSError as error:
        reason = f"{type(error).__name__}: {one_line(error)}"
        raise Refused(f"cannot read {directory} ({reason}); nothing was moved") from None
    if waiting:
        try:
            writable = SQLiteQueue(path)
            try:
                new, duplicates = writable.drain(directory)
            finally:
                writable.close()
        except (sqlite3.DatabaseError, OSError, InboxUnreadable) as error:
            raise Refused(f"cannot drain {directory} into {path} ({type(error).__name__}: {one_line(error)}); "
                          "nothing was moved") from None
        notes.append(f"drained {directory} into {path} first: {new} acknowledged message(s) not yet queued"
                     + (f", {duplicates} already there" if duplicates else ""))
        left = inbox.inbox_files(directory)
        if left:
            raise Refused(f"{len(left)} inbox file(s) in {directory} are still being written (a webhook "
                          "process outside this bot's lock?): stop it and run this again; nothing was moved")
    try:
        quarantined = len(os.listdir(os.path.join(directory, QUARANTINE)))
    except OSError:
        quarantined = 0
    if quarantined:
        notes.append(f"{quarantined} inbox file(s) with damaged bytes stay in {directory}/quarantine for a "
                     "person to look at (as before the move)")
    return notes


def copy_all(source: SQLiteQueue, target: PostgresQueue, where: str) -> tuple[dict[str, int], str, int]:
    """Every table in one PostgreSQL transaction (rolled back whole on any error)."""
    import psycopg

    counts: dict[str, int] = {}
    replaced = 0
    try:
        with source._read() as sdb, target._write() as db:
            sdb.execute("BEGIN")  # one snapshot of SQLite
            try:
                tables = known_tables(sdb)
                db.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                # Writers wait until the commit (then get ids past ours); readers go on.
                db.execute(f"LOCK TABLE {', '.join(tables)} IN EXCLUSIVE MODE")
                refuse_unless_empty(db, where)  # again, now that nobody can add a row
                for table in tables:
                    counts[table], nul = copy_table(sdb, db.conn, table)
                    replaced += nul
                # PostgreSQL's own count of the chunks holding each word (bot/knowledge/store.py),
                # afresh: a knowledge base used and emptied there leaves words counted 0.
                db.execute("LOCK TABLE knowledge_terms IN EXCLUSIVE MODE")
                db.execute("DELETE FROM knowledge_terms")
                db.execute("INSERT INTO knowledge_terms (lexeme, chunks)"
                           " SELECT word, ndoc FROM ts_stat('SELECT tsv FROM knowledge_chunks')")
                # Last: a sequence is not rolled back, so it moves only once every row is in. Past
                # SQLite's own counter too: ids of deleted rows (pruned records, a removed knowledge
                # source) are never given again - the exchange log names knowledge chunks by id.
                for table, column in SEQUENCES.items():
                    last = max(sqlite_sequence(sdb, table), db.execute(
                        f"SELECT COALESCE(MAX({column}), 0) FROM {table}").fetchone()[0])
                    if last:
                        db.execute("SELECT setval(pg_get_serial_sequence(?, ?), ?)", (table, column, last))
                states = ", ".join(f"{count} {state}" for state, count in sdb.execute(
                    "SELECT state, COUNT(*) FROM events GROUP BY state ORDER BY state"))
                _LateInterrupt.hold()  # every row is in: the commit that follows is not to be undone
            finally:
                sdb.execute("COMMIT")
    except psycopg.errors.LockNotAvailable:
        raise Refused(f"{where} is busy (another bot or session writes to it): stop it and run this again; "
                      "nothing was changed") from None
    except (psycopg.Error, sqlite3.DatabaseError, Mismatch) as error:
        if raised_by_interrupt(error):
            raise KeyboardInterrupt from None
        raise Refused(f"the copy failed and was rolled back, {where} is as it was "
                      f"({type(error).__name__}: {one_line(error)})") from None
    return counts, states, replaced


def sqlite_sequence(sdb: sqlite3.Connection, table: str) -> int:
    """The largest id SQLite ever gave in `table` (AUTOINCREMENT), deleted rows included; 0: none."""
    try:
        row = sdb.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    except sqlite3.OperationalError:  # no AUTOINCREMENT table in the file at all
        return 0
    return int(row[0]) if row else 0


def known_tables(sdb: sqlite3.Connection) -> list[str]:
    """The tables to copy; a table this code does not know stops the move (it may hold data
    that would otherwise stay behind unnoticed)."""
    present = {row[0] for row in sdb.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                             " AND name NOT LIKE 'sqlite_%'")}
    unknown = sorted(present - set(TABLES) - set(SKIPPED))
    if unknown:
        raise Refused(f"the SQLite database has table(s) this move does not know ({', '.join(unknown)}): "
                      "run the move of the bot version that created them; nothing was changed")
    return [table for table in TABLES if table in present]


class Mismatch(RuntimeError):
    """PostgreSQL does not hold what was copied into it."""


def raised_by_interrupt(error: BaseException) -> bool:
    """Whether `error` was raised while a Ctrl-C unwound: psycopg leaves pipeline mode in a
    `finally`, and a Ctrl-C inside executemany's pipeline came out as "cannot exit pipeline mode
    while busy" (seen in CI), reported as a failed copy instead of an interrupted one."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__context__
    return False


def copy_table(sdb: sqlite3.Connection, conn, table: str) -> tuple[int, int]:
    """One table, in SQLite's rowid order, ids (and the mirror's rowid) kept."""
    columns = [row[1] for row in sdb.execute(f"PRAGMA table_info({table})")]
    if table == "mirror":
        columns.insert(0, "rowid")  # insertion order breaks ties of at_ms in history()
    names = ", ".join(f'"{name}"' for name in columns)
    select = ", ".join("rowid" if name == "rowid" else f'"{name}"' for name in columns)
    insert = f"INSERT INTO {table} ({names}) VALUES ({', '.join(['%s'] * len(columns))})"
    if table == "graph_budgets":  # a bot started once on the target may have set it: the later wins
        insert += " ON CONFLICT (account) DO UPDATE SET next_at = GREATEST(graph_budgets.next_at, excluded.next_at)"
    elif table == "answer_cache":  # a cache: an answer the target already holds is as good
        insert += " ON CONFLICT (key) DO NOTHING"
    elif table == "knowledge_version":  # its one row is there from the migration: the larger wins
        insert += " ON CONFLICT (id) DO UPDATE SET version = GREATEST(knowledge_version.version, excluded.version)"
    rows = sdb.execute(f"SELECT {select} FROM {table} ORDER BY rowid")
    # A postback's key as this code makes it: an older one held the whole title, past what
    # PostgreSQL's unique index takes (queue.TITLE_IN_KEY_MAX_BYTES).
    rekey = [columns.index(name) for name in ("dedupe_key", "psid", "timestamp_ms")] if table == "events" else None
    copied = replaced = 0
    with conn.cursor() as cursor:
        while chunk := rows.fetchmany(CHUNK):
            values = []
            for row in chunk:
                if rekey is not None:
                    key, psid, timestamp_ms = (row[i] for i in rekey)
                    row = (*row[:rekey[0]], within_key_limit(key, psid, timestamp_ms), *row[rekey[0] + 1:])
                row, nul = storable(row)
                values.append(row)
                replaced += nul
            cursor.executemany(insert, values)
            copied += len(values)
        held = cursor.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    expected = sdb.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    if copied != expected or (held != copied and table not in ("graph_budgets", "answer_cache", "knowledge_version")):
        raise Mismatch(f"{table}: {expected} row(s) in SQLite, {copied} copied, {held} in PostgreSQL")
    return copied, replaced


def storable(row: tuple) -> tuple[tuple, int]:
    """PostgreSQL's text cannot hold NUL, which SQLite's can: such a character becomes U+FFFD."""
    if not any(isinstance(value, str) and "\x00" in value for value in row):
        return row, 0
    return tuple(value.replace("\x00", "\ufffd") if isinstance(value, str) else value for value in row), 1
