"""A real PostgreSQL for the tests: each test gets a schema of its own, dropped after it.

TEST_DATABASE_URL names the server (default: the project machines' 127.0.0.1:5432, trust
auth, database `test`). Without a server the PostgreSQL tests are skipped with one line
saying how to run them - unless BOT_REQUIRE_POSTGRES=1 (`.ci/run` sets it): then they fail.
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import quote

import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
HOW = ("PostgreSQL tests skipped: no server at TEST_DATABASE_URL (default " + DEFAULT_URL + "); "
       "start one (apt-get install postgresql) or set TEST_DATABASE_URL")


def server_url() -> str:
    return os.environ.get("TEST_DATABASE_URL", DEFAULT_URL)


def available() -> bool:
    import psycopg

    try:
        with psycopg.connect(server_url(), connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def require() -> None:
    """Skip (or, under CI, fail) when there is no server."""
    if not available():
        if os.environ.get("BOT_REQUIRE_POSTGRES") == "1":
            pytest.fail("BOT_REQUIRE_POSTGRES=1 but no PostgreSQL answers at " + server_url())
        pytest.skip(HOW)


def with_schema(url: str, schema: str) -> str:
    """The URL with every connection's search_path set to `schema`."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-csearch_path={schema}')}"


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A database URL whose tables live in a new, empty schema, dropped afterwards."""
    import psycopg

    require()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(server_url(), schema)
    finally:
        with psycopg.connect(server_url(), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
