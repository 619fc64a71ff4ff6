"""Which bot this is, and whether this process is its one reply process.

Claims carry the owner `<instance>:[<lineage>.]<pid>:<random>` (lineage: the gunicorn master start). The instance id is kept in DATA_DIR
(one running bot per DATA_DIR: bot/runtime/preflight.py), so it is unique among live bots
even when several share a PostgreSQL database. The reply process holds an exclusive lock
on DATA_DIR/reply.lock for its life; the kernel drops it when the process dies. So a new
reply process that gets the lock knows that every claim of its instance belongs to a dead
process, and takes that work back at once instead of waiting out LEASE_SECONDS.
"""
from __future__ import annotations

import fcntl
import os
import socket
import uuid

ID_FILE = "instance-id"
REPLY_LOCK = "reply.lock"
WEBCHAT_LOCK = "webchat.lock"  # the website chat's process (bot/webchat/serve.py) and its worker


def instance_id(data_dir: str) -> str:
    """This bot's id, created on first use: `<hostname>-<random>`. Made under a lock of its own
    (the master, its workers and the reply process may all ask at the first start) and written
    whole (a synced draft moved into place): a kill -9 or a power cut at the first start must
    not leave an empty id, and an empty one left by an older version is replaced."""
    path = os.path.join(data_dir, ID_FILE)
    if value := _read_id(path):
        return value
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if value := _read_id(path):  # made by the process that had the lock before
            return value
        value = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}".replace(":", "-")
        draft = f"{path}.draft"
        with open(draft, "w", encoding="ascii", opener=lambda name, flags: os.open(name, flags, 0o600)) as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(draft, path)
        return value
    finally:
        os.close(lock)  # drops the lock


def _read_id(path: str) -> str | None:
    """The id in the file; "" for an empty file, None for none."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


# Set by the gunicorn master's ReplySupervisor in the reply processes it starts, one value per
# master start: a claim left by a reply process of another start died with the whole bot (kill -9
# of the process group, a container or host restart) - nothing its message did (Queue.take_over).
LINEAGE_ENV = "BOT_REPLY_LINEAGE"
# The gunicorn master that started a reply (or website chat) process: gone, the process stops.
# Given, not read with getppid() once the process is up - a master killed during its start-up
# (a second or so of imports) would leave it watching init, for ever.
MASTER_PID_ENV = "BOT_MASTER_PID"


def master_pid() -> int:
    """The pid of the master that started this process (its parent when started otherwise)."""
    given = os.environ.get(MASTER_PID_ENV, "")
    return int(given) if given.isdigit() else os.getppid()


def owner_pid(owner: str) -> str:
    """The process id in a reply process's owner name: instance:[lineage.]pid:random."""
    return owner.split(":")[1].rsplit(".", 1)[-1] if owner.count(":") >= 2 else ""


def owner_prefix(data_dir: str) -> str:
    return instance_id(data_dir) + ":"


def take_reply_lock(data_dir: str) -> int | None:
    """The reply lock's file descriptor (keep it open for the process's life), or None when
    another live process of this bot holds it (several reply processes: no takeover then)."""
    return take_process_lock(data_dir, REPLY_LOCK)


def take_process_lock(data_dir: str, name: str, block: bool = False) -> int | None:
    """A lock file in DATA_DIR held for a process's life (its forked children share it), or None
    when a live process holds it (`block`: wait until it ends). move-to-postgres waits for these
    processes to end (lock_if_present)."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    return _try_lock(os.path.join(data_dir, name), os.O_RDWR | os.O_CREAT, block)


class LockHeld(Exception):
    """A live process holds the lock."""


def lock_if_present(data_dir: str, name: str) -> int | None:
    """For one who must wait for a process: the lock's descriptor, None when there is no lock
    file (no such process ever ran here: nothing to wait for; none is created, as a file made by
    root would lock the bot's own user out), LockHeld when a live process holds it."""
    try:
        fd = _try_lock(os.path.join(data_dir, name), os.O_RDWR)
    except FileNotFoundError:
        return None
    if fd is None:
        raise LockHeld(name)
    return fd


def _try_lock(path: str, flags: int, block: bool = False) -> int | None:
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
