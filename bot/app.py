"""The Flask edge: read the raw request, call plain functions, return a status."""
from __future__ import annotations

import json
import logging
import sqlite3
import time

from flask import Flask, Response, jsonify, request
from werkzeug.middleware.proxy_fix import ProxyFix

from bot import metrics
from bot.doorbell import Doorbell
from bot.store import SQLiteStore, open_store
from config import Config, load_config
from messenger.events import BadPayload, Echo, parse_delivery
from messenger.graph import REPLY_METADATA
from messenger.signature import is_valid_signature, is_verify_request

logger = logging.getLogger(__name__)

# Meta's bodies can exceed 300 KB; anything past this is not Meta.
MAX_BODY_BYTES = 5 * 1024 * 1024


def create_app(config: Config | None = None, *, replies: str = "threads") -> Flask:
    """Build the queue and the app; tests pass a Config aimed at fake servers.

    replies: "threads" answers the queue on reply threads inside this process;
    "process" leaves it to the reply process (bot/worker.py, started by
    gunicorn.conf.py), so a webhook worker never even imports the model client;
    "manual" builds the dispatcher without starting it, for tests that call
    `app.extensions["dispatcher"].run_pending()`.
    """
    if replies not in ("threads", "process", "manual"):
        raise ValueError(f"replies must be threads, process or manual, not {replies!r}")
    config = config or load_config()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    # Behind a tunnel (cloudflared, ngrok) the client address and scheme arrive in X-Forwarded-*.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    store = open_store(config)
    if replies != "process":
        from bot.replies import build_dispatcher  # the model client loads only where replies are made

        dispatcher = build_dispatcher(config, store)
        app.extensions["dispatcher"] = dispatcher
        if replies == "threads":
            dispatcher.start()
    _add_routes(app, config, store, Doorbell(config.database_path))
    return app


def _add_routes(app: Flask, config: Config, store: SQLiteStore, doorbell: Doorbell) -> None:
    @app.get("/webhook")
    def verify() -> Response:
        if is_verify_request(request.args, config.fb_verify_token):
            return _text(request.args.get("hub.challenge", ""), 200)
        logger.warning("webhook verification refused for %s", request.remote_addr)
        return _text("verification failed", 403)

    @app.post("/webhook")
    def receive() -> Response:
        body = request.get_data(cache=False)
        if not is_valid_signature(body, request.headers, config.fb_app_secret):
            return _refuse("forbidden", 403, "missing or wrong signature")
        try:
            delivery = parse_delivery(json.loads(body))
        except (ValueError, RecursionError) as exc:  # BadPayload and JSON errors alike
            return _refuse("bad_request", 400, str(exc) if isinstance(exc, BadPayload) else "body is not valid JSON")
        echoes = [_classify(echo, config) for echo in delivery.echoes]
        try:
            added = store.add(delivery.messages, echoes) if delivery.messages or echoes else []
        except sqlite3.Error as exc:
            # Not stored means not acknowledged: Meta delivers it again.
            logger.error("could not store the delivery, asking Meta to retry: %s", exc)
            return _refuse("unavailable", 503, "temporarily unavailable")
        new = sum(added)
        if new:
            doorbell.ring()
        _count(new, len(added) - new, delivery.ignored)
        return _text("EVENT_RECEIVED", 200)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok", **store.stats())

    @app.get("/metrics")
    def metrics_page() -> Response:
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)


def _classify(echo: Echo, config: Config) -> tuple[Echo, bool, float]:
    """(echo, by a human, pause until): an echo is the bot's own when it carries the bot's
    metadata or app id; any other (the Page inbox, another app) means a person took over."""
    own = echo.metadata == REPLY_METADATA or bool(config.fb_app_id and echo.app_id == config.fb_app_id)
    if own:
        return echo, False, 0.0
    if config.human_pause_seconds:
        logger.info("a human answered psid=%s: the bot pauses for %.0f s", echo.psid, config.human_pause_seconds)
    return echo, True, time.time() + config.human_pause_seconds if config.human_pause_seconds else 0.0


def _refuse(result: str, status: int, reason: str) -> Response:
    metrics.WEBHOOKS.labels(result).inc()
    logger.warning("webhook refused for %s: %s", request.remote_addr, reason)
    return _text(reason, status)


def _count(accepted: int, duplicates: int, ignored: int) -> None:
    metrics.WEBHOOKS.labels("accepted").inc()
    for outcome, number in (("accepted", accepted), ("duplicate", duplicates), ("ignored", ignored)):
        if number:
            metrics.EVENTS.labels(outcome).inc(number)
    logger.info("webhook accepted: %d new, %d duplicate, %d ignored", accepted, duplicates, ignored)


def _text(body: str, status: int) -> Response:
    return Response(body, status=status, mimetype="text/plain")
