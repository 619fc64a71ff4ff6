"""A frozen kept process is told from a live one by its alive file (bot/runtime/liveness.py),
on the master's clock - here a FakeClock, the file's changes made by the test."""
import os
import threading

from bot.runtime.liveness import Silence, keep_saying_alive
from tests.support import FakeClock, wait_until


def touched(path, at_ns):
    os.utime(path, ns=(at_ns, at_ns))


def test_a_file_that_keeps_changing_is_never_frozen_and_one_that_stops_is_after_the_limit(tmp_path):
    path = tmp_path / "alive"
    path.write_text("")
    clock = FakeClock(100.0)
    silence = Silence(str(path), clock)
    silence.restart()
    for second in range(1, 200):  # a live process: a touch a second
        clock.advance(1)
        touched(path, second * 10 ** 9)
        assert not silence.frozen(clock(), after=90)
    for _ in range(90):  # it stops
        clock.advance(1)
        assert not silence.frozen(clock(), after=90)
    clock.advance(1)
    assert silence.frozen(clock(), after=90)
    touched(path, 500 * 10 ** 9)  # it moves again
    assert not silence.frozen(clock(), after=90)


def test_a_new_process_gets_the_whole_limit_and_a_missing_file_is_never_judged(tmp_path):
    path = tmp_path / "alive"
    clock = FakeClock(100.0)
    silence = Silence(str(path), clock)
    for _ in range(20):
        clock.advance(10)
        assert not silence.frozen(clock(), after=90)  # no file: nothing to judge by
    path.write_text("")
    silence.restart()  # the supervisor made it, starting a process
    clock.advance(25)
    assert not silence.frozen(clock(), after=90)
    for _ in range(3):
        clock.advance(25)
    assert silence.frozen(clock(), after=90) is False  # one look 75 s after the last: this master was not running
    for _ in range(4):
        clock.advance(25)
        frozen = silence.frozen(clock(), after=90)
    assert frozen  # 100 s of silence, looked at every 25 s


def test_the_kept_process_keeps_touching_its_file_and_one_started_by_hand_does_not(tmp_path, monkeypatch):
    path = tmp_path / "alive"
    path.write_text("")
    touched(path, 0)
    stop = threading.Event()
    thread = keep_saying_alive(str(path), every=0.05, until=stop)
    try:
        assert wait_until(lambda: os.stat(path).st_mtime > 1_000_000, 5)
        touched(path, 0)
        assert wait_until(lambda: os.stat(path).st_mtime > 1_000_000, 5)  # again, not once
    finally:
        stop.set()
        thread.join(5)
    monkeypatch.delenv("BOT_ALIVE_FILE", raising=False)
    assert keep_saying_alive() is None
