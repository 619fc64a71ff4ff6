"""The Flask edge: read the raw request, call plain functions, return a status."""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import openai
from flask import Flask, Response, jsonify, request
from werkzeug.middleware.proxy_fix import ProxyFix

from bot.responder import PromptSettings, Responder
from bot.runner import Runner, ThreadRunner
from config import Config, load_config
from gpt.reply import ModelSettings, ReplyGenerator
from messenger.events import BadPayload, parse_delivery
from messenger.graph import GraphClient
from messenger.signature import is_valid_signature, is_verify_request

logger = logging.getLogger(__name__)

# Meta's bodies can exceed 300 KB; anything past this is not Meta.
MAX_BODY_BYTES = 5 * 1024 * 1024


def create_app(config: Config | None = None, *, runner: Runner | None = None) -> Flask:
    """Build the clients and the app; tests pass a Config pointing at fake servers."""
    config = config or load_config()
    responder = build_responder(config)
    runner = runner or ThreadRunner(config.reply_threads)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    # Behind a tunnel (cloudflared, ngrok) the client address and scheme arrive in X-Forwarded-*.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    app.extensions["runner"] = runner
    _add_routes(app, config, responder, runner)
    return app


def build_responder(config: Config) -> Responder:
    """The reply pipeline with its two API clients, each built once."""
    graph = GraphClient(config.fb_api_url, config.fb_page_id, config.fb_page_access_token,
                        config.fb_app_secret, timeout=config.graph_timeout)
    client = openai.OpenAI(api_key=config.openai_api_key, base_url=config.openai_base_url,
                           timeout=config.openai_timeout, max_retries=config.openai_max_retries)
    model = ModelSettings(config.openai_model, config.openai_temperature, config.openai_top_p,
                          config.openai_max_tokens)
    generator = ReplyGenerator(client, model, config.fallback_reply, config.error_log_file)
    prompt = PromptSettings(config.fb_page_id, config.politeness_prefix, config.message_count,
                            config.system_prompt, config.unsupported_reply)
    actions = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sender-action")
    return Responder(graph, generator, prompt, actions)


def _add_routes(app: Flask, config: Config, responder: Responder, runner: Runner) -> None:
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
            logger.warning("webhook refused for %s: missing or wrong signature", request.remote_addr)
            return _text("invalid signature", 403)
        try:
            delivery = parse_delivery(json.loads(body))
        except (ValueError, RecursionError) as exc:  # BadPayload and JSON errors alike
            reason = str(exc) if isinstance(exc, BadPayload) else "body is not valid JSON"
            logger.warning("webhook refused for %s: %s", request.remote_addr, reason)
            return _text(reason, 400)
        for message in delivery.messages:
            runner.submit(responder.handle, message)
        logger.info("webhook accepted: %d to answer, %d ignored", len(delivery.messages), delivery.ignored)
        return _text("EVENT_RECEIVED", 200)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")


def _text(body: str, status: int) -> Response:
    return Response(body, status=status, mimetype="text/plain")
