"""Meta's webhook deliveries: signed, sent in the background, retried like Meta on failure."""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from devtools.emulator.timeline import Timeline
from devtools.emulator.webhooks import delivery_body
from messenger.signature import LEGACY_SIGNATURE_HEADER, SIGNATURE_256_HEADER, sign

logger = logging.getLogger(__name__)

# Seconds to wait before each attempt. Meta retries at once, then less and less
# often, and unsubscribes the app after an hour of failures; the sandbox gives
# up after about two minutes.
RETRY_DELAYS = (0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
ACK_TIMEOUT = 5.0  # current docs: answer 200 "within 5 or less seconds"


class WebhookSender:
    """Delivers signed bodies to the bot's callback URL in the background, retrying like Meta."""

    def __init__(self, url: str, app_secret: str, timeline: Timeline, *, echoes: bool = True,
                 retry_delays: tuple[float, ...] = RETRY_DELAYS, timeout: float = ACK_TIMEOUT):
        self.url = url
        self.echoes = echoes  # subscribed to message_echoes
        self._secret = app_secret
        self._timeline = timeline
        self._delays = retry_delays
        self._timeout = timeout
        self._session = requests.Session()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook")

    def verify(self, verify_token: str, challenge: str = "1158201444") -> bool:
        """The dashboard's "Verify and save": GET with hub.* and expect the challenge back."""
        params = {"hub.mode": "subscribe", "hub.verify_token": verify_token, "hub.challenge": challenge}
        try:
            response = self._session.get(self.url, params=params, timeout=self._timeout)
            ok = response.status_code == 200 and response.text == challenge
            status = response.status_code
        except requests.RequestException as exc:
            ok, status = False, type(exc).__name__
        self._timeline.add("verify", None, ok=ok, status=status)
        return ok

    def deliver(self, account_id: str, events: list[dict], psid: str | None = None, object: str = "page", *,
                at_ms: int | None = None, key: str = "messaging"):
        """Sign and post `events` of one account (a Page, or an Instagram account with
        `object="instagram"`) in the background; the future says whether a 200 came back.
        `at_ms`: the entry's time by Meta's clock (now when not given); `key`: see delivery_body."""
        body = delivery_body(account_id, events, object, key, at_ms=at_ms)
        return self._pool.submit(self._deliver, body, psid, account_id)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _deliver(self, body: bytes, psid: str | None, account_id: str) -> bool:
        headers = {"Content-Type": "application/json",
                   SIGNATURE_256_HEADER: sign(body, self._secret),
                   LEGACY_SIGNATURE_HEADER: sign(body, self._secret, "sha1")}
        shown = json.loads(body)
        for attempt, delay in enumerate(self._delays, start=1):
            time.sleep(delay)
            started = time.monotonic()
            try:
                response = self._session.post(self.url, data=body, headers=headers, timeout=self._timeout)
                status: int | str = response.status_code
            except requests.RequestException as exc:
                status = "timeout" if isinstance(exc, requests.Timeout) else "unreachable"
            ms = round((time.monotonic() - started) * 1000)
            self._timeline.add("webhook", psid, attempt=attempt, status=status, ms=ms, body=shown, account=account_id)
            if status == 200:
                return True
        self._timeline.add("webhook_failed", psid, attempts=len(self._delays), account=account_id)
        logger.warning("webhook delivery failed %d times; Meta would disable the webhook", len(self._delays))
        return False
