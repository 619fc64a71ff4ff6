"""What a claim costs on PostgreSQL when the database is across a network: round trips and time.

    .venv/bin/python bench/pg_claim.py --database-url postgresql://postgres@127.0.0.1:5432/test

Every host's claims take turns under one advisory lock (bot/storage/postgres.py, CLAIM_LOCK), so
the round trips a claim makes while holding it bound how many claims per second all the hosts
together can make: at 1 ms between a host and its database, each is a millisecond the others
wait. This claims (and completes) one waiting message per user, through a proxy (a process of
its own) that holds every packet for half of `--rtt-ms` each way, and prints one JSON line per
round-trip time and number of claimants: the claim's median and p99 wall time, the flights of
packets the bot sent per claim and its completion (one flight a round trip; counted with one
claimant), and the claims per second all the claimants (threads, as reply threads or hosts
would) make together. A fresh schema per line, dropped after.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import queue as queue_module
import socket
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import PAGE_ID, with_options  # noqa: E402


class DelayingProxy:
    """A TCP proxy on 127.0.0.1, in a process of its own (its threads and the claimants do not
    take turns at one interpreter lock), holding each packet `one_way_s` before passing it on, in
    order: a thread per direction reads, another sleeps until each packet is due and writes it
    (threads, as asyncio's timers wake to the millisecond at best). `flights`: the bursts the
    client sent (packets after a quiet moment of half the delay), a round trip each."""

    def __init__(self, host: str, port: int, one_way_s: float):
        self.target, self.one_way_s = (host, port), one_way_s
        self._flights = multiprocessing.Value("q", 0)
        self._last_sent = 0.0
        ready, self._ready = multiprocessing.Pipe(duplex=False)
        self._process = multiprocessing.get_context("fork").Process(target=self._run, daemon=True)
        self._process.start()
        self.port = ready.recv()

    @property
    def flights(self) -> int:
        return self._flights.value

    def stop(self) -> None:
        self._process.kill()
        self._process.join()

    def _run(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self._ready.send(listener.getsockname()[1])
        while True:
            client, _ = listener.accept()
            server = socket.create_connection(self.target)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(client, server, counted=True)
            self._pipe(server, client, counted=False)

    def _pipe(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        held: queue_module.SimpleQueue = queue_module.SimpleQueue()

        def read() -> None:
            while data := source.recv(65536):
                now = time.monotonic()
                if counted:
                    if now - self._last_sent > self.one_way_s / 2:
                        with self._flights.get_lock():
                            self._flights.value += 1
                    self._last_sent = now
                held.put((now + self.one_way_s, data))
            held.put(None)

        def write() -> None:
            while (item := held.get()) is not None:
                if (wait := item[0] - time.monotonic()) > 0:
                    time.sleep(wait)
                sink.sendall(item[1])
            sink.shutdown(socket.SHUT_WR)
        for target in (read, write):
            threading.Thread(target=target, daemon=True).start()


def measure(url: str, rtt_ms: float, claims: int, claimants: int, analysed: bool = True) -> dict:
    import psycopg

    from bot.storage.queue import PostgresQueue
    from messenger.events import TEXT, IncomingMessage

    conninfo = psycopg.conninfo.conninfo_to_dict(url)
    proxy = DelayingProxy(conninfo.get("host", "127.0.0.1"), int(conninfo.get("port", 5432)), rtt_ms / 2000) \
        if rtt_ms else None  # 0: straight to the server
    queue = PostgresQueue(psycopg.conninfo.make_conninfo(url, host="127.0.0.1", port=proxy.port) if proxy else url,
                          pool_size=claimants + 1)
    walls: list[float] = []

    def claim_until_none(owner: str) -> None:
        while True:
            started = time.perf_counter()
            batch = queue.claim(owner, 60.0)
            if batch is None:
                return
            walls.append(time.perf_counter() - started)
            queue.complete(batch)
    try:
        tag = uuid.uuid4().hex[:6]
        queue.take_in([([IncomingMessage(psid=f"9{n:09d}", page_id=PAGE_ID, mid=f"m_claim_{tag}_{n}", kind=TEXT,
                                         text="Do you open on Sundays?", timestamp_ms=1_764_000_000_000 + n)], [])
                       for n in range(claims + 1)])
        # Statistics, as autovacuum gives a table about a minute after its first 50 rows (--statistics
        # none: as before that, or where autovacuum is off). Without any, PostgreSQL plans the look
        # for work as if the queue held a row or two; before 2026-12-07 that compared every waiting
        # row with every other (at 300-900 waiting, 10-45 ms a claim).
        if analysed:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("ANALYZE events")
        queue.claim("warm-up", 60.0)  # the pool's connection made, the statements' plans settled
        before, started = proxy.flights if proxy else 0, time.perf_counter()
        threads = [threading.Thread(target=claim_until_none, args=(f"bench-{n}",)) for n in range(claimants)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed, flights = time.perf_counter() - started, (proxy.flights if proxy else 0) - before
    finally:
        queue.close()
        if proxy:
            proxy.stop()
    walls.sort()
    return {"bench": "claim", "rtt_ms": rtt_ms, "claimants": claimants, "claims": len(walls),
            "statistics": "analysed" if analysed else "none",
            "claim_p50_ms": round(statistics.median(walls) * 1000, 2),
            "claim_p99_ms": round(walls[int(len(walls) * 0.99)] * 1000, 2),
            # a flight: what the bot sent after a quiet moment; only one claimant's can be told apart
            "round_trips_per_claim_and_complete": round(flights / len(walls), 2) if claimants == 1 and rtt_ms else None,
            "claims_per_s_all_claimants": round(len(walls) / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--rtt-ms", default="0,0.5,1",
                        help="round-trip times to the database, comma-separated (0: no proxy in between)")
    parser.add_argument("--claims", type=int, default=300)
    parser.add_argument("--claimants", default="1,4", help="claiming threads at once (as many reply threads"
                        " or hosts), comma-separated")
    parser.add_argument("--statistics", default="analysed", help="analysed (ANALYZE before the claims, as"
                        " autovacuum would), none, or both: analysed,none")
    args = parser.parse_args()
    import psycopg

    for rtt, claimants, stats in ((float(rtt), int(claimants), stats) for rtt in args.rtt_ms.split(",")
                                  for claimants in args.claimants.split(",")
                                  for stats in args.statistics.split(",")):
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        try:
            url = with_options(args.database_url, [f"search_path={schema}"])
            print(json.dumps(measure(url, rtt, args.claims, claimants, stats == "analysed")), flush=True)
        finally:
            with psycopg.connect(args.database_url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


if __name__ == "__main__":
    main()
