"""What /healthz and /readyz pay to count the messages still in the inbox files.

    .venv/bin/python bench/inbox_backlog.py [--records 100000] [--runs 7]

Writes `--records` one-message deliveries to an inbox file (as the webhook workers do when the
reply process is down or far behind), then times the count a health check makes: the first
call in a process, the median of the next `--runs`, and one after another delivery arrives.
`--whole-reads` adds the figure of reading every waiting record on each call (the way before
bot/storage/inbox.py's Backlog), for the ratio. One JSON line per figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.storage import inbox  # noqa: E402
from bot.storage.queue import SQLiteQueue  # noqa: E402
from messenger.events import TEXT, IncomingMessage  # noqa: E402


def message(n: int) -> IncomingMessage:
    return IncomingMessage(psid=f"u{n % 2000}", page_id="1", mid=f"m{n}", kind=TEXT, text="Do you open on Sundays?",
                           timestamp_ms=n)


def whole_read(directory: str) -> int:
    """Every waiting record read and decoded (the former way; offsets are 0 here)."""
    count = 0
    for name in inbox.inbox_files(directory):
        for record in inbox.read_records(inbox.read_from(os.path.join(directory, name), 0))[0]:
            count += len(inbox.decode(record)[1])
    return count


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return (time.perf_counter() - started) * 1000, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--whole-reads", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        directory = os.path.join(data, "inbox")
        writer = inbox.InboxWriter(directory)
        for n in range(args.records):
            writer.append([message(n)], [])
        store = SQLiteQueue(os.path.join(data, "bot.sqlite3"))
        first, (count, _) = timed(lambda: store.inbox_backlog(directory))
        assert count == args.records, count
        later = [timed(lambda: store.inbox_backlog(directory))[0] for _ in range(args.runs)]
        writer.append([message(args.records)], [])
        grown, (count, _) = timed(lambda: store.inbox_backlog(directory))
        assert count == args.records + 1, count
        figures = {"first_call_ms": first, "later_call_ms_median": statistics.median(later),
                   "after_one_more_delivery_ms": grown}
        if args.whole_reads:
            whole = [timed(lambda: whole_read(directory))[0] for _ in range(3)]
            figures["whole_read_ms_median"] = statistics.median(whole)
            figures["ratio_later_to_whole"] = figures["later_call_ms_median"] / figures["whole_read_ms_median"]
        for name, value in figures.items():
            print(json.dumps({"bench": "inbox_backlog", "records": args.records, "figure": name,
                              "value": round(value, 4 if name.startswith("ratio") else 2)}))


if __name__ == "__main__":
    main()
