"""gunicorn's asyncio worker with the two guards against idle connections that it lacks.

gunicorn's `asgi` worker (27.0) gives a connection's first request no deadline for its headers
and ignores `worker_connections`: connections that open and send nothing stay open for ever, and
500 of them against an open-file limit of 256 stopped a worker accepting anything, Meta's
deliveries included: its loop spun on EMFILE tracebacks until gunicorn killed it 30 s later. Here:

- a connection must send its first request line and headers within `header_seconds` of opening
  (gunicorn's own `keepalive` timer bounds the wait for each later request, and bot/web/asgi.py
  the wait for a body);
- a worker holds at most `connection_cap` connections (`worker_connections`, and always room
  under its open-file limit). Past it, the connection idle longest (one with no request fully
  received: still sending it, or kept alive after its answer) is closed to make room, so a crowd
  of slow or silent sockets cannot lock Meta out. A request fully received is never cut short.

And a stop closes the idle connections at once: gunicorn waited for each to end by itself.

Used by the webhook workers (gunicorn.conf.py) and the website chat (bot/webchat/serve.py).
"""
from __future__ import annotations

import asyncio
import logging
import resource

from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers import gasgi

HEADER_SECONDS = 10.0
# Open files a worker needs besides the connections it holds: the database (and PostgreSQL's
# pool), the listening socket, logs, pipes (a webhook worker holds 23 on SQLite), and room for
# the 100 connections asyncio accepts in one go before the guard sees the first of them. The
# website chat adds one connection to the model server per answer in progress (WEBCHAT_THREADS).
RESERVED_FILES = 256
# Fewer connections than this per worker is worth a line at start.
LOW_CAP = 100
# At most one warning a minute about closing connections to make room.
WARN_EVERY_SECONDS = 60.0

log = logging.getLogger("bot.web.worker")


def connection_cap(worker_connections: int, open_files_limit: int, reserved_files: int) -> int:
    """How many connections one worker may hold: gunicorn's setting, within its open files."""
    if open_files_limit == resource.RLIM_INFINITY:
        return worker_connections
    return max(1, min(worker_connections, open_files_limit - reserved_files))


class ConnectionGuard:
    """One worker's idle HTTP/1 connections, longest idle first, and the deadline of each first
    request's headers."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cap: int, header_seconds: float):
        self.loop = loop
        self.cap = cap
        self.header_seconds = header_seconds
        self.idle: dict[GuardedProtocol, None] = {}  # insertion order: longest idle first
        self.header_timers: dict[GuardedProtocol, asyncio.TimerHandle] = {}
        # Imported here, in the worker: gunicorn imports this module in the master, before
        # gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR, and prometheus_client chooses its
        # (multiprocess) storage once, when first imported.
        from bot.telemetry.metrics import CONNECTIONS_CLOSED
        self.closed_total = CONNECTIONS_CLOSED
        self.closed_for_room = 0
        self.stopping = False
        self._warned_at: float | None = None

    def opened(self, connection: "GuardedProtocol", open_connections: int) -> None:
        if open_connections > self.cap:
            # With no connection idle every one is being answered: the new one goes.
            longest_idle = next(iter(self.idle), connection)
            self._close_for_room(longest_idle)
            if longest_idle is connection:
                return
        self.idle[connection] = None
        self.header_timers[connection] = self.loop.call_later(self.header_seconds, self._too_slow, connection)

    def headers_in(self, connection: "GuardedProtocol") -> None:
        timer = self.header_timers.pop(connection, None)
        if timer is not None:
            timer.cancel()

    def received(self, connection: "GuardedProtocol") -> None:
        """The request is in: the connection is busy until its answer is out."""
        self.headers_in(connection)
        self.idle.pop(connection, None)

    gone = received  # closed: forgotten alike

    def idle_again(self, connection: "GuardedProtocol") -> None:
        if self.stopping:  # its answer is out, and no other request is coming
            self.received(connection)
            connection.close_idle()
            return
        self.idle.pop(connection, None)
        self.idle[connection] = None

    def stop(self) -> None:
        """The worker is stopping: connections with no request in progress have nothing to finish,
        and gunicorn would otherwise wait for their header deadline or keep-alive to run out."""
        self.stopping = True
        for connection in list(self.idle):
            self.received(connection)
            connection.close_idle()

    def _too_slow(self, connection: "GuardedProtocol") -> None:
        self.header_timers.pop(connection, None)
        self.idle.pop(connection, None)
        connection.close_idle()
        self.closed_total.labels("header-timeout").inc()

    def _close_for_room(self, connection: "GuardedProtocol") -> None:
        self.received(connection)
        connection.close_idle()
        self.closed_total.labels("room").inc()
        self.closed_for_room += 1
        now = self.loop.time()
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY_SECONDS:
            self._warned_at = now
            log.warning("%d connections open, the most this worker holds (worker_connections, open files): "
                        "closed the one idle longest (%d so far)", self.cap, self.closed_for_room)


class GuardedProtocol(ASGIProtocol):
    """gunicorn's protocol, reporting to the worker's ConnectionGuard."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # HTTP/1 only: HTTP/2 (which the bot does not turn on) frames requests its own way.
        if getattr(self, "_callback_parser", None) is not None and not self._closed:
            self.worker.guard.opened(self, self.worker.nr_conns)

    def _on_headers_complete(self):
        self.worker.guard.headers_in(self)
        return super()._on_headers_complete()

    def _on_message_complete(self):
        self.worker.guard.received(self)
        return super()._on_message_complete()

    def _arm_keepalive_timer(self):  # the answer is out: idle until the next request
        if not self._closed:
            self.worker.guard.idle_again(self)
        return super()._arm_keepalive_timer()

    def connection_lost(self, exc) -> None:
        self.worker.guard.gone(self)
        super().connection_lost(exc)

    def close_idle(self) -> None:
        self._close_transport()
        # Wake the connection's task so it ends now rather than at the connection_lost callback.
        if self._request_ready is not None:
            self._request_ready.set()


class GuardedASGIWorker(gasgi.ASGIWorker):
    """`worker_class` for the bot: gunicorn's asgi worker serving GuardedProtocol."""

    # Set per deployment by the post_fork hook: HEADER_TIMEOUT, and the website chat's threads.
    header_seconds = HEADER_SECONDS
    reserved_files = RESERVED_FILES

    def init_process(self) -> None:
        # gunicorn builds each connection's protocol from this module-level name, with no setting
        # to choose another; this process runs this worker only (gunicorn is pinned, and
        # tests/test_hardening.py fails if the guard stops working).
        gasgi.ASGIProtocol = GuardedProtocol
        super().init_process()

    async def _serve(self):
        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap = connection_cap(self.worker_connections, soft_limit, self.reserved_files)
        if cap < LOW_CAP:
            log.warning("this worker can hold only %d connections: its open-file limit (ulimit -n) is %d; "
                        "raise it (the systemd unit sets LimitNOFILE=65536)", cap, soft_limit)
        self.guard = ConnectionGuard(self.loop, cap, self.header_seconds)
        await super()._serve()

    async def _shutdown(self):
        # No await before gunicorn's own _shutdown stops accepting: no connection slips in between.
        self.guard.stop()
        await super()._shutdown()
