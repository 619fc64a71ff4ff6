"""`python -m bot move-to-postgres`: a SQLite DATA_DIR built by the real code, moved by the real
command (a subprocess), checked in a real PostgreSQL through PostgresQueue."""
from __future__ import annotations

import gc
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import zlib
from array import array
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest

from bot.knowledge.base import KnowledgeBase
from bot.knowledge.embeddings import Embedded
from bot.replies.answer import Outcome
from bot.runtime.move import SKIPPED, TABLES
from bot.runtime.preflight import lock_data_dir
from bot.storage import inbox
from bot.storage.database_url import Refused, describe, scrub
from bot.storage.exchanges import Exchange
from bot.storage.inbox import ClassifiedEcho
from bot.storage.instance import WEBCHAT_LOCK, LockHeld, lock_if_present, take_process_lock
from bot.storage.moved import MARKER
from bot.storage.queue import PostgresQueue, SQLiteQueue
from bot.storage.schema import SCHEMA
from bot.storage.sqlite import Database
from config import database_path
from messenger.events import POSTBACK, TEXT, Echo, IncomingMessage
from tests.support import (
    PSID, ROOT, Bot, FakeClock, free_port, incompressible_title, is_up, start_gunicorn, text_body, wait_until,
)
from tests.support.messages import base_env
from tests.support.webchat import WebchatProcess

PASSWORD = "s3cr/et-pw?9q"  # percent-encoded in the URL; trust auth ignores it
PSIDS = ("u0", "u1", "u2", "u3", "u4", "u5", "u6")
BAD_RECORD = b"this is not JSON"
BASE_MS = int(time.time() * 1000) - 3_600_000


def message(mid, psid="u1", at=1000, text="hi"):
    return IncomingMessage(psid=psid, page_id="1", mid=mid, kind=TEXT, text=text, timestamp_ms=at)


def ms(offset: int) -> int:
    """A moment of the conversations built here: within the last hour."""
    return BASE_MS + offset


def exchange(batch, outcome=Outcome.ANSWERED, reply="ok", sent=("r",), at=None):
    at = ms(10_000) if at is None else at  # after every message: each reply part at this one ms
    return Exchange(psid=batch.psid, messages=batch.messages, outcome=outcome, bot_message=reply,
                    sent_parts=[(mid, reply) for mid in sent], bot_timestamp_ms=at, model="m",
                    usage=(3, 7, 10), latency_ms=42)


def with_password(url: str) -> tuple[str, str]:
    """The test server's URL with a password in it (the one it already has, if any)."""
    parts = urlsplit(url)
    if parts.password:
        return url, parts.password
    netloc = f"{parts.username or 'postgres'}:{quote(PASSWORD, safe='')}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc)), PASSWORD


@pytest.fixture
def target(pg_url):
    """(the URL with a password, the password)."""
    return with_password(pg_url)


def build_store(data_dir) -> str:
    """A SQLite DATA_DIR as a bot leaves it, written by the bot's own code."""
    path = database_path(str(data_dir))
    clock = FakeClock(time.time() - 100 * 86400)
    store = SQLiteQueue(path, clock=clock)
    # u0: answered 100 days ago, then pruned (retention): the ids left start past 1.
    store.add([message("m0", psid="u0", at=int(clock.now * 1000))])
    batch = store.claim("old-host", 30)
    store.complete(batch, exchange(batch, sent=("r0",), at=int(clock.now * 1000) + 10))
    clock.now = time.time()
    # u1: a done batch answered in three parts of the same millisecond (their mids sort
    # otherwise than they arrived); a message still pending comes last.
    store.add([message("m1", at=ms(1000), text="Do you deliver?")])
    batch = store.claim("old-host", 30)
    store.complete(batch, exchange(batch, reply="Yes.", sent=("z_part", "a_part", "m_part")))
    store.conversations.update_user("u1", synced_at=1_700_000_000.5, reset_at_ms=ms(900))
    # u3: paused - a person answered from the Page - with notices given.
    echo = Echo(psid="u3", page_id="1", mid="e1", text="A person here", timestamp_ms=ms(1200), app_id=None, metadata=None)
    store.add([], [ClassifiedEcho(echo, True, clock.now + 3600)])
    store.conversations.update_user("u3", rate_notice_at=1_700_000_001.25, budget_notice_day="2027-01-15")
    # u4: failed for good, with its record; u5: in work when the old bot was killed.
    store.add([message("m4", psid="u4", at=ms(1600))])
    batch = store.claim("old-host", 30)
    store.fail(batch, "model down", exchange(batch, Outcome.FAILED, reply=None, sent=()))
    store.add([message("m5", psid="u5", at=ms(1700))])
    store.claim("old-host", 30)
    # u2: a batch that sent one part of its reply, then was put back to be retried.
    store.add([message("m3", psid="u2", at=ms(1500))])
    batch = store.claim("old-host", 30)
    store.retry(batch, 0, "boom", reply='{"text": "part one"}', sent_parts=1)
    store.add([message("m2", at=ms(2000), text="And on Sundays?")])
    store.conversations.take_graph_read("1", 2.0)
    assert store.conversations.prune(90).exchanges == 1  # u0's record, mirror rows and message
    # An inbox record that cannot enter the queue: a dead letter, its bytes kept.
    inbox_dir = os.path.join(str(data_dir), "inbox")
    os.makedirs(inbox_dir)
    with open(os.path.join(inbox_dir, "1-dead.inbox"), "wb") as file:
        file.write(inbox.MARKER + inbox.HEADER.pack(len(BAD_RECORD), zlib.crc32(BAD_RECORD))
                   + BAD_RECORD)
    store.drain(inbox_dir)
    # The knowledge base: a source with its chunks and their vectors (bytes into BYTEA).
    document = os.path.join(str(data_dir), "hours.md")
    with open(document, "w") as file:
        file.write("# Opening hours\n\nWe open at 8:00.\n\n## Sundays\n\nClosed on Sundays.\n")
    KnowledgeBase(store.conversations.database, TwoDimensions()).add([document])
    # u6: acknowledged to Meta, still in an inbox file when the bot stopped.
    with open(os.path.join(inbox_dir, "2-undrained.inbox"), "wb") as file:
        file.write(inbox.encode([message("m6", psid="u6", at=ms(1800))], []))
    store.close()
    return path


class TwoDimensions:
    """An embedder for the copy to carry: every text the same unit vector (what is compared is the bytes)."""

    model, unsupported = "two-dimensions", None

    def embed(self, texts, timeout=None):
        return Embedded([array("f", [0.6, 0.8]) for _ in texts], 3)


def run_move(tmp_path, data_dir, url, password):
    """The command as an owner runs it, from a folder with no .env; the password never shows."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DATA_DIR")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", "bot", "move-to-postgres", "--data-dir", str(data_dir),
                             "--database-url", url], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    output = result.stdout + result.stderr
    assert password not in output and quote(password, safe="") not in output
    return result


def refused(result) -> str:
    """A refusal: status 2, one line on stderr, nothing on stdout."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def sqlite_rows(path, sql):
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return [tuple(row) for row in db.execute(sql)]


def pg_rows(url, sql, *params):
    with psycopg.connect(url, autocommit=True) as conn:
        return [tuple(row) for row in conn.execute(sql, params)]


COMPARED = {  # every copied table, all columns, in an order both databases share
    "events": "SELECT * FROM events ORDER BY id",
    "mirror": "SELECT rowid, mid, psid, author, text, at_ms FROM mirror ORDER BY rowid",
    "users": "SELECT * FROM users ORDER BY psid",
    "interactions": "SELECT * FROM interactions ORDER BY id",
    "graph_budgets": "SELECT * FROM graph_budgets ORDER BY account",
    "dead_letters": 'SELECT id, source, "offset", error, payload, at FROM dead_letters ORDER BY id',
    "knowledge_sources": "SELECT * FROM knowledge_sources ORDER BY id",
    "knowledge_chunks": "SELECT id, source_id, page_id, position, heading, text, embedding, embedding_i8,"
                        " embedding_model FROM knowledge_chunks ORDER BY id",
    "knowledge_version": "SELECT * FROM knowledge_version",
}


@pytest.fixture
def moved(tmp_path, target):
    """A DATA_DIR moved into PostgreSQL: (SQLite path, URL, password, the command's result)."""
    url, password = target
    data_dir = tmp_path / "data"
    path = build_store(data_dir)
    result = run_move(tmp_path, data_dir, url, password)
    assert result.returncode == 0, result.stderr
    return path, url, password, result


def test_every_table_arrives_as_it_was(moved):
    path, url, _, result = moved
    for table, sql in COMPARED.items():
        assert pg_rows(url, sql) == sqlite_rows(path, sql), table
    # Nothing trivially equal: ids start past the pruned ones, each table holds what was built.
    for table, column in (("events", "id"), ("mirror", "rowid"), ("interactions", "id")):
        assert sqlite_rows(path, f"SELECT MIN({column}) FROM {table}")[0][0] > 1, table
    assert bytes(pg_rows(url, "SELECT payload FROM dead_letters")[0][0]) == BAD_RECORD
    # The knowledge base arrives searchable: PostgreSQL indexes the copied chunks itself.
    assert pg_rows(url, "SELECT heading FROM knowledge_chunks WHERE tsv @@ to_tsquery('english', 'sunday')") == [
        ("Opening hours \u203a Sundays",)]
    assert pg_rows(url, "SELECT chunks FROM knowledge_terms WHERE lexeme = 'sunday'") == [(1,)]  # counted too
    assert pg_rows(url, "SELECT dedupe_key, state, batch_id IS NOT NULL FROM events ORDER BY id") == [
        ("m1", "done", True), ("m4", "failed", True), ("m5", "working", True), ("m3", "pending", True),
        ("m2", "pending", False), ("m6", "pending", False)]
    # The counts printed are the rows of each table.
    counts = dict(re.findall(r"^  (\w+) +(\d+)", result.stdout, re.M))
    assert {table: int(count) for table, count in counts.items()} == {
        table: sqlite_rows(path, f"SELECT COUNT(*) FROM {table}")[0][0] for table in counts}
    assert set(COMPARED) <= set(counts)


def test_the_inbox_is_drained_first_so_acknowledged_messages_arrive(moved, tmp_path):
    path, url, _, result = moved
    assert inbox.inbox_files(str(tmp_path / "data" / "inbox")) == []
    assert sqlite_rows(path, "SELECT state FROM events WHERE dedupe_key = 'm6'") == [("pending",)]
    assert pg_rows(url, "SELECT psid, state FROM events WHERE dedupe_key = 'm6'") == [("u6", "pending")]
    assert "drained" in result.stdout


def test_history_export_and_user_state_read_the_same(moved):
    path, url, _, _ = moved
    old, new = SQLiteQueue(path, read_only=True), PostgresQueue(url)
    try:
        for psid in PSIDS:
            history = new.conversations.history(psid, "page", 50, None)
            assert history == old.conversations.history(psid, "page", 50, None), psid
            assert new.conversations.user(psid) == old.conversations.user(psid)
        assert list(new.conversations.export()) == list(old.conversations.export())
        # Same-millisecond rows in the order they arrived, not by their ids.
        assert [h.mid for h in new.conversations.history("u1", "page", 50, None)] == [
            "m_part", "a_part", "z_part", "m1"]
        assert new.conversations.user("u3").paused_until > time.time()
        assert len(list(new.conversations.export())) == 2
    finally:
        new.close()


def test_waiting_work_goes_on_in_postgres(moved):
    path, url, _, _ = moved
    old_batch_id = sqlite_rows(path, "SELECT batch_id FROM events WHERE dedupe_key = 'm3'")[0][0]
    store = PostgresQueue(url)
    try:
        batches = {}
        while (batch := store.claim("new-host", 30)) is not None:
            batches[batch.psid] = batch
        assert {psid: [m.mid for m in b.messages] for psid, b in batches.items()} == {
            "u1": ["m2"], "u2": ["m3"], "u6": ["m6"]}  # u5's lease has not run out yet
        retried = batches["u2"]
        assert (retried.batch_id, retried.reply, retried.sent_parts, retried.attempts) == (
            old_batch_id, '{"text": "part one"}', 1, 2)
        # The reply flow: logged, mirrored after the moved rows (same millisecond too).
        store.complete(batches["u1"], exchange(batches["u1"], reply="Yes, Sundays too.", sent=("b_new",)))
        assert [h.mid for h in store.conversations.history("u1", "page", 3, None)] == ["b_new", "m_part", "a_part"]
        records = list(store.conversations.export())
        assert len(records) == 3 and records[-1]["bot_message"] == "Yes, Sundays too."
        # New rows take ids past the moved ones.
        assert store.add([message("m7", psid="u7", at=9000)]) == [True]
        ids = [row[0] for row in pg_rows(url, "SELECT id FROM events ORDER BY id")]
        assert len(ids) == len(set(ids)) == 7 and ids[-1] > max(ids[:-1])
        pg_rows(url, 'INSERT INTO dead_letters (source, "offset", error, payload, at) VALUES (%s, 0, %s, %s, 0)'
                " RETURNING id", "x", "e", b"p")
        assert len(pg_rows(url, "SELECT id FROM dead_letters")) == 2
    finally:
        store.close()


def test_a_second_run_refuses_a_target_that_holds_a_store(moved, tmp_path):
    path, url, password, _ = moved
    before = {table: pg_rows(url, sql) for table, sql in COMPARED.items()}
    os.remove(tmp_path / "data" / MARKER)  # past the note the first run left (tested below)
    line = refused(run_move(tmp_path, tmp_path / "data", url, password))
    assert "already holds" in line and "empty database" in line
    assert {table: pg_rows(url, sql) for table, sql in COMPARED.items()} == before


def test_a_moved_store_is_not_run_on_sqlite_again_nor_moved_twice(moved, graph, model, tmp_path):
    """The SQLite store keeps its waiting messages, which PostgreSQL answers: a bot started on it
    again without DATABASE_URL answered all of them a second time. The move leaves a note in
    DATA_DIR; a SQLite start and a second move refuse while it is there."""
    path, url, password, result = moved
    note = tmp_path / "data" / MARKER
    assert note.exists() and str(note) in result.stdout
    assert "moved to PostgreSQL at" in note.read_text() and password not in note.read_text()
    line = refused(run_move(tmp_path, tmp_path / "data", url, password))
    assert "nothing to move again" in line and str(note) in line
    env = {**base_env(graph, model, tmp_path), "PORT": str(free_port()), "HOST": "127.0.0.1"}
    process = start_gunicorn(env, tmp_path)
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 1 and "Cannot start:" in output and "set DATABASE_URL" in output, output
    assert f"delete {note}" in output and "Traceback" not in output
    assert graph.sent_texts("u1") == [] and model.requests == []
    # Where it now runs - also when it was moved by a version that left no note: PostgreSQL
    # holds every message SQLite still calls waiting, and the start writes the note itself.
    note.unlink()
    process = start_gunicorn({**env, "DATABASE_URL": url}, tmp_path)
    try:
        assert wait_until(lambda: is_up(f"http://127.0.0.1:{env['PORT']}"), 15), "gunicorn did not start"
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    assert note.exists(), output


def test_messages_past_metas_longest_window_left_in_sqlite_do_not_stop_a_start(tmp_path, target):
    """A store switched to PostgreSQL long ago (moved by an earlier version, its rows since pruned
    there; or never moved) may still call old messages waiting: nobody can answer them any more,
    so they are no reason to refuse. The same messages a day old are."""
    from bot.runtime.preflight import ANSWERABLE_S, StartupProblem, check_database

    url, _ = target
    data_dir = tmp_path / "data"
    path = database_path(str(data_dir))
    now = time.time()
    SQLiteQueue(path).add([message("m_old", at=int((now - ANSWERABLE_S - 3600) * 1000))])
    check_database(url, path, str(data_dir), now=now)  # no refusal
    SQLiteQueue(path).add([message("m_recent", at=int((now - 86400) * 1000))])
    with pytest.raises(StartupProblem, match=r"holds 1 message\(s\) of the last 7 days"):
        check_database(url, path, str(data_dir), now=now)


def test_with_a_short_retention_only_messages_younger_than_it_stop_a_start(tmp_path, target):
    """RETENTION_DAYS=1 prunes PostgreSQL's answered rows after a day: a message two days old still
    waiting in a store moved before moves left a note may be answered and gone there."""
    from bot.runtime.preflight import StartupProblem, check_database

    url, _ = target
    data_dir = tmp_path / "data"
    path = database_path(str(data_dir))
    now = time.time()
    SQLiteQueue(path).add([message("m_two_days", at=int((now - 2 * 86400) * 1000))])
    check_database(url, path, str(data_dir), now=now, retention_days=1)  # no refusal
    with pytest.raises(StartupProblem, match=r"holds 1 message\(s\) of the last 7 days"):
        check_database(url, path, str(data_dir), now=now, retention_days=30)
    SQLiteQueue(path).add([message("m_an_hour", at=int((now - 3600) * 1000))])
    with pytest.raises(StartupProblem, match=r"holds 1 message\(s\) of the last day"):
        check_database(url, path, str(data_dir), now=now, retention_days=1)


def test_a_note_that_cannot_be_read_still_says_the_store_was_moved(tmp_path):
    from bot.storage.moved import moved_to

    (tmp_path / MARKER).mkdir()  # unreadable as a file (as root, modes do not stop a read)
    assert "moved to PostgreSQL" in moved_to(str(tmp_path)) and "cannot be read" in moved_to(str(tmp_path))
    assert moved_to(str(tmp_path / "elsewhere")) is None


def test_a_start_on_postgres_refuses_a_sqlite_store_with_messages_still_waiting(graph, model, tmp_path, target):
    """DATABASE_URL set on a DATA_DIR whose SQLite queue still holds unanswered messages, without
    moving: nothing would ever answer them. The start refuses, naming the way."""
    url, _ = target
    data_dir = tmp_path / "data"
    build_store(data_dir)  # u1's m2 and others still wait
    shutil.rmtree(data_dir / "inbox")  # (inbox files left behind are refused on their own)
    env = {**base_env(graph, model, tmp_path), "PORT": str(free_port()), "HOST": "127.0.0.1", "DATABASE_URL": url}
    process = start_gunicorn(env, tmp_path)
    output = process.communicate(timeout=30)[0]
    waiting = sqlite_rows(database_path(str(data_dir)),
                          "SELECT COUNT(*) FROM events WHERE state IN ('pending', 'working')")
    assert waiting[0][0] > 0
    assert process.returncode == 1 and f"holds {waiting[0][0]} message(s) of the last 7 days acknowledged on SQLite" \
        in output, output
    assert "move-to-postgres" in output and "without DATABASE_URL" in output and "Traceback" not in output


def test_a_start_on_postgres_refuses_a_sqlite_store_it_cannot_read_now(tmp_path, target):
    """Unreadable (here locked exclusively by another process; damaged or of another owner alike),
    the store was taken for one holding nothing, and the start went on: its acknowledged messages
    were never answered. (A bot running on it does not stop a reader: its store is in WAL mode.)"""
    from bot.runtime.preflight import StartupProblem, check_database

    url, _ = target
    data_dir = tmp_path / "data"
    path = build_store(data_dir)  # u1's m2 and others still wait
    shutil.rmtree(data_dir / "inbox")
    gc.collect()  # build_store's connections: the exclusive lock below waits for none
    holder = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")  # no other connection reads it, WAL or not
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE users SET psid = psid")
        with pytest.raises(StartupProblem, match="cannot tell whether .* holds messages acknowledged on SQLite"):
            check_database(url, path, str(data_dir))
    finally:
        holder.close()
    with pytest.raises(StartupProblem, match=r"holds \d+ message\(s\) of the last 7 days"):  # read, it says what
        check_database(url, path, str(data_dir))
    empty = tmp_path / "empty.sqlite3"
    empty.touch()  # no bot's store: nothing in it to miss
    check_database(url, str(empty), str(tmp_path))


def test_ids_sqlite_gave_to_rows_since_deleted_are_never_given_again(tmp_path, target):
    """The exchange log names knowledge chunks by id: a chunk added after the move must not take
    the id of one removed before it (nor a record the id of a pruned one)."""
    url, password = target
    data_dir = tmp_path / "data"
    path = build_store(data_dir)
    with sqlite3.connect(path) as db:  # the newest rows deleted: SQLite's counters stay past them
        for table in ("interactions", "knowledge_chunks"):
            db.execute(f"DELETE FROM {table} WHERE id = (SELECT MAX(id) FROM {table})")
    given = dict(sqlite_rows(path, "SELECT name, seq FROM sqlite_sequence"))
    assert run_move(tmp_path, data_dir, url, password).returncode == 0
    for table in ("interactions", "knowledge_chunks"):
        [(next_id,)] = pg_rows(url, "SELECT nextval(pg_get_serial_sequence(%s, 'id'))", table)
        assert next_id == given[table] + 1, table


def test_a_target_holding_a_knowledge_base_is_refused_in_one_line(tmp_path, target):
    url, password = target
    PostgresQueue(url).close()  # the schema, as a bot started on it makes it
    pg_rows(url, "INSERT INTO knowledge_sources (location, title, kind, content_hash, chunks, added_at)"
                 " VALUES ('faq.md', 'FAQ', 'markdown', 'h', 0, 0) RETURNING id")
    data_dir = tmp_path / "data"
    build_store(data_dir)
    line = refused(run_move(tmp_path, data_dir, url, password))
    assert "already holds a store (1 knowledge_sources rows)" in line and "nothing was changed" in line


def test_a_target_not_in_utf8_is_refused_in_one_line_before_anything_is_made_there(tmp_path, target):
    """The same refusal as the bot's start (a LATIN1 database could hold no emoji, and the knowledge
    base's schema cannot be made in it), not PostgreSQL's raw error from half-way through."""
    url, password = target
    name = f"bot_move_latin1_{os.getpid()}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    latin1 = urlunsplit(urlsplit(url)._replace(path=f"/{name}", query=""))
    try:
        data_dir = tmp_path / "data"
        build_store(data_dir)
        line = refused(run_move(tmp_path, data_dir, latin1, password))
        assert f"/{name} uses the LATIN1 encoding" in line and "needs a UTF8 database" in line, line
        assert pg_rows(latin1, "SELECT to_regclass('schema_version')") == [(None,)]
        assert not (data_dir / MARKER).exists()
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_target_whose_knowledge_base_was_used_and_emptied_gets_its_word_counts_afresh(tmp_path, target):
    """Removing every source on PostgreSQL leaves its words counted 0 in knowledge_terms: the move
    had failed on them (a duplicate key) although the target held no chunk."""
    url, password = target
    data_dir = tmp_path / "data"
    build_store(data_dir)
    PostgresQueue(url).close()  # the target's tables, as a bot that ran there left them
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO knowledge_terms (lexeme, chunks) VALUES ('sunday', 0), ('gone', 0)")
    assert run_move(tmp_path, data_dir, url, password).returncode == 0
    assert pg_rows(url, "SELECT lexeme, chunks FROM knowledge_terms WHERE lexeme IN ('sunday', 'gone')") == [
        ("sunday", 1)]


def test_ctrl_c_mid_copy_says_nothing_was_moved_and_leaves_the_target_empty(tmp_path, target):
    url, password = target
    data_dir = tmp_path / "data"
    path = build_store(data_dir)
    with sqlite3.connect(path) as db:  # enough mirror rows for the copy to take a while
        db.executemany("INSERT INTO mirror (mid, psid, author, text, at_ms) VALUES (?, 'u9', 'user', 'x', ?)",
                       ((f"bulk_{n}", n) for n in range(400_000)))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DATA_DIR")}
    command = subprocess.Popen([sys.executable, "-m", "bot", "move-to-postgres", "--data-dir", str(data_dir),
                                "--database-url", url], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    copying = "SELECT COUNT(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation" \
              " WHERE c.relname = 'mirror' AND l.mode = 'ExclusiveLock'"
    assert wait_until(lambda: pg_rows(url, copying) != [(0,)] or command.poll() is not None, 60)
    command.send_signal(2)  # SIGINT, as Ctrl-C sends it
    out, err = command.communicate(timeout=60)
    assert command.returncode == 130, out + err
    assert "Traceback" not in err and err.startswith("not moved: interrupted") and err.count("\n") == 1
    assert pg_rows(url, "SELECT COUNT(*) FROM mirror") == [(0,)]
    assert run_move(tmp_path, data_dir, url, password).returncode == 0  # run again: it moves


def test_an_error_psycopg_raises_while_a_ctrl_c_unwinds_counts_as_the_ctrl_c():
    """A Ctrl-C inside executemany's pipeline: psycopg leaves pipeline mode in a `finally`, and
    that raised instead, so the move said "the copy failed" (exit 2) for an interrupt (seen in CI)."""
    from bot.runtime.move import raised_by_interrupt

    def pipeline_unwinding():
        try:
            raise KeyboardInterrupt
        finally:
            raise psycopg.OperationalError("cannot exit pipeline mode while busy")
    try:
        pipeline_unwinding()
    except psycopg.Error as error:
        assert raised_by_interrupt(error)
    assert not raised_by_interrupt(psycopg.OperationalError("the server is gone"))


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_the_commit_lets_the_move_finish_and_says_so(tmp_path, target, presses):
    """Once every row is copied, a Ctrl-C no longer undoes the move: raised just after the commit it
    would report "PostgreSQL is as it was" over a store that was moved. A second one stops the
    command (a commit that hangs), saying the outcome is unknown. A deferred trigger on the target
    makes its commit take 3 s, so the signals land inside it."""
    url, password = target
    PostgresQueue(url).close()  # the schema, as a bot started on it makes it
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN
                      IF current_setting('test.slept', true) IS DISTINCT FROM '1' THEN
                        PERFORM set_config('test.slept', '1', true);
                        PERFORM pg_sleep(3);
                      END IF;
                      RETURN NULL;
                    END $$;
                    CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON mirror
                      DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()""")
    data_dir = tmp_path / "data"
    build_store(data_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DATA_DIR")}
    command = subprocess.Popen([sys.executable, "-m", "bot", "move-to-postgres", "--data-dir", str(data_dir),
                                "--database-url", url], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    committing = "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query = 'COMMIT'"
    assert wait_until(lambda: pg_rows(url, committing) != [(0,)] or command.poll() is not None, 60)
    command.send_signal(signal.SIGINT)  # as Ctrl-C sends it
    assert command.stderr.readline().startswith("every row is copied, committing: Ctrl-C again")
    if presses == 2:
        command.send_signal(signal.SIGINT)
    out, err = command.communicate(timeout=60)
    assert "Traceback" not in err
    if presses == 1:
        assert command.returncode == 0, out + err
        assert out.startswith("moved ") and "the copy was committed, and is moved" in out
        assert pg_rows(url, "SELECT COUNT(*) FROM mirror") != [(0,)]
    else:
        assert command.returncode == 130 and "whether the store was moved is unknown" in err, out + err


def test_a_data_dir_with_a_running_bot_is_refused(tmp_path, target):
    url, password = target
    data_dir = tmp_path / "data"
    build_store(data_dir)
    lock = lock_data_dir(str(data_dir))
    try:
        line = refused(run_move(tmp_path, data_dir, url, password))
    finally:
        os.close(lock)
    assert "still running" in line and f"pid {os.getpid()}" in line
    assert inbox.inbox_files(str(data_dir / "inbox")) == ["2-undrained.inbox"]  # nothing touched
    tables = "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema()"
    assert pg_rows(url, tables) == [(0,)]  # not even created
    assert run_move(tmp_path, data_dir, url, password).returncode == 0  # stopped: it moves
    # No lock file made where none was: one a root-run move made would lock the bot's own user out.
    assert not (data_dir / "reply.lock").exists() and not (data_dir / "webchat.lock").exists()


def test_a_reply_process_left_running_by_a_kill_of_gunicorn_is_waited_for(graph, model, tmp_path, target):
    """kill -9 of the master alone: its reply process finishes the reply in progress, then ends.
    A move in between copied the message as 'working', recorded it 'done' in SQLite only, and
    PostgreSQL answered it a second time."""
    url, password = target
    bot = Bot(graph, model, tmp_path, OPENAI_TIMEOUT="15").start()
    model.delay = 8.0
    assert bot.post(text_body("m_inflight", "still being answered")).status_code == 200
    assert wait_until(lambda: len(model.requests) == 1, 10)
    os.kill(bot.process.pid, signal.SIGKILL)  # the master only: workers and reply process see it gone
    bot.process.wait(timeout=10)
    data_dir = tmp_path / "data"

    def data_lock_free():  # the webhook workers are gone
        try:
            os.close(lock_data_dir(str(data_dir)))
            return True
        except Exception:  # noqa: BLE001 - still held
            return False
    assert wait_until(data_lock_free, 10)
    line = refused(run_move(tmp_path, data_dir, url, password))
    assert "a reply process of the bot is still running" in line and "nothing was moved" in line, line
    assert wait_until(lambda: graph.sent_texts(PSID) == ["Hello from the model."], 20)
    assert wait_until(lambda: run_move(tmp_path, data_dir, url, password).returncode == 0, 20)
    queue = PostgresQueue(url, pool_size=2)
    try:
        assert queue.states() == {"m_inflight": "done"}
    finally:
        queue.close()


def test_a_website_chat_process_still_running_is_waited_for(graph, model, tmp_path, target):
    """Its answers go into the exchange log: one recorded after the copy would be missing from it.
    A chat started while an earlier one still finishes serves at once, and holds the lock after."""
    url, password = target
    earlier = take_process_lock(str(tmp_path / "data"), WEBCHAT_LOCK)  # an earlier chat, still finishing
    webchat = WebchatProcess(graph, model, tmp_path)
    try:
        assert webchat.chat("Open today?").status_code == 200  # served meanwhile
        os.close(earlier)  # the earlier one ends

        def held() -> bool:
            try:
                fd = lock_if_present(str(tmp_path / "data"), WEBCHAT_LOCK)
            except LockHeld:
                return True
            os.close(fd)
            return False
        assert wait_until(held, 10)
        line = refused(run_move(tmp_path, tmp_path / "data", url, password))
        assert "a website chat process of the bot is still running" in line, line
    finally:
        webchat.stop()
    assert run_move(tmp_path, tmp_path / "data", url, password).returncode == 0


def test_an_out_of_date_sqlite_file_is_refused_and_left_alone(tmp_path, target):
    url, password = target
    path = database_path(str(tmp_path / "data"))
    Database(path, SCHEMA[:-1])  # as an older bot left it
    line = refused(run_move(tmp_path, tmp_path / "data", url, password))
    assert f"schema version {len(SCHEMA) - 1}" in line and "start the bot once" in line
    assert sqlite_rows(path, "PRAGMA user_version") == [(len(SCHEMA) - 1,)]


def test_a_failure_mid_copy_leaves_the_target_as_it_was(tmp_path, target):
    url, password = target
    data_dir = tmp_path / "data"
    path = build_store(data_dir)
    with sqlite3.connect(path) as db:  # a value PostgreSQL rejects, in a table copied after others
        db.execute("UPDATE interactions SET user_timestamp = 'soon' WHERE id = (SELECT MAX(id) FROM interactions)")
    line = refused(run_move(tmp_path, data_dir, url, password))
    assert "rolled back" in line
    for table in set(COMPARED) - {"knowledge_version"}:  # its one row comes with the schema
        assert pg_rows(url, f"SELECT COUNT(*) FROM {table}") == [(0,)], table
    assert pg_rows(url, "SELECT version FROM knowledge_version") == [(0,)]
    assert pg_rows(url, "SELECT is_called FROM events_id_seq") == [(False,)]
    with sqlite3.connect(path) as db:
        db.execute("UPDATE interactions SET user_timestamp = 1600 WHERE user_timestamp = 'soon'")
    assert run_move(tmp_path, data_dir, url, password).returncode == 0  # as it was: empty, so it moves


def test_a_target_a_bot_only_started_on_is_empty_enough(tmp_path, target):
    url, password = target
    started = PostgresQueue(url)
    started.heartbeat("host-b:1")
    started.conversations.hold_graph_reads("1", 10_000)  # later than the SQLite store's budget
    started.close()
    data_dir = tmp_path / "data"
    build_store(data_dir)
    assert run_move(tmp_path, data_dir, url, password).returncode == 0
    assert pg_rows(url, "SELECT owner FROM dispatchers") == [("host-b:1",)]
    assert pg_rows(url, "SELECT next_at FROM graph_budgets")[0][0] > time.time() + 9_000


def test_nul_characters_postgres_cannot_store_are_replaced_and_said(tmp_path, target):
    url, password = target
    data_dir = tmp_path / "data"
    store = SQLiteQueue(database_path(str(data_dir)))
    store.add([message("m1", text="a b")])
    batch = store.claim("a", 30)
    store.complete(batch, exchange(batch))
    with sqlite3.connect(database_path(str(data_dir))) as db:  # as an older version stored them
        db.execute("UPDATE mirror SET text = 'a' || char(0) || 'b' WHERE mid = 'm1'")
        db.execute("UPDATE interactions SET user_message = 'a' || char(0) || 'b'")
    result = run_move(tmp_path, data_dir, url, password)
    assert result.returncode == 0 and "NUL" in result.stdout
    assert pg_rows(url, "SELECT text FROM mirror WHERE mid = 'm1'") == [("a\ufffdb",)]
    assert pg_rows(url, "SELECT user_message FROM interactions") == [("a\ufffdb",)]


def test_a_postback_keyed_by_a_title_of_thousands_is_moved_under_the_key_a_redelivery_makes(tmp_path, target):
    """An older bot keyed a postback without a mid by its whole title: past PostgreSQL's unique-index
    limit, the copy failed. It arrives keyed as the webhook keys it now, so Meta's redelivery is known."""
    url, password = target
    data_dir = tmp_path / "data"
    store = SQLiteQueue(database_path(str(data_dir)))
    tapped = IncomingMessage(psid="u1", page_id="1", mid=None, kind=POSTBACK, timestamp_ms=ms(100),
                             text=incompressible_title(3))
    store.add([tapped])
    with sqlite3.connect(database_path(str(data_dir))) as db:  # the key as the older bot made it
        db.execute("UPDATE events SET dedupe_key = ?", (f"postback:u1:{ms(100)}:{tapped.text}",))
    assert run_move(tmp_path, data_dir, url, password).returncode == 0
    moved_store = PostgresQueue(url)
    try:
        assert moved_store.add([tapped]) == [False]  # Meta's redelivery, after the move
        assert moved_store.claim("a", 30).messages[0].text == tapped.text
    finally:
        moved_store.close()


def test_a_table_the_move_does_not_know_stops_it(tmp_path, target):
    url, password = target
    data_dir = tmp_path / "data"
    path = build_store(data_dir)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
    line = refused(run_move(tmp_path, data_dir, url, password))
    assert "(notes)" in line
    assert inbox.inbox_files(str(data_dir / "inbox")) == ["2-undrained.inbox"]


def test_every_table_of_the_schema_is_copied_or_skipped_on_purpose(tmp_path):
    path = str(tmp_path / "bot.sqlite3")
    Database(path, SCHEMA)
    tables = {row[0] for row in sqlite_rows(path, "SELECT name FROM sqlite_master WHERE type = 'table'"
                                                  " AND name NOT LIKE 'sqlite_%'")}
    assert tables <= set(TABLES) | set(SKIPPED), "a new table: copy it in bot/runtime/move.py, or skip it on purpose"


def test_an_unreachable_or_wrong_server_is_one_line_without_the_password(tmp_path, target):
    url, password = target
    data_dir = tmp_path / "data"
    build_store(data_dir)
    parts = urlsplit(url)
    for netloc in (f"{parts.username}:{quote(password, safe='')}@127.0.0.1:{free_port()}",
                   f"no_such_role:{quote(password, safe='')}@{parts.hostname}:{parts.port or 5432}"):
        line = refused(run_move(tmp_path, data_dir, urlunsplit(parts._replace(netloc=netloc)), password))
        assert "cannot be used" in line
    assert inbox.inbox_files(str(data_dir / "inbox")) == ["2-undrained.inbox"]


def test_a_url_the_move_and_export_cannot_read_is_refused_in_one_line_without_its_password(tmp_path):
    url = "postgresql://bot:s3cret@[::1:5432/bot"  # an unclosed IPv6 bracket: urlparse raised
    with pytest.raises(Refused, match=r"must look like postgresql://.*\(an IPv6 address goes in \[ \]\)"):
        describe(url)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DATA_DIR")}
    done = subprocess.run([sys.executable, "-m", "bot", "export", "--database-url", url], cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "s3cret" not in done.stderr, done.stderr
    assert done.stderr.startswith("cannot export: the database URL must look like"), done.stderr


def test_the_password_is_scrubbed_however_it_is_spelled():
    url = f"postgresql://bot:{quote(PASSWORD, safe='')}@db.example:5432/bot"
    said = scrub(f"a driver said {PASSWORD} and {quote(PASSWORD, safe='')} about {url}", url)
    assert PASSWORD not in said and quote(PASSWORD, safe="") not in said and said.count("***") == 3
    assert describe(url) == "PostgreSQL at db.example:5432/bot"
    # ?password= is libpq's other way to give it: scrubbed too, and a secret of the settings.
    in_query = f"postgresql://bot@db.example:5432/bot?password={quote(PASSWORD, safe='')}"
    assert PASSWORD not in scrub(f"a driver said {PASSWORD} about {in_query}", in_query)
    from config import load_config
    from tests.test_config import GOOD

    assert PASSWORD in load_config({**GOOD, "DATABASE_URL": in_query}, env_file=None).secrets
    for written in ("s3cr+t", "p%2fss"):  # libpq decodes %XX only: "+" is a "+"; as written, lower case
        url = f"postgresql://bot@db.example:5432/bot?password={written}"
        assert written not in scrub(f"a driver said {url}", url)
