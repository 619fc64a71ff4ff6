"""The durable queue of messages to answer: SQLite for one host (WAL mode, shared by its
processes) or PostgreSQL for several (DATABASE_URL), with the same SQL.

Why hand-written: the queues that run on SQLite (Huey, for one) delete a task
when a worker takes it, so a crash mid-task loses it; none orders work per
user or merges a user's waiting messages. This one keeps a row per message
from the moment the reply process drains it from the webhooks' inbox files
(bot/storage/inbox.py) until the reply is sent:

  pending --claim--> working --complete--> done
     ^                  |  \\--fail / too many attempts--> failed
     +--retry/release---+   (an expired lease, e.g. after kill -9, is pending again)

A claim takes every waiting message of ONE user whose older messages are all
answered, so replies go out in order and a burst gets one reply.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from typing import Callable, Sequence

from bot.storage import edits, inbox, users
from bot.storage.inbox import ClassifiedEcho
from bot.storage.conversations import Conversations, record_echoes
from bot.storage.exchanges import Exchange
from bot.storage.schema import SCHEMA
from bot.storage.sqlite import Database
from bot.storage.sql import StorageUnavailable
from config import Config
from messenger.events import IncomingMessage
from messenger.text import clean_text

logger = logging.getLogger(__name__)

QUARANTINE = "quarantine"  # inbox files with damaged bytes, kept for a person
MAX_BATCH = 20  # messages of one user answered together, at most
# How often a claimant (owner) looks for expired leases, at most. Every claim used to: two UPDATEs
# inside the claim lock, which every host's claims wait for - a third of the lock's round trips,
# and at 100 replies/s on three hosts ~5 s of PostgreSQL's time a minute (bench/run.py,
# 2026-12-07). A dead host's work now waits up to this much longer than its lease.
EXPIRY_EVERY_S = 0.5


# The next batch to claim, in one statement (on PostgreSQL every statement is a round trip that
# the other hosts' claims wait for, behind the lock): the oldest message that can be answered
# now - its user has nothing being answered and nothing older waiting - and with it the rest of
# that user's batch. A retried batch keeps its members and its reply; otherwise the user's
# waiting messages, at most MAX_BATCH, oldest first. Each row says whether its user unsent or
# edited it before it was stored, so the claim looks further only then.
#
# Written so that its cost does not depend on the planner's statistics, which a queue's table
# rarely has right (stale after a quiet hour, none at all where autovacuum is off): as NOT EXISTS
# joins, PostgreSQL without them compared every waiting row with every other waiting and every
# working one, 5 ms a claim behind the lock at 100 waiting (bench/run.py's burst, auto_explain).
# The working users are one set, looked up by hash; "nothing older waiting" is a scalar subquery,
# which is never made a join, so it is an index probe per row (events_open); the head's user and
# batch are values to the rest (scalar subqueries again), so its rows are read by index too, not
# picked out of every waiting row (3 ms a claim at 14,000 waiting). The batches the
# claimant's threads answer come as one JSON array (the database's IDS_IN_JSON), so the text
# never changes: parsed once per connection, and planned at every claim (postgres.CLAIM_BEGIN says why).
NEXT_BATCH = """
    WITH head AS (
        SELECT e.psid, e.batch_id FROM events e
        WHERE e.state = 'pending' AND e.available_at <= ?
          AND (e.batch_id IS NULL OR e.batch_id NOT IN ({ids_in_json}))
          AND e.psid NOT IN (SELECT w.psid FROM events w WHERE w.state = 'working')
          AND (SELECT 1 FROM events o WHERE o.state = 'pending' AND o.psid = e.psid
               AND (o.timestamp_ms, o.id) < (e.timestamp_ms, e.id) LIMIT 1) IS NULL
        ORDER BY e.id LIMIT 1),
    batch AS (
        SELECT ev.* FROM events ev
        WHERE ev.batch_id = (SELECT batch_id FROM head) AND ev.state = 'pending'
        UNION ALL
        SELECT * FROM (SELECT ev.* FROM events ev
                       WHERE (SELECT batch_id FROM head) IS NULL AND ev.psid = (SELECT psid FROM head)
                         AND ev.state = 'pending' AND ev.batch_id IS NULL
                       ORDER BY ev.timestamp_ms, ev.id LIMIT ?) AS fresh)
    SELECT b.*, EXISTS (SELECT 1 FROM unsent u WHERE u.mid = b.dedupe_key) AS was_unsent,
           EXISTS (SELECT 1 FROM edited d WHERE d.psid = b.psid AND d.mid = b.dedupe_key) AS was_edited
    FROM batch b ORDER BY b.timestamp_ms, b.id"""


@dataclass(frozen=True)
class Batch:
    """Waiting messages of one user, claimed together and answered with one reply."""

    batch_id: int
    psid: str
    ids: tuple[int, ...]
    messages: tuple[IncomingMessage, ...]
    attempts: int
    received_at: float
    reply: str | None = None
    sent_parts: int = 0
    owner: str = ""  # who holds it: every write of its outcome checks that it still does
    sending: int | None = None  # the part whose Send API call its owner died in, or that failed in doubt
    sending_since: float | None = None  # when that part's send was first tried
    deaths: int = 0  # earlier claims whose owner died; the other earlier ones ended in an error


# The webhooks' intake (PostgreSQL): a group's rows as one JSON array of arrays, a redelivery's
# row dropped by its key on any host. Not one array per column: psycopg adapts a Python list
# element by element in Python (a regex escape each), and that cost the writer thread as much
# CPU as the rest of the commit (bench/pg_phases.py, take_in_group_of_4).
ADD_EVENTS = ("INSERT INTO events (dedupe_key, psid, message, timestamp_ms, received_at)"
              " SELECT r->>0, r->>1, r->>2, (r->>3)::bigint, (r->>4)::double precision"
              " FROM json_array_elements(?::json) AS r"
              " ON CONFLICT (dedupe_key) DO NOTHING RETURNING 1")


# A claim whose owner died is counted apart from one that ended in an error (events.deaths):
# a message that kills its process each time (a poison message) must end failed, not stop
# every reply. But a death after the answer is stored is hardly the message's doing - what is
# left is sending stored text - while a host restarting again and again (kill -9 storms, a
# crash-looping neighbour) kills whatever is in flight; and answers waiting for their in-doubt
# check (a Graph read slot, up to 10 s) stay in flight longest. So those get
# SENDING_DEATHS_FACTOR times as many deaths: still bounded. Errors have their own bound
# (MAX_ATTEMPTS, in retry), so deaths never spend a stored answer's tries at sending.
SENDING_DEATHS_FACTOR = 4
DIED_FAILED = "state = 'failed', finished_at = ?, error = 'lease expired too often', deaths = deaths + 1"
DIED_BACK = "state = 'pending', owner = NULL, deaths = deaths + 1"
DIED_TOO_OFTEN = "deaths + 1 >= (CASE WHEN reply IS NULL THEN ? ELSE ? END)"  # this death included
# Deaths with the whole bot (take_over): a storm of restarts is not the message's doing, but one
# that takes the bot down at every start must still end.
RESTARTS_FACTOR = 4
RESTARTED_TOO_OFTEN = "restarts + 1 >= (CASE WHEN reply IS NULL THEN ? ELSE ? END)"


class InboxUnreadable(Exception):
    """Some inbox files could not be read (EIO, permissions, no space to quarantine them); the
    others were drained: `new` and `duplicates` count what they held."""

    def __init__(self, failed: list[tuple[str, OSError]], new: int, duplicates: int):
        self.failed, self.new, self.duplicates = failed, new, duplicates
        super().__init__("; ".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in failed))


class LostLease(Exception):
    """The batch is no longer this owner's: its lease ran out and another process took it."""


class PausedByPerson(Exception):
    """A person answered the user after this answer was composed (the bot is paused): not sent."""


# A postback's title past this many bytes (UTF-8) is keyed by its SHA-256, so every key fits
# PostgreSQL's unique index (2,704 bytes): a title of thousands of characters (Meta caps a button's
# at 20) made the delivery a 503 at every retry, with the rest of its group commit. A title up to
# it keeps the key it had, so a redelivery across an upgrade is still known; only a longer one's
# key changed (one PostgreSQL refused unless it compressed well).
TITLE_IN_KEY_MAX_BYTES = 2000


def dedupe_key(message: IncomingMessage) -> str:
    """Meta's mid; a postback without one is keyed by who, when and what."""
    return message.mid or f"{_postback_key_start(message.psid, message.timestamp_ms)}{_title_in_key(message.text)}"


def within_key_limit(key: str, psid: str, timestamp_ms: int) -> str:
    """The key of this psid's message at timestamp_ms as an older version stored it (a SQLite store
    being moved), as dedupe_key makes it now."""
    start = _postback_key_start(psid, timestamp_ms)
    return start + _title_in_key(key[len(start):]) if key.startswith(start) else key


def _postback_key_start(psid: str, timestamp_ms: int) -> str:
    return f"postback:{psid}:{timestamp_ms}:"


def _title_in_key(title: str) -> str:
    spelled = title.encode("utf-8", "surrogatepass")
    return title if len(spelled) <= TITLE_IN_KEY_MAX_BYTES else "sha256:" + hashlib.sha256(spelled).hexdigest()


class Queue:
    """The queue over one database; safe for several processes (SQLite) or hosts (PostgreSQL)."""

    def __init__(self, database, max_attempts: int = 5, tracking: bool = False,
                 clock: Callable[[], float] = time.time):
        self.max_attempts = max_attempts
        self.clock = clock  # wall time: leases, backoff and finish times are stored in it
        self._database = database
        self.backend = database.backend
        self.conversations = Conversations(self._database, tracking, clock)
        self._write = self._database.write
        self._read = self._database.read
        self._progress_at: float | None = None  # a message finished, or held at Meta's word: for the heartbeat
        self._backlog = inbox.Backlog()
        self._expired_at: dict[str, float] = {}  # each claimant's last look for expired leases (claim)
        self._next_batch = NEXT_BATCH.format(ids_in_json=database.IDS_IN_JSON)

    def close(self) -> None:
        self._database.close()

    # -- adding messages directly (tests, the sandbox); the webhooks write inbox files ---------
    def add(self, messages: Sequence[IncomingMessage], echoes: Sequence[ClassifiedEcho] = ()) -> list[bool]:
        """Store messages to answer (directly, without the inbox); False for each one already stored."""
        now = self.clock()
        with self._write() as db:
            added = [self._insert_one(db, message, now) for message in messages]
            if echoes:
                record_echoes(db, echoes)
            if any(added):
                self._database.notify(db)
        return added

    def drain(self, directory: str) -> tuple[int, int]:
        """Move what the webhook processes appended to their inbox files into the queue.

        Returns (new, duplicate) message counts. Damaged bytes are skipped with an ERROR
        and every record after them still enters; a record or message that cannot enter
        goes to `dead_letters`. A file whose writer is gone is deleted once read to its
        end - or moved to quarantine/ if any of it was damaged: bytes nobody could read
        are kept for a person, never deleted.
        """
        with self._read() as db:
            known = {row[0]: (row[1], row[2]) for row in db.execute("SELECT source, offset, damaged FROM inbox_offsets")}
        new = duplicates = 0
        failed: list[tuple[str, OSError]] = []
        for name in inbox.inbox_files(directory):
            try:
                added = self._drain_file(directory, name, *known.get(name, (0, 0)))
            except OSError as exc:  # one unreadable file (EIO, permissions) must not hold back the rest;
                failed.append((name, exc))  # a database error stops the drain, as ever
                continue
            new, duplicates = new + sum(added), duplicates + len(added) - sum(added)
        with suppress(OSError):  # tidying: never a reason for the drain to fail
            inbox.remove_unborn(directory, self.clock())
        if failed:
            raise InboxUnreadable(failed, new, duplicates)
        return new, duplicates

    def _drain_file(self, directory: str, name: str, start: int, damaged: int) -> list[bool]:
        path = os.path.join(directory, name)
        gone = inbox.writer_gone(path)  # checked first: a gone writer appends nothing more
        records, used, skipped = inbox.read_records(inbox.read_from(path, start), final=gone)
        for offset, length in skipped:
            logger.error("inbox %s: %d damaged byte(s) at offset %d skipped; the records after them "
                         "are read", path, length, start + offset)
        damaged += sum(length for _, length in skipped)
        added = self._ingest(name, start, used, records, damaged) if used else []
        if gone:
            self._retire(directory, name, damaged)
        return added

    def _retire(self, directory: str, name: str, damaged: int) -> None:
        """A gone writer's file, read to its end: deleted, or quarantined if any of it was damaged."""
        path = os.path.join(directory, name)
        if damaged:
            quarantine = os.path.join(directory, QUARANTINE)
            os.makedirs(quarantine, mode=0o700, exist_ok=True)
            os.replace(path, os.path.join(quarantine, name))
            logger.error("inbox %s had %d damaged byte(s): moved to %s for a person to look at",
                         path, damaged, quarantine)
        else:
            # Gone before its offset is: a crash in between must not read it again from 0 (its
            # echoes would be applied twice, and messages pruned since would come back).
            with suppress(FileNotFoundError):
                os.unlink(path)
        with self._write() as db:
            db.execute("DELETE FROM inbox_offsets WHERE source = ?", (name,))

    def quarantined(self, directory: str) -> int:
        """Inbox files holding damaged bytes, kept in DATA_DIR/inbox/quarantine/."""
        try:
            return len(os.listdir(os.path.join(directory, QUARANTINE)))
        except FileNotFoundError:
            return 0

    def inbox_backlog(self, directory: str) -> tuple[int, float | None]:
        """Messages acknowledged but not yet in the queue, and when the oldest of them came."""
        with self._read() as db:
            offsets = dict(db.execute("SELECT source, offset FROM inbox_offsets").fetchall())
        return self._backlog.measure(directory, offsets)

    def _ingest(self, source: str, start: int, used: int, records: list[bytes], damaged: int) -> list[bool]:
        """Records from one inbox file and the new offset, in one transaction: each enters once.

        Anything but a busy or failing database (retried on the next drain, the offset
        unmoved) is a poison record: it goes to dead_letters and the rest goes on.
        """
        added: list[bool] = []
        with self._write() as db:
            for record in records:
                try:
                    received_at, messages, echoes = inbox.decode(record)
                except Exception as exc:  # noqa: BLE001 - whatever the bytes hold
                    self._dead_letter(db, source, start, exc, record)
                    continue
                for message in messages:
                    try:
                        added.append(self._insert_one(db, message, received_at))
                    except sqlite3.OperationalError:
                        raise
                    except Exception as exc:  # noqa: BLE001
                        self._dead_letter(db, source, start, exc, _to_json(message).encode())
                if echoes:
                    try:
                        record_echoes(db, echoes)
                    except sqlite3.OperationalError:
                        raise
                    except Exception as exc:  # noqa: BLE001
                        self._dead_letter(db, source, start, exc, record)
            db.execute("INSERT INTO inbox_offsets (source, offset, damaged) VALUES (?, ?, ?) ON CONFLICT (source)"
                       " DO UPDATE SET offset = MAX(offset, excluded.offset), damaged = excluded.damaged",
                       (source, start + used, damaged))
        return added

    def _dead_letter(self, db: sqlite3.Connection, source: str, offset: int, error: Exception, payload: bytes) -> None:
        logger.error("inbox %s near offset %d: a record could not enter the queue (%s: %s); kept in "
                     "dead_letters", source, offset, type(error).__name__, str(error)[:200])
        db.execute("INSERT INTO dead_letters (source, offset, error, payload, at) VALUES (?, ?, ?, ?, ?)",
                   (source, offset, f"{type(error).__name__}: {error}"[:500], payload, self.clock()))

    @staticmethod
    def _insert_one(db, message: IncomingMessage, now: float) -> bool:
        cursor = db.execute(
            "INSERT INTO events (dedupe_key, psid, message, timestamp_ms, received_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (dedupe_key) DO NOTHING",
            (dedupe_key(message), message.psid, _to_json(message), message.timestamp_ms, now))
        return cursor.rowcount == 1

    # -- the workers' side ------------------------------------------------------------------------
    def claim(self, owner: str, lease_seconds: float, answering: Sequence[int] = ()) -> Batch | None:
        """The oldest answerable user's waiting messages, leased to `owner`; None when idle.
        `answering`: the batches `owner`'s threads are answering (see _expire_leases)."""
        looked = None
        try:
            with self._database.claiming() as db:
                now = self.clock()  # after the wait for a connection and the lock: the lease starts now
                if not 0 <= now - self._expired_at.get(owner, -EXPIRY_EVERY_S) < EXPIRY_EVERY_S:
                    self._expire_leases(db, now, owner, answering)
                    looked = self._expired_at[owner] = now
                # Not a batch this process's threads answer, which another host expired meanwhile (one
                # waited out a PostgreSQL restart): claimed again under the same owner name, the waiting
                # thread's writes would still pass as the owner's, and both would send the reply. That
                # thread finishes it or loses it (LostLease); another claimant answers it then.
                mine = json.dumps([int(batch_id) for batch_id in answering])
                rows: list = []
                while not rows:  # each turn finishes at least one unsent message, or stops
                    rows = db.execute(self._next_batch, (now, mine, MAX_BATCH)).fetchall()
                    if not rows:
                        return None
                    # Unsent before it was stored (edits.withdraw_unsent): finished here, never answered.
                    unsent = edits.withdraw_unsent(db, [row["dedupe_key"] for row in rows if row["was_unsent"]], now)
                    rows = [row for row in rows if row["dedupe_key"] not in unsent]
                # Edited before it was stored (edits.apply_edits): answered as the user now says it.
                edited = edits.apply_edits(db, [row["dedupe_key"] for row in rows if row["was_edited"]])
                batch_id = rows[0]["batch_id"] or rows[0]["id"]
                ids = [row["id"] for row in rows]
                self._database.claimed(
                    db, f"UPDATE events SET state = 'working', owner = ?, lease_until = ?, batch_id = ?,"
                        f" attempts = attempts + 1 WHERE id IN ({','.join('?' * len(ids))})",
                    (owner, now + lease_seconds, batch_id, *ids))
        except BaseException:
            if looked is not None:  # rolled back with the claim: the next claim looks again
                self._expired_at.pop(owner, None)
            raise
        first = rows[0]
        return Batch(
            batch_id=batch_id, psid=first["psid"], ids=tuple(ids),
            messages=tuple(_from_json(edited.get(row["dedupe_key"], row["message"])) for row in rows),
            attempts=first["attempts"] + 1, received_at=min(row["received_at"] for row in rows),
            reply=first["reply"], sent_parts=first["sent_parts"], owner=owner, sending=first["sending"],
            sending_since=first["sending_since"], deaths=first["deaths"],
        )

    def _expire_leases(self, db, now: float, owner: str, answering: Sequence[int]) -> None:
        """Work whose owner died (kill -9) or stalled: back in the queue, or failed after the bound.
        Never a batch the claimant's threads are answering (a live process does not take over from
        itself) - but its own batch that a thread gave up on, unable to put it back, is taken back
        like a dead process's: nothing renews it, and on one host nobody else would."""
        keep = f" AND (owner <> ? OR batch_id NOT IN ({','.join('?' * len(answering))}))" if answering else ""
        kept = (owner, *answering) if answering else ()
        # Rows another transaction holds are passed by (PostgreSQL): a process frozen in the middle
        # of writing its batch would otherwise hold every host's claims, not just its own user's.
        skip = self._database.SKIP_LOCKED
        db.execute(f"UPDATE events SET {DIED_FAILED} WHERE id IN (SELECT id FROM events WHERE state = 'working'"
                   f" AND lease_until < ? AND {DIED_TOO_OFTEN}{keep}{skip})", (now, now, *self._death_bounds, *kept))
        db.execute(f"UPDATE events SET {DIED_BACK} WHERE id IN (SELECT id FROM events WHERE state = 'working'"
                   f" AND lease_until < ?{keep}{skip})", (now, *kept))

    @property
    def _death_bounds(self) -> tuple[int, int]:
        """DIED_TOO_OFTEN's bounds: before the answer is stored, and after."""
        return self.max_attempts, self.max_attempts * SENDING_DEATHS_FACTOR

    def take_over(self, prefix: str, me: str, lineage: str = "") -> int:
        """Every claim of this bot instance (`prefix`) not held by `me`: its process is dead
        (the caller holds the instance's reply lock). Back in the queue at once, counted as a
        death - or failed after the bound, as an expired lease would be.

        With a `lineage` (the gunicorn master's start, bot/storage/instance.py), a claim of an
        earlier start died with the whole bot (a kill -9 of the process group, a restart): that
        is counted apart, in `restarts`, with RESTARTS_FACTOR times the bound - a storm of such
        kills fails nothing, while a message that takes the whole bot down at every start (the
        OOM killer, where systemd then restarts the service) still ends failed. Only a reply
        process that died under this same master counts a death."""
        now = self.clock()
        mine = "state = 'working' AND substr(owner, 1, ?) = ? AND owner <> ?"
        with self._write() as db:
            taken = 0
            if lineage:
                ours = f"{prefix}{lineage}."
                earlier = f"{mine} AND substr(owner, 1, ?) <> ?"
                params = (len(prefix), prefix, me, len(ours), ours)
                db.execute(f"UPDATE events SET state = 'failed', finished_at = ?, error = 'the bot died with it"
                           f" too often', restarts = restarts + 1 WHERE {earlier} AND {RESTARTED_TOO_OFTEN}",
                           (now, *params, *(bound * RESTARTS_FACTOR for bound in self._death_bounds)))
                taken = db.execute("UPDATE events SET state = 'pending', owner = NULL, restarts = restarts + 1,"
                                   " attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END"
                                   f" WHERE {earlier}", params).rowcount
                prefix = ours
            db.execute(f"UPDATE events SET {DIED_FAILED} WHERE {mine} AND {DIED_TOO_OFTEN}",
                       (now, len(prefix), prefix, me, *self._death_bounds))
            taken += db.execute(f"UPDATE events SET {DIED_BACK} WHERE {mine}",
                                (len(prefix), prefix, me)).rowcount
            if taken:
                self._database.notify(db)
        return taken

    def heartbeat(self, owner: str) -> None:
        """Note that `owner` is alive and working the queue, and when it last made progress: finished
        a message, or put one back at Meta's word (readiness tells a busy bot from a stuck one by it)."""
        with self._write() as db:
            db.execute("INSERT INTO dispatchers (owner, seen_at, progress_at) VALUES (?, ?, ?)"
                       " ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at,"
                       " progress_at = excluded.progress_at", (owner, self.clock(), self._progress_at))
            db.execute("DELETE FROM dispatchers WHERE seen_at < ?", (self.clock() - 3600,))

    def checkpoint(self) -> None:
        """Fold the WAL back into the database (the reply process, once a second)."""
        self._database.checkpoint()

    def renew(self, owner: str, lease_seconds: float, batches: Sequence[int]) -> None:
        """Keep the leases of the batches this owner is answering alive while it works."""
        # Rows a reply thread is writing are passed by (PostgreSQL): that write is the owner's own
        # proof of life, and waiting for it deadlocked - the two locked one batch's rows in
        # different orders, and the reply's write failed (a try spent).
        with self._write() as db:
            db.execute("UPDATE events SET lease_until = ? WHERE id IN (SELECT id FROM events WHERE state = 'working'"
                       f" AND owner = ? AND batch_id IN ({','.join('?' * len(batches))}){self._database.SKIP_LOCKED})",
                       (self.clock() + lease_seconds, owner, *batches))

    def sending(self, batch: Batch, reply: str, part: int, lease_seconds: float,
                user_updates: dict | None = None, unless_paused: bool = False) -> None:
        """Before each Send API call: the answer kept with the batch (a takeover sends it instead
        of asking the model again), the part under way and when its send was first tried (kept
        while it stays in doubt), the lease renewed - and proof that the batch is still this
        owner's (LostLease otherwise: then nothing is sent). `unless_paused`: PausedByPerson
        (nothing written) if a person answered the user since the answer was composed - the
        model's wait, a retry's backoff or a look for a send in doubt can last minutes."""
        with self._write() as db:
            # After the wait for the database (PostgreSQL restarting, a busy file): a lease reckoned
            # from before it may have run out meanwhile, and another host would take the batch over
            # while this send goes out.
            now = self.clock()
            # A row left in doubt before sending_since existed is looked for since it arrived.
            self._apply(db, batch, "reply = ?, sent_parts = ?, sending = ?, lease_until = ?, sending_since ="
                        " CASE WHEN sending = ? THEN COALESCE(sending_since, received_at) ELSE ? END",
                        reply, part, part, now + lease_seconds, part, now, user_updates=user_updates,
                        unless_paused_at=now if unless_paused else None)

    def mark_sent(self, batch: Batch, reply: str, parts: int) -> None:
        """Progress of a reply in several parts: a crash resumes after the last part sent."""
        self._update(batch, "reply = ?, sent_parts = ?, sending = NULL, sending_since = NULL", reply, parts)

    def complete(self, batch: Batch, exchange: Exchange | None = None, user_updates: dict | None = None) -> None:
        """Done, with the exchange logged and mirrored (and `user_updates` written) in the same transaction."""
        self._update(batch, "state = 'done', finished_at = ?, owner = NULL", self.clock(), exchange=exchange,
                     user_updates=user_updates)
        self._progress_at = self.clock()

    def retry(self, batch: Batch, delay: float, error: str, reply: str | None = None, sent_parts: int = 0,
              exchange: Exchange | None = None, sending: int | None = None, user_updates: dict | None = None) -> bool:
        """Back in the queue after `delay`, keeping the reply so far; False when MAX_ATTEMPTS tries
        have ended in an error, this one included (then failed, with `exchange` logged; deaths have
        their own bound). `sending`: the part whose send failed in doubt - the next attempt looks
        for it before sending it again, as after a crash mid-send. `user_updates`: the user state
        the kept reply changes, not written yet."""
        if batch.attempts - batch.deaths >= self.max_attempts:
            self.fail(batch, error, exchange, user_updates)
            return False
        self._update(batch, "state = 'pending', owner = NULL, available_at = ?, error = ?, reply = ?, sent_parts = ?,"
                     " sending = ?", self.clock() + delay, error, reply, sent_parts, sending,
                     user_updates=user_updates)
        return True

    def look_again(self, batch: Batch, delay: float, error: str) -> None:
        """Back in the queue after `delay`, its send still in doubt, this try not counted: nothing
        could say whether that send went out (no Graph read slot in time, Graph failing)."""
        self._update(batch, "state = 'pending', owner = NULL, available_at = ?, error = ?,"
                     " attempts = attempts - 1", self.clock() + delay, error)

    def throttled(self, batch: Batch, delay: float, error: str) -> None:
        """Back in the queue after `delay`, this try not counted: Meta refused the send for a rate
        limit (nothing went out, nothing is in doubt), which lasts minutes - tries spent on it
        would fail the reply within seconds. Meta's messaging window still ends it."""
        self._update(batch, "state = 'pending', owner = NULL, available_at = ?, error = ?, sending = NULL,"
                     " sending_since = NULL, attempts = attempts - 1", self.clock() + delay, error)
        self._progress_at = self.clock()  # waiting out Meta's limit is the job, not a stuck bot

    def fail(self, batch: Batch, error: str, exchange: Exchange | None = None,
             user_updates: dict | None = None) -> None:
        self._update(batch, "state = 'failed', finished_at = ?, owner = NULL, error = ?", self.clock(), error,
                     exchange=exchange, user_updates=user_updates)
        self._progress_at = self.clock()

    def release(self, owner: str) -> int:
        """Give back what `owner` holds (graceful shutdown); the attempt is not counted. Not a
        batch whose send is under way: given back now, another host could look for that send
        before it lands, and send it too. It waits out its lease (or this bot's next start)."""
        with self._write() as db:
            return db.execute("UPDATE events SET state = 'pending', owner = NULL,"
                              " attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END"
                              " WHERE state = 'working' AND owner = ? AND sending IS NULL", (owner,)).rowcount

    def _update(self, batch: Batch, assignments: str, *values: object, exchange: Exchange | None = None,
                user_updates: dict | None = None) -> None:
        with self._write() as db:
            self._apply(db, batch, assignments, *values, exchange=exchange, user_updates=user_updates)

    def _apply(self, db, batch: Batch, assignments: str, *values: object, exchange: Exchange | None = None,
               user_updates: dict | None = None, unless_paused_at: float | None = None) -> None:
        """`assignments` on the batch's rows while it is still this owner's (LostLease otherwise:
        the whole transaction is rolled back), with the exchange and the user's new state.
        `unless_paused_at`: PausedByPerson instead while a person's pause runs past that time."""
        # Error and reply text may quote anything (an exception's message, a model's output):
        # a lone surrogate in it would make this write - the batch's outcome - fail.
        values = tuple(clean_text(value) if isinstance(value, str) else value for value in values)
        owned = " AND owner = ? AND state = 'working'" if batch.owner else ""
        # The pause checked in the same statement: a read of its own was a round trip before every send.
        unpaused = " AND NOT EXISTS (SELECT 1 FROM users WHERE psid = ? AND paused_until > ?)" \
            if unless_paused_at is not None else ""
        updated = db.execute(f"UPDATE events SET {assignments} WHERE id IN ({','.join('?' * len(batch.ids))})"
                             f"{owned}{unpaused}", (*values, *batch.ids, *([batch.owner] if batch.owner else []),
                                                   *([batch.psid, unless_paused_at] if unpaused else []))).rowcount
        if updated != len(batch.ids):  # rolled back with the block: another process's outcome stands
            if unpaused and (until := users.get(db, batch.psid).paused_until) and until > unless_paused_at:
                raise PausedByPerson(f"a person answers psid {batch.psid!r} until {until:.0f}")
            raise LostLease(f"batch {batch.batch_id} of psid {batch.psid!r} is no longer {batch.owner}'s")
        if user_updates:
            users.apply(db, batch.psid, user_updates)
        if exchange is not None:
            self.conversations.finish(db, exchange)

    # -- observation ----------------------------------------------------------------------------------
    def stats(self, inbox_dir: str | None = None, owner_prefix: str | None = None) -> dict[str, float | int]:
        """Queue depth (messages in the inbox files not drained yet included), in-flight count, the age of the
        oldest pending message, how long ago a reply process (of `owner_prefix`'s host, when
        given) said it was alive, and how long ago any reply process (of any host) made progress."""
        with self._read() as db:
            row = db.execute(
                "SELECT SUM(CASE WHEN state = 'pending' THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN state = 'working' THEN 1 ELSE 0 END),"
                " MIN(CASE WHEN state = 'pending' THEN received_at END),"
                " SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END)"
                " FROM events WHERE state IN ('pending', 'working', 'failed')").fetchone()
            prefix = owner_prefix or ""
            seen = db.execute("SELECT MAX(seen_at) FROM dispatchers WHERE substr(owner, 1, ?) = ?",
                              (len(prefix), prefix)).fetchone()[0]
            progress = db.execute("SELECT MAX(progress_at) FROM dispatchers").fetchone()[0]
            dead = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        waiting, oldest = self.inbox_backlog(inbox_dir) if inbox_dir else (0, None)
        oldest = min(filter(None, (row[2], oldest)), default=None)
        return {"queue_depth": (row[0] or 0) + waiting, "in_flight": row[1] or 0, "failed": row[3] or 0,
                "oldest_pending_age_s": round(self.clock() - oldest, 3) if oldest else 0.0,
                "dispatcher_seen_s_ago": round(self.clock() - seen, 1) if seen else None,
                "progress_s_ago": round(self.clock() - progress, 1) if progress else None,
                "dead_letters": dead, "quarantined": self.quarantined(inbox_dir) if inbox_dir else 0}

    def states(self) -> dict[str, str]:
        """dedupe key -> state, for tests and diagnostics."""
        with self._read() as db:
            return {row[0]: row[1] for row in db.execute("SELECT dedupe_key, state FROM events")}


def _to_json(message: IncomingMessage) -> str:
    return json.dumps(message.to_dict())


def _from_json(text: str) -> IncomingMessage:
    return IncomingMessage.from_dict(json.loads(text))


class DatabaseIntake:
    """The webhooks' intake with PostgreSQL: `append` returns once the delivery is committed.

    Group commit: the deliveries that arrive while a commit is under way wait for the next
    one, and that one transaction takes them all - one round trip and one WAL flush for many
    acknowledgements, instead of one each (measured in bench/: README, "Benchmark"). The
    asyncio front awaits `append_async`: the writer thread settles a whole group's futures
    with one call into the event loop, and no thread is held per waiting delivery."""

    MAX_GROUP = 64
    WAIT_S = 10.0  # a commit that takes longer is answered 503; Meta delivers again

    def __init__(self, queue: PostgresQueue, on_taken: Callable[[int, int], None] | None = None):
        self.queue = queue
        self.on_taken = on_taken  # (new, redelivered) messages of each group, once committed
        self._pending: list[_Delivery] = []
        self._ready = threading.Condition()
        self._writer: threading.Thread | None = None

    def append(self, messages: Sequence[IncomingMessage], echoes: Sequence[ClassifiedEcho],
               at: float | None = None) -> None:
        """`at` is the queue's own clock here (the same injected clock as the webhook's)."""
        delivery = _Delivery(messages, echoes, threading.Event())
        self._enqueue(delivery)
        if not delivery.done.wait(self.WAIT_S):
            raise StorageUnavailable("the database did not take the delivery in time")
        if delivery.error is not None:
            raise delivery.error

    async def append_async(self, messages: Sequence[IncomingMessage], echoes: Sequence[ClassifiedEcho],
                           at: float | None = None) -> None:
        """`append` for the event loop: returns once the delivery is committed, raises
        StorageUnavailable when it was not."""
        loop = asyncio.get_running_loop()
        delivery = _Delivery(messages, echoes, future=loop.create_future())
        self._enqueue(delivery)
        try:
            await asyncio.wait_for(delivery.future, self.WAIT_S)
        except TimeoutError:
            raise StorageUnavailable("the database did not take the delivery in time") from None
        if delivery.error is not None:
            raise delivery.error

    def _enqueue(self, delivery: "_Delivery") -> None:
        with self._ready:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_groups, name="group-commit", daemon=True)
                self._writer.start()
            self._pending.append(delivery)
            self._ready.notify()

    def _write_groups(self) -> None:
        while True:
            with self._ready:
                while not self._pending:
                    self._ready.wait()
                group, self._pending = self._pending[:self.MAX_GROUP], self._pending[self.MAX_GROUP:]
            try:
                self._commit(group)
            except Exception:  # noqa: BLE001 - the writer goes on; what no commit took is answered 503
                logger.exception("the group commit failed unexpectedly")
            finally:
                _settle(group)

    def _commit(self, group: list["_Delivery"]) -> None:
        """The group in one statement. When PostgreSQL refuses it for what one delivery holds, not
        for being down, each goes alone: only that one is answered 503, not the group with it."""
        error = self._take_in(group)
        if error is not None and len(group) > 1 and _refused_for_its_rows(error):
            logger.warning("PostgreSQL refused a group of %d deliveries (%s): taking them one by one",
                           len(group), type(error.__cause__).__name__)
            for delivery in group:
                delivery.error = self._take_in([delivery])
        else:
            for delivery in group:
                delivery.error = error

    def _take_in(self, group: list["_Delivery"]) -> StorageUnavailable | None:
        try:
            new = self.queue.take_in([(d.messages, d.echoes) for d in group])
        except StorageUnavailable as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - every waiting webhook gets an answer
            return StorageUnavailable(f"{type(exc).__name__}: {str(exc)[:200]}")
        self._tell(group, new)
        return None

    def _tell(self, group: list["_Delivery"], new: int) -> None:
        """on_taken, before the group's 200s (so /metrics counts a delivery once it is answered);
        committed is committed: whatever it raises is logged, never a 503."""
        if self.on_taken is None:
            return
        try:
            self.on_taken(new, sum(len(d.messages) for d in group) - new)
        except Exception:  # noqa: BLE001 - counting only
            logger.exception("could not count what the webhooks took in")


class _Delivery:
    def __init__(self, messages: Sequence[IncomingMessage], echoes: Sequence[ClassifiedEcho],
                 done: threading.Event | None = None, *, future: asyncio.Future | None = None):
        self.messages, self.echoes = messages, echoes
        self.done, self.future = done, future  # a thread waits on the one, an event loop on the other
        # Refused until a commit says it holds it (None): a 503 is the safe answer to anything else.
        self.error: StorageUnavailable | None = StorageUnavailable("the delivery was not taken in")


# SQLSTATE classes of a statement refused for the values it carries (data exception, integrity
# constraint violation, program limit exceeded), where the server and the connection are fine.
REFUSED_FOR_ITS_ROWS = ("22", "23", "54")


def _refused_for_its_rows(error: StorageUnavailable) -> bool:
    sqlstate = getattr(error.__cause__, "sqlstate", None)  # psycopg's, without importing it here
    return isinstance(sqlstate, str) and sqlstate[:2] in REFUSED_FOR_ITS_ROWS


def _settle(group: list[_Delivery]) -> None:
    """Wake every delivery of a committed (or failed) group: threads by their event, each
    event loop once for all of its futures."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
    for delivery in group:
        if delivery.done is not None:
            delivery.done.set()
        else:
            by_loop.setdefault(delivery.future.get_loop(), []).append(delivery.future)
    for loop, futures in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, futures)
        except RuntimeError:  # the loop is closed: the worker is gone, nobody waits
            pass


def _resolve(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():  # not given up on (wait_for cancels it at WAIT_S)
            future.set_result(None)


def open_intake(config: Config, queue: Queue, on_taken: Callable[[int, int], None] | None = None):
    """Where a webhook puts what it acknowledges: this process's inbox file, or the database
    (`on_taken` then hears how many messages each commit took in, and how many were redeliveries:
    with the inbox files, the reply process's drain counts them)."""
    if config.database_url:
        return DatabaseIntake(queue, on_taken)
    return inbox.InboxWriter(config.inbox_dir)


class SQLiteQueue(Queue):
    """The queue in one SQLite file (DATA_DIR/bot.sqlite3): one host, no setting."""

    def __init__(self, path: str, max_attempts: int = 5, tracking: bool = False,
                 clock: Callable[[], float] = time.time, *, read_only: bool = False):
        self.path = path
        super().__init__(Database(path, SCHEMA, read_only=read_only), max_attempts, tracking, clock)


class PostgresQueue(Queue):
    """The queue in PostgreSQL (DATABASE_URL): every host that shares it acts as one bot."""

    def __init__(self, url: str, max_attempts: int = 5, tracking: bool = False,
                 clock: Callable[[], float] = time.time, *, read_only: bool = False, pool_size: int = 10,
                 wait: float = 5.0):
        from bot.storage.postgres import PostgresDatabase  # psycopg loads only where it is used
        from bot.storage.schema import POSTGRES_SCHEMA

        self.url = url
        database = PostgresDatabase(url, POSTGRES_SCHEMA, max_size=pool_size, read_only=read_only, wait=wait)
        super().__init__(database, max_attempts, tracking, clock)

    def take_in(self, deliveries: Sequence[tuple[Sequence[IncomingMessage], Sequence[ClassifiedEcho]]]) -> int:
        """The webhooks' write with PostgreSQL: these deliveries, committed before their 200s, and
        the reply processes of every host woken at that commit; how many messages were new (the
        others: redeliveries). A database that cannot take them raises StorageUnavailable (503:
        Meta delivers again)."""
        now = self.clock()
        rows = [(dedupe_key(m), m.psid, _to_json(m), m.timestamp_ms, now) for messages, _ in deliveries for m in messages]
        echoes = [echo for _, some in deliveries for echo in some]
        new = 0
        try:
            # The usual group has no echoes: one statement, its own transaction, one round trip.
            with self._database.intake() as db, db.conn.transaction() if echoes else nullcontext():
                if rows:  # (a data-modifying WITH always runs; the SELECT's NOTIFY is sent at commit)
                    new = db.execute(f"WITH added AS ({ADD_EVENTS}) {self._database.NOTIFY_SELECT},"
                                     " (SELECT COUNT(*) FROM added)", (json.dumps(rows),)).fetchone()[1]
                if echoes:
                    record_echoes(db, echoes)
        except Exception as exc:  # noqa: BLE001 - whatever the driver raised, it was not stored
            raise StorageUnavailable(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
        return new


def open_queue(config: Config, clock: Callable[[], float] = time.time, pool_size: int = 10,
               wait: float = 5.0) -> Queue:
    """The store as the settings describe it: PostgreSQL when DATABASE_URL is set, else SQLite.
    `wait`: the longest wait for a PostgreSQL connection (a webhook worker's is short)."""
    if config.database_url:
        return PostgresQueue(config.database_url, max_attempts=config.max_attempts,
                             tracking=bool(config.tracking_url), clock=clock, pool_size=pool_size, wait=wait)
    return SQLiteQueue(config.database_path, max_attempts=config.max_attempts, tracking=bool(config.tracking_url),
                       clock=clock)
