"""A WSGI callable served on a loopback port in a daemon thread."""
from __future__ import annotations

import json
import threading
from typing import Any

from werkzeug.exceptions import ClientDisconnected
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from messenger.nesting import loads


class _DepthCheckedJSON:
    """json for `Request.get_json`: a body nested past messenger.nesting's limit is a ValueError,
    which werkzeug answers with its 400 (or None when silent), instead of the RecursionError it
    let through as a 500 - and the collection at the stack limit that came with it."""

    dumps = staticmethod(json.dumps)

    @staticmethod
    def loads(data, **kwargs):
        return loads(data.decode(json.detect_encoding(data), "surrogatepass") if isinstance(data, bytes) else data,
                     **kwargs)


class EmulatorRequest(Request):
    json_module = _DepthCheckedJSON


class QuietHandler(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real APIs offer

    def log_request(self, *args, **kwargs) -> None:
        pass  # what matters is recorded on the timeline; per-request lines are noise


class LocalServer:
    """Subclasses answer `handle(request)`; `port=0` takes a free port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._server = make_server(host, port, self.wsgi, threaded=True, request_handler=QuietHandler)
        self.host = host
        self.port = self._server.server_port
        self.dropped = 0  # requests whose caller went away mid-body
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wsgi(self, environ, start_response):
        try:
            response = self.handle(EmulatorRequest(environ))
        except ClientDisconnected as exc:  # the caller died mid-body (a bot killed mid-call): not our error
            self.dropped += 1
            response = exc.get_response()
        return response(environ, start_response)

    def handle(self, request: Request) -> Response:
        raise NotImplementedError


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json", headers=headers)
