"""The web workers' ConnectionGuard (bot/web/worker.py) on a fake event-loop clock: which
connection goes to make room, and when deadlines cut one off. tests/test_hardening.py runs the
same guard in the real gunicorn against real sockets."""
from __future__ import annotations

import heapq
import itertools
import time

from bot.web.worker import ROOM_GRACE_SECONDS, ConnectionGuard, connection_cap, connection_ceiling


class FakeLoop:
    """`time`, `call_later` and a hand that moves the clock."""

    def __init__(self):
        self.now = 0.0
        self.timers: list = []
        self.order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, seconds, callback, *args):
        handle = Timer(callback, args)
        heapq.heappush(self.timers, (self.now + seconds, next(self.order), handle))
        return handle

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while self.timers and self.timers[0][0] <= self.now:
            _, _, handle = heapq.heappop(self.timers)
            if not handle.cancelled:
                handle.callback(*handle.args)


class Timer:
    def __init__(self, callback, args):
        self.callback, self.args, self.cancelled = callback, args, False

    def cancel(self) -> None:
        self.cancelled = True


class Connection:
    def __init__(self, name: str):
        self.name, self.closed = name, False

    def close_now(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return self.name


class Counter:
    def __init__(self):
        self.counts: dict[str, int] = {}

    def labels(self, reason):
        counter = self

        class Child:
            def inc(self):
                counter.counts[reason] = counter.counts.get(reason, 0) + 1
        return Child()


class World:
    """A guard with `cap` connections at most, and the connections it has seen opened."""

    def __init__(self, cap: int = 3, header_seconds: float = 10.0, stall_seconds: float = 30.0,
                 ceiling: int | None = None):
        self.loop, self.closed_total = FakeLoop(), Counter()
        self.guard = ConnectionGuard(self.loop, cap, header_seconds, stall_seconds, closed_total=self.closed_total,
                                     ceiling=ceiling)
        self.open: list[Connection] = []

    def connect(self, name: str) -> Connection:
        connection = Connection(name)
        self.open.append(connection)
        self.guard.opened(connection, len(self.open))
        self.open = [c for c in self.open if not c.closed]
        return connection

    def request(self, connection: Connection) -> None:
        """Headers and body in."""
        self.guard.headers_in(connection)
        self.guard.received(connection)


def test_past_the_cap_the_connection_quiet_longest_goes_and_one_being_answered_never_does():
    world = World(cap=3)
    answering = world.connect("answering")
    world.request(answering)
    silent, sending = world.connect("silent"), world.connect("sending")
    world.guard.active(sending)  # its bytes keep coming: the newest in the order again
    assert not any(c.closed for c in (answering, silent, sending))
    world.loop.advance(ROOM_GRACE_SECONDS)  # silent since it opened, past the grace
    meta = world.connect("meta")
    assert silent.closed and not sending.closed and not answering.closed and not meta.closed
    world.request(meta)
    world.connect("next")
    assert sending.closed and not answering.closed and not meta.closed
    assert world.closed_total.counts == {"room": 2}


def test_with_every_connection_being_answered_new_ones_come_in_until_the_open_files_run_out():
    """Busy, well-behaved clients (each with a request always in flight) past the cap must not
    lock Meta out: the new one comes in while the worker's open files allow."""
    world = World(cap=2, ceiling=3)
    first, second = world.connect("first"), world.connect("second")
    world.request(first)
    world.request(second)
    meta = world.connect("meta")
    assert not any(c.closed for c in (first, second, meta))
    world.request(meta)
    last = world.connect("last")
    assert last.closed and not any(c.closed for c in (first, second, meta))
    assert world.closed_total.counts == {"refused": 1}


def test_a_connection_accepted_a_moment_ago_is_not_closed_to_make_room_until_the_grace_is_over():
    """asyncio accepts a burst of connections before it reads from any: the oldest of the burst
    (Meta's, its request already on its way) must not go for the ones behind it."""
    world = World(cap=2, ceiling=4)
    busy = world.connect("busy")
    world.request(busy)
    meta = world.connect("meta")
    world.loop.advance(ROOM_GRACE_SECONDS / 2)
    crowd = world.connect("crowd")  # past the cap: nothing closable yet, so it comes in
    assert not any(c.closed for c in (busy, meta, crowd))
    world.guard.active(meta)  # its request's bytes: heard from, so it waits with the others
    world.loop.advance(ROOM_GRACE_SECONDS)
    late = world.connect("late")  # crowd is silent past the grace: it goes, meta (heard) is next
    assert crowd.closed and not any(c.closed for c in (busy, meta, late))
    assert world.closed_total.counts == {"room": 1}


def test_headers_must_be_in_within_the_deadline_and_a_body_still_coming_stays_closable():
    world = World(cap=2, header_seconds=10)
    silent, uploading = world.connect("silent"), world.connect("uploading")
    world.loop.advance(9.9)
    world.guard.headers_in(uploading)  # in time; its body is still on its way
    world.loop.advance(0.2)
    assert silent.closed and not uploading.closed
    assert world.closed_total.counts == {"header-timeout": 1}
    world.loop.advance(60)
    assert not uploading.closed  # the body's own deadline is bot/web/asgi.py's (408)
    world.connect("another")
    world.connect("meta")
    assert uploading.closed  # closable until its body is in: it made room


def test_a_connection_idle_after_its_answer_goes_before_a_fresh_one_waiting_for_its_request():
    """A crowd whose connections are answered and reconnect at once must not push out a fresh
    connection (Meta's) before its request is in."""
    world = World(cap=3)
    crowd = world.connect("crowd")
    world.request(crowd)
    meta = world.connect("meta")  # fresh: its bytes not read yet
    world.guard.answered(crowd)  # idle from now: newer than `meta`, and still the first to go
    world.connect("crowd again")
    world.connect("crowd once more")
    assert crowd.closed and not meta.closed
    world.guard.active(meta)
    world.request(meta)
    assert not meta.closed and world.closed_total.counts == {"room": 1}


def test_a_kept_alive_connection_starting_its_next_request_waits_with_the_fresh_ones():
    world = World(cap=2)
    kept = world.connect("kept")
    world.request(kept)
    world.guard.answered(kept)
    other = world.connect("other")
    world.guard.active(kept)  # its next request is coming: after `other` in the queue
    world.loop.advance(ROOM_GRACE_SECONDS)  # `other` silent since it opened, past the grace
    world.connect("meta")
    assert other.closed and not kept.closed


def test_an_answer_left_unread_makes_its_connection_closable_and_is_cut_off_after_the_stall_deadline():
    world = World(cap=2, stall_seconds=30)
    reader, not_reading = world.connect("reader"), world.connect("not-reading")
    world.request(reader)
    world.request(not_reading)
    world.guard.stalled_writing(not_reading)
    world.guard.stalled_writing(reader)
    world.loop.advance(5)
    world.guard.resumed_writing(reader)  # it read: busy, not closable
    meta = world.connect("meta")
    assert not_reading.closed and not reader.closed and not meta.closed
    assert world.closed_total.counts == {"room": 1}

    slow = World(cap=5, stall_seconds=30)
    stuck = slow.connect("stuck")
    slow.request(stuck)
    slow.guard.stalled_writing(stuck)
    slow.loop.advance(29.9)
    assert not stuck.closed
    slow.loop.advance(0.2)
    assert stuck.closed and slow.closed_total.counts == {"unread": 1}


def test_a_stop_closes_what_has_nothing_to_finish_then_what_ends_or_arrives_after_it():
    world = World(cap=5)
    silent, answering = world.connect("silent"), world.connect("answering")
    world.request(answering)
    world.guard.stop()
    assert silent.closed and not answering.closed
    world.guard.answered(answering)  # an answer that ends after the stop
    assert answering.closed
    late = world.connect("late")  # accepted before the stop, reported by asyncio a loop turn later
    assert late.closed
    assert world.closed_total.counts == {}  # a stop is not trouble: not counted


def test_reports_after_a_connection_is_gone_leave_nothing_behind():
    """gunicorn re-feeds a pipelined request after the client hung up: its reports come late."""
    world = World(cap=5)
    gone = world.connect("gone")
    world.request(gone)
    world.guard.gone(gone)
    world.guard.headers_in(gone)
    world.guard.received(gone)
    world.guard.answered(gone)
    world.guard.stalled_writing(gone)
    world.guard.closing_unsent(gone)
    guard = world.guard
    assert gone not in guard.closable and gone not in guard.busy and gone not in guard.stalled
    assert gone not in guard.closing
    assert not guard.deadlines and not guard.known


def test_an_answer_still_unsent_when_gunicorn_closes_is_closable_and_dropped_after_the_stall_deadline():
    world = World(cap=2, stall_seconds=30)
    closing, reading = world.connect("closing"), world.connect("reading")
    world.request(closing)
    world.request(reading)
    world.guard.closing_unsent(closing)  # Connection: close, its answer still buffered
    world.connect("meta")
    assert closing.closed and not reading.closed
    again = World(cap=5, stall_seconds=30)
    closing = again.connect("closing")
    again.request(closing)
    again.guard.closing_unsent(closing)
    again.guard.stalled_writing(closing)
    again.loop.advance(20)
    again.guard.resumed_writing(closing)  # it read a little: its deadline still stands
    again.loop.advance(10.1)
    assert closing.closed and again.closed_total.counts == {"unread": 1}


def test_the_next_pipelined_requests_headers_end_the_busy_time_of_the_one_before():
    world = World(cap=2)
    piped = world.connect("piped")
    world.request(piped)
    world.guard.headers_in(piped)  # the next request, its body still coming
    world.guard.stalled_writing(piped)
    world.guard.resumed_writing(piped)
    assert piped in world.guard.closable and piped not in world.guard.busy


def test_a_connection_gone_by_itself_leaves_no_deadline_behind():
    world = World(cap=5, header_seconds=10)
    gone = world.connect("gone")
    world.guard.gone(gone)
    world.loop.advance(20)
    assert not gone.closed and world.closed_total.counts == {}
    assert not world.guard.deadlines and not world.guard.closable


def test_the_cap_and_the_ceiling_leave_room_under_the_open_file_limit():
    assert connection_cap(1000, 65536, 384) == 1000 and connection_ceiling(65536, 384) == 65152
    assert connection_cap(1000, 1024, 384) == 640 == connection_ceiling(1024, 384)
    assert connection_cap(1000, 300, 384) == 1  # a line at start says to raise it


def test_the_soft_open_file_limit_is_raised_to_the_hard_one():
    """As a worker does before it counts its places (the soft 1,024 or 256 is a default)."""
    import subprocess
    import sys

    from tests.support import ROOT

    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)); "
            "from bot.web.worker import raise_open_files_limit; "
            "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.stdout.split(" ", 1) == ["4096", "(4096, 4096)\n"], done.stderr


def test_with_no_open_file_left_a_connection_in_its_grace_goes_rather_than_the_new_one():
    """A crowd of silent connections opened at once, past the open files: the grace gives way, the
    oldest goes, and the newest (Meta's, say) comes in."""
    world = World(cap=2, ceiling=3)
    silent = [world.connect(f"silent {n}") for n in range(3)]
    meta = world.connect("meta")
    assert silent[0].closed and not any(c.closed for c in (*silent[1:], meta))
    assert world.closed_total.counts == {"room": 1}


def test_a_flood_of_new_connections_inside_their_grace_costs_the_guard_little_each():
    """Each connection let in past the cap looks for one to close among a bounded few, not through
    every connection still inside its grace (20,000 at once took the guard ~15 s, quadratic)."""
    world = World(cap=10, ceiling=100_000)
    started = time.process_time()
    for n in range(20_000):
        world.guard.opened(Connection(f"flood {n}"), n + 1)
    assert time.process_time() - started < 2.0
