"""Wake the reply dispatcher the moment a webhook stores work, across processes.

A datagram on a Linux abstract UNIX socket named after the database: no file to
clean up, nothing to configure, about 10 us per ring. Where it cannot be bound
(another dispatcher has it, or no abstract sockets), the dispatcher polls.
"""
from __future__ import annotations

import hashlib
import logging
import os
import select
import socket
import time

logger = logging.getLogger(__name__)


class Doorbell:
    def __init__(self, database_path: str):
        digest = hashlib.sha1(os.path.abspath(database_path).encode()).hexdigest()[:20]
        self.address = f"\0messenger-bot-{digest}"
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        self._listener: socket.socket | None = None

    def listen(self) -> bool:
        """Become the one that is woken; False when another process already is."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            listener.bind(self.address)
        except OSError as exc:
            listener.close()
            logger.warning("doorbell unavailable (%s): the dispatcher will poll", exc)
            return False
        listener.setblocking(False)
        self._listener = listener
        return True

    def ring(self) -> None:
        """Never blocks and never fails the caller: at worst the dispatcher's poll finds the work."""
        try:
            self._sender.sendto(b"\x01", self.address)
        except OSError:
            pass

    def wait(self, timeout: float) -> bool:
        """True when rung within `timeout` seconds (all pending rings are consumed)."""
        if self._listener is None:
            time.sleep(timeout)
            return False
        ready, _, _ = select.select([self._listener], [], [], timeout)
        if not ready:
            return False
        try:
            while self._listener.recv(64):
                pass
        except (BlockingIOError, OSError):
            pass
        return True

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None


def open_doorbell(config):
    """This host's doorbell (SQLite), or LISTEN/NOTIFY between all hosts (PostgreSQL)."""
    if config.database_url:
        from bot.storage.postgres import PostgresDoorbell

        return PostgresDoorbell(config.database_url)
    return Doorbell(config.database_path)
