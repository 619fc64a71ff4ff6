"""The floor: a bare ASGI app that only reads the body, checks the signature and answers 200.

Run under the same gunicorn settings (and worker class) as the bot, it is the
fastest any webhook can be acknowledged on this machine.
"""
import os

from messenger.signature import is_valid_signature

SECRET = os.environ["FB_APP_SECRET"]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    signature = dict(scope["headers"]).get(b"x-hub-signature-256", b"").decode()
    ok = bool(signature) and is_valid_signature(body, {"X-Hub-Signature-256": signature}, SECRET)
    await send({"type": "http.response.start", "status": 200 if ok else 403,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"EVENT_RECEIVED" if ok else b"invalid signature"})
