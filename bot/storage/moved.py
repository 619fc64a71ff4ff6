"""The note move-to-postgres leaves in DATA_DIR once its copy is committed.

The SQLite store stays as it was, its waiting messages included, and PostgreSQL answers them.
Run on SQLite again, the bot would answer them a second time; so a SQLite start refuses while
the note is there, and a PostgreSQL start refuses a SQLite store with waiting messages and no
note (bot/runtime/preflight.py).
"""
from __future__ import annotations

import os
import time

MARKER = "moved-to-postgresql.txt"


def mark(data_dir: str, where: str, now: float | None = None) -> str:
    """Write the note (synced: a power cut right after the move must not lose it); its path."""
    path = os.path.join(data_dir, MARKER)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() if now is None else now))
    text = (f"This DATA_DIR's store was moved to {where} on {when} (python -m bot move-to-postgres).\n"
            "Run the bot with DATABASE_URL. On SQLite it would answer the messages this store still\n"
            "holds as waiting a second time: it refuses to start while this file is here.\n")
    draft = path + ".draft"
    with open(draft, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(draft, path)
    directory = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def moved_to(data_dir: str) -> str | None:
    """The note's first line when this DATA_DIR was moved; None otherwise. A note this user
    cannot read (a move run as root) still says the store was moved."""
    path = os.path.join(data_dir, MARKER)
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.readline().strip() or "This DATA_DIR's store was moved to PostgreSQL"
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"This DATA_DIR's store was moved to PostgreSQL ({path} cannot be read: {error.strerror})"
