"""Where a prompt's history comes from: the mirror when it covers the user, else ONE Graph
Conversations API read within the Page's budget (shared by every process and host).

A user the mirror does not know yet is worth a short wait for the next read slot (their
earlier conversation with the Page lives only in Graph), and a Graph read that fails
for a passing reason (timeout, 5xx) is tried once more: only then does the answer come
from what the mirror has, and the exchange log says so (`history`: mirror-only).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from bot.storage.conversations import Conversations
from bot.storage.mirror import BOT, USER, MirrorRow
from bot.storage.times import created_ms
from bot.storage.users import UserState
from bot.telemetry import metrics
from messenger.graph import RATE_LIMIT_CODES, GraphAPIError, GraphClient, HistoryMessage, is_retryable

logger = logging.getLogger(__name__)

GRAPH_RETRY_AFTER_S = 0.3
TOKEN_REFUSED = 190  # the Page's token is invalid or expired: no Graph call of this Page can succeed
# Values of the exchange log's `history` column.
FROM_MIRROR, FROM_GRAPH, MIRROR_ONLY = "mirror", "graph", "mirror-only"


@dataclass(frozen=True)
class History:
    messages: list[HistoryMessage]
    synced: tuple[MirrorRow, ...] | None  # what Graph returned, as mirror rows for the exchange to write
    source: str  # FROM_MIRROR, FROM_GRAPH or MIRROR_ONLY


class HistoryReader:
    def __init__(self, graph: GraphClient, conversations: Conversations, *, page_id: str, limit: int,
                 mirror_max_age: float, reads_per_second: float, new_user_wait: float,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], object] = time.sleep):
        self.graph = graph
        self.conversations = conversations
        self.page_id = page_id
        self.limit = limit
        self.mirror_max_age = mirror_max_age
        self.reads_per_second = reads_per_second
        self.new_user_wait = new_user_wait  # HISTORY_WAIT
        self.clock = clock  # wall time, as the budget stores it
        self.sleep = sleep

    def read(self, psid: str, user: UserState, spend: float = float("inf"), received_at: float | None = None) -> History:
        """`spend`: the most seconds this may take (the reply's deadline keeps the rest for the model).
        `received_at`: when the message came in; a new user's wait for a read slot counts from then,
        so a message claimed late in a burst does not wait longer than HISTORY_WAIT all over again."""
        now = self.clock()
        give_up = now + spend
        if user.synced_at is not None and now - user.synced_at < self.mirror_max_age:
            metrics.HISTORY_READS.labels("mirror").inc()
            return History(self._mirror(psid, user), None, FROM_MIRROR)
        # Someone the mirror knows can be answered from it now; someone new is worth a wait.
        wait = self.new_user_wait if user.synced_at is None else 0.0
        wait_until = min(max(now, (received_at if received_at is not None else now) + wait), give_up)
        for attempt in (1, 2):
            if not self._take_read(wait_until):
                logger.info("no Graph read slot for psid=%r in time: answering from the mirror", psid)
                break
            try:
                history = self.graph.fetch_history(psid, self.limit)
            except GraphAPIError as exc:
                metrics.GRAPH_ERRORS.labels(str(exc.code)).inc()
                if exc.code in RATE_LIMIT_CODES:
                    self.conversations.hold_graph_reads(self.page_id)
                    break
                if exc.code == TOKEN_REFUSED:  # the send will be refused too: the model is not paid for it
                    raise
                if attempt == 1 and is_retryable(exc) and self._time_for_another(give_up):
                    logger.info("history read for psid=%r failed (%s); trying once more", psid, exc)
                    self.sleep(GRAPH_RETRY_AFTER_S)
                    # The retry needs a slot of its own: worth a short wait, known user or not.
                    wait_until = max(wait_until, min(give_up, self.clock() + self.new_user_wait))
                    continue
                logger.warning("history unavailable for psid=%r, answering from the mirror: %s", psid, exc)
                break
            metrics.HISTORY_READS.labels("graph").inc()
            return self._from_graph(psid, history, user)
        metrics.HISTORY_READS.labels("mirror-only").inc()
        return History(self._mirror(psid, user), None, MIRROR_ONLY)

    def latest(self, psid: str, wait: float) -> list[HistoryMessage] | None:
        """This user's newest messages in one Graph read within the Page's budget, waiting up to
        `wait` seconds for a slot: None when no slot came in time or the read failed for now.
        GraphAPIError when it can never succeed as things are (a token or permission error)."""
        if not self._take_read(self.clock() + wait):
            logger.warning("no Graph read slot for psid=%r within %.0f s", psid, wait)
            return None
        try:
            return self.graph.fetch_history(psid, self.limit)
        except GraphAPIError as exc:
            metrics.GRAPH_ERRORS.labels(str(exc.code)).inc()
            if exc.code in RATE_LIMIT_CODES:
                self.conversations.hold_graph_reads(self.page_id)
            logger.warning("could not read psid=%r's conversation: %s", psid, exc)
            if not is_retryable(exc):
                raise
            return None

    def _time_for_another(self, give_up: float) -> bool:
        """Room for the pause and one more read at its full timeout before giving up."""
        return self.clock() + GRAPH_RETRY_AFTER_S + sum(self.graph.timeout) <= give_up

    def _take_read(self, wait_until: float) -> bool:
        """A read slot from the budget, now or by `wait_until` (then waited for)."""
        slot = self.conversations.reserve_graph_read(self.page_id, self.reads_per_second, latest=wait_until)
        if slot is None:
            return False
        if slot > self.clock():
            self.sleep(slot - self.clock())
        return True

    def _from_graph(self, psid: str, history: list[HistoryMessage], user: UserState) -> History:
        after = user.reset_at_ms or 0
        synced = tuple((h.mid, BOT if h.from_id == self.page_id else USER, h.text, created_ms(h.created_time))
                       for h in reversed(history))  # oldest first: insertion order breaks ties of whole seconds
        cut = [h.mid for h in history if created_ms(h.created_time) <= after]
        # A message written after the reset word, answered with it, is mirrored past the cut
        # (Conversations.finish): Graph's time for it (whole seconds) may not be.
        kept = self.conversations.mirrored_after(psid, cut, after) if cut and after else set()
        return History([h for h in history if created_ms(h.created_time) > after or h.mid in kept], synced,
                       FROM_GRAPH)

    def _mirror(self, psid: str, user: UserState) -> list[HistoryMessage]:
        return self.conversations.history(psid, self.page_id, self.limit, user.reset_at_ms)
