"""Which bot this is, and whether this process is its one reply process.

Claims carry the owner `<instance>:<pid>:<random>`. The instance id is kept in DATA_DIR
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


def instance_id(data_dir: str) -> str:
    """This bot's id, created on first use: `<hostname>-<random>`."""
    path = os.path.join(data_dir, ID_FILE)
    try:
        with open(path, encoding="ascii") as f:
            if value := f.read().strip():
                return value
    except FileNotFoundError:
        pass
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    value = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}".replace(":", "-")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of this bot wrote it first
        return instance_id(data_dir)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(value + "\n")
    return value


def owner_prefix(data_dir: str) -> str:
    return instance_id(data_dir) + ":"


def take_reply_lock(data_dir: str) -> int | None:
    """The reply lock's file descriptor (keep it open for the process's life), or None when
    another live process of this bot holds it (several reply processes: no takeover then)."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(data_dir, REPLY_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
