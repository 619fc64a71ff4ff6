"""The bot on PostgreSQL (DATABASE_URL), end to end: the Flask app in-process and real
gunicorn processes. The storage contract itself is tests/test_storage_contract.py."""
import os
import threading
import time

import psycopg
import pytest

from tests.support import PSID, Bot, fixture_bytes, incompressible_title, post_signed, replay, text_body, wait_until


def rows(url, sql, *params):
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def test_a_delivery_is_in_the_database_before_its_200_and_answered_once(make_client, graph, pg_url, env):
    client = make_client(DATABASE_URL=pg_url)
    response = post_signed(client, fixture_bytes("text"))
    assert response.status_code == 200
    # Nothing answered yet (no reply thread here), and already durable beyond this host.
    assert rows(pg_url, "SELECT state FROM events") == [("pending",)]
    assert not os.path.exists(os.path.join(env["DATA_DIR"], "inbox"))
    replay(client, "text")  # Meta's redelivery, then the reply threads' turn
    assert graph.sent_texts(PSID) == ["Hello from the model."]
    assert rows(pg_url, "SELECT outcome FROM interactions") == [("answered",)]


def test_health_and_readiness_read_postgres(make_client, pg_url):
    client = make_client(DATABASE_URL=pg_url)
    assert client.get("/healthz").get_json()["queue_depth"] == 0
    problems = client.get("/readyz").get_json()["problems"]
    assert problems == ["the reply process has not started"]


def test_a_database_that_hangs_holds_neither_liveness_nor_readiness(make_client, pg_url):
    """A table locked (or a network dropping packets) held /healthz and /readyz for as long as it
    lasted, then answered 200 "ready": a liveness probe with a timeout restarted a healthy bot."""
    client = make_client(DATABASE_URL=pg_url)
    readiness = client.application.extensions["readiness"]
    readiness.stats.within = 0.5
    with psycopg.connect(pg_url) as blocker:
        blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")  # every read of it waits
        # Let go after 10 s whatever happens: a probe that waits on the lock fails, not hangs.
        letting_go = threading.Timer(10, blocker.rollback)
        letting_go.start()
        for _ in range(2):  # the second while the first read still hangs
            started = time.monotonic()
            assert client.get("/healthz").get_json() == {"status": "ok"}
            response = client.get("/readyz")
            assert time.monotonic() - started < 3
            assert response.status_code == 503
            assert response.get_json()["problems"] == ["the database did not answer within 0.5 s"]
        letting_go.cancel()
        blocker.rollback()
    assert wait_until(lambda: "queue_depth" in client.get("/healthz").get_json(), 5)
    assert client.get("/readyz").get_json()["problems"] == ["the reply process has not started"]


def test_gunicorn_on_postgres_survives_kill_9_after_the_200(graph, model, tmp_path, pg_url):
    bot = Bot(graph, model, tmp_path, DATABASE_URL=pg_url).start()
    try:
        model.delay = 3.0
        assert bot.post(text_body("m_pg_survivor", "Do you deliver?")).status_code == 200
        bot.kill_9()
        assert bot.states() == {"m_pg_survivor": "pending"} or bot.states() == {"m_pg_survivor": "working"}
        model.delay = 0
        bot.start()
        assert wait_until(lambda: graph.sent_texts(PSID) == ["Hello from the model."], 15)
        assert wait_until(lambda: bot.states() == {"m_pg_survivor": "done"})
        time.sleep(0.5)
        assert graph.sent_texts(PSID) == ["Hello from the model."]
    finally:
        bot.stop()


def test_an_unreachable_postgres_stops_start_up_with_one_line(graph, model, tmp_path):
    from tests.support import free_port, start_gunicorn
    from tests.support.messages import base_env

    env = {**base_env(graph, model, tmp_path), "PORT": str(free_port()), "HOST": "127.0.0.1",
           "DATABASE_URL": f"postgresql://bot:s3cret-pw@127.0.0.1:{free_port()}/bot"}
    process = start_gunicorn(env, tmp_path)
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 1
    assert "Cannot start: PostgreSQL at 127.0.0.1:" in output and "check DATABASE_URL" in output
    assert "s3cret-pw" not in output and "Traceback" not in output


def test_a_database_that_does_not_exist_is_named_with_the_servers_reason(graph, model, tmp_path, pg_url):
    """The start said only "cannot be used (PoolTimeout)" after 6 s; the reason was in the pool's
    warnings above it."""
    from urllib.parse import urlsplit, urlunsplit

    from tests.support import free_port, start_gunicorn
    from tests.support.messages import base_env

    parts = urlsplit(pg_url)
    missing = urlunsplit(parts._replace(path="/no_such_bot_database", query=""))
    env = {**base_env(graph, model, tmp_path), "PORT": str(free_port()), "HOST": "127.0.0.1", "DATABASE_URL": missing}
    process = start_gunicorn(env, tmp_path)
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 1 and "Traceback" not in output
    [line] = [line for line in output.splitlines() if line.startswith("Cannot start:")]
    assert f"PostgreSQL at {parts.hostname}:{parts.port or 5432}/no_such_bot_database cannot be used" in line, line
    assert 'database "no_such_bot_database" does not exist' in line


def test_a_database_not_in_utf8_is_refused_in_one_line(graph, model, tmp_path, pg_url):
    """A LATIN1 database could store no emoji nor most languages, and the knowledge base's schema
    (Unicode normalisation) cannot be made in it: refused before any migration, saying why."""
    from urllib.parse import urlsplit, urlunsplit

    from tests.support import free_port, start_gunicorn
    from tests.support.messages import base_env

    name = f"bot_latin1_{os.getpid()}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    try:
        url = urlunsplit(urlsplit(pg_url)._replace(path=f"/{name}", query=""))
        env = {**base_env(graph, model, tmp_path), "PORT": str(free_port()), "HOST": "127.0.0.1", "DATABASE_URL": url}
        process = start_gunicorn(env, tmp_path)
        output = process.communicate(timeout=30)[0]
        assert process.returncode == 1 and "Traceback" not in output
        [line] = [line for line in output.splitlines() if line.startswith("Cannot start:")]
        assert f"/{name} uses the LATIN1 encoding" in line and "needs a UTF8 database" in line, line
        with psycopg.connect(url) as conn:  # nothing was migrated into it
            assert conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_inbox_files_left_behind_stop_a_start_on_postgres(graph, model, tmp_path, pg_url):
    """Acknowledged on SQLite, still in the inbox files, then DATABASE_URL set without moving in:
    nothing would ever read them. The start refuses, saying how to move them."""
    from bot.storage.inbox import InboxWriter
    from messenger.events import TEXT, IncomingMessage
    from tests.support import free_port, start_gunicorn
    from tests.support.messages import base_env

    env = {**base_env(graph, model, tmp_path), "PORT": str(free_port()), "HOST": "127.0.0.1"}
    InboxWriter(os.path.join(env["DATA_DIR"], "inbox")).append(
        [IncomingMessage(psid=PSID, page_id="1", mid="m_left", kind=TEXT, text="hi", timestamp_ms=1)], [])
    process = start_gunicorn({**env, "DATABASE_URL": pg_url}, tmp_path)
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 1 and "inbox holds 1 inbox file(s) of messages acknowledged" in output, output
    assert "move-to-postgres" in output and "Traceback" not in output


def test_export_reads_postgres_when_database_url_is_set(make_client, graph, pg_url, tmp_path):
    import json
    import subprocess
    import sys

    from tests.support import ROOT

    replay(make_client(DATABASE_URL=pg_url), "text")
    done = subprocess.run([sys.executable, "-m", "bot", "export", "--database-url", pg_url], cwd=tmp_path,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["outcome"] for line in done.stdout.splitlines()] == ["answered"]


def test_export_from_a_database_that_does_not_exist_says_the_servers_reason_in_one_line(pg_url, tmp_path):
    """The pool tried for 5 s, logged every try, and blamed its own timeout; libpq's reasons run over
    several lines (a refused port on localhost: one for each address it tried)."""
    import subprocess
    import sys
    from urllib.parse import urlsplit, urlunsplit

    from tests.support import ROOT, free_port

    missing = urlunsplit(urlsplit(pg_url)._replace(path="/no_such_database_here", query=""))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DATA_DIR")}
    for url, reason in ((missing, 'database "no_such_database_here" does not exist'),
                        (f"postgresql://postgres@localhost:{free_port()}/test", "Connection refused")):
        done = subprocess.run([sys.executable, "-m", "bot", "export", "--database-url", url], cwd=tmp_path,
                              env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr  # libpq's own run over lines
        assert reason in done.stderr and "couldn't get a connection" not in done.stderr, done.stderr


def test_a_database_newer_than_the_code_stops_start_up_with_one_line(graph, model, tmp_path, backend):
    """Migrated by a newer version of the bot (another host, say): this older code refuses to start."""
    import sqlite3

    from tests.support import free_port, start_gunicorn
    from tests.support.messages import base_env

    name, settings = backend
    env = {**base_env(graph, model, tmp_path), "PORT": str(free_port()), "HOST": "127.0.0.1", **settings}
    if name == "sqlite":
        from bot.storage.queue import SQLiteQueue
        SQLiteQueue(os.path.join(env["DATA_DIR"], "bot.sqlite3")).close()
        with sqlite3.connect(os.path.join(env["DATA_DIR"], "bot.sqlite3")) as db:
            db.execute("PRAGMA user_version = 99")  # a newer bot whose change older code cannot use
            db.execute("UPDATE schema_compat SET min_code_version = 99")
    else:
        from bot.storage.queue import PostgresQueue
        PostgresQueue(settings["DATABASE_URL"], pool_size=2).close()
        rows(settings["DATABASE_URL"], "UPDATE schema_version SET version = 99, min_code_version = 99 RETURNING version")
    process = start_gunicorn(env, tmp_path)
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 1 and "Cannot start:" in output and "newer than this code" in output, output
    assert "Traceback" not in output


def execute(url, sql):
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


def _message(number: int, mid: str | None = None):
    from messenger.events import TEXT, IncomingMessage

    return IncomingMessage(psid=f"9{number:05d}", page_id="1", mid=mid or f"m_intake_{number}", kind=TEXT,
                           text="hello", timestamp_ms=1_700_000_000_000 + number)


async def _first_delivery_waiting_on_the_lock(intake, pg_url):
    """Delivery 0, its commit waiting on a lock the test holds on events: the deliveries sent
    next pile up behind it and go in the writer's next group. Returns its future."""
    import asyncio

    first = asyncio.ensure_future(intake.append_async([_message(0)], []))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if rows(pg_url, "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database()")[0][0]:
            break
    return first


def test_the_intake_commits_waiting_deliveries_together_and_drops_a_redelivery_among_them(pg_url):
    """The asyncio front's path: deliveries that arrive during a commit share the next one
    (rows of one transaction share its xmin), a mid delivered twice in one group is stored
    once, and the reply processes are notified at that commit."""
    import asyncio

    from bot.storage.queue import DatabaseIntake, PostgresQueue

    queue = PostgresQueue(pg_url)
    intake = DatabaseIntake(queue)
    try:
        with psycopg.connect(pg_url, autocommit=True) as listener, psycopg.connect(pg_url) as blocker:
            listener.execute("LISTEN bot_queue")
            blocker.execute("LOCK TABLE events IN EXCLUSIVE MODE")  # the first commit waits on it

            async def deliver():
                first = await _first_delivery_waiting_on_the_lock(intake, pg_url)
                rest = [intake.append_async([_message(n)], []) for n in range(1, 20)]
                rest.append(intake.append_async([_message(99, mid="m_intake_5")], []))  # a redelivery
                waiting = asyncio.gather(first, *rest)
                await asyncio.sleep(0.2)
                assert not waiting.done()  # nobody acknowledged before the commit
                blocker.rollback()
                await waiting

            asyncio.run(deliver())
            transactions, stored = rows(pg_url, "SELECT COUNT(DISTINCT xmin::text), COUNT(*) FROM events")[0]
            assert stored == 20
            assert 2 <= transactions <= 3  # the first alone, then the 20 that waited in at most two groups
            assert list(listener.notifies(timeout=2, stop_after=1))
    finally:
        queue.close()


def test_a_delivery_postgres_refuses_costs_only_itself_its_200_not_the_group_it_came_in(pg_url):
    """A group is one statement: a row PostgreSQL refuses (here a time past bigint, which the parser
    never lets through) failed the whole group, and every delivery in it got a 503 at every retry.
    Now the group is taken one by one; a postback keyed by a title of thousands is taken too."""
    import asyncio
    from dataclasses import replace

    import pytest

    from bot.storage.queue import DatabaseIntake, PostgresQueue
    from bot.storage.sql import StorageUnavailable
    from messenger.events import POSTBACK

    queue = PostgresQueue(pg_url)
    intake = DatabaseIntake(queue)
    tapped = replace(_message(7, mid="unused"), mid=None, kind=POSTBACK, text=incompressible_title(5))
    try:
        with psycopg.connect(pg_url) as blocker:
            blocker.execute("LOCK TABLE events IN EXCLUSIVE MODE")  # the first commit waits on it

            async def deliver():
                first = await _first_delivery_waiting_on_the_lock(intake, pg_url)
                group = [intake.append_async([_message(n)], []) for n in range(1, 4)]
                group.append(intake.append_async([replace(_message(4), timestamp_ms=10 ** 30)], []))
                group += [intake.append_async([tapped], []), intake.append_async([_message(5)], [])]
                waiting = asyncio.gather(first, *group, return_exceptions=True)  # queued behind the lock now
                await asyncio.sleep(0.2)
                assert not waiting.done()
                blocker.rollback()
                return await waiting

            results = asyncio.run(deliver())
        assert [type(result).__name__ for result in results] == ["NoneType"] * 4 + ["StorageUnavailable"] + ["NoneType"] * 2
        stored = {row[0] for row in rows(pg_url, "SELECT dedupe_key FROM events")}
        assert stored >= {f"m_intake_{n}" for n in (0, 1, 2, 3, 5)} and "m_intake_4" not in stored and len(stored) == 6
        assert rows(pg_url, "SELECT COUNT(DISTINCT xmin::text) FROM events")[0][0] >= 3  # the group went one by one
        with pytest.raises(StorageUnavailable):  # and still is refused alone, the intake going on after it
            intake.append([replace(_message(4), timestamp_ms=10 ** 30)], [])
        intake.append([_message(6)], [])
    finally:
        queue.close()


def test_the_intake_stores_every_message_as_it_came_whatever_its_text_holds(pg_url):
    """The group goes to PostgreSQL as one JSON text (bot/storage/queue.py, ADD_EVENTS): quotes,
    backslashes, escapes spelled out, line breaks, accents and emoji come back as they went in,
    postbacks without a mid are keyed by their text, and a redelivery in the group is not new."""
    from bot.storage.queue import PostgresQueue, _from_json, dedupe_key
    from messenger.events import POSTBACK, IncomingMessage

    texts = ['say "hi"', "C:\\new\\table \\u0041 \\n", "line one\nline two\ttab", "café, Größe, ½",
             "\U0001F600 and \u00e9\u0301", '{"not": ["json", 1]}', "'; DROP TABLE events; --"]
    messages = [IncomingMessage(psid=f"8{n:05d}", page_id="1", mid=f"m_text_{n}", kind="text", text=text,
                                timestamp_ms=1_700_000_000_000 + n) for n, text in enumerate(texts)]
    postbacks = [IncomingMessage(psid="800100", page_id="1", mid=None, kind=POSTBACK, text=title, payload="P\"1",
                                 timestamp_ms=1_700_000_000_100 + n) for n, title in enumerate(["Menü 🍕", "Menü 🍕 "])]
    queue = PostgresQueue(pg_url, clock=lambda: 1_764_000_000.123456)
    try:
        assert queue.take_in([(messages[:4], []), (messages[4:] + postbacks, [])]) == len(texts) + 2
        assert queue.take_in([([messages[0]], []), ([messages[1]], [])]) == 0
        stored = {row[0]: row[1:] for row in rows(pg_url, "SELECT dedupe_key, message, psid, timestamp_ms,"
                                                          " received_at FROM events")}
        assert len(stored) == len(texts) + 2
        for message in messages + postbacks:
            text, psid, timestamp_ms, received_at = stored[dedupe_key(message)]
            assert _from_json(text) == message
            assert (psid, timestamp_ms, received_at) == (message.psid, message.timestamp_ms, 1_764_000_000.123456)
    finally:
        queue.close()


def test_the_intake_answers_every_waiting_delivery_when_the_commit_fails_and_goes_on_after(pg_url):
    import asyncio

    import pytest

    from bot.storage.queue import DatabaseIntake, PostgresQueue
    from bot.storage.sql import StorageUnavailable

    queue = PostgresQueue(pg_url)
    intake = DatabaseIntake(queue)
    try:
        execute(pg_url, "ALTER TABLE events RENAME TO events_away")

        async def five():
            return await asyncio.gather(*(intake.append_async([_message(n)], []) for n in range(5)),
                                        return_exceptions=True)

        assert all(isinstance(result, StorageUnavailable) for result in asyncio.run(five()))
        with pytest.raises(StorageUnavailable):
            intake.append([_message(1)], [])
        execute(pg_url, "ALTER TABLE events_away RENAME TO events")
        asyncio.run(intake.append_async([_message(2)], []))
        intake.append([_message(3)], [])  # the threaded path (WSGI servers) shares the writer
        assert rows(pg_url, "SELECT dedupe_key FROM events ORDER BY id") == [("m_intake_2",), ("m_intake_3",)]
    finally:
        queue.close()


def newer_bot(tmp_path, name: str, *migrations: str):
    """This code as a later version would be: a copy whose PostgreSQL schema has more versions."""
    import shutil

    from tests.support import ROOT

    copy = tmp_path / name
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "tests", "bench", ".env",
                                                              "data", ".hypothesis", "*.log"))
    with open(copy / "bot" / "storage" / "schema.py", "a") as schema:
        schema.write("".join(f"\nPOSTGRES_SCHEMA.append({migration})\n" for migration in migrations))
    return copy


def start_host(code, graph, model, tmp_path, name, pg_url):
    """One host: `gunicorn server:app` of `code`, with a DATA_DIR of its own."""
    import subprocess
    import sys

    from tests.support import free_port, is_up
    from tests.support.messages import base_env

    port = free_port()
    where = tmp_path / name  # the folder it runs from: no .env of the developer's
    where.mkdir()
    env = {**base_env(graph, model, where), "PORT": str(port), "HOST": "127.0.0.1", "DATABASE_URL": pg_url}
    command = [sys.executable, "-m", "gunicorn", "-c", str(code / "gunicorn.conf.py"), "server:app"]
    with open(where / "gunicorn.log", "w") as log:  # gunicorn writes to its own copy of the file
        process = subprocess.Popen(command, cwd=where, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(code), **env},
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    assert wait_until(lambda: is_up(f"http://127.0.0.1:{port}") or process.poll() is not None, 20)
    return process


def test_a_rolling_upgrade_keeps_older_hosts_working_only_across_additive_migrations(graph, model, tmp_path,
                                                                                      pg_url):
    """The next version starts on one host first and migrates; the hosts still on this version go on,
    and one restarted meanwhile starts - unless a migration since did more than add."""
    old = Bot(graph, model, tmp_path, DATABASE_URL=pg_url).start()
    additive = 'Additive("CREATE TABLE rolling_probe (x INTEGER)")'
    newer = start_host(newer_bot(tmp_path, "next", additive), graph, model, tmp_path, "next-host", pg_url)
    try:
        assert newer.poll() is None
        assert rows(pg_url, "SELECT version FROM schema_version") == [(len(_pg_schema()) + 1,)]
        old.stop()
        old.start()  # a restart during the upgrade: this older code starts and says so
        assert "newer than this code" in old.log_text() and "this host goes on" in old.log_text()
        assert old.post(text_body("m_during_upgrade", "Still open?")).status_code == 200
        assert wait_until(lambda: graph.sent_texts(PSID) == ["Hello from the model."], 15)
    finally:
        old.stop()
        stop_host(newer)
    breaking = start_host(newer_bot(tmp_path, "after", additive, '"ALTER TABLE events ADD COLUMN must_be_set INTEGER"'),
                          graph, model, tmp_path, "after-host", pg_url)
    try:
        assert breaking.poll() is None
        from tests.support import start_gunicorn
        process = start_gunicorn(old.env, tmp_path)  # this version again, on the same host
        output = process.communicate(timeout=30)[0]
        assert process.returncode == 1 and "Cannot start:" in output and "newer than this code" in output, output
    finally:
        stop_host(breaking)


def stop_host(process) -> None:
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)


def _pg_schema():
    from bot.storage.schema import POSTGRES_SCHEMA
    return POSTGRES_SCHEMA


def test_metrics_count_new_and_redelivered_messages_on_postgres(make_client, pg_url):
    """With PostgreSQL nothing drains inbox files: the webhook's own commit says which messages
    were new and which a redelivery (dropped by mid), and counts them."""
    from tests.test_delivery import sample

    client = make_client(DATABASE_URL=pg_url)
    before = client.get("/metrics").get_data(as_text=True)
    post_signed(client, fixture_bytes("text"))
    post_signed(client, fixture_bytes("text"))  # Meta's redelivery
    after = client.get("/metrics").get_data(as_text=True)
    for name, delta in [('messenger_events_total{outcome="accepted"}', 1),
                        ('messenger_events_total{outcome="duplicate"}', 1)]:
        assert sample(after, name) - sample(before, name) == delta, name


def test_after_an_outage_the_reply_side_and_the_intake_work_again_within_seconds_of_the_return():
    """psycopg_pool retries a failed connection 1, 2, 4, 8, 16... s apart: PostgreSQL back after
    17 s was used again only at the try after, 31 s in (after a minute's outage, up to half a
    minute later), with every webhook answering 503 meanwhile. Each attempt now gives up after
    RECONNECT_GIVE_UP_S and the next caller starts a new one."""
    from bot.storage.queue import DatabaseIntake, PostgresQueue
    from tests.support.pgserver import PgServer

    server = PgServer()  # skipped (failed under BOT_REQUIRE_POSTGRES=1) without the binaries
    server.start()
    queue = intake = None
    try:
        queue = PostgresQueue(server.url)
        intake = DatabaseIntake(queue)
        intake.append([_message(1)], [])
        assert queue.claim("a", 30) is not None
        server.stop("fast")
        down_until = time.monotonic() + 17
        while time.monotonic() < down_until:  # the claim loop and Meta's deliveries keep trying
            for attempt in (lambda: queue.claim("a", 30), lambda: intake.append([_message(2)], [])):
                try:
                    attempt()
                except Exception:  # noqa: BLE001 - down: 503s and failed claims, as expected
                    pass
            time.sleep(0.2)
        server.start()
        back = time.monotonic()

        def works(attempt) -> bool:
            try:
                attempt()
                return True
            except Exception:  # noqa: BLE001
                return False
        assert wait_until(lambda: works(lambda: intake.append([_message(3)], [])), 10)
        assert wait_until(lambda: works(lambda: queue.claim("a", 30)), 10)
        assert time.monotonic() - back < 3.5, time.monotonic() - back
    finally:
        if queue is not None:
            queue.close()
        server.destroy()


def test_hosts_pruning_at_once_delete_different_rows_instead_of_waiting_on_each_other(pg_url):
    """Every host runs the retention pass: a step passes by the rows another host's step holds
    (SKIP LOCKED), instead of waiting for its commit and then finding them gone."""
    import threading

    from bot.storage.queue import PostgresQueue

    queue = PostgresQueue(pg_url)
    try:
        old_ms = int((time.time() - 200 * 86400) * 1000)
        execute(pg_url, "INSERT INTO mirror (mid, psid, author, text, at_ms) SELECT 'm.old' || n, 'u', 'user', 'old', "
                        f"{old_ms} + n FROM generate_series(1, 6) AS n")
        other_host = psycopg.connect(pg_url)  # a step of its own, not committed yet
        other_host.execute("SELECT mid FROM mirror WHERE mid IN ('m.old1', 'm.old2', 'm.old3') FOR UPDATE")
        steps = []
        step = threading.Thread(target=lambda: steps.append(queue.conversations.prune(90, limit=6)), daemon=True)
        step.start()
        step.join(5)
        other_host.rollback()
        other_host.close()
        step.join(10)
        assert steps, "the step waited for the other host's transaction"
        assert rows(pg_url, "SELECT mid FROM mirror ORDER BY mid") == [("m.old1",), ("m.old2",), ("m.old3",)]
    finally:
        queue.close()


FROZEN_CLAIMANT = """
import os, signal, sys, time
from bot.storage.postgres import PostgresDatabase
from bot.storage.queue import PostgresQueue

claiming = []
def freeze(where):
    if claiming and sys.argv[2] == where:
        print("frozen", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)

def clock():  # read first inside the claim, the claim lock taken
    freeze("with the lock just taken")
    return time.time()

claimed = PostgresDatabase.claimed
def frozen_before_its_update(self, db, sql, params):  # the look for work answered
    freeze("before its update")
    claimed(self, db, sql, params)
PostgresDatabase.claimed = frozen_before_its_update

queue = PostgresQueue(sys.argv[1], clock=clock)
claiming.append(True)
queue.claim("frozen", 30)
"""


@pytest.mark.parametrize("where", ["with the lock just taken", "before its update"])
def test_a_process_frozen_inside_a_claim_stops_the_other_hosts_claims_for_seconds_not_until_it_is_killed(
        pg_url, where):
    """A reply process SIGSTOPped while it holds the claim lock: PostgreSQL ends its idle
    transaction after CLAIM_IDLE_LIMIT_S, and another host claims the waiting message. (Were the
    claim's statements pipelined, PostgreSQL would not count it idle: it starts the limit only
    once it has answered all it was sent.)"""
    import subprocess
    import sys
    import threading

    from bot.storage.postgres import CLAIM_IDLE_LIMIT_S, CLAIM_LOCK
    from bot.storage.queue import PostgresQueue

    queue = PostgresQueue(pg_url)
    queue.add([_message(1)])
    frozen = subprocess.Popen([sys.executable, "-c", FROZEN_CLAIMANT, pg_url, where], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert frozen.stdout.readline().strip() == "frozen"
        assert wait_until(lambda: _state(frozen.pid) == "T", 5)
        assert rows(pg_url, "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s AND granted",
                    CLAIM_LOCK) == [(1,)], "frozen without the claim lock: nothing to test"
        claimed = []
        started = time.monotonic()
        claimant = threading.Thread(target=lambda: claimed.append(queue.claim("other-host", 30)), daemon=True)
        claimant.start()
        claimant.join(CLAIM_IDLE_LIMIT_S + 5)
        assert claimed and claimed[0] is not None, "the claim waited on the frozen process's lock"
        assert claimed[0].owner == "other-host"
        assert time.monotonic() - started < CLAIM_IDLE_LIMIT_S + 3
        assert rows(pg_url, "SELECT state, owner FROM events") == [("working", "other-host")]
    finally:
        frozen.kill()
        frozen.wait()
        queue.close()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_a_process_frozen_while_writing_its_batch_holds_up_its_own_user_only(pg_url):
    """Frozen in the middle of a write to its batch (renewing, sending, completing), a reply
    process holds those rows until it is killed: another host's claim passes them by, lease run
    out or not, and answers the other users meanwhile."""
    import threading

    from bot.storage.queue import PostgresQueue

    now = [1_800_000_000.0]
    queue = PostgresQueue(pg_url, clock=lambda: now[0])
    frozen_host = psycopg.connect(pg_url)
    try:
        queue.add([_message(1), _message(2)])
        held = queue.claim("frozen-host", 2)
        frozen_host.execute("UPDATE events SET lease_until = lease_until WHERE id = ANY(%s)", (list(held.ids),))
        now[0] += 10  # its lease has run out, and nothing can take its rows back while they are held
        claimed = []
        claimant = threading.Thread(target=lambda: claimed.append(queue.claim("other-host", 30)), daemon=True)
        claimant.start()
        claimant.join(5)
        assert claimed, "the claim waited for the frozen process's rows"
        assert claimed[0] is not None and claimed[0].psid == _message(2).psid
    finally:
        frozen_host.rollback()
        frozen_host.close()
        queue.close()


GUESTS = "CREATE TABLE guests (id INTEGER)"
GUESTS_NAMED = "ALTER TABLE guests ADD COLUMN name TEXT"


def _waiting_for_a_lock(url) -> bool:
    return bool(rows(url, "SELECT 1 FROM pg_locks WHERE NOT granted AND relation = 'guests'::regclass"))


def test_a_migration_blocked_by_a_long_transaction_gives_way_and_stops_the_start_with_nothing_changed(pg_url):
    """A session left holding a table (an older host's long query, a psql transaction left open):
    the migration waits for it only so long each try, so the statements queued behind its request
    go on meanwhile; after its tries the start stops saying why, and nothing was changed."""
    import threading

    import pytest

    from bot.storage.postgres import MIGRATION_TRIES, MigrationBlocked, PostgresDatabase

    PostgresDatabase(pg_url, [GUESTS]).close()
    holder = psycopg.connect(pg_url)
    holder.execute("SELECT * FROM guests")  # its transaction holds the table until it ends
    pauses, outcome = [], []

    def migrate():
        try:
            PostgresDatabase(pg_url, [GUESTS, GUESTS_NAMED], lock_wait=1.0, pause=pauses.append).close()
        except MigrationBlocked as error:
            outcome.append(error)

    try:
        migration = threading.Thread(target=migrate, daemon=True)
        migration.start()
        assert wait_until(lambda: _waiting_for_a_lock(pg_url), 5)
        started = time.monotonic()
        with psycopg.connect(pg_url, autocommit=True) as other:  # queued behind the migration's request
            other.execute("SET statement_timeout = '10s'")
            other.execute("INSERT INTO guests (id) VALUES (1)")
        assert time.monotonic() - started < 1.0 + 1.5
        migration.join(MIGRATION_TRIES * 1.0 + 10)
        assert not migration.is_alive()
        [error] = outcome
        assert "could not be migrated to version 2" in str(error) and "nothing was changed" in str(error)
        assert pauses == list(range(1, MIGRATION_TRIES))
        assert rows(pg_url, "SELECT MAX(version) FROM schema_version") == [(1,)]
        with pytest.raises(psycopg.errors.UndefinedColumn):
            rows(pg_url, "SELECT name FROM guests")
        assert rows(pg_url, "SELECT id FROM guests") == [(1,)]
    finally:
        holder.close()


def test_a_migration_that_gave_way_goes_through_once_the_long_transaction_ends(pg_url):
    from bot.storage.postgres import PostgresDatabase

    PostgresDatabase(pg_url, [GUESTS]).close()
    holder = psycopg.connect(pg_url)
    holder.execute("SELECT * FROM guests")
    pauses = []

    def pause(seconds):
        pauses.append(seconds)
        holder.rollback()  # the long transaction ends while the migration waits to try again

    try:
        PostgresDatabase(pg_url, [GUESTS, GUESTS_NAMED], lock_wait=0.3, pause=pause).close()
        assert pauses == [1]
        assert rows(pg_url, "SELECT MAX(version) FROM schema_version") == [(2,)]
        assert rows(pg_url, "SELECT name FROM guests") == []
    finally:
        holder.close()


def _last_statement(url, pid: int) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]


def test_a_pooled_connection_is_handed_out_without_a_round_trip_unless_it_sat_unused_or_the_server_spoke(pg_url):
    """The pool's check before each use was an empty query, a round trip per transaction; it now
    runs only after QUIET_CHECK_S unused, or when the server said something since (QuietCheck)."""
    from bot.storage.postgres import QUIET_CHECK_S, PostgresDatabase

    now = [1000.0]
    database = PostgresDatabase(pg_url, (), max_size=1, clock=lambda: now[0])
    try:
        with database.read() as db:
            pid = db.execute("SELECT pg_backend_pid() AS marker").fetchone()[0]
        now[0] += QUIET_CHECK_S - 1
        with database.read():  # checked on the way out of the pool, then used for nothing
            pass
        assert _last_statement(pg_url, pid) == "SELECT pg_backend_pid() AS marker"
        now[0] += QUIET_CHECK_S  # unused this long: it may have been dropped without a word
        with database.read():
            pass
        assert _last_statement(pg_url, pid) == ""  # the empty query, the full check

        execute(pg_url, f"SELECT pg_terminate_backend({pid})")  # as a restart of PostgreSQL does
        assert wait_until(lambda: not rows(pg_url, f"SELECT 1 FROM pg_stat_activity WHERE pid = {pid}"), 5)
        with database.write() as db:  # no error for the caller: the ended connection is replaced
            assert db.execute("SELECT pg_backend_pid()").fetchone()[0] != pid
    finally:
        database.close()


def test_after_a_restart_of_postgresql_the_first_use_of_a_full_pool_gets_a_new_connection_at_once():
    """Every idle connection died with the restart; psycopg_pool waited 1, 2, 4 s before checking
    each next one, so with 8 in the pool the first two callers got PoolTimeout after 5 s. The first
    dead one found now drains the pool (QuietCheck.when_dead)."""
    from contextlib import ExitStack

    from bot.storage.postgres import PostgresDatabase
    from tests.support.pgserver import PgServer

    server = PgServer()  # skipped (failed under BOT_REQUIRE_POSTGRES=1) without the binaries
    server.start()
    database = None
    try:
        database = PostgresDatabase(server.url, (), max_size=8)
        with ExitStack() as stack:  # eight connections at once, then all idle in the pool
            for _ in range(8):
                stack.enter_context(database.read())
        assert database.pool.get_stats()["pool_available"] == 8
        server.restart("fast")
        for _ in range(3):
            started = time.monotonic()
            with database.read() as db:
                assert db.execute("SELECT 1").fetchone()[0] == 1
            assert time.monotonic() - started < 2.0
    finally:
        if database is not None:
            database.close()
        server.destroy()


def _events_rows_read(plan: dict) -> int:
    """Rows of `events` a plan's nodes read (returned or filtered out), over all their loops."""
    own = 0
    if plan.get("Relation Name") == "events":
        own = (plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
               + plan.get("Rows Removed by Index Recheck", 0)) * plan["Actual Loops"]
    return own + sum(_events_rows_read(child) for child in plan.get("Plans", []))


def test_a_claim_reads_a_few_rows_of_a_long_queue_whose_table_has_no_statistics(pg_url):
    """With no statistics (before autovacuum's first ANALYZE, or where it is off) PostgreSQL thinks
    a queue holds a row or two; the claim used to compare every waiting row with every other then
    (10-45 ms a claim at 300-900 waiting). However long the queue, it now walks the oldest rows
    and stops at the first it can answer."""
    from bot.storage.queue import MAX_BATCH, PostgresQueue

    queue = PostgresQueue(pg_url)
    try:
        now = time.time()
        execute(pg_url, "ALTER TABLE events SET (autovacuum_enabled = off)")  # no ANALYZE meanwhile
        # 3,000 users waiting, the first 100 of them with an older message being answered.
        execute(pg_url, f"""INSERT INTO events (dedupe_key, psid, message, timestamp_ms, received_at, state, owner,
                                                lease_until, batch_id)
                            SELECT 'm_w' || n, 'u' || n, '{{}}', n, {now}, 'working', 'other', {now + 60}, n
                            FROM generate_series(1, 100) n;
                            INSERT INTO events (dedupe_key, psid, message, timestamp_ms, received_at)
                            SELECT 'm_p' || n, 'u' || n, '{{}}', 1000 + n, {now} FROM generate_series(1, 3000) n""")
        assert rows(pg_url, "SELECT COUNT(*) FROM pg_stats WHERE schemaname = current_schema() AND tablename = 'events'")[0][0] == 0
        with queue._database.claiming() as db:  # the claim's own settings
            plan = db.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + queue._next_batch, (now, "[]", MAX_BATCH)).fetchone()[0]
            first = db.execute(queue._next_batch, (now, "[]", MAX_BATCH)).fetchone()
        assert first["psid"] == "u101"  # the oldest waiting message whose user is not being answered
        assert _events_rows_read(plan[0]["Plan"]) < 500, plan  # not the 3,100 waiting and working
    finally:
        queue.close()


def test_the_claim_is_planned_at_every_claim_and_its_planner_settings_end_with_it(pg_url):
    """The claim's settings (postgres.CLAIM_BEGIN) hold for its transaction only, and PostgreSQL never
    keeps one plan of it: a plan made while the table was small read every waiting row for each
    candidate once the queue was long (7 ms a claim at 14,000 waiting)."""
    from bot.storage.queue import PostgresQueue

    queue = PostgresQueue(pg_url, pool_size=1)  # one connection: its prepared statements are the claims'
    try:
        queue.add([_message(n) for n in range(20)])
        claimed = [queue.claim("a", 60) for _ in range(16)]  # psycopg prepares it at the 5th run
        assert all(batch is not None for batch in claimed)
        with queue._database.write() as db:
            plans = db.execute("SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                               " WHERE statement LIKE '%WITH head AS%'").fetchall()
            settings = db.execute("SELECT current_setting('enable_bitmapscan'), current_setting('plan_cache_mode'),"
                                  " current_setting('idle_in_transaction_session_timeout')").fetchone()
        assert plans and plans[0][0] == 0 and plans[0][1] >= 10, plans
        assert tuple(settings) == ("on", "auto", "0")  # what the claim set ended with its transaction
    finally:
        queue.close()
