"""The little that differs between the two backends' drivers, hidden behind one cursor.

The SQL of every storage module is written once, in the subset SQLite (3.35+) and
PostgreSQL share: `?` placeholders, INSERT ... ON CONFLICT, RETURNING, CASE instead of
two-argument MAX. PostgreSQL's driver wants `%s`: `translate` rewrites the placeholders.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence


class SchemaTooNew(RuntimeError):
    """The database was migrated by newer code than this host runs, and that code cannot use it."""


class Additive(str):
    """A migration that only adds (a nullable column, an index, a table older code never reads):
    code of the version before it still works on the database. A run of them at the end of a
    schema lets older hosts go on during a rolling upgrade, and a rollback of the code."""


def min_code_version(schema: Sequence[str]) -> int:
    """The oldest schema version whose code may use a database at len(schema)."""
    version = len(schema)
    while version > 0 and isinstance(schema[version - 1], Additive):
        version -= 1
    return version


def newer_schema_note(where: str, version: int, mine: int, oldest: int | None) -> str:
    """The one line for a database newer than this code: a warning when this code may use it
    (returned), SchemaTooNew when it may not."""
    if oldest is None or oldest > mine:
        raise SchemaTooNew(f"{where} is at schema version {version}, newer than this code ({mine}): run the newer "
                           "version of the bot, or upgrade this host")
    return (f"{where} is at schema version {version}, newer than this code ({mine}); the migrations since only "
            "add, so this host goes on: upgrade it")


class StorageUnavailable(OSError):
    """The database cannot take the write now (PostgreSQL down, say): answer 503, Meta retries."""


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """`?` placeholders as psycopg's `%s`; a literal `%` (the modulo operator) doubled, as psycopg
    wants it. No statement here holds a literal `?`."""
    return sql.replace("%", "%%").replace("?", "%s")


class Row(tuple):
    """A result row by position or by column name, like sqlite3.Row."""

    def __new__(cls, values: Sequence[Any], names: dict[str, int]):
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


class Cursor:
    """What a storage module needs of a PostgreSQL connection: execute with `?` placeholders,
    and a script of several statements (migrations)."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = (), prepare: bool | None = None):
        """`prepare`: psycopg's (None: after a few runs the server keeps the statement and, in
        time, one plan for any parameters; False: planned for its own parameters every time)."""
        return self.conn.execute(translate(sql), params, prepare=prepare) if params else self.conn.execute(sql)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement, many rows: psycopg pipelines them (one round trip, not one per row)."""
        with self.conn.cursor() as cursor:
            cursor.executemany(translate(sql), rows)

    def script(self, sql: str) -> None:
        self.conn.execute(sql)
