"""POST /webhook: the one hot path, kept free of Flask.

Every delivery Meta sends comes through here, so it does only what the 200
needs - verify the signature on the raw body, parse, append to this process's
inbox, ring the doorbell - without Flask's request and app contexts (measured:
0.29 ms of CPU per delivery through a Flask view, 0.12-0.14 ms here).
`WebhookReceiver.handle` is that core (`handle_async` when the store is a commit to
PostgreSQL, awaited on the event loop); the ASGI front (bot/web/asgi.py, what gunicorn
runs) and `WebhookRoute` (plain WSGI, for tests, the sandbox and any WSGI server)
only read the body and write the answer.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from bot.storage.doorbell import Doorbell
from bot.storage.inbox import RESUME, WATCHED, ClassifiedEcho, InboxWriter
from bot.telemetry import metrics
from config import Config
from messenger.events import (FEEDBACK, BadPayload, Echo, IncomingMessage, OtherObject, ThreadControl, Touch,
                              parse_body)
from messenger.graph import REPLY_METADATA
from messenger.signature import LEGACY_SIGNATURE_HEADER, SIGNATURE_256_HEADER, is_valid_signature

logger = logging.getLogger(__name__)

# Meta's bodies can exceed 300 KB; anything past this is not Meta.
MAX_BODY_BYTES = 5 * 1024 * 1024
SIGNATURE_HEADERS = (SIGNATURE_256_HEADER, LEGACY_SIGNATURE_HEADER)
REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 408: "Request Timeout",
           413: "Content Too Large", 503: "Service Unavailable"}
WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


class WebhookReceiver:
    """Turns one raw delivery into a status and a short text."""

    def __init__(self, config: Config, inbox: InboxWriter, doorbell: Doorbell,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.inbox = inbox
        self.doorbell = doorbell
        self.clock = clock
        self._foreign_pages_seen: set[str] = set()
        self.accounts = config.account_ids or frozenset({config.fb_page_id})

    def handle(self, body: bytes, signatures: Mapping[str, str], peer: str | None) -> tuple[int, str]:
        accepted = self._accept(body, signatures, peer)
        if isinstance(accepted, tuple):
            return accepted
        if accepted.stores:
            try:
                self.inbox.append(accepted.messages, accepted.echoes, at=accepted.now)
            except OSError as exc:
                return self._not_stored(peer, exc)
        return self._acknowledge(accepted)

    async def handle_async(self, body: bytes, signatures: Mapping[str, str], peer: str | None) -> tuple[int, str]:
        """`handle` for a store that commits over the network (the PostgreSQL intake): the event
        loop waits for the commit without a thread of its own per delivery."""
        accepted = self._accept(body, signatures, peer)
        if isinstance(accepted, tuple):
            return accepted
        if accepted.stores:
            try:
                await self.inbox.append_async(accepted.messages, accepted.echoes, at=accepted.now)
            except OSError as exc:
                return self._not_stored(peer, exc)
        return self._acknowledge(accepted)

    def _accept(self, body: bytes, signatures: Mapping[str, str], peer: str | None) -> "_Accepted | tuple[int, str]":
        """The delivery verified and parsed, with what must be stored before its 200; or the refusal."""
        if not is_valid_signature(body, signatures, self.config.fb_app_secret):
            return self.refuse(peer, "forbidden", 403, "missing or wrong signature")
        now = self.clock()
        try:
            delivery = parse_body(body, now_ms=int(now * 1000), accounts=self.accounts)
        except BadPayload as exc:
            return self.refuse(peer, "bad_request", 400, str(exc))
        except OtherObject as other:  # a refusal would only make Meta retry it, then disable the webhook
            self._note_foreign(f"object {other.args[0]!r}", "this bot answers only 'page' and 'instagram' deliveries")
            return _Accepted((), [], other.args[1], now)
        self._note_foreign_pages(delivery.foreign_pages)
        echoes = [classify(echo, self._config_of(echo.page_id), now, self._is_instagram(echo.page_id))
                  for echo in delivery.echoes] + [resumed(control) for control in delivery.controls] \
            + [touched(touch) for touch in delivery.touches] + [watched(m) for m in delivery.watched if m.mid]
        return _Accepted(delivery.messages, echoes, delivery.ignored, now)

    def _not_stored(self, peer: str | None, exc: OSError) -> tuple[int, str]:
        # Not stored means not acknowledged: Meta delivers it again.
        logger.error("could not store the delivery, asking Meta to retry: %s", exc)
        return self.refuse(peer, "unavailable", 503, "temporarily unavailable")

    def _acknowledge(self, accepted: "_Accepted") -> tuple[int, str]:
        if accepted.stores:
            self.doorbell.ring()
        metrics.WEBHOOKS.labels("accepted").inc()
        if accepted.ignored:  # accepted / duplicate: metrics.count_taken_in, once the queue has them
            metrics.EVENTS.labels("ignored").inc(accepted.ignored)
        logger.info("webhook accepted: %d message(s) stored, %d event(s) ignored",
                    len(accepted.messages), accepted.ignored)
        return 200, "EVENT_RECEIVED"

    def _config_of(self, account_id: str) -> Config:
        """The settings of the Page (or Instagram account) an event belongs to: its human pause."""
        account = self.config.account(account_id)
        return account.config if account else self.config

    def _is_instagram(self, account_id: str) -> bool:
        account = self.config.account(account_id)
        return bool(account and account.platform == "instagram")

    def _note_foreign_pages(self, page_ids: Iterable[str]) -> None:
        """Once per id and process: the app is subscribed to a Page (or an Instagram account) this
        bot does not answer for. Meta gets its 200: a refusal would only make it retry, then disable
        the subscription."""
        for page_id in page_ids:
            self._note_foreign(repr(page_id), "not a Page or Instagram account this bot answers for "
                                              f"({', '.join(sorted(self.accounts))})")

    def _note_foreign(self, what: str, why: str) -> None:
        if what not in self._foreign_pages_seen and len(self._foreign_pages_seen) < 100:
            self._foreign_pages_seen.add(what)
            logger.warning("ignoring events for %s: %s", what, why)

    @staticmethod
    def refuse(peer: str | None, result: str, status: int, reason: str) -> tuple[int, str]:
        metrics.WEBHOOKS.labels(result).inc()
        logger.warning("webhook refused for %s: %s", peer, reason)
        return status, reason


@dataclass(frozen=True)
class _Accepted:
    messages: tuple[IncomingMessage, ...]
    echoes: list[ClassifiedEcho]
    ignored: int
    now: float

    @property
    def stores(self) -> bool:
        return bool(self.messages or self.echoes)


def classify(echo: Echo, config: Config, now: float, instagram: bool = False) -> ClassifiedEcho:
    """An echo is the bot's own when it carries the bot's metadata or app id; any other
    (the Page inbox, another app) means a person took over.

    Instagram's echoes may carry neither (the Send API keeps no metadata there): one with no
    app id at all cannot be told apart from the bot's own reply, and a bot that paused after
    each of its own replies would stop answering, so it counts as the bot's. A person answering
    from Meta's inbox is still seen: that echo carries the inbox's app id."""
    own = echo.metadata == REPLY_METADATA or bool(config.fb_app_id and echo.app_id == config.fb_app_id)
    if instagram and echo.app_id is None and echo.metadata is None:
        own = True
    if own:
        return ClassifiedEcho(echo, False, 0.0)
    if not config.human_pause_seconds:
        return ClassifiedEcho(echo, True, 0.0)
    # From when the person wrote (Meta's time; never later than now): an answer redelivered an
    # hour late, after an outage, does not silence the bot for another whole pause.
    until = min(now, echo.timestamp_ms / 1000) + config.human_pause_seconds
    logger.info("a human answered psid=%r: the bot pauses for %.0f s", echo.psid, max(0.0, until - now))
    return ClassifiedEcho(echo, True, until)


def resumed(control: ThreadControl) -> ClassifiedEcho:
    """Meta passed the thread back to the bot's app: stored with the echoes, it ends the pause."""
    logger.info("thread control came back for psid=%r: the bot answers again", control.psid)
    echo = Echo(psid=control.psid, mid=f"thread-control:{control.timestamp_ms}", text="",
                timestamp_ms=control.timestamp_ms, app_id=None, metadata=None, page_id=control.page_id)
    return ClassifiedEcho(echo, False, 0.0, RESUME)


def touched(touch: Touch) -> ClassifiedEcho:
    """An edit, a reaction or feedback, stored with the echoes (bot/storage/conversations.py)."""
    if touch.kind == FEEDBACK:
        metrics.FEEDBACK.labels("good" if touch.value.lower().startswith("good") else "bad").inc()
    echo = Echo(psid=touch.psid, mid=touch.mid, text=touch.value, timestamp_ms=touch.timestamp_ms, app_id=None,
                metadata=None, page_id=touch.page_id)
    return ClassifiedEcho(echo, False, 0.0, touch.kind)


def watched(message: IncomingMessage) -> ClassifiedEcho:
    """A user's message in a thread the Page inbox owns (standby): mirrored with the echoes, as
    the user's (an attachment as its kinds), never answered."""
    text = message.text or " ".join(f"[{kind}]" for kind in message.attachment_types)
    echo = Echo(psid=message.psid, mid=message.mid, text=text, timestamp_ms=message.timestamp_ms, app_id=None,
                metadata=None, page_id=message.page_id)
    return ClassifiedEcho(echo, False, 0.0, WATCHED)


class WebhookRoute:
    """WSGI: answers POST /webhook through the receiver and hands every other request to `app`."""

    def __init__(self, app: WSGIApp, receiver: WebhookReceiver):
        self.app = app
        self.receiver = receiver

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/webhook" or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        peer = environ.get("REMOTE_ADDR")
        body = read_wsgi_body(environ)
        if body is None:
            status, text = self.receiver.refuse(peer, "too_large", 413, "body too large")
        else:
            signatures = {name: environ[key] for name in SIGNATURE_HEADERS
                          if (key := "HTTP_" + name.upper().replace("-", "_")) in environ}
            status, text = self.receiver.handle(body, signatures, peer)
        payload = text.encode()
        start_response(f"{status} {REASONS[status]}", [("Content-Type", "text/plain; charset=utf-8"),
                                                       ("Content-Length", str(len(payload)))])
        return [payload]


def read_wsgi_body(environ: dict, limit: int = MAX_BODY_BYTES) -> bytes | None:
    """The whole body, or None when it is over `limit` - announced or, chunked, as it arrives."""
    stream = environ["wsgi.input"]
    try:
        length = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        length = -1
    if length > limit:
        return None
    if length >= 0:
        return stream.read(length)
    if not environ.get("wsgi.input_terminated"):
        return b""  # no length and no chunking: no body (PEP 3333)
    chunks, size = [], 0
    while chunk := stream.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)

