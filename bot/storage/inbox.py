"""The webhook's inbox: an append-only file per webhook process, drained into the queue.

Why not commit to SQLite before the 200: one write lock for every process is
what limited acknowledgements (measured: a bare WSGI app that only committed
each message to SQLite reached 0.44x the throughput of one that only checked
signatures, p99 5x; appending to a file of its own, 0.97-1.05x and 1.2-1.3x).

Durability is the same as the queue's (WAL, synchronous=NORMAL): a record is
in the kernel's page cache when os.write returns, so it survives a kill -9 of
any process; only a power cut can drop the newest records.

Record: a 4-byte marker, 4-byte length, 4-byte CRC-32, then JSON of the messages
and echoes. The marker lets a reader find the next record after damaged bytes
(a bad disk block, an editor, a bug) instead of stopping there for good: every
later record is still answered, and the damage is reported, never dropped quietly.
Files of the version before carry records without the marker; they are still read.
A write that fails half-way (disk full) is cut back off the file before the 503, so
it never hides the records appended after it.
Each writer holds an exclusive flock on its file; when the lock is free, the
writer is gone (exit, crash, or it moved to a new file) and a drained file
can be deleted. The reader (the reply process) keeps its offset per file in
SQLite, in the same transaction that inserts the records: each record enters
the queue exactly once, and duplicates (Meta's redeliveries, on any worker)
are dropped there by mid.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import struct
import threading
import time
import uuid
import zlib
from array import array
from typing import NamedTuple, Sequence

from messenger.events import Echo, IncomingMessage


# What a ClassifiedEcho is: an echo, or something stored the same way - the thread passed back
# to the bot (the pause ends), an edit, a reaction, feedback or an unsent message (`echo` carries
# the target mid and the new text, the emoji or the rating), or a user's message to a person
# who owns the thread (WATCHED: mirrored, never answered).
ECHO, RESUME, EDIT, REACTION, FEEDBACK, WATCHED = "echo", "resume", "edit", "reaction", "feedback", "watched"
UNSEND = "unsend"


class ClassifiedEcho(NamedTuple):
    """An echo as the webhook judged it: whether a person sent it from the Page inbox, and
    until when the bot then stays silent for that user (0: no pause); `kind` above."""

    echo: Echo
    by_human: bool
    paused_until: float
    kind: str = ECHO

MARKER = b"\xf0IBX"  # never the start of a legacy record: that length would be over 4 GB
HEADER = struct.Struct(">II")  # length, CRC-32 of the payload
FULL_HEADER = len(MARKER) + HEADER.size
# Far above the largest delivery (5 MiB): a larger length is damage, not a record.
MAX_PAYLOAD = 64 * 1024 * 1024
ROTATE_BYTES = 16 * 1024 * 1024
SUFFIX = ".inbox"
CREATING = ".creating"  # a file before its writer holds its lock: the reader does not list it
UNBORN_AFTER_S = 60.0  # a *.creating file lives microseconds; one this old lost its writer


def encode(messages: Sequence[IncomingMessage], echoes: Sequence[ClassifiedEcho],
           at: float | None = None) -> bytes:
    """One record; `at` is when the delivery was acknowledged (now, unless a test says)."""
    # vars(), not dataclasses.asdict: these records are flat, and asdict's deep copy
    # was a tenth of the webhook's CPU.
    payload = json.dumps({"at": time.time() if at is None else at, "m": [m.to_dict() for m in messages],
                          "e": [[vars(e), human, until, kind] for e, human, until, kind in echoes]},
                         separators=(",", ":")).encode()
    return MARKER + HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode(payload: bytes) -> tuple[float, list[IncomingMessage], list[ClassifiedEcho]]:
    data = json.loads(payload)
    messages = [IncomingMessage.from_dict(m) for m in data["m"]]
    # A record written before handovers were read has three fields an echo.
    return data["at"], messages, [ClassifiedEcho(Echo(**e[0]), *e[1:]) for e in data["e"]]


def read_records(data: bytes, final: bool = False) -> tuple[list[bytes], int, list[tuple[int, int]]]:
    """The records in `data`, the bytes they (and any damage) take, and the damaged
    (offset, length) spans skipped (scan_records says how)."""
    ends, used, skipped = scan_records(data, final)
    return [data[end - length:end] for end, length in ends], used, skipped


def scan_records(data: bytes, final: bool = False) -> tuple[list[tuple[int, int]], int, list[tuple[int, int]]]:
    """Where each record in `data` ends and its payload's length, the bytes they (and any
    damage) take, and the damaged (offset, length) spans skipped.

    An incomplete record at the end is being written: it is left for the next read,
    unless `final` (the writer is gone), when it is damage too. Damaged bytes are
    skipped only once a valid record follows them (or when `final`), so a record
    still arriving is never mistaken for damage. The JSON payload is ASCII, so the
    marker's first byte (0xF0) never occurs inside a record.
    """
    ends, skipped, at = [], [], 0
    while at < len(data):
        end = _record_end(data, at)
        if end is not None:
            ends.append((end, _payload_length(data, at)))
            at = end
            continue
        # Records are appended whole, one after another: a valid record further on means
        # these bytes will never complete. Nothing valid after them: still being written.
        following = _next_record(data, at + 1)
        if following is None and not final:
            break
        stop = len(data) if following is None else following
        skipped.append((at, stop - at))
        at = stop
    return ends, at, skipped


def _payload_length(data: bytes, at: int) -> int:
    return HEADER.unpack_from(data, at + len(MARKER) if data.startswith(MARKER, at) else at)[0]


def _record_end(data: bytes, at: int) -> int | None:
    """Where the whole, CRC-checked record at `at` ends; None if there is none (yet)."""
    start = at + len(MARKER) if data.startswith(MARKER, at) else at  # legacy records have no marker
    if start + HEADER.size > len(data):
        return None
    length, crc = HEADER.unpack_from(data, start)
    end = start + HEADER.size + length
    if length > MAX_PAYLOAD or end > len(data) or zlib.crc32(data[start + HEADER.size:end]) != crc:
        return None
    return end


def _next_record(data: bytes, at: int) -> int | None:
    """The offset of the next whole, valid record after damage."""
    while (at := data.find(MARKER, at)) != -1:
        if _record_end(data, at) is not None:
            return at
        at += 1
    return None


class InboxWriter:
    """One file per process (opened after gunicorn's fork), appended to by its threads."""

    def __init__(self, directory: str):
        self.directory = directory
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0
        self._size = 0

    def append(self, messages: Sequence[IncomingMessage], echoes: Sequence[ClassifiedEcho],
               at: float | None = None) -> None:
        """Durable against any process crash when it returns; OSError (disk full...) otherwise,
        with nothing of this record left in the file. `at`: when it was received (now)."""
        record = encode(messages, echoes, at)
        with self._lock:
            if self._fd is None or self._pid != os.getpid() or self._size > ROTATE_BYTES:
                self._open()
            try:
                written = os.write(self._fd, record)
                if written != len(record):
                    raise OSError(errno.ENOSPC, f"short write to the inbox ({written} of {len(record)} bytes)")
            except OSError:
                self._cut_back()
                raise
            self._size += written

    def _cut_back(self) -> None:
        """Remove a partly written record, so the next one starts where it started. If even
        that fails, leave the file: the next record goes to a new one (and the reader skips
        the partial bytes when it meets them, reporting them)."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> None:
        """A new file, locked before it gets the name the reader lists: found unlocked, it would
        be taken for a finished file and deleted under its writer, with every record appended
        after that acknowledged and lost. The old file is closed only once the new one is ready:
        a failure here leaves no closed descriptor behind to be closed again (by then another
        file's or socket's)."""
        os.makedirs(self.directory, exist_ok=True)
        name = os.path.join(self.directory, f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
        fd = os.open(name + CREATING, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(name + CREATING, name + SUFFIX)  # the lock goes with the file
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name + CREATING)
            raise
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)  # releases the lock: the reader deletes the file once drained
        self._fd, self._pid, self._size = fd, os.getpid(), 0


def writer_gone(path: str) -> bool:
    """True when no process holds the file's lock (its writer exited or moved on)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also drops the lock if this process just took it


def inbox_files(directory: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(directory) if n.endswith(SUFFIX))
    except FileNotFoundError:
        return []


def remove_unborn(directory: str, now: float) -> None:
    """Delete the *.creating files a writer killed between creating one and naming it left behind.
    Such a file is always empty (records go in only once it is named): one older than
    UNBORN_AFTER_S is nobody's."""
    try:
        names = [n for n in os.listdir(directory) if n.endswith(CREATING)]
    except FileNotFoundError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            status = os.stat(path)
            if status.st_size == 0 and now - status.st_mtime > UNBORN_AFTER_S:
                os.unlink(path)
        except FileNotFoundError:
            continue


def read_from(path: str, offset: int) -> bytes:
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            return file.read()
    except FileNotFoundError:
        return b""


class Backlog:
    """The messages acknowledged in the inbox files and not yet in the queue, and when the oldest
    of them came (/healthz, /readyz). Each record is read once: a later call reads only what was
    appended since, and forgets what the drain took. Reading every waiting record on each call
    took about a second at 100,000 of them (bench/inbox_backlog.py)."""

    def __init__(self):
        self._files: dict[str, _ScannedFile] = {}
        self._lock = threading.Lock()  # health checks run on several threads: each byte counted once

    def measure(self, directory: str, offsets: dict[str, int]) -> tuple[int, float | None]:
        with self._lock:
            return self._measure(directory, offsets)

    def _measure(self, directory: str, offsets: dict[str, int]) -> tuple[int, float | None]:
        names = inbox_files(directory)
        for name in set(self._files) - set(names):  # drained and deleted
            del self._files[name]
        count, oldest = 0, None
        for name in names:
            scanned = self._files.setdefault(name, _ScannedFile())
            try:
                scanned.advance(os.path.join(directory, name), offsets.get(name, 0))
            except OSError:  # unreadable (the drain reports it): health figures must still come
                continue
            count += scanned.messages
            if (first := scanned.oldest()) is not None:
                oldest = first if oldest is None else min(oldest, first)
        return count, oldest


class _ScannedFile:
    """One inbox file's records past the queue's offset: where each ends, when it came and how
    many messages it holds, in arrays (24 bytes a record) from `head` on."""

    def __init__(self):
        self.scanned_to = 0
        self.head = 0
        self.ends, self.times, self.counts = array("q"), array("d"), array("l")
        self.messages = 0

    def advance(self, path: str, offset: int) -> None:
        while self.head < len(self.ends) and self.ends[self.head] <= offset:  # taken by the drain
            self.messages -= self.counts[self.head]
            self.head += 1
        if self.head > 1024 and self.head * 2 > len(self.ends):
            del self.ends[:self.head], self.times[:self.head], self.counts[:self.head]
            self.head = 0
        self.scanned_to = max(self.scanned_to, offset)
        data = read_from(path, self.scanned_to)
        ends, used, _ = scan_records(data)
        for end, length in ends:
            try:
                record = json.loads(data[end - length:end])
                at, messages = float(record["at"]), len(record["m"])
            except Exception:  # noqa: BLE001 - a dead letter to be, not a backlog figure
                continue
            if not messages:  # echoes alone: nothing waits for a reply
                continue
            self.ends.append(self.scanned_to + end)
            self.times.append(at)
            self.counts.append(messages)
            self.messages += messages
        self.scanned_to += used

    def oldest(self) -> float | None:
        return min(self.times[self.head:]) if self.head < len(self.times) else None
