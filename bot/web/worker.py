"""gunicorn's asyncio worker with the guards against slow and idle clients that it lacks.

gunicorn's `asgi` worker (27.0) gives a connection's first request no deadline for its headers,
ignores `worker_connections`, and waits for ever on a client that does not read its answer:
connections that open and send nothing stay open for ever, and 500 of them against an open-file
limit of 256 stopped a worker accepting anything, Meta's deliveries included (its loop spun on
EMFILE tracebacks until gunicorn killed it 30 s later). Here:

- a connection must send its first request line and headers within `header_seconds` of opening
  (gunicorn's own `keepalive` timer bounds the wait for each later request, and bot/web/asgi.py
  the wait for a webhook's body);
- an answer that fills the write buffer (64 KB) and stays unread for `stall_seconds`, or that
  is still unsent when gunicorn closes the connection, is dropped with its connection after
  `stall_seconds` (gunicorn waited for ever to send it, its file open);
- a worker holds about `connection_cap` connections (`worker_connections`, and always room
  under its open-file limit, which it first raises to the hard limit). Past it, a closable
  connection is closed to make room: one with no request fully received (opening, sending one,
  kept alive after its answer) or one whose client is not reading: first the one idle longest
  after an answer, then the one waiting longest for its request to come in - but not one
  accepted less than ROOM_GRACE_SECONDS ago that has sent nothing yet (asyncio accepts a burst
  before it reads any of them), while the open files allow more. So a crowd of slow or silent
  sockets cannot lock Meta out. A request fully received whose client reads its answer is never
  cut short; with none closable, new connections are still let in up to what the open files
  allow (`connection_ceiling`), so neither can a crowd of busy, well-behaved clients.
- a stop closes the closable connections at once (gunicorn waited for each to end by itself);
- the listening socket keeps gunicorn's `backlog` (2048): asyncio re-listened with 100.

Used by the webhook workers (gunicorn.conf.py) and the website chat (bot/webchat/serve.py).
"""
from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import math
import resource

from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers import gasgi

HEADER_SECONDS = 10.0
# An answer its client leaves unread this long is abandoned (the website chat's stream sends a
# piece at least every few seconds to a reader; nobody honest leaves 64 KB unread for this long).
STALL_SECONDS = 30.0
# Open files a worker needs besides the connections it holds: the database (and PostgreSQL's
# pool), the listening socket, logs, pipes (a webhook worker holds 23 on SQLite), and room for
# the connections asyncio accepts before the guard has closed any: up to 100 at a time, and a
# second hundred while the first are being closed (a flood peaked at 296 over the cap).
RESERVED_FILES = 384
# A connection accepted this recently and not yet heard from is not closed to make room: asyncio
# accepts a burst of connections before it reads from any, so the oldest of a burst - Meta's, its
# request already sent - went first (seen in CI: a delivery reset under a crowd of busy clients).
ROOM_GRACE_SECONDS = 1.0
# How far into the waiting connections the guard looks for one past its grace: a flood of new
# connections inside their grace would otherwise be read through again for every one let in.
ROOM_LOOK_AHEAD = 64
# Fewer connections than this per worker is worth a line at start.
LOW_CAP = 100
# At most one warning a minute for each kind of trouble.
WARN_EVERY_SECONDS = 60.0

log = logging.getLogger("bot.web.worker")


def connection_cap(worker_connections: int, open_files_limit: int, reserved_files: int) -> int:
    """How many connections one worker holds before it closes closable ones to make room:
    gunicorn's setting, within its open files."""
    return min(worker_connections, connection_ceiling(open_files_limit, reserved_files))


def connection_ceiling(open_files_limit: int, reserved_files: int) -> int:
    """How many connections one worker's open files allow: past the cap, with none closable (every
    one being answered), new ones are still let in up to here - refusing them would let a crowd
    of busy but well-behaved clients lock Meta out."""
    if open_files_limit == resource.RLIM_INFINITY:
        return 1_000_000
    return max(1, open_files_limit - reserved_files)


def raise_open_files_limit(most: int = 65536) -> int:
    """The soft open-file limit raised to the hard one (at most `most`), as servers do: the soft
    1,024 (256 on macOS) is a default, not a choice. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = most if hard == resource.RLIM_INFINITY else min(hard, most)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


class ConnectionGuard:
    """One worker's closable connections, in the order they go, and their deadlines.

    A connection is closable while no request of it is fully received (from opening, or from its
    last answer, until the next request is all in) and while its client leaves an answer unread.
    Past the cap the first to go is the one idle longest after an answer (kept alive, or its
    answer unread), then the one waiting longest for its request to come in: a fresh connection
    (Meta's, say) is never closed for a crowd that keeps reconnecting between its answers.
    Times come from the event loop's clock (`loop.time`, `loop.call_later`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cap: int, header_seconds: float,
                 stall_seconds: float = STALL_SECONDS, closed_total=None, ceiling: int | None = None):
        self.loop = loop
        self.cap = cap
        self.ceiling = max(cap, ceiling or cap)
        self.header_seconds = header_seconds
        self.stall_seconds = stall_seconds
        self.closed_total = closed_total  # a Counter by reason (bot.telemetry.metrics), or None
        self.known: set[GuardedProtocol] = set()  # opened and not gone: reports for others are late
        # Closable, each in insertion order (quiet longest first): after an answer, then coming in.
        self.idle: dict[GuardedProtocol, None] = {}
        self.receiving: dict[GuardedProtocol, None] = {}
        self.unheard: dict[GuardedProtocol, float] = {}  # opened, no byte yet: when (ROOM_GRACE_SECONDS)
        self.busy: set[GuardedProtocol] = set()  # a request fully in, its answer not yet out
        self.stalled: set[GuardedProtocol] = set()  # the client is not reading its answer
        self.closing: set[GuardedProtocol] = set()  # closed by gunicorn, its answer not all sent
        self.deadlines: dict[GuardedProtocol, asyncio.TimerHandle] = {}  # headers, or an unread answer
        self.stopping = False
        self._warned_at: dict[str, float] = {}

    @property
    def closable(self) -> set["GuardedProtocol"]:
        return set(self.idle) | set(self.receiving)

    # -- what the protocol reports --------------------------------------------------------------
    def opened(self, connection: "GuardedProtocol", open_connections: int) -> None:
        if self.stopping:  # accepted just before the stop: asyncio reports it a loop turn later
            connection.close_now()
            return
        now = self.loop.time()
        if open_connections > self.cap:
            waiting = itertools.islice(self.receiving, ROOM_LOOK_AHEAD)
            first = next(iter(self.idle), None) or next(
                (c for c in waiting if now - self.unheard.get(c, -math.inf) >= ROOM_GRACE_SECONDS), None)
            if first is None and open_connections > self.ceiling:  # no file left: the grace gives way
                first = next(iter(self.receiving), None)
            if first is not None:
                self._close(first, "room", "%d connections open, the most this worker holds (worker_connections, "
                            "open files): closed the one quiet longest", self.cap)
            elif open_connections > self.ceiling:  # every one is being answered, and no file is left
                self._close(connection, "refused", "%d connections open, all of them being answered, and no open "
                            "file left for more: closed a new one", self.ceiling)
                return
        self.known.add(connection)
        self.receiving[connection] = None
        self.unheard[connection] = now
        self._deadline(connection, self.header_seconds, "header-timeout")

    def active(self, connection: "GuardedProtocol") -> None:
        """Bytes came in: a request is coming (the one sending goes last among those waiting)."""
        self.unheard.pop(connection, None)
        if connection in self.receiving or (connection in self.idle and connection not in self.stalled):
            self.idle.pop(connection, None)
            self.receiving.pop(connection, None)
            self.receiving[connection] = None

    def headers_in(self, connection: "GuardedProtocol") -> None:
        """A request's headers are in; its body may still be on its way (closable until it is).
        gunicorn parses a pipelined request once the answer before it is out."""
        if connection not in self.known:  # gone: gunicorn re-feeds a pipelined tail after a hang-up
            return
        self.busy.discard(connection)
        if connection not in self.stalled:
            self._cancel_deadline(connection)
            self.idle.pop(connection, None)
            self.receiving.setdefault(connection, None)

    def received(self, connection: "GuardedProtocol") -> None:
        """The request is in: its connection is not closable while it is being answered."""
        if connection not in self.known:
            return
        self.busy.add(connection)
        if connection not in self.stalled:
            self.idle.pop(connection, None)
            self.receiving.pop(connection, None)

    def answered(self, connection: "GuardedProtocol") -> None:
        """The answer is out and no request is in progress: closable again, idle from now."""
        if connection not in self.known:
            return
        self.busy.discard(connection)
        if self.stopping:  # no other request is coming
            self._close(connection)
            return
        self._idle_from_now(connection)

    def stalled_writing(self, connection: "GuardedProtocol") -> None:
        if connection not in self.known or connection in self.closing:  # closing: its deadline stands
            return
        self.stalled.add(connection)
        self._idle_from_now(connection)
        self._deadline(connection, self.stall_seconds, "unread")

    def resumed_writing(self, connection: "GuardedProtocol") -> None:
        if connection in self.stalled and connection not in self.closing:  # closing: its deadline stands
            self.stalled.discard(connection)
            self._cancel_deadline(connection)
            if connection in self.busy:
                self.idle.pop(connection, None)

    def closing_unsent(self, connection: "GuardedProtocol") -> None:
        """gunicorn closes the connection (`Connection: close`, an error) with its answer not all
        sent: closable, and dropped if still unsent after `stall_seconds`."""
        if connection not in self.known or connection in self.closing:
            return
        self.busy.discard(connection)
        self.closing.add(connection)
        self.stalled.add(connection)
        self._idle_from_now(connection)
        self._deadline(connection, self.stall_seconds, "unread")

    def gone(self, connection: "GuardedProtocol") -> None:
        self.known.discard(connection)
        self.unheard.pop(connection, None)
        self._cancel_deadline(connection)
        self.idle.pop(connection, None)
        self.receiving.pop(connection, None)
        self.busy.discard(connection)
        self.stalled.discard(connection)
        self.closing.discard(connection)

    def stop(self) -> None:
        """The worker is stopping: closable connections have nothing to finish, and gunicorn would
        otherwise wait for their deadlines or keep-alive to run out."""
        self.stopping = True
        for connection in [*self.idle, *self.receiving]:
            self._close(connection)

    # -- inside ------------------------------------------------------------------------------------
    def _idle_from_now(self, connection: "GuardedProtocol") -> None:
        self.receiving.pop(connection, None)
        self.idle.pop(connection, None)
        self.idle[connection] = None

    def _deadline(self, connection: "GuardedProtocol", seconds: float, reason: str) -> None:
        self._cancel_deadline(connection)
        self.deadlines[connection] = self.loop.call_later(seconds, self._close, connection, reason)

    def _cancel_deadline(self, connection: "GuardedProtocol") -> None:
        timer = self.deadlines.pop(connection, None)
        if timer is not None:
            timer.cancel()

    def _close(self, connection: "GuardedProtocol", reason: str | None = None, warning: str = "", *args) -> None:
        self.gone(connection)
        connection.close_now()
        if reason and self.closed_total is not None:
            self.closed_total.labels(reason).inc()
        if warning:
            self.warn(reason, warning, *args)

    def warn(self, kind: str, message: str, *args) -> None:
        """`message`, at most once a minute for each kind."""
        now = self.loop.time()
        if now - self._warned_at.get(kind, -WARN_EVERY_SECONDS) >= WARN_EVERY_SECONDS:
            self._warned_at[kind] = now
            log.warning(message, *args)


class GuardedProtocol(ASGIProtocol):
    """gunicorn's protocol, reporting to the worker's ConnectionGuard."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # HTTP/1 only: HTTP/2 (which the bot does not turn on) frames requests its own way.
        if getattr(self, "_callback_parser", None) is not None and not self._closed:
            self.worker.guard.opened(self, self.worker.nr_conns)

    def data_received(self, data) -> None:
        self.worker.guard.active(self)
        super().data_received(data)

    def _on_headers_complete(self):
        self.worker.guard.headers_in(self)
        return super()._on_headers_complete()

    def _on_message_complete(self):
        self.worker.guard.received(self)
        return super()._on_message_complete()

    def _arm_keepalive_timer(self):  # the answer is out: idle until the next request
        if not self._closed:
            self.worker.guard.answered(self)
        return super()._arm_keepalive_timer()

    def _keepalive_timeout(self):
        if self._request_ready is not None and self._request_ready.is_set() and self._current_request is not None:
            return  # a request's headers came in this very loop turn: it is served
        # gunicorn's close waits to send what is buffered: for a client that does not read, for ever.
        self.close_now()

    def _close_transport(self):
        super()._close_transport()
        if self.transport is not None and self.transport.get_write_buffer_size():
            self.worker.guard.closing_unsent(self)

    def pause_writing(self):
        super().pause_writing()
        self.worker.guard.stalled_writing(self)

    def resume_writing(self):
        super().resume_writing()
        self.worker.guard.resumed_writing(self)

    def connection_lost(self, exc) -> None:
        self.worker.guard.gone(self)
        super().connection_lost(exc)

    def close_now(self) -> None:
        """Closed at once: what is buffered for a client that is not reading is dropped with it."""
        self._closed = True
        if self.transport is not None:
            if self.transport.get_write_buffer_size():
                self.transport.abort()
            else:
                self.transport.close()
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
        # Imported here, in the worker: gunicorn imports this module in the master, before
        # gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR, and prometheus_client chooses its
        # (multiprocess) storage once, when first imported.
        from bot.telemetry.metrics import CONNECTIONS_CLOSED

        soft_limit = raise_open_files_limit()
        cap = connection_cap(self.worker_connections, soft_limit, self.reserved_files)
        if cap < LOW_CAP:
            log.warning("this worker can hold only %d connections: its open-file limit (ulimit -n) is %d; "
                        "raise it (the systemd unit sets LimitNOFILE=65536)", cap, soft_limit)
        self.guard = ConnectionGuard(self.loop, cap, self.header_seconds, closed_total=CONNECTIONS_CLOSED,
                                     ceiling=connection_ceiling(soft_limit, self.reserved_files))
        self.loop.set_exception_handler(self._loop_exception)
        self._listen_with_gunicorns_backlog()
        await super()._serve()

    def _listen_with_gunicorns_backlog(self) -> None:
        """gunicorn hands its listening sockets to asyncio's create_server without a backlog, and
        asyncio listens again with its default of 100, not gunicorn's `backlog` (2048): a burst of
        deliveries past 100 waiting connections would lose SYNs, each retried a second later.
        The kernel's queue gets gunicorn's length back once asyncio has listened; asyncio keeps
        its 100 as the most it accepts in one go (with 2048 a flood took 2048 files at once)."""
        create_server = self.loop.create_server
        backlog = self.cfg.backlog

        async def with_backlog(*args, **kwargs):
            server = await create_server(*args, **kwargs)
            if kwargs.get("sock") is not None:
                kwargs["sock"].listen(backlog)
            return server
        self.loop.create_server = with_backlog

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # Out of open files, asyncio pauses accepting for a second and says so each time, with a
        # traceback: once a minute is enough.
        if isinstance(context.get("exception"), OSError) and context["exception"].errno in (errno.EMFILE,
                                                                                            errno.ENFILE):
            self.guard.warn("out-of-files", "out of open files (ulimit -n): accepting no connection for a second "
                            "(%s)", context.get("message", ""))
            return
        loop.default_exception_handler(context)

    async def _shutdown(self):
        # No await before gunicorn's own _shutdown stops accepting; a connection accepted before it
        # and reported after is closed in `opened`.
        self.guard.stop()
        await super()._shutdown()
