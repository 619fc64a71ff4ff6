"""A DATABASE_URL as the owner reads it: where it points (never its password), what went wrong
in one line with the password scrubbed, and whether that database can hold the store. Shared by
the start's checks (bot/runtime/preflight.py) and the move into PostgreSQL (bot/runtime/move.py)."""
from __future__ import annotations

from urllib.parse import urlparse

from config import url_passwords


class Refused(Exception):
    """One line for the owner: why nothing was done (a move, an export, a start), and what to do."""


def describe(url: str) -> str:
    """Where the URL points, without its password (or user)."""
    try:
        parsed = urlparse(url)
    except ValueError:  # an unclosed [ of an IPv6 address
        raise Refused("the database URL must look like postgresql://user@host:5432/database "
                      "(an IPv6 address goes in [ ])") from None
    if parsed.scheme not in ("postgresql", "postgres"):
        raise Refused("the database URL must look like postgresql://user@host:5432/database")
    try:
        port = parsed.port or 5432
    except ValueError:
        raise Refused("the database URL's port is not a number") from None
    return f"PostgreSQL at {parsed.hostname or 'localhost'}:{port}/{parsed.path.strip('/') or '(default database)'}"


def scrub(text: str, url: str) -> str:
    """`text` with the URL's password removed, however it is spelled."""
    for spelling in url_passwords(url):
        text = text.replace(spelling, "***")
    return text


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def encoding_problem(conn, where: str) -> str | None:
    """Why a database whose encoding is not UTF8 cannot hold the store (None: it is UTF8): it
    could hold no emoji nor most languages, and the knowledge search's schema needs it."""
    encoding = conn.execute("SHOW server_encoding").fetchone()[0]
    if encoding == "UTF8":
        return None
    return (f"{where} uses the {encoding} encoding: the bot stores messages in every language and needs a UTF8 "
            "database (CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)")
