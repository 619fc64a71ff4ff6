"""The webhook's inbox files: appended before the 200, drained once into the queue."""
import os

from bot import inbox
from bot.inbox import InboxWriter, read_records
from bot.store import SQLiteStore
from messenger.events import TEXT, IncomingMessage
from tests.conftest import PSID, fixture_bytes, post_signed


def message(mid, text="hi"):
    return IncomingMessage(psid=PSID, page_id="1", mid=mid, kind=TEXT, text=text, timestamp_ms=1)


def test_a_torn_last_record_is_not_read():
    whole = inbox.encode([message("m1")], []) + inbox.encode([message("m2")], [])
    torn = whole + inbox.encode([message("m3")], [])[:-3]
    records, used = read_records(torn)
    assert [inbox.decode(r)[1][0].mid for r in records] == ["m1", "m2"] and used == len(whole)
    corrupt = bytearray(whole)
    corrupt[-2] ^= 0xFF  # a flipped byte fails the CRC
    assert len(read_records(bytes(corrupt))[0]) == 1


def test_drained_once_duplicates_dropped_and_files_of_gone_writers_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(inbox, "ROTATE_BYTES", 200)  # a new file every couple of records
    directory = str(tmp_path / "inbox")
    store = SQLiteStore(str(tmp_path / "bot.sqlite3"))
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


def test_a_failing_inbox_write_asks_meta_to_retry(make_client, env):
    client = make_client()
    os.makedirs(env["DATA_DIR"], exist_ok=True)
    open(os.path.join(env["DATA_DIR"], "inbox"), "w").close()  # a file where the folder should be
    response = post_signed(client, fixture_bytes("text"))
    assert response.status_code == 503
    assert client.application.extensions["dispatcher"].store.states() == {}
