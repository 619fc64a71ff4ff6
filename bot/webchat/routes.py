"""The website chat's Flask routes: the two documents' contracts in JSON, the widget and its demo.

CORS is flask-cors's (as the source document's backend uses it): WEBCHAT_ORIGINS may call
from a browser, preflights included; a browser call from any other site is refused with 403
before anything is stored or asked. The streamed POST /api/chat is served by server.py with
the same CORS options.
"""
from __future__ import annotations

import logging
from pathlib import Path

from flask import Flask, Response, jsonify, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException

from bot.replies.answer import Outcome
from bot.webchat.requests import MAX_BODY_BYTES, ChatInput, Refused, origin_allowed, parse_json_body, parse_query
from bot.webchat.service import WebAnswer, WebChat
from config import Config

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
CHAT_ROUTES = r"^/(api/chat|chat)$"


def cors_settings(config: Config) -> dict:
    """flask-cors's options for the chat routes (server.py applies the same to the stream)."""
    return {"origins": list(config.webchat_origins) or [], "methods": ["GET", "POST", "OPTIONS"],
            "allow_headers": ["Content-Type", "Accept"], "expose_headers": ["Retry-After"], "max_age": 600,
            "vary_header": True}


def create_webchat_app(config: Config, chat: WebChat) -> Flask:
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    CORS(app, resources={CHAT_ROUTES: cors_settings(config)})

    @app.post("/api/chat")
    def api_chat() -> Response:
        """The first document's contract: {"user_id"?, "message"} -> {"answer"}, plus ids."""
        parsed = parse_json_body(_checked_body(config), config.webchat_max_chars)
        answer = _answer(chat, parsed)
        return jsonify(answer=answer.text or "", conversation=answer.conversation, request_id=answer.request_id)

    @app.get("/chat")
    def get_chat() -> Response:
        """The second document's contract: ?query= -> {"response", "source": "api"|"cache"}, plus ids."""
        _check_origin(config)
        answer = _answer(chat, parse_query(request.args, config.webchat_max_chars))
        source = "cache" if answer.outcome == Outcome.CACHED else "api"
        return jsonify(response=answer.text or "", source=source, conversation=answer.conversation,
                       request_id=answer.request_id)

    @app.get("/webchat.js")
    def widget() -> Response:
        return _static("webchat.js", "text/javascript")

    @app.get("/webchat/demo")
    def demo() -> Response:
        return _static("demo.html", "text/html")

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @app.errorhandler(Refused)
    def refused(error: Refused) -> Response:
        return refused_response(error)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        code = {413: "body_too_large", 404: "not_found", 405: "method_not_allowed"}.get(
            error.code or 0, "bad_request" if (error.code or 500) < 500 else "internal")
        return refused_response(Refused(error.code or 400, code, error.description or error.name))

    return app


def _answer(chat: WebChat, parsed: ChatInput) -> WebAnswer:
    admitted = chat.admit(parsed, request.remote_addr)
    answer = chat.answer(admitted, parsed, address=request.remote_addr, referer=request.headers.get("Referer"))
    if refused := chat.refusal(answer):
        raise refused
    return answer


def _checked_body(config: Config) -> bytes:
    _check_origin(config)
    return request.get_data(cache=False)


def _check_origin(config: Config) -> None:
    if not origin_allowed(request.headers, config.webchat_origins, request.host_url.rstrip("/")):
        raise Refused(403, "origin_not_allowed", "This website may not use this chat (WEBCHAT_ORIGINS).")


def refused_response(error: Refused) -> Response:
    response = jsonify(error.body())
    response.status_code = error.status
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def _static(name: str, mimetype: str) -> Response:
    response = Response((STATIC / name).read_bytes(), mimetype=mimetype)
    response.headers["Cache-Control"] = "public, max-age=300"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
