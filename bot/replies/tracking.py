"""TRACKING_URL: each exchange record POSTed as JSON, in the background, with retries.

The records wait in the store (interactions.tracking = 'waiting') until the
endpoint answers 2xx, so a slow or failing endpoint never delays a reply and
loses nothing; a record is sent again only if the endpoint's 2xx never arrived. Every
host's tracker shares the records on PostgreSQL: each claims the ones it posts.
"""
from __future__ import annotations

import logging
import threading
import time

import requests

from bot.telemetry import metrics
from bot.telemetry.quiet import QuietRepeats
from bot.storage.conversations import Conversations

logger = logging.getLogger(__name__)

RETRY_CAP_S = 300.0
# Records claimed at a time: each is this tracker's for as long as posting them all may take
# (connect and read timeouts), so a tracker that dies holds its records back only that long.
CLAIM_SIZE = 10


class Tracker:
    def __init__(self, conversations: Conversations, url: str, timeout: float = 5.0, interval: float = 1.0,
                 retry_base: float = 1.0):
        self.conversations = conversations
        self.url = url
        self.timeout = timeout
        self.interval = interval
        self.retry_base = retry_base
        self._session = requests.Session()
        self._failing = False  # log the first failure of an outage, and its end
        self._errors = QuietRepeats(time.monotonic, log=logger)  # a database outage: not a line a second

    def start(self, stopping: threading.Event) -> None:
        threading.Thread(target=self._loop, args=(stopping,), name="tracking", daemon=True).start()

    def _loop(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.interval):
            try:
                self.send_waiting()
            except Exception as exc:  # noqa: BLE001 - a database that blinks (PostgreSQL restarting) must not end tracking
                self._errors.error(f"tracking:{type(exc).__name__}", "tracking: cannot read or update the exchange "
                                   "log: %s: %s", type(exc).__name__, exc)

    def send_waiting(self) -> int:
        """POST what is due, oldest first, CLAIM_SIZE records at a time, each claimed for long
        enough to post them all (every host's tracker shares the outbox on PostgreSQL); stop at
        the first failure and retry later."""
        sent = 0
        while claimed := self.conversations.claim_for_tracking(CLAIM_SIZE * (2 * self.timeout + 1), CLAIM_SIZE):
            for n, (record_id, record) in enumerate(claimed):
                try:
                    response = self._session.post(self.url, json=record, timeout=self.timeout)
                    ok, why = response.ok, f"HTTP {response.status_code}"
                except requests.RequestException as exc:
                    ok, why = False, type(exc).__name__
                if not ok:
                    metrics.TRACKING.labels("failed").inc()
                    self.conversations.tracking_failed(record_id, self.retry_base, RETRY_CAP_S)
                    self.conversations.release_tracking([i for i, _ in claimed[n + 1:]])
                    if not self._failing:
                        logger.warning("tracking endpoint failed (%s); records wait in the store and are retried", why)
                    self._failing = True
                    return sent
                metrics.TRACKING.labels("sent").inc()
                self.conversations.tracked(record_id)
                if self._failing:
                    logger.info("tracking endpoint answers again")
                self._failing = False
                sent += 1
        return sent
