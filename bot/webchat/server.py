"""What the website chat's listener serves: `POST /api/chat` with `Accept: text/event-stream` as
server-sent events, here on the event loop; everything else by the Flask routes (routes.py).

A stream: the store's admission (limits, conversation) on a thread, then `start` with the ids,
a `delta` event for each piece the model writes, and `done` with the whole answer - or `error`
with words a person can read. The pipeline runs on a thread of its own; its pieces cross to the
loop through a mailbox shared by all streams (one wake-up of the loop for all the pieces waiting)
into the stream's queue. A visitor who goes away (the connection closes) sets the sink's
`cancelled`: the model call is closed at its next piece and the exchange logged as `cancelled`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from a2wsgi import WSGIMiddleware
from flask import Flask
from flask_cors.core import get_cors_headers, get_cors_options
from werkzeug.datastructures import Headers

from bot.web.asgi import lifespan, read_body
from bot.web.proxy import TrustedPeers, forwarded_scope
from bot.webchat.requests import MAX_BODY_BYTES, Refused, origin_allowed, parse_json_body
from bot.webchat.service import SORRY, WebAnswer, WebChat

logger = logging.getLogger(__name__)

BODY_SECONDS = 10.0
_END = object()


class Mailbox:
    """The pipeline threads' pieces, handed to the event loop: one wake-up of the loop for all the
    pieces of all the streams that arrive before it runs, rather than one per piece. With 200 chats
    open that is about 800 pieces a second; each wake-up is a write to the loop's socket, a turn of
    its selector and a read."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.waiting: list[tuple[asyncio.Queue, object]] = []
        self.lock = threading.Lock()

    def put(self, queue: asyncio.Queue, item: object) -> None:
        with self.lock:  # the wake-up is asked for inside: it must precede the thread's later callbacks
            self.waiting.append((queue, item))
            if len(self.waiting) == 1:
                self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            waiting, self.waiting = self.waiting, []
        for queue, item in waiting:
            queue.put_nowait(item)


class QueueSink:
    """One stream's pieces, through the mailbox to its queue."""

    def __init__(self, mailbox: Mailbox, queue: asyncio.Queue):
        self.mailbox, self.queue = mailbox, queue
        self.cancelled = False

    def delta(self, text: str) -> None:
        self.mailbox.put(self.queue, text)


class WebchatServer:
    """ASGI: the stream here, the rest through a2wsgi to Flask (a thread each while the model answers)."""

    def __init__(self, flask_app: Flask, chat: WebChat, peers: TrustedPeers, cors: dict, *, origins: tuple[str, ...],
                 max_chars: int, threads: int = 256):
        self.chat = chat
        self.peers = peers
        self.origins = origins
        self.max_chars = max_chars
        self.cors = get_cors_options(flask_app, cors)
        self.flask = WSGIMiddleware(flask_app.wsgi_app, workers=threads)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="webchat")
        self.mailbox: Mailbox | None = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        scope = forwarded_scope(scope, self.peers)
        headers = Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]])
        if scope["path"] == "/api/chat" and scope["method"] == "POST" and wants_stream(headers):
            await self.stream(scope, headers, receive, send)
            return
        # Read here, on the loop, within BODY_SECONDS: a body trickled in a byte at a time would
        # otherwise hold one of the Flask routes' threads each, and a few hundred such connections
        # from one client would leave none for the widget's script or its preflight.
        body = await read_body(scope, receive, MAX_BODY_BYTES, BODY_SECONDS)
        if body is None:
            return
        if isinstance(body, int):
            cors = get_cors_headers(self.cors, headers, scope["method"]).items()
            refused = body_refused(body)
            await send_json(send, body, refused.body(), [(k.encode("latin-1"), v.encode("latin-1")) for k, v in cors]
                            + [(b"connection", b"close")])  # the rest of the body is not a next request
            return
        await self.flask(read_whole(scope, body), replaying(body, receive), send)

    async def stream(self, scope: dict, headers: Headers, receive: Callable, send: Callable) -> None:
        cors = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in get_cors_headers(self.cors, headers, "POST").items()]
        body = await read_body(scope, receive, MAX_BODY_BYTES, BODY_SECONDS)
        if body is None:
            return
        address = scope["client"][0] if scope.get("client") else None
        loop = asyncio.get_running_loop()
        try:
            if isinstance(body, int):
                raise body_refused(body)
            if not origin_allowed(headers, self.origins, own_origin(scope, headers)):
                raise Refused(403, "origin_not_allowed", "This website may not use this chat (WEBCHAT_ORIGINS).")
            parsed = parse_json_body(body, self.max_chars)
            admitted = await loop.run_in_executor(self.pool, self.chat.admit, parsed, address)
        except Refused as refused:
            await send_json(send, refused.status, refused.body(), cors, refused.retry_after)
            return
        except Exception:  # noqa: BLE001 - the store is down, say: words for the visitor, the trace for the log
            logger.exception("website chat: could not admit a request")
            await send_json(send, 503, {"error": "unavailable", "message": SORRY}, cors, 5)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"), *cors]})
        queue: asyncio.Queue = asyncio.Queue()
        if self.mailbox is None or self.mailbox.loop is not loop:
            self.mailbox = Mailbox(loop)
        sink = QueueSink(self.mailbox, queue)
        work = loop.run_in_executor(self.pool, lambda: self.chat.answer(
            admitted, parsed, address=address, referer=headers.get("Referer"), sink=sink))
        work.add_done_callback(lambda _: queue.put_nowait(_END))
        watcher = asyncio.ensure_future(_disconnected(receive))
        watcher.add_done_callback(lambda _: queue.put_nowait(_END))
        try:
            await self._relay(send, queue, work, watcher, admitted)
        except OSError:  # the connection broke while writing
            pass
        finally:
            if not work.done():
                sink.cancelled = True  # nobody reads: the model call stops at its next piece
            watcher.cancel()

    async def _relay(self, send: Callable, queue: asyncio.Queue, work: asyncio.Future, watcher: asyncio.Future,
                     admitted) -> None:
        await send_event(send, "start", {"conversation": admitted.conversation, "request_id": admitted.request_id})
        while True:
            item = await queue.get()
            if item is _END:
                if watcher.done() and not work.done():
                    return  # the visitor left mid-answer
                if work.done():
                    break
                continue
            await send_event(send, "delta", {"text": item})
        try:
            answer: WebAnswer = work.result()
        except Exception:  # noqa: BLE001 - the visitor gets words, the log the traceback
            logger.exception("website chat: the answer to request %s failed", admitted.request_id)
            await send_event(send, "error", {"error": "internal", "message": SORRY}, last=True)
            return
        if refused := self.chat.refusal(answer):
            await send_event(send, "error", refused.body(), last=True)
            return
        if answer.text is None:
            await send_event(send, "error", {"error": answer.outcome, "message": "No answer this time. Please try again "
                                                                            "later."}, last=True)
            return
        await send_event(send, "done", {"answer": answer.text, "outcome": answer.outcome,
                                        "conversation": answer.conversation, "request_id": answer.request_id},
                         last=True)


def wants_stream(headers: Headers) -> bool:
    return "text/event-stream" in headers.get("Accept", "")


def own_origin(scope: dict, headers: Headers) -> str:
    return f"{scope.get('scheme', 'http')}://{headers.get('Host', '')}"


async def _disconnected(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def send_event(send: Callable, name: str, data: dict, last: bool = False) -> None:
    payload = f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
    await send({"type": "http.response.body", "body": payload, "more_body": not last})


def body_refused(status: int) -> Refused:
    """read_body's 413 or 408, in the chat's words."""
    return Refused(status, "body_too_large" if status == 413 else "body_timeout",
                   "The request is too large." if status == 413 else "The request took too long to arrive.")


def read_whole(scope: dict, body: bytes) -> dict:
    """The scope of a request whose body was read already, as if it came with its length: a
    chunked one's (no Content-Length) had reached Flask as an empty body."""
    headers = [(name, value) for name, value in scope["headers"]
               if name.lower() not in (b"content-length", b"transfer-encoding")]
    return {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}


def replaying(body: bytes, receive: Callable) -> Callable:
    """`receive` for an app that reads the body again: the body read already, then the connection's."""
    given = False

    async def receive_again() -> dict:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}
    return receive_again


async def send_json(send: Callable, status: int, data: dict, headers: list, retry_after: int | None = None) -> None:
    payload = json.dumps(data).encode()
    extra = [(b"retry-after", str(retry_after).encode())] if retry_after is not None else []
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers, *extra]})
    await send({"type": "http.response.body", "body": payload})
