"""The app: POST /webhook answered by bot/webhook.py, the rest by a small Flask app."""
from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from werkzeug.middleware.proxy_fix import ProxyFix

from bot import metrics
from bot.doorbell import Doorbell
from bot.inbox import InboxWriter
from bot.store import SQLiteStore, open_store
from config import Config, load_config
from bot.webhook import WebhookReceiver
from messenger.signature import is_verify_request

logger = logging.getLogger(__name__)


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
    store = open_store(config)
    if replies != "process":
        from bot.replies import build_dispatcher  # the model client loads only where replies are made

        dispatcher = build_dispatcher(config, store)
        app.extensions["dispatcher"] = dispatcher
        if replies == "threads":
            dispatcher.start()
    _add_routes(app, config, store)
    receiver = WebhookReceiver(app.wsgi_app, config, InboxWriter(config.inbox_dir), Doorbell(config.database_path))
    # Behind a tunnel (cloudflared, ngrok) the client address and scheme arrive in X-Forwarded-*.
    app.wsgi_app = ProxyFix(receiver, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    return app


def _add_routes(app: Flask, config: Config, store: SQLiteStore) -> None:
    """Everything but POST /webhook, which bot/webhook.py answers before Flask."""
    @app.get("/webhook")
    def verify() -> Response:
        if is_verify_request(request.args, config.fb_verify_token):
            return _text(request.args.get("hub.challenge", ""), 200)
        logger.warning("webhook verification refused for %s", request.remote_addr)
        return _text("verification failed", 403)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok", **store.stats(config.inbox_dir))

    @app.get("/metrics")
    def metrics_page() -> Response:
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)


def _text(body: str, status: int) -> Response:
    return Response(body, status=status, mimetype="text/plain")
