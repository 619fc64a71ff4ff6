"""Times as the store keeps them: milliseconds since the epoch, ISO 8601 UTC on the way out."""
from __future__ import annotations

from datetime import datetime, timezone


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def created_ms(created_time: str) -> int:
    """Graph's `2026-11-23T10:15:00+0000` in ms (0 when absent or odd)."""
    try:
        return int(datetime.strptime(created_time, "%Y-%m-%dT%H:%M:%S%z").timestamp() * 1000)
    except ValueError:
        return 0


def utc_day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d")


def utc_day_start_ms(seconds: float) -> int:
    day = datetime.fromtimestamp(seconds, timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return int(day.timestamp() * 1000)
