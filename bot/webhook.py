"""POST /webhook as a plain WSGI callable in front of Flask: the one hot path.

Every delivery Meta sends comes through here, so it does only what the 200
needs - read the raw body, verify the signature, parse, append to this
process's inbox, ring the doorbell - without Flask's request and app contexts
(measured: 0.29 ms of CPU per delivery through a Flask view, 0.14 ms here).
Everything else (GET /webhook, /healthz, /metrics) stays in Flask.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Callable, Iterable

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wsgi import get_input_stream

from bot import metrics
from bot.doorbell import Doorbell
from bot.inbox import InboxWriter
from config import Config
from messenger.events import BadPayload, Echo, parse_delivery
from messenger.graph import REPLY_METADATA
from messenger.signature import LEGACY_SIGNATURE_HEADER, SIGNATURE_256_HEADER, is_valid_signature

logger = logging.getLogger(__name__)

# Meta's bodies can exceed 300 KB; anything past this is not Meta.
MAX_BODY_BYTES = 5 * 1024 * 1024
WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


class WebhookReceiver:
    """Answers POST /webhook itself and hands every other request to `app`."""

    def __init__(self, app: WSGIApp, config: Config, inbox: InboxWriter, doorbell: Doorbell):
        self.app = app
        self.config = config
        self.inbox = inbox
        self.doorbell = doorbell

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/webhook" or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        status, text = self.receive(environ)
        body = text.encode()
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    def receive(self, environ: dict) -> tuple[str, str]:
        try:
            body = get_input_stream(environ, max_content_length=MAX_BODY_BYTES).read()
        except RequestEntityTooLarge:
            return self._refuse(environ, "too_large", "413 Request Entity Too Large", "body too large")
        headers = {name: environ[key] for name, key in ((SIGNATURE_256_HEADER, "HTTP_X_HUB_SIGNATURE_256"),
                                                         (LEGACY_SIGNATURE_HEADER, "HTTP_X_HUB_SIGNATURE"))
                   if key in environ}
        if not is_valid_signature(body, headers, self.config.fb_app_secret):
            return self._refuse(environ, "forbidden", "403 Forbidden", "missing or wrong signature")
        try:
            delivery = parse_delivery(json.loads(body))
        except (ValueError, RecursionError) as exc:  # BadPayload and JSON errors alike
            reason = str(exc) if isinstance(exc, BadPayload) else "body is not valid JSON"
            return self._refuse(environ, "bad_request", "400 Bad Request", reason)
        echoes = [classify(echo, self.config) for echo in delivery.echoes]
        if delivery.messages or echoes:
            try:
                self.inbox.append(delivery.messages, echoes)
            except OSError as exc:
                # Not stored means not acknowledged: Meta delivers it again.
                logger.error("could not store the delivery, asking Meta to retry: %s", exc)
                return self._refuse(environ, "unavailable", "503 Service Unavailable", "temporarily unavailable")
            self.doorbell.ring()
        metrics.WEBHOOKS.labels("accepted").inc()
        if delivery.ignored:
            metrics.EVENTS.labels("ignored").inc(delivery.ignored)  # accepted / duplicate: counted as drained
        logger.info("webhook accepted: %d message(s) stored, %d event(s) ignored",
                    len(delivery.messages), delivery.ignored)
        return "200 OK", "EVENT_RECEIVED"

    @staticmethod
    def _refuse(environ: dict, result: str, status: str, reason: str) -> tuple[str, str]:
        metrics.WEBHOOKS.labels(result).inc()
        logger.warning("webhook refused for %s: %s", environ.get("REMOTE_ADDR"), reason)
        return status, reason


def classify(echo: Echo, config: Config) -> tuple[Echo, bool, float]:
    """(echo, by a human, pause until): an echo is the bot's own when it carries the bot's
    metadata or app id; any other (the Page inbox, another app) means a person took over."""
    own = echo.metadata == REPLY_METADATA or bool(config.fb_app_id and echo.app_id == config.fb_app_id)
    if own:
        return echo, False, 0.0
    if config.human_pause_seconds:
        logger.info("a human answered psid=%s: the bot pauses for %.0f s", echo.psid, config.human_pause_seconds)
    return echo, True, time.time() + config.human_pause_seconds if config.human_pause_seconds else 0.0
