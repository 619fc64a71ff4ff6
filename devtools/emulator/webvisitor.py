"""The website chat as the sandbox shows it: the bot's own listener (bot/webchat, ASGI) served in the
sandbox's process, each `POST /api/chat` put on the timeline under `web:<conversation>` - the
psid the bot's exchange log gives a web conversation - as the webhook sender does for Messenger.

What the visitor asked is read from the request as it passes and what the bot answered from the
server-sent events (`start`, `delta`..., `done` or `error`) or the JSON answer as they pass: the
bot's code is not touched, only watched.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Callable

from a2wsgi import ASGIMiddleware

from bot.storage.queue import Queue
from bot.web.proxy import TrustedPeers
from bot.webchat.routes import cors_settings, create_webchat_app
from bot.webchat.server import WebchatServer
from bot.webchat.service import PSID_PREFIX, web_psid
from bot.webchat.wiring import build_webchat
from devtools.emulator.http import LocalServer
from devtools.emulator.model_inputs import text_of
from devtools.emulator.timeline import Timeline

REMEMBER_S = 60.0  # how long a visitor's words place the model call that answers them


def webchat_server(config, store: Queue) -> WebchatServer:
    """bot.webchat.wiring.build_server on the bot's own store. A second SQLite store on the same file in
    this process would open and close the file (bot.storage.sqlite.make_private), which drops every POSIX
    lock this process holds on it: another process (`python -m bot knowledge ...`) closing its connection
    would then take itself for the last one and delete the WAL under the running bot ("disk I/O error")."""
    chat = build_webchat(config, store)
    return WebchatServer(create_webchat_app(config, chat), chat, TrustedPeers(config.forwarded_allow_ips),
                         cors_settings(config), origins=config.webchat_origins, max_chars=config.webchat_max_chars,
                         threads=config.webchat_threads)


class Visit:
    """One `POST /api/chat`, read as it passes: the request's message, the answer's events."""

    def __init__(self, visitors: "WebVisitors"):
        self.visitors = visitors
        self.started = time.monotonic()
        self.body, self.answer = b"", b""
        self.status: int | None = None
        self.stream = False
        self.events: list[tuple[str, dict]] = []
        self.first_delta: float | None = None
        self.shown = False  # the request is on the timeline

    def received(self, message: dict) -> None:
        if message.get("type") == "http.request":
            self.body += message.get("body", b"")

    def sent(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = dict((k.lower(), v) for k, v in message.get("headers", ()))
            self.stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        elif message["type"] == "http.response.body":
            self.answer += message.get("body", b"")
            if self.stream:
                self._read_events()

    def _read_events(self) -> None:
        *blocks, self.answer = self.answer.split(b"\n\n")
        for block in blocks:
            fields = dict(line.split(": ", 1) for line in block.decode().splitlines() if ": " in line)
            name, data = fields.get("event", ""), _json(fields.get("data", ""))
            if name == "delta" and self.first_delta is None:
                self.first_delta = time.monotonic()
            self.events.append((name, data))
            if name == "start":
                self.visitors.asked(self, data.get("conversation"))

    def message(self) -> str | None:
        text = _json(self.body.decode("utf-8", "replace")).get("message")
        return text if isinstance(text, str) else None

    def ended(self) -> dict:
        """What the answer was: the `done` or `error` event, or the JSON body; how long it took."""
        last = next(((n, d) for n, d in reversed(self.events) if n in ("done", "error")), None)
        data = last[1] if last else ({} if self.stream else _json(self.answer.decode("utf-8", "replace")))
        conversation = next((d.get("conversation") for _, d in self.events if d.get("conversation")), None)
        return {"conversation": conversation or data.get("conversation"), "status": self.status,
                "stream": self.stream, "left": self.stream and last is None,
                **{key: data.get(key) for key in ("outcome", "answer", "error", "message")},
                "deltas": sum(1 for n, _ in self.events if n == "delta"),
                "first_delta_ms": self._ms(self.first_delta), "ms": self._ms(time.monotonic())}

    def _ms(self, at: float | None) -> int | None:
        return round((at - self.started) * 1000) if at is not None else None


class WebVisitors:
    """ASGI around the website chat's server: each chat on the timeline (kind `webchat`)."""

    def __init__(self, app: Callable, timeline: Timeline, account: str):
        self.app, self.timeline, self.account = app, timeline, account
        self._said: dict[str, tuple[str, float]] = {}  # the visitor's words -> (psid, until)
        self._lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] != "/api/chat" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        visit = Visit(self)

        async def receiving() -> dict:
            message = await receive()
            visit.received(message)
            return message

        async def sending(message: dict) -> None:
            visit.sent(message)
            await send(message)
        try:
            await self.app(scope, receiving, sending)
        finally:
            self.answered(visit)

    def asked(self, visit: Visit, conversation: str | None) -> None:
        """The visitor's message on the timeline, once its conversation is known."""
        if visit.shown:
            return
        visit.shown = True
        psid, text = _psid(conversation), visit.message()
        if conversation and text:
            with self._lock:
                self._said[text.strip()] = (psid, time.monotonic() + REMEMBER_S)
        self.timeline.add("webchat", psid, phase="request", account=self.account, text=text, stream=visit.stream,
                          status=visit.status, conversation=conversation)

    def answered(self, visit: Visit) -> None:
        end = visit.ended()
        self.asked(visit, end["conversation"])  # a JSON answer, or a refusal before any stream
        self.timeline.add("webchat", _psid(end["conversation"]), phase="answer", account=self.account,
                          **end)

    def psid_for_prompt(self, messages: list[dict]) -> str | None:
        """The web conversation a model call answers: its last message ends with what a visitor just wrote."""
        last = text_of(messages[-1].get("content", "")).strip() if messages else ""
        now = time.monotonic()
        with self._lock:
            self._said = {text: kept for text, kept in self._said.items() if kept[1] > now}
            matches = [(len(text), kept[0]) for text, kept in self._said.items() if last.endswith(text)]
        return max(matches)[1] if matches else None


class WebchatListener(LocalServer):
    """The website chat's ASGI app, watched, on a loopback port in a daemon thread (a2wsgi + Werkzeug)."""

    def __init__(self, app: Callable, host: str = "127.0.0.1", port: int = 0):
        self._asgi = ASGIMiddleware(app)
        super().__init__(host, port)

    def wsgi(self, environ, start_response):
        return self._asgi(environ, start_response)


def _json(text: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _psid(conversation: str | None) -> str:
    """The exchange log's psid for a web conversation (before it has one: the bare prefix)."""
    return web_psid(conversation) if conversation else PSID_PREFIX
