"""The Flask edge: read the raw request, call plain functions, return a status."""
from __future__ import annotations

import json
import logging
import sqlite3

import openai
from flask import Flask, Response, jsonify, request
from werkzeug.middleware.proxy_fix import ProxyFix

from bot import metrics
from bot.dispatcher import Dispatcher
from bot.doorbell import Doorbell
from bot.responder import PromptSettings, Responder
from bot.store import SQLiteStore
from config import Config, load_config
from gpt.reply import ModelSettings, ReplyGenerator
from messenger.events import BadPayload, parse_delivery
from messenger.graph import GraphClient
from messenger.signature import is_valid_signature, is_verify_request

logger = logging.getLogger(__name__)

# Meta's bodies can exceed 300 KB; anything past this is not Meta.
MAX_BODY_BYTES = 5 * 1024 * 1024


def create_app(config: Config | None = None, *, start_workers: bool = True) -> Flask:
    """Build the clients, the queue and the app; tests pass a Config aimed at fake servers.

    With start_workers=False no reply thread runs here: the reply process
    (bot/worker.py) answers the queue, or a test calls
    `app.extensions["dispatcher"].run_pending()`.
    """
    config = config or load_config()
    dispatcher = build_dispatcher(config)
    if start_workers:
        dispatcher.start()

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    # Behind a tunnel (cloudflared, ngrok) the client address and scheme arrive in X-Forwarded-*.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    app.extensions["dispatcher"] = dispatcher
    _add_routes(app, config, dispatcher.store, dispatcher.doorbell)
    return app


def build_dispatcher(config: Config) -> Dispatcher:
    """The queue, the reply pipeline and the doorbell between them."""
    store = SQLiteStore(config.database_path, max_attempts=config.max_attempts)
    return Dispatcher(store, build_responder(config), Doorbell(config.database_path),
                      threads=config.reply_threads, lease_seconds=config.lease_seconds,
                      retry_base=config.retry_base_seconds)


def build_responder(config: Config) -> Responder:
    """The reply pipeline with its two API clients, each built once."""
    graph = GraphClient(config.fb_api_url, config.fb_page_id, config.fb_page_access_token,
                        config.fb_app_secret, timeout=config.graph_timeout, pool_size=config.reply_threads + 8)
    client = openai.OpenAI(api_key=config.openai_api_key, base_url=config.openai_base_url,
                           timeout=config.openai_timeout, max_retries=config.openai_max_retries)
    model = ModelSettings(config.openai_model, config.openai_temperature, config.openai_top_p,
                          config.openai_max_tokens)
    generator = ReplyGenerator(client, model, config.fallback_reply, config.error_log_file)
    prompt = PromptSettings(config.fb_page_id, config.politeness_prefix, config.message_count,
                            config.system_prompt, config.unsupported_reply)
    return Responder(graph, generator, prompt)


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
        try:
            added = store.add(delivery.messages)
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
