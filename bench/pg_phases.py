"""Where a PostgreSQL acknowledgement's time goes: the webhook's store step, phase by phase.

    .venv/bin/python bench/pg_phases.py --database-url postgresql://postgres@127.0.0.1:5432/test

Three measurements, each printed as one JSON line, in a fresh schema dropped after:

1. `store_step`: one delivery at a time, in this process, through the bot's own code
   (WebhookReceiver.handle with the SQLite inbox file, then with the PostgreSQL intake);
   the intake's statement for a group of four deliveries (`take_in_group_of_4`);
   and the PostgreSQL transaction taken apart with the pool and driver the bot uses:
   pool checkout (with psycopg_pool's connection check, the bot's, and none), BEGIN/INSERT/COMMIT,
   + NOTIFY, with synchronous_commit off; a result row's column names (`row_names`). Wall time
   and this process's CPU per step, and the server backend's CPU per step (from /proc).
2. `pgbench`: the same INSERT(+NOTIFY) transaction from PostgreSQL's own C client, 16
   connections, 2 threads: what the server can take on this machine with no Python in the way.
3. Each bounded: `--count` steps, `--seconds` per pgbench run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import APP_SECRET, PAGE_ID, PAGE_TOKEN, text_body, wait_for_quiet, with_options  # noqa: E402
from messenger.signature import sign  # noqa: E402

PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
INSERT = ("INSERT INTO events (dedupe_key, psid, message, timestamp_ms, received_at)"
          " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (dedupe_key) DO NOTHING")


def backend_cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(step, count: int, backend_pid: int | None = None) -> dict:
    """Median and p99 wall time (us), and mean CPU (us) of this process and of the server backend."""
    walls = []
    cpu0, server0 = time.process_time(), backend_cpu_s(backend_pid) if backend_pid else 0.0
    for n in range(count):
        started = time.perf_counter()
        step(n)
        walls.append(time.perf_counter() - started)
    cpu = (time.process_time() - cpu0) / count
    walls.sort()
    result = {"wall_p50_us": round(statistics.median(walls) * 1e6), "wall_p99_us": round(walls[int(count * 0.99)] * 1e6),
              "client_cpu_us": round(cpu * 1e6)}
    if backend_pid:
        result["server_cpu_us"] = round((backend_cpu_s(backend_pid) - server0) / count * 1e6)
    return result


def config_for(url: str | None, data_dir: str):
    from config import load_config

    env = {"FB_VERIFY_TOKEN": "v", "FB_APP_SECRET": APP_SECRET, "FB_PAGE_ACCESS_TOKEN": PAGE_TOKEN,
           "FB_PAGE_ID": PAGE_ID, "OPENAI_API_KEY": "sk-x", "DATA_DIR": data_dir, "LOG_LEVEL": "ERROR"}
    if url:
        env["DATABASE_URL"] = url
    return load_config(env, env_file=None)


def receiver_step(url: str | None, data_dir: str):
    """The bot's own webhook core (signature, parse, store, doorbell), as a worker runs it."""
    from bot.storage.doorbell import open_doorbell
    from bot.storage.queue import open_intake, open_queue
    from bot.web.webhook import WebhookReceiver

    config = config_for(url, data_dir)
    os.makedirs(data_dir, exist_ok=True)
    store = open_queue(config, pool_size=config.database_pool_size)
    receiver = WebhookReceiver(config, open_intake(config, store), open_doorbell(config))
    tag = uuid.uuid4().hex[:6]
    bodies = []

    def step(n: int) -> None:
        body = text_body(n, f"9{n:015d}", text=f"phase {tag} {n}")
        status, _ = receiver.handle(body, {"X-Hub-Signature-256": sign(body, APP_SECRET)}, "127.0.0.1")
        assert status == 200, status
    return step, store, bodies


def take_in_step(store, size: int = 4):
    """The intake's one statement for a group of `size` one-message deliveries (the sustained
    scenario's groups average ~4), as DatabaseIntake's writer thread runs it; and the server
    backend that runs it (the intake's own connection)."""
    from messenger.events import TEXT, IncomingMessage

    tag = uuid.uuid4().hex[:6]

    def step(n: int) -> None:
        store.take_in([([IncomingMessage(psid=f"8{n:09d}{k}", page_id=PAGE_ID, mid=f"m_group_{tag}_{n}_{k}", kind=TEXT,
                                         text=f"group {n} message {k}: do you open on Sundays?",
                                         timestamp_ms=1_764_000_000_000 + n)], []) for k in range(size)])
    with store._database.intake() as db:  # the one connection the intake's statements go through
        pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
    return step, pid


def executor_hop(count: int) -> dict:
    """An event loop handing a no-op to a thread pool and awaiting it, one at a time."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=10)

    async def run() -> dict:
        loop = asyncio.get_running_loop()
        walls = []
        cpu0 = time.process_time()
        for _ in range(count):
            started = time.perf_counter()
            await loop.run_in_executor(pool, lambda: None)
            walls.append(time.perf_counter() - started)
        walls.sort()
        return {"wall_p50_us": round(statistics.median(walls) * 1e6), "wall_p99_us": round(walls[int(count * 0.99)] * 1e6),
                "client_cpu_us": round((time.process_time() - cpu0) / count * 1e6)}
    try:
        return asyncio.run(run())
    finally:
        pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=5, help="per pgbench run")
    parser.add_argument("--quiet-wait", type=float, default=60,
                        help="before each measurement, wait at most this long for a quiet machine")
    args = parser.parse_args()

    import psycopg
    from psycopg_pool import ConnectionPool

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = with_options(args.database_url, [f"search_path={schema}"])
    work = tempfile.mkdtemp(prefix="bench-phases-")
    try:
        results = {"waited_for_quiet_s": wait_for_quiet(args.quiet_wait)}
        # -- the bot's webhook core, SQLite inbox file vs PostgreSQL intake --------------------------------
        step, _, _ = receiver_step(None, os.path.join(work, "sqlite"))
        results["handle_sqlite_inbox"] = timed(step, args.count)
        step, store, _ = receiver_step(url, os.path.join(work, "pg"))  # migrates the schema
        results["handle_postgres"] = timed(step, args.count)
        step, pid = take_in_step(store)
        results["take_in_group_of_4"] = timed(step, args.count, pid)
        store.close()

        # -- the thread hop the ASGI front made per delivery before it awaited the intake on its loop ----
        results["executor_hop"] = executor_hop(args.count)

        # -- the PostgreSQL transaction, step by step, with the bot's pool settings ------------------------
        from bot.storage.postgres import QuietCheck

        def pool(check, conn_url: str = url) -> ConnectionPool:
            p = ConnectionPool(conn_url, min_size=1, max_size=1, open=True, kwargs={"autocommit": True},
                               check=check)
            p.wait()
            return p

        def pid_of(p: ConnectionPool) -> int:
            with p.connection() as conn:
                return conn.execute("SELECT pg_backend_pid()").fetchone()[0]

        def insert(conn, n: int, key: str) -> None:
            conn.execute(INSERT, (f"{key}{n}", f"9{n:015d}", '{"text": "x"}', n, time.time()))

        # psycopg_pool's check (an empty query), the bot's (that query only when the server spoke or the
        # connection sat unused for QUIET_CHECK_S), none.
        for name, check in (("checkout_with_check", ConnectionPool.check_connection),
                            ("checkout_quiet_check", QuietCheck()), ("checkout_no_check", None)):
            p = pool(check)
            pid = pid_of(p)

            def checkout(n, p=p):
                with p.connection():
                    pass
            results[name] = timed(checkout, args.count, pid)
            p.close()

        p = pool(None)
        pid = pid_of(p)
        with p.connection() as conn:
            results["select_1"] = timed(lambda n: conn.execute("SELECT 1"), args.count, pid)

            def tx(notify: bool, key: str):
                def step(n: int) -> None:
                    with conn.transaction():
                        insert(conn, n, key)
                        if notify:
                            conn.execute("NOTIFY bot_queue")
                return step
            results["tx_insert"] = timed(tx(False, "a"), args.count, pid)
            results["tx_insert_notify"] = timed(tx(True, "b"), args.count, pid)
            conn.execute("SET synchronous_commit = off")
            results["tx_insert_notify_async_commit"] = timed(tx(True, "c"), args.count, pid)
            conn.execute("SET synchronous_commit = on")
            # A listener, as every reply process keeps one (bot/storage/postgres.py PostgresDoorbell).
            with psycopg.connect(url, autocommit=True) as listener:
                listener.execute("LISTEN bot_queue")
                results["tx_insert_notify_1_listener"] = timed(tx(True, "d"), args.count, pid)
        p.close()

        # -- a result row's column names, as the bot's row factory reads them (per statement), against
        # cursor.description's Column objects (what it read before): a seven-column row ---------------------
        from bot.storage.postgres import _row_factory
        with psycopg.connect(url, autocommit=True) as conn:
            cursor = conn.execute("SELECT 1 AS a, 2 AS b, 'x' AS c, 4.0 AS d, NULL AS e, 6 AS f, 7 AS g")
            results["row_names"] = timed(lambda n: _row_factory(cursor), args.count)
            results["row_names_from_description"] = timed(
                lambda n: {column.name: i for i, column in enumerate(cursor.description)}, args.count)
        print(json.dumps({"measure": "store_step", "count": args.count, **results}), flush=True)

        # -- PostgreSQL's own client: the server's ceiling for this transaction on this machine -------------
        for name, notify, async_commit in (("insert", False, False), ("insert_notify", True, False),
                                           ("insert_notify_async_commit", True, True)):
            with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
                script.write("\\set n random(1, 2000000000)\nBEGIN;\n"
                             f"INSERT INTO events (dedupe_key, psid, message, timestamp_ms, received_at) VALUES "
                             f"('{name}-' || :client_id || '-' || :n, '9' || :n, '{{}}', :n, 0) "
                             "ON CONFLICT (dedupe_key) DO NOTHING;\n"
                             + ("NOTIFY bot_queue;\n" if notify else "") + "COMMIT;\n")
            waited = wait_for_quiet(args.quiet_wait)
            env = {**os.environ, "PGOPTIONS": f"-c search_path={schema}"
                   + (" -c synchronous_commit=off" if async_commit else "")}
            out = subprocess.run([PGBENCH, "-n", "-M", "prepared", "-c", "16", "-j", "2", "-T", str(args.seconds),
                                  "-f", script.name, args.database_url], capture_output=True, text=True, env=env,
                                 timeout=args.seconds + 60)
            os.unlink(script.name)
            tps = [line for line in out.stdout.splitlines() if line.startswith("tps")]
            lat = [line for line in out.stdout.splitlines() if line.startswith("latency average")]
            print(json.dumps({"measure": "pgbench", "transaction": name, "clients": 16,
                              "tps": float(tps[0].split()[2]) if tps else None,
                              "latency_avg_ms": float(lat[0].split()[3]) if lat else None,
                              "error": out.stderr.strip()[-300:] if out.returncode else None,
                              "waited_for_quiet_s": waited}), flush=True)
    finally:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
