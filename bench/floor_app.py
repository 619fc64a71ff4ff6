"""The floor: a bare WSGI app that only checks the signature and answers 200.

Run under the same gunicorn settings as the bot, it is the fastest any
webhook can be acknowledged on this machine.
"""
import os

from messenger.signature import is_valid_signature

SECRET = os.environ["FB_APP_SECRET"]


def app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    headers = {"X-Hub-Signature-256": environ.get("HTTP_X_HUB_SIGNATURE_256")}
    ok = is_valid_signature(body, {k: v for k, v in headers.items() if v}, SECRET)
    start_response("200 OK" if ok else "403 Forbidden", [("Content-Type", "text/plain")])
    return [b"EVENT_RECEIVED" if ok else b"invalid signature"]
