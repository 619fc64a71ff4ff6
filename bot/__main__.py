"""`python -m bot export --since 2026-11-01 --format csv`: the exchange log, to stdout or a file.

One record per answered batch (a burst answered with one reply is one record,
its messages one per line in user_message); timestamps in ISO 8601 UTC.

`python -m bot move-to-postgres`: a SQLite DATA_DIR's store copied into PostgreSQL
(bot/runtime/move.py).

`python -m bot doctor [--url https://…]`: is the deployment set up? (bot/doctor.py)
`python -m bot profile apply FILE | show`: the Page's Messenger Profile (bot/profile.py)
`python -m bot knowledge add|sync|list|remove|search`: the Page's own knowledge (bot/knowledge/cli.py)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sqlite3
import sys
import time
from datetime import datetime, timezone

from bot import doctor, profile
from bot.knowledge import cli as knowledge_cli
from bot.runtime import move
from bot.storage import database_url
from bot.storage.exchanges import EXPORT_COLUMNS
from bot.storage.queue import PostgresQueue, SQLiteQueue
from bot.storage.sql import SchemaTooNew
from config import database_path, parse_seconds, read_environment


def parse_moment(text: str) -> int:
    """`2026-11-01`, `2026-11-01T08:00:00Z` (naive = UTC) or an age such as `7d` / `24h`, in ms."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        age = parse_seconds(text, bare_unit=None)
        if age is None:
            raise argparse.ArgumentTypeError(f"not a date, a time or an age: {text!r} (e.g. 2026-11-01 or 7d)") from None
        return int((time.time() - age) * 1000)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def export(args: argparse.Namespace) -> int:
    environment = read_environment()
    url = args.database_url or environment.get("DATABASE_URL", "").strip()
    if url and args.data_dir and not args.database_url:
        # Not read instead (a cron job's --data-dir on a PostgreSQL host must not turn into the
        # store a move left behind), but said: how to read that one.
        print(f"export: reading DATABASE_URL's PostgreSQL, not {args.data_dir}: for that folder's SQLite store, "
              f"run it with DATABASE_URL= (empty)", file=sys.stderr)
    if url:  # the store of every host: PostgreSQL, read-only
        try:
            where = database_url.describe(url)
        except database_url.Refused as refusal:
            print(f"cannot export: {refusal}", file=sys.stderr)
            return 2
        try:
            import psycopg

            # One plain connection first: it fails at once with the server's own reason (refused,
            # authentication, no such database), where the pool tries for 5 s, logs every try and
            # says only "couldn't get a connection".
            psycopg.connect(url, connect_timeout=5).close()
            store = PostgresQueue(url, read_only=True, pool_size=2)
        except Exception as error:  # noqa: BLE001 - the driver's: say which, never the URL
            return _cannot_read(where, error, url)
    else:
        data_dir = args.data_dir or environment.get("DATA_DIR", "data")
        where = path = database_path(data_dir)
        if not os.path.isfile(path):
            print(f"no database at {path}: set DATA_DIR (or --data-dir) to the bot's data folder", file=sys.stderr)
            return 2
        try:
            store = SQLiteQueue(path, read_only=True)
        except (sqlite3.DatabaseError, SchemaTooNew) as error:
            return _cannot_read(where, error, url)
    try:
        out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout
    except OSError as error:
        print(f"cannot write {args.output}: {error.strerror or error}", file=sys.stderr)
        return 2
    written = 0
    try:
        # Streamed: a log of any size is written as it is read, in little memory.
        records = store.conversations.export(args.since or 0, args.until, args.page, args.channel)
        writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS) if args.format == "csv" else None
        if writer:
            writer.writeheader()
        for record in records:
            if writer:
                writer.writerow(spreadsheet_safe(record))
            else:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
        out.flush()
    except BrokenPipeError:  # `export | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except OSError as error:
        print(f"cannot write {args.output or 'the output'}: {error.strerror or error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - the database's, mid-way: say which, never the URL
        return _cannot_read(where, error, url)
    finally:
        if args.output:
            out.close()
        store.close()
    if not written:
        # Replayed fixtures carry their recorded (old) times: say what the window is on.
        print("no exchange records matched: --since and --until filter on the time of the user's message "
              "(Meta's timestamp), not on when the bot answered", file=sys.stderr)
    return 0


# A cell starting with one of these is a formula to a spreadsheet: a visitor's "=HYPERLINK(...)"
# would run in the owner's Excel. Such text gets a leading apostrophe in CSV (OWASP's advice);
# JSON lines keep every text as it was.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(record: dict) -> dict:
    return {key: "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value
            for key, value in record.items()}


def _cannot_read(where: str, error: Exception, url: str) -> int:
    detail = f"{type(error).__name__}: {database_url.scrub(database_url.one_line(error), url)}" if url else str(error)
    print(f"cannot read {where}: {detail}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("export", help="write the exchange log as JSON lines or CSV")
    command.add_argument("--since", type=parse_moment, help="records whose user message is from this date/time (UTC) or age (7d, 24h) on")
    command.add_argument("--until", type=parse_moment, help="up to (not including) this date/time or age")
    command.add_argument("--page", help="only this Page's (or Instagram account's) exchanges: its numeric id")
    command.add_argument("--channel", choices=("messenger", "instagram", "web"),
                         help="only the exchanges of this channel (web: the website chat)")
    command.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    command.add_argument("--output", help="a file to write (default: standard output)")
    command.add_argument("--data-dir", help="the bot's DATA_DIR (default: from the environment or .env)")
    command.add_argument("--database-url", help="read PostgreSQL instead (default: DATABASE_URL from the "
                                                "environment or .env)")
    command = commands.add_parser("move-to-postgres", help=move.HELP, description=move.DESCRIPTION)
    move.add_arguments(command)
    doctor.add_arguments(commands.add_parser("doctor", help="check the settings, the Page tokens, the webhook "
                                                            "subscription, the app's mode, the model and the URL"))
    profile.add_arguments(commands.add_parser("profile", help="the Page's Get Started, greeting, ice breakers "
                                                              "and persistent menu"))
    knowledge_cli.add_arguments(commands.add_parser("knowledge", help=knowledge_cli.HELP))
    args = parser.parse_args(argv)
    if args.command == "knowledge":
        return knowledge_cli.main(args)
    if args.command == "move-to-postgres":
        return move.main(args)
    if args.command in ("doctor", "profile"):
        return (doctor if args.command == "doctor" else profile).main(args)
    return export(args)


if __name__ == "__main__":
    sys.exit(main())
