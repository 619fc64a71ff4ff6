"""The conversation store, for the reply pipeline: the mirror of every message
(bot/storage/mirror.py), per-user state (users.py), the exchange log (exchanges.py), its
tracking outbox (outbox.py) and each Page's Graph read budget (graph_budget.py).

Each of those modules holds its own SQL, written once for both backends; this class
gives them a database and a clock. The mirror lets the bot build prompts without asking
Graph, whose Conversations API allows about 2 calls per second per Page: Graph is read
once per user (and again only when the mirror is older than MIRROR_MAX_AGE), within a
budget shared by every process and host.
"""
from __future__ import annotations

import time
from typing import Callable, Collection, Iterator, NamedTuple, Sequence

from bot.storage import answer_cache, edits, exchanges, graph_budget, mirror, outbox, users
from bot.storage.exchanges import Exchange
from bot.storage.graph_budget import RATE_LIMIT_BACKOFF_S
from bot.storage.inbox import EDIT, FEEDBACK, REACTION, RESUME, UNSEND, WATCHED, ClassifiedEcho
from bot.storage.mirror import BOT, HUMAN, USER
from bot.storage.users import UserState
from messenger.graph import HistoryMessage


def record_echoes(db, echoes: Sequence[ClassifiedEcho]) -> None:
    """Inside the transaction that takes a delivery in: each echo mirrored; a person's pauses
    the bot for that user; a thread passed back ends the pause; edits, reactions and feedback
    land where they belong; an unsent message is forgotten."""
    for echo, human, pause_until, kind in echoes:
        if kind == RESUME:  # the person passed the thread back: the bot answers again at once
            users.thread_back(db, echo.psid, echo.timestamp_ms, mirror.activity(db, echo.psid, 0)[1])
        elif kind == EDIT:  # answered: the mirror says it as edited; still waiting: answered so
            if not echo.text.strip():  # no words (a payload without its text): nothing to put in their place
                continue
            text = edits.remember_edit(db, echo.psid, echo.mid, echo.text, echo.timestamp_ms)
            mirror.edit(db, echo.psid, echo.mid, text)
            edits.apply_edits(db, [echo.mid])
        elif kind == UNSEND:  # the user took it back: never in a prompt again; still waiting: not answered
            edits.remember_unsent(db, echo.mid, echo.timestamp_ms)
            mirror.forget(db, echo.psid, echo.mid, echo.timestamp_ms)
            edits.withdraw_unsent(db, [echo.mid], echo.timestamp_ms / 1000)
        elif kind == REACTION:
            mirror.react(db, echo.mid, echo.text or None)
        elif kind == FEEDBACK:
            exchanges.rate(db, echo.psid, echo.mid, echo.text)
        elif kind == WATCHED:  # said to the person who has the thread: history once the bot answers again
            mirror.add_rows(db, echo.psid, [(echo.mid, USER, echo.text, echo.timestamp_ms)])
        else:
            mirror.add_rows(db, echo.psid, [(echo.mid, HUMAN if human else BOT, echo.text, echo.timestamp_ms)])
            if human and pause_until:
                users.pause(db, echo.psid, pause_until, echo.timestamp_ms)


# Rows of each kind one retention step deletes: 10-40 ms of the write lock, up to a few hundred
# on a store much larger than memory (bench/retention.py).
PRUNE_CHUNK = 2_000
# What retention deletes, each kind by itself: one that had less than a chunk left is done for the
# pass, and later steps do not scan its table again.
PRUNED_KINDS = frozenset({"exchanges", "mirror", "events", "answer_cache", "unsent", "edited"})


class Pruned(NamedTuple):
    exchanges: int  # exchange records this step deleted
    more: frozenset[str]  # the kinds that filled their chunk: there may be more of them (empty: done)


class Conversations:
    """The reply side's view of the store, over one database (SQLite or PostgreSQL)."""

    def __init__(self, database, tracking: bool = False, clock: Callable[[], float] = time.time):
        self._database = database
        self.clock = clock
        self.tracking = tracking  # new records wait for TRACKING_URL
        # The channel of each account's exchanges (bot/replies/wiring.py): an Instagram account's
        # are `instagram`; any other account's `messenger`, unless the exchange names its own (web).
        self.channels: dict[str, str] = {}

    record_echoes = staticmethod(record_echoes)

    @property
    def database(self):
        """The database itself, for a module with SQL of its own (bot/webchat/store.py)."""
        return self._database

    def user(self, psid: str) -> UserState:
        with self._database.read() as db:
            return users.get(db, psid)

    def update_user(self, psid: str, **changes: object) -> None:
        """Columns of the user's row (reset_at_ms, rate_notice_at...) and a pause: users.apply."""
        with self._database.write() as db:
            users.apply(db, psid, changes)

    def threads_due_back(self, now: float, limit: int = 100) -> list[tuple[str, str]]:
        """(psid, account) of threads the bot passed to the Page inbox whose pause is over: users.py."""
        with self._database.read() as db:
            return users.threads_due_back(db, now, limit)

    def claim_thread_back(self, psid: str, account: str, now: float, hold: float) -> bool:
        with self._database.write() as db:
            return users.claim_thread_back(db, psid, account, now, hold)

    def thread_taken_back(self, psid: str, account: str) -> None:
        with self._database.write() as db:
            users.thread_taken_back(db, psid, account)

    def history(self, psid: str, page_id: str, limit: int, after_ms: int | None) -> list[HistoryMessage]:
        with self._database.read() as db:
            return mirror.history(db, psid, page_id, limit, after_ms)

    def mirrored_after(self, psid: str, mids: Sequence[str], after_ms: int) -> set[str]:
        """Those of `mids` the mirror places after `after_ms` (mirror.move_after)."""
        with self._database.read() as db:
            return mirror.after(db, psid, mids, after_ms)

    def activity(self, psid: str, before_ms: int) -> tuple[int | None, int | None]:
        """(the newest message before `before_ms`, the newest a person sent from the Page), in ms."""
        with self._database.read() as db:
            return mirror.activity(db, psid, before_ms)

    def find_own_message(self, psid: str, text: str, since_ms: int, exclude: Collection[str] = ()) -> str | None:
        with self._database.read() as db:
            return mirror.find_own(db, psid, text, since_ms, exclude)

    def reply_mids_since(self, psid: str, since_ms: int) -> set[str]:
        """The mids of the replies already logged as sent to this user since `since_ms`."""
        with self._database.read() as db:
            return exchanges.reply_mids(db, psid, since_ms)

    def take_graph_read(self, account: str, per_second: float) -> bool:
        """One Conversations API read from the account's budget now, or False when it is spent for now."""
        return self.reserve_graph_read(account, per_second, latest=self.clock()) is not None

    def reserve_graph_read(self, account: str, per_second: float, latest: float) -> float | None:
        """The moment of this caller's read of `account` (a Page or an Instagram account) - now or
        a little later - if a slot is free by `latest`."""
        # `latest` is at least "now", for a caller that read the clock a moment ago.
        with self._database.read() as db:
            if graph_budget.next_read_at(db, account) > max(latest, self.clock()):
                return None  # spent: no write taken (a burst of new users asks many times a second)
        with self._database.write() as db:
            now = self.clock()  # after the wait for the database: a slot reckoned from before may be past
            return graph_budget.reserve(db, account, now, per_second, max(latest, now))

    def hold_graph_reads(self, account: str, seconds: float = RATE_LIMIT_BACKOFF_S) -> None:
        with self._database.write() as db:
            graph_budget.hold(db, account, self.clock() + seconds)

    def messages_between(self, psid: str, start_ms: int, end_ms: int) -> int:
        """How many messages this user sent in (start, end] - every one the webhooks took in."""
        with self._database.read() as db:
            return db.execute("SELECT COUNT(*) FROM events WHERE psid = ? AND timestamp_ms > ?"
                              " AND timestamp_ms <= ?", (psid, start_ms, end_ms)).fetchone()[0]

    def tokens_since(self, psid: str, since_ms: int) -> int:
        with self._database.read() as db:
            return exchanges.tokens_since(db, psid, since_ms)

    def finish(self, db, exchange: Exchange) -> None:
        """Inside the transaction that completes the batch (or logs a web answer): log, mirror, user state -
        all or nothing."""
        messages = exchange.messages
        # The user's messages before Graph's rows: Graph has no words for a voice note, the
        # exchange has its transcript (and a label for a photo), and the first row of a mid stays.
        # One edited while its answer was made is mirrored as edited (its answer and its record
        # keep the words they were made from).
        edited = edits.latest_texts(db, exchange.psid, [m.mid for m in messages if m.mid])
        mirror.add_rows(db, exchange.psid, [(m.mid, USER, edited.get(m.mid) or exchanges.user_text(m, exchange.said),
                                             m.timestamp_ms) for m in messages if m.mid])
        if exchange.disclosed_at is not None:
            users.update(db, exchange.psid, disclosed_at=exchange.disclosed_at)
        if exchange.synced is not None:  # what Graph returned; from now on the mirror covers this user
            mirror.add_rows(db, exchange.psid, exchange.synced)
            users.update(db, exchange.psid, synced_at=self.clock())
        # After what it answers even if Meta's clock (user messages) runs ahead of ours.
        replied_at = max(exchange.bot_timestamp_ms or 0, max(m.timestamp_ms for m in messages) + 1)
        if exchange.restarted and (reset_ms := users.get(db, exchange.psid).reset_at_ms) is not None:
            # Written after the reset word, they open the new context: just after the cut (a
            # Graph row of theirs, whole seconds, included), their answer after them.
            mirror.move_after(db, exchange.restarted, reset_ms)
            replied_at = max(replied_at, reset_ms + len(exchange.restarted) + 1)
        mirror.add_rows(db, exchange.psid, [(mid, BOT, text, replied_at) for mid, text in exchange.sent_parts])
        exchanges.record(db, exchange, self.tracking, self.channels.get(messages[0].page_id, exchanges.MESSENGER))

    def cached_answer(self, cache_key: str) -> tuple[str, str | None] | None:
        with self._database.read() as db:
            return answer_cache.get(db, cache_key, self.clock())

    def remember_answer(self, cache_key: str, text: str, model: str | None, ttl: float) -> None:
        with self._database.write() as db:
            answer_cache.put(db, cache_key, text, model, self.clock() + ttl)

    # -- the log: export, tracking, retention ---------------------------------------------------
    def export(self, since_ms: int = 0, until_ms: int | None = None, page: str | None = None,
               channel: str | None = None) -> Iterator[dict]:
        with self._database.read() as db:
            yield from exchanges.export(db, since_ms, until_ms, page, channel)

    def waiting_for_tracking(self, limit: int = 50) -> list[tuple[int, dict]]:
        with self._database.read() as db:
            return outbox.waiting(db, self.clock(), limit)

    def claim_for_tracking(self, lease: float, limit: int = 10) -> list[tuple[int, dict]]:
        with self._database.write() as db:
            return outbox.claim(db, self.clock(), lease, limit)

    def release_tracking(self, record_ids: list[int]) -> None:
        if record_ids:
            with self._database.write() as db:
                outbox.release(db, record_ids, self.clock())

    def tracked(self, record_id: int) -> None:
        with self._database.write() as db:
            outbox.sent(db, record_id)

    def tracking_failed(self, record_id: int, base_delay: float, cap: float = 300.0) -> int:
        with self._database.write() as db:
            return outbox.failed(db, record_id, self.clock(), base_delay, cap)

    def prune(self, older_than_days: int, limit: int = PRUNE_CHUNK,
              kinds: frozenset[str] = PRUNED_KINDS) -> Pruned:
        """One step of RETENTION_DAYS: at most `limit` each of the exchanges, mirror rows,
        finished queue rows, unsends and edits older than the retention, and of the expired cached
        answers (of `kinds`), in one transaction. A pass is steps, each given the kinds the last one said
        have more, until none has (Dispatcher.prune): a large store is never one transaction
        holding the write lock for seconds while no reply can be recorded. Records still waiting
        for the tracking endpoint are kept until they are sent."""
        now = self.clock()
        cutoff_s = now - older_than_days * 86400
        # Several hosts prune at once (PostgreSQL): each passes the rows another one is deleting by.
        skip = self._database.SKIP_LOCKED
        deletes = {
            "exchanges": lambda db: exchanges.prune(db, cutoff_s, limit, skip),
            "mirror": lambda db: mirror.prune(db, int(cutoff_s * 1000), limit, skip),
            # Found by finished_at alone (only a done or failed message has one), so both databases
            # use its index; asked by state too, SQLite took the state index and read every
            # finished row (bench/retention.py). The state is checked again on the way out.
            "events": lambda db: db.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE finished_at < ?"
                f" LIMIT ?{skip}) AND state IN ('done', 'failed')", (cutoff_s, limit)).rowcount,
            "answer_cache": lambda db: answer_cache.prune(db, now, limit, skip),
            "unsent": lambda db: edits.prune(db, "unsent", int(cutoff_s * 1000), limit, skip),
            "edited": lambda db: edits.prune(db, "edited", int(cutoff_s * 1000), limit, skip),
        }
        with self._database.write() as db:
            deleted = {kind: deletes[kind](db) for kind in PRUNED_KINDS & kinds}
        return Pruned(deleted.get("exchanges", 0), frozenset(kind for kind, count in deleted.items() if count >= limit))
