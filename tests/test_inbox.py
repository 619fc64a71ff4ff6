"""The webhook's inbox files: appended before the 200, drained once into the queue."""
import os
import threading

import pytest

from bot.storage import inbox
from bot.storage.inbox import ClassifiedEcho, InboxWriter, read_records
from bot.storage.queue import InboxUnreadable, SQLiteQueue
from messenger.events import TEXT, Echo, IncomingMessage
from tests.support import PSID, fixture_bytes, post_signed


def message(mid, text="hi"):
    return IncomingMessage(psid=PSID, page_id="1", mid=mid, kind=TEXT, text=text, timestamp_ms=1)


def test_a_torn_last_record_is_not_read():
    whole = inbox.encode([message("m1")], []) + inbox.encode([message("m2")], [])
    torn = whole + inbox.encode([message("m3")], [])[:-3]
    records, used, _ = read_records(torn)
    assert [inbox.decode(r)[1][0].mid for r in records] == ["m1", "m2"] and used == len(whole)
    corrupt = bytearray(whole)
    corrupt[-2] ^= 0xFF  # a flipped byte fails the CRC
    assert len(read_records(bytes(corrupt))[0]) == 1


def test_drained_once_duplicates_dropped_and_files_of_gone_writers_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(inbox, "ROTATE_BYTES", 200)  # a new file every couple of records
    directory = str(tmp_path / "inbox")
    store = SQLiteQueue(str(tmp_path / "bot.sqlite3"))
    writer = InboxWriter(directory)
    for n in range(6):
        writer.append([message(f"m{n}")], [])
    writer.append([message("m0")], [])  # Meta's redelivery of the first
    assert len(os.listdir(directory)) > 2
    assert store.inbox_backlog(directory)[0] == 7
    assert store.drain(directory) == (6, 1)
    assert store.drain(directory) == (0, 0)  # nothing enters twice
    assert set(store.states()) == {f"m{n}" for n in range(6)}
    assert len(os.listdir(directory)) == 1  # rotated-away files are gone; the open one stays
    writer.append([message("m9")], [])
    assert store.drain(directory) == (1, 0)


def test_the_backlog_counts_messages_reads_each_record_once_and_forgets_what_was_drained(tmp_path):
    directory = str(tmp_path / "inbox")
    store = SQLiteQueue(str(tmp_path / "bot.sqlite3"))
    writer = InboxWriter(directory)
    echo = ClassifiedEcho(Echo("u", "e1", "from a person", 1, None, None), True, None, inbox.ECHO)
    writer.append([message("m1"), message("m2")], [], at=100.0)  # one delivery, two messages
    writer.append([], [echo], at=101.0)  # echoes alone: nothing to answer
    writer.append([], [echo], at=101.5)
    assert store.inbox_backlog(directory) == (2, 100.0)
    [path] = [os.path.join(directory, name) for name in os.listdir(directory)]
    with open(path, "r+b") as f:  # what was read once is not read again (it cost ~1 s at 100k records)
        f.write(b"\0" * 40)
    writer.append([message("m3")], [], at=102.0)
    assert store.inbox_backlog(directory) == (3, 100.0)
    with open(path, "r+b") as f:  # put back, for the drain
        f.write(inbox.encode([message("m1"), message("m2")], [], at=100.0)[:40])
    assert store.drain(directory) == (3, 0)
    assert store.inbox_backlog(directory) == (0, None)
    writer.append([message("m4")], [], at=103.0)
    assert store.inbox_backlog(directory) == (1, 103.0)


def test_health_checks_at_the_same_moment_count_each_record_once(tmp_path):
    """Flask answers on several threads: two checks scanning the same bytes counted them twice."""
    directory = str(tmp_path / "inbox")
    writer = InboxWriter(directory)
    for n in range(20_000):
        writer.append([message(f"m{n}")], [], at=100.0 + n)
    backlog = inbox.Backlog()
    start = threading.Barrier(4)

    def check():
        start.wait()
        backlog.measure(directory, {})
    threads = [threading.Thread(target=check) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.append([message("late")], [], at=50.0)
    assert backlog.measure(directory, {}) == (20_001, 50.0)


def test_echoes_alone_give_the_backlog_no_age(tmp_path):
    directory = str(tmp_path / "inbox")
    echo = ClassifiedEcho(Echo("u", "e1", "from a person", 1, None, None), True, None, inbox.ECHO)
    InboxWriter(directory).append([], [echo], at=100.0)
    assert inbox.Backlog().measure(directory, {}) == (0, None)


def test_a_new_inbox_file_is_locked_before_the_reader_can_list_it(tmp_path, monkeypatch):
    """Listed while still unlocked, a new file would look like a finished one to the reader and
    be deleted under its writer - every record appended after that acknowledged and lost."""
    monkeypatch.setattr(inbox, "ROTATE_BYTES", 200)  # a new file every couple of records
    directory = str(tmp_path / "inbox")
    listed_when_locked = []
    flock = inbox.fcntl.flock

    def watched_flock(fd, operation):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        listed_when_locked.append(name in inbox.inbox_files(directory))
        return flock(fd, operation)
    monkeypatch.setattr(inbox.fcntl, "flock", watched_flock)
    writer = InboxWriter(directory)
    for n in range(6):
        writer.append([message(f"m{n}")], [])
    monkeypatch.setattr(inbox.fcntl, "flock", flock)
    assert len(listed_when_locked) >= 3 and not any(listed_when_locked)
    assert all(name.endswith(inbox.SUFFIX) for name in os.listdir(directory))  # each got its name after
    store = SQLiteQueue(str(tmp_path / "bot.sqlite3"))
    assert store.drain(directory) == (6, 0)


def test_files_left_unnamed_by_a_killed_writer_are_removed_once_old(tmp_path):
    """A writer killed between creating a file and naming it leaves an empty *.creating file
    (the reader never lists it): the drain deletes such a file once it is a minute old - not a
    fresh one, whose writer may be about to name it, and nothing that holds bytes."""
    directory = tmp_path / "inbox"
    InboxWriter(str(directory)).append([message("m_fine")], [])
    now = 1_800_000_000.0
    old, fresh, holding = (directory / f"{n}-0123456789ab{inbox.CREATING}" for n in (101, 102, 103))
    for path in (old, fresh, holding):
        path.touch()
    holding.write_bytes(b"x")
    os.utime(old, (now - 61, now - 61))
    os.utime(holding, (now - 61, now - 61))
    os.utime(fresh, (now - 5, now - 5))
    store = SQLiteQueue(str(tmp_path / "bot.sqlite3"), clock=lambda: now)
    assert store.drain(str(directory)) == (1, 0)
    assert not old.exists() and fresh.exists() and holding.exists()


def test_an_unreadable_inbox_file_holds_back_none_of_the_others(tmp_path):
    """One file the reader cannot read (a bad disk block, a wrong owner): the others are drained
    all the same, and what cannot be read is reported."""
    directory = tmp_path / "inbox"
    InboxWriter(str(directory)).append([message("m_fine")], [])
    (directory / "0-unreadable.inbox").mkdir()  # listed first; reading it fails (IsADirectoryError)
    store = SQLiteQueue(str(tmp_path / "bot.sqlite3"))
    with pytest.raises(InboxUnreadable) as raised:
        store.drain(str(directory))
    assert raised.value.new == 1 and "0-unreadable.inbox: IsADirectoryError" in str(raised.value)
    assert store.states() == {"m_fine": "pending"}
    assert store.stats(str(directory))["queue_depth"] == 1  # health figures come all the same


def test_a_failing_inbox_write_asks_meta_to_retry(make_client, env):
    client = make_client()
    os.makedirs(env["DATA_DIR"], exist_ok=True)
    open(os.path.join(env["DATA_DIR"], "inbox"), "w").close()  # a file where the folder should be
    response = post_signed(client, fixture_bytes("text"))
    assert response.status_code == 503
    assert client.application.extensions["dispatcher"].store.states() == {}


# -- issue 9, F1: nothing acknowledged is lost to damage or a full disk ---------------------------------------
def mids(records):
    return [m.mid for r in records for m in inbox.decode(r)[1]]


def test_a_damaged_record_is_skipped_and_every_later_one_is_still_read():
    parts = [inbox.encode([message(f"m{n}")], []) for n in range(3)]
    damaged = bytearray(b"".join(parts))
    damaged[len(parts[0]) + 20] ^= 0xFF  # one byte in record 2 of 3
    records, used, skipped = read_records(bytes(damaged))
    assert mids(records) == ["m0", "m2"] and used == len(damaged)
    assert skipped == [(len(parts[0]), len(parts[1]))]


def test_a_record_still_being_written_is_not_damage_until_its_writer_is_gone():
    whole = inbox.encode([message("m1")], [])
    partial = whole + inbox.encode([message("m2")], [])[:-5]
    assert read_records(partial) == ([whole[12:]], len(whole), [])
    records, used, skipped = read_records(partial, final=True)
    assert mids(records) == ["m1"] and used == len(partial) and skipped == [(len(whole), len(partial) - len(whole))]


def test_records_of_the_previous_format_are_still_read():
    payload = inbox.encode([message("old")], [])[len(inbox.MARKER):][inbox.HEADER.size:]
    legacy = inbox.HEADER.pack(len(payload), __import__("zlib").crc32(payload)) + payload
    assert mids(read_records(legacy + inbox.encode([message("new")], []))[0]) == ["old", "new"]


def test_drain_logs_damage_answers_the_rest_and_quarantines_the_file(tmp_path, caplog):
    directory = tmp_path / "inbox"
    directory.mkdir()
    parts = [inbox.encode([message(f"m{n}")], []) for n in range(3)]
    damaged = bytearray(b"".join(parts))
    damaged[len(parts[0]) + 20] ^= 0xFF
    (directory / "1-gone.inbox").write_bytes(bytes(damaged))  # no lock held: its writer is gone
    store = SQLiteQueue(str(tmp_path / "bot.sqlite3"))
    with caplog.at_level("ERROR"):
        assert store.drain(str(directory)) == (2, 0)
    assert set(store.states()) == {"m0", "m2"}
    assert f"1-gone.inbox: {len(parts[1])} damaged byte(s) at offset {len(parts[0])}" in caplog.text
    assert not (directory / "1-gone.inbox").exists()
    assert (directory / "quarantine" / "1-gone.inbox").read_bytes() == bytes(damaged)
    assert store.stats(str(directory))["quarantined"] == 1
    assert store.drain(str(directory)) == (0, 0)  # the quarantine is not read again


def test_poison_records_go_to_dead_letters_and_the_drain_goes_on(tmp_path, caplog):
    directory = tmp_path / "inbox"
    directory.mkdir()
    surrogate = inbox.encode([message("m_\udfff")], [])  # JSON escapes it; SQLite cannot store it
    not_a_delivery = b'{"nothing": 1}'
    shaped_wrong = inbox.MARKER + inbox.HEADER.pack(len(not_a_delivery), __import__("zlib").crc32(not_a_delivery)) \
        + not_a_delivery
    (directory / "1-gone.inbox").write_bytes(surrogate + shaped_wrong + inbox.encode([message("m_after")], []))
    store = SQLiteQueue(str(tmp_path / "bot.sqlite3"))
    with caplog.at_level("ERROR"):
        assert store.drain(str(directory)) == (1, 0)
    assert set(store.states()) == {"m_after"}
    assert store.stats(str(directory))["dead_letters"] == 2
    assert "could not enter the queue (UnicodeEncodeError" in caplog.text and "(KeyError" in caplog.text
    assert not (directory / "1-gone.inbox").exists()  # read to its end, nothing damaged: deleted


FULL_DISK_WRITER = """
import json, resource, signal, sys
sys.path.insert(0, sys.argv[2])
from bot.storage.inbox import InboxWriter
from messenger.events import TEXT, IncomingMessage
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: a short write, then EFBIG
writer = InboxWriter(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
results = []
for n in range(40):
    if n == 5:
        resource.setrlimit(resource.RLIMIT_FSIZE, (writer._size + 700, hard))  # the disk fills up
    if n == 30:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is back
    m = IncomingMessage(psid="2000000000000001", page_id="1", mid=f"m{n}", kind=TEXT, text="x" * 150, timestamp_ms=1)
    try:
        writer.append([m], [])
        results.append(f"m{n}")
    except OSError:
        pass
print(json.dumps(results))
"""


def test_a_full_disk_loses_nothing_acknowledged_and_hides_nothing_written_after(tmp_path):
    import json
    import subprocess
    import sys

    from tests.support import ROOT

    directory = tmp_path / "inbox"
    done = subprocess.run([sys.executable, "-c", FULL_DISK_WRITER, str(directory), str(ROOT)],
                          capture_output=True, text=True, timeout=60, check=True)
    acknowledged = json.loads(done.stdout)
    assert 5 < len(acknowledged) < 40 and "m39" in acknowledged  # some failed, later ones succeeded
    store = SQLiteQueue(str(tmp_path / "bot.sqlite3"))
    store.drain(str(directory))
    assert set(store.states()) == set(acknowledged)
    assert store.stats(str(directory))["quarantined"] == 0  # every failed write was cut back off the file


def test_an_edit_drained_before_its_message_is_answered_as_edited(tmp_path):
    """Two webhook workers' files, read in name order: the edit's ("1000-…") before its message's
    ("999-…"). The message still takes the edited text."""
    directory = tmp_path / "inbox"
    first, second = InboxWriter(str(directory)), InboxWriter(str(directory))
    first.append([message("m1", text="Opn Sundy?")], [], at=100.0)
    [name] = os.listdir(directory)
    os.rename(directory / name, directory / f"999-{name.split('-', 1)[1]}")
    edit = ClassifiedEcho(Echo(PSID, "m1", "Open on Sunday?", 2, None, None), False, None, inbox.EDIT)
    second.append([], [edit], at=101.0)
    [name] = (n for n in os.listdir(directory) if not n.startswith("999-"))
    os.rename(directory / name, directory / f"1000-{name.split('-', 1)[1]}")
    store = SQLiteQueue(str(tmp_path / "bot.sqlite3"))
    assert inbox.inbox_files(str(directory))[0].startswith("1000-")
    assert store.drain(str(directory)) == (1, 0)
    assert [m.text for m in store.claim("a", 30).messages] == ["Open on Sunday?"]
