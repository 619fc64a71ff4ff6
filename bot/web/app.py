"""The app: POST /webhook answered by bot/web/webhook.py, the rest by a small Flask app."""
from __future__ import annotations

import logging
import time
from typing import Callable

from flask import Flask, Response, jsonify, request

from bot.storage.doorbell import open_doorbell
from bot.storage.queue import Queue, open_intake, open_queue
from bot.telemetry import metrics
from bot.web.proxy import TrustedPeers, TrustedProxyFix
from bot.web.readiness import Readiness
from bot.web.webhook import WebhookReceiver, WebhookRoute
from config import Config, load_config
from messenger.signature import is_verify_request

logger = logging.getLogger(__name__)


def create_app(config: Config | None = None, *, replies: str = "threads",
               clock: Callable[[], float] = time.time, sleep: Callable[[float], object] = time.sleep) -> Flask:
    """Build the queue and the app; tests pass a Config aimed at fake servers.

    replies: "threads" answers the queue on reply threads inside this process;
    "process" leaves it to the reply process (bot/runtime/reply_process.py, started by
    gunicorn.conf.py), so a webhook worker never even imports the model client;
    "manual" builds the dispatcher without starting it, for tests that call
    `app.extensions["dispatcher"].run_pending()`.
    """
    if replies not in ("threads", "process", "manual"):
        raise ValueError(f"replies must be threads, process or manual, not {replies!r}")
    config = config or load_config()
    app = Flask(__name__)
    # A webhook worker (replies in their own process) answers 503 after 1 s without a connection.
    store = open_queue(config, clock, pool_size=config.database_pool_size, wait=1.0 if replies == "process" else 5.0)
    if replies != "process":
        from bot.replies.wiring import build_dispatcher  # the model client loads only where replies are made

        dispatcher = build_dispatcher(config, store, wall_clock=clock, sleep=sleep)
        app.extensions["dispatcher"] = dispatcher
        if replies == "threads":
            dispatcher.start()
    _add_routes(app, config, store)
    receiver = WebhookReceiver(config, open_intake(config, store, on_taken=metrics.count_taken_in), open_doorbell(config),
                               clock=clock)
    app.extensions["webhook"] = receiver  # the ASGI front (bot/web/asgi.py) calls it directly
    app.wsgi_app = TrustedProxyFix(WebhookRoute(app.wsgi_app, receiver),  # type: ignore[method-assign]
                                   TrustedPeers(config.forwarded_allow_ips))
    return app


def _add_routes(app: Flask, config: Config, store: Queue) -> None:
    """Everything but POST /webhook, which bot/web/webhook.py answers before Flask."""
    @app.get("/webhook")
    def verify() -> Response:
        if is_verify_request(request.args, config.fb_verify_token):
            return _text(request.args.get("hub.challenge", ""), 200)
        logger.warning("webhook verification refused for %s", request.remote_addr)
        return _text("verification failed", 403)

    readiness = Readiness(config, store)
    app.extensions["readiness"] = readiness

    @app.get("/healthz")
    def healthz() -> Response:
        """Liveness: this process answers. The queue figures come along when they can be read."""
        try:
            return jsonify(status="ok", **readiness.stats(config.inbox_dir))
        except Exception:  # noqa: BLE001 - liveness does not depend on the database (nor waits on it)
            return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> Response:
        problems, stats = readiness.problems()
        if problems:
            logger.warning("not ready: %s", "; ".join(problems))
            return _json(503, status="not ready", problems=problems, **stats)
        return _json(200, status="ready", **stats)

    @app.get("/metrics")
    def metrics_page() -> Response:
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)


def _json(code: int, **fields) -> Response:
    response = jsonify(**fields)
    response.status_code = code
    return response


def _text(body: str, status: int) -> Response:
    return Response(body, status=status, mimetype="text/plain")
