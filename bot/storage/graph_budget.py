"""Each Page's (and Instagram account's) Conversations API budget - Meta allows about 2 reads a
second per Page and per Instagram account - one for every process and host: a read is taken
by moving the account's `next_at` forward in one atomic statement."""
from __future__ import annotations

# Jitter between taking a read from the budget and its arrival at Meta (a busy
# machine, the network) must never tip a read over the limit: reads are spaced
# 1.5 / GRAPH_READS_PER_SECOND apart. Measured: gaps of 0.625 s arrived as
# close as 0.56 s apart on a saturated 2-core machine.
BUDGET_MARGIN = 1.5
RATE_LIMIT_BACKOFF_S = 10.0


def next_read_at(db, account: str) -> float:
    row = db.execute("SELECT next_at FROM graph_budgets WHERE account = ?", (account,)).fetchone()
    return row[0] if row else 0.0


def reserve(db, account: str, now: float, per_second: float, latest: float) -> float | None:
    """The next free read slot (now, or a moment to wait for), if it comes by `latest`; None
    otherwise. Atomic: two hosts asking at once get different slots, and a reservation is
    only made when it can be kept - a burst of new users does not queue up behind the budget."""
    spacing = BUDGET_MARGIN / per_second
    db.execute("INSERT INTO graph_budgets (account, next_at) VALUES (?, 0) ON CONFLICT (account) DO NOTHING",
               (account,))
    slot = db.execute(
        "UPDATE graph_budgets SET next_at = (CASE WHEN next_at > ? THEN next_at ELSE ? END) + ?"
        " WHERE account = ? AND (CASE WHEN next_at > ? THEN next_at ELSE ? END) <= ? RETURNING next_at",
        (now, now, spacing, account, now, now, latest)).fetchone()
    return None if slot is None else slot[0] - spacing


def hold(db, account: str, until: float) -> None:
    """Meta said "rate limited" (another tool may share the quota): no reads of this account until then."""
    db.execute("INSERT INTO graph_budgets (account, next_at) VALUES (?, ?) ON CONFLICT (account) DO UPDATE"
               " SET next_at = excluded.next_at", (account, until))
