"""The doorbell between the webhook and the reply dispatcher."""
import threading
import time

from bot.storage.doorbell import Doorbell


def test_a_ring_wakes_the_listener_at_once(tmp_path):
    listener = Doorbell(str(tmp_path / "q.sqlite3"))
    assert listener.listen()
    ringer = Doorbell(str(tmp_path / "q.sqlite3"))
    threading.Timer(0.05, ringer.ring).start()
    started = time.monotonic()
    assert listener.wait(5.0) is True
    assert time.monotonic() - started < 1.0
    listener.close()


def test_rings_before_the_wait_are_not_lost_and_are_consumed(tmp_path):
    bell = Doorbell(str(tmp_path / "q.sqlite3"))
    assert bell.listen()
    for _ in range(5):
        bell.ring()
    assert bell.wait(1.0) is True
    assert bell.wait(0.05) is False  # all five consumed by one wake-up
    bell.close()


def test_only_one_listener_per_database_and_the_other_polls(tmp_path):
    first, second = Doorbell(str(tmp_path / "q.sqlite3")), Doorbell(str(tmp_path / "q.sqlite3"))
    assert first.listen()
    assert not second.listen()
    started = time.monotonic()
    assert second.wait(0.1) is False
    assert time.monotonic() - started >= 0.1
    first.close()


def test_ringing_nobody_is_harmless(tmp_path):
    Doorbell(str(tmp_path / "nobody.sqlite3")).ring()
