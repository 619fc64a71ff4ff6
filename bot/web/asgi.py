"""What gunicorn serves: an asyncio front that no slow client can starve.

gunicorn's threaded worker holds a thread per connection while it reads, so 16
connections trickling headers (or announcing a body they never send) took every
thread and Meta's deliveries timed out. On gunicorn's asyncio worker a waiting
connection costs a little memory, not a thread: POST /webhook is read here with a
deadline and a size cap and answered by the same WebhookReceiver core, and the few
Flask routes (verification, health, metrics) run on a small thread pool through
a2wsgi. Measured in bench/ (slow_clients): README, "Benchmark".

`ServerApp` also answers WSGI calls, so `server:app` runs under any server.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from a2wsgi import WSGIMiddleware

from bot.web.proxy import TrustedPeers, forwarded_scope
from bot.web.webhook import MAX_BODY_BYTES, SIGNATURE_HEADERS, WebhookReceiver

# Meta sends a delivery in one go; a body still arriving after this is not Meta.
BODY_SECONDS = 10.0
SIGNATURE_NAMES = {name.lower().encode("latin-1"): name for name in SIGNATURE_HEADERS}


class ServerApp:
    """ASGI for gunicorn's asgi worker, WSGI (the Flask app as built) for anything else."""

    def __init__(self, wsgi_app: Callable, receiver: WebhookReceiver, peers: TrustedPeers,
                 body_seconds: float = BODY_SECONDS, threads: int = 8):
        self.wsgi_app = wsgi_app
        self.receiver = receiver
        self.peers = peers
        self.body_seconds = body_seconds
        self.flask = WSGIMiddleware(wsgi_app, workers=threads)

    def __call__(self, *args):
        if len(args) == 2:  # (environ, start_response)
            return self.wsgi_app(*args)
        return self.asgi(*args)

    async def asgi(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] != "http":
            return  # websockets: not served
        else:
            scope = forwarded_scope(scope, self.peers)
            if scope["path"] == "/webhook" and scope["method"] == "POST":
                await self.webhook(scope, receive, send)
            else:
                await self.flask(scope, receive, send)

    async def webhook(self, scope: dict, receive: Callable, send: Callable) -> None:
        peer = scope["client"][0] if scope.get("client") else None
        body = await read_body(scope, receive, MAX_BODY_BYTES, self.body_seconds)
        if body is None:
            return  # the client went away: nobody to answer
        if body == 413:
            status, text = self.receiver.refuse(peer, "too_large", 413, "body too large")
        elif body == 408:
            status, text = self.receiver.refuse(peer, "timeout", 408, "body not received in time")
        else:
            signatures = {SIGNATURE_NAMES[name]: value.decode("latin-1")
                          for name, value in scope["headers"] if name in SIGNATURE_NAMES}
            status, text = await self._handle(body, signatures, peer)
        await respond(send, status, text, close=status in (408, 413))


    async def _handle(self, body: bytes, signatures: dict, peer: str | None) -> tuple[int, str]:
        """A local append (the inbox file) runs on the event loop; a commit to PostgreSQL is
        awaited there too (the intake's writer thread commits, the loop waits without a thread),
        so one slow commit never holds the other connections."""
        if hasattr(self.receiver.inbox, "append_async"):
            return await self.receiver.handle_async(body, signatures, peer)
        return self.receiver.handle(body, signatures, peer)


async def read_body(scope: dict, receive: Callable, limit: int, seconds: float) -> bytes | int | None:
    """The body; 413 when it is (or is announced) over `limit`; 408 when it takes longer
    than `seconds`; None when the client disconnects."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return 413
    chunks, size = [], 0
    try:
        async with asyncio.timeout(seconds):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return 413
                chunks.append(chunk)
                if not message.get("more_body"):
                    return b"".join(chunks)
    except TimeoutError:
        return 408


async def respond(send: Callable, status: int, text: str, close: bool = False) -> None:
    payload = text.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(payload)).encode())]
    if close:  # the rest of an unread body must not be parsed as the next request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def lifespan(receive: Callable, send: Callable) -> None:
    """Nothing to start or stop per worker: the app is built when gunicorn imports it."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

