"""Local fake Graph and OpenAI servers: real HTTP on 127.0.0.1, real clients.

Both record what they received so tests assert on the wire, and both take
scripted failures and latency so every error path runs through real sockets.
"""
from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

PAGE_ID = "1000000000000001"
PAGE_TOKEN = "EAAtest-page-token-0123456789"
APP_SECRET = "test-app-secret-0123456789abcdef"
VERSION = "v26.0"


class _QuietHandler(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real APIs offer

    def log_request(self, *args, **kwargs) -> None:
        pass  # tests assert on recorded calls; per-request lines are noise


class FakeServer:
    """Serves a WSGI callable on a free loopback port in a daemon thread."""

    def __init__(self):
        self._server = make_server("127.0.0.1", 0, self.wsgi, threaded=True, request_handler=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()

    def wsgi(self, environ, start_response):
        request = Request(environ)
        return self.handle(request)(environ, start_response)

    def handle(self, request: Request) -> Response:
        raise NotImplementedError


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json", headers=headers)


def graph_error(code: int, message: str = "error", status: int = 400, subcode: int | None = None) -> Response:
    error = {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": f"trace-{code}"}
    if subcode is not None:
        error["error_subcode"] = subcode
    return json_response({"error": error}, status)


@dataclass
class GraphCall:
    method: str
    path: str
    args: dict
    body: Any
    at: float = field(default_factory=time.monotonic)


class FakeGraph(FakeServer):
    """The Conversations API and the Send API of one Page."""

    def __init__(self, page_id: str = PAGE_ID, token: str = PAGE_TOKEN, app_secret: str = APP_SECRET):
        super().__init__()
        self.page_id = page_id
        self.token = token
        self.proof = hmac.new(app_secret.encode(), token.encode(), hashlib.sha256).hexdigest()
        self.calls: list[GraphCall] = []
        self.conversations: dict[str, list[dict]] = {}  # psid -> messages, oldest first
        self.delivered: list[tuple[str, str]] = []  # (psid, text) the Send API accepted
        self.delivered_at: list[float] = []  # time.monotonic() of each, after the injected latency
        self.failures: dict[str, list[Response]] = {"history": [], "send": [], "action": []}
        self.delays: dict[str, float] = {"history": 0.0, "send": 0.0, "action": 0.0}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._delivery = threading.Condition(self._lock)

    @property
    def api_url(self) -> str:
        return f"{self.url}/{VERSION}/"

    # -- what tests set up and read ------------------------------------------------
    def add_message(self, psid: str, text: str, from_page: bool = False, mid: str | None = None) -> str:
        mid = mid or f"m_{next(self._ids)}"
        sender = {"id": self.page_id, "name": "Page"} if from_page else {"id": psid, "name": "User"}
        with self._lock:
            self.conversations.setdefault(psid, []).append({
                "id": mid, "message": text, "from": sender,
                "created_time": time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime()),
            })
        return mid

    def wait_for_deliveries(self, count: int, timeout: float) -> bool:
        """Block until the Send API has accepted `count` texts in all (no polling)."""
        with self._delivery:
            return self._delivery.wait_for(lambda: len(self.delivered) >= count, timeout)

    def fail_next(self, kind: str, response: Response) -> None:
        self.failures[kind].append(response)

    def sent_texts(self, psid: str | None = None) -> list[str]:
        """Texts the Send API accepted (failed attempts are in `calls` only)."""
        return [text for to, text in self.delivered if psid is None or to == psid]

    def actions(self) -> list[str]:
        return [c.body["sender_action"] for c in self.calls if "sender_action" in (c.body or {})]

    def history_calls(self) -> list[GraphCall]:
        return [c for c in self.calls if c.path.endswith("/conversations")]

    # -- the API ---------------------------------------------------------------------
    def handle(self, request: Request) -> Response:
        body = request.get_json(silent=True)
        self.calls.append(GraphCall(request.method, request.path, dict(request.args), body))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return graph_error(190, "Invalid OAuth access token.")
        if request.args.get("appsecret_proof") != self.proof:
            return graph_error(100, "Invalid appsecret_proof provided in the API argument")
        if request.method == "GET" and request.path == f"/{VERSION}/{self.page_id}/conversations":
            return self._scripted("history") or self._conversations(request)
        if request.method == "POST" and request.path in (f"/{VERSION}/me/messages", f"/{VERSION}/{self.page_id}/messages"):
            kind = "action" if isinstance(body, dict) and "sender_action" in body else "send"
            return self._scripted(kind) or self._send(body)
        return graph_error(100, "Unknown path components", status=404)

    def _scripted(self, kind: str) -> Response | None:
        if self.delays[kind]:
            time.sleep(self.delays[kind])
        with self._lock:
            return self.failures[kind].pop(0) if self.failures[kind] else None

    def _conversations(self, request: Request) -> Response:
        if request.args.get("platform") != "messenger" or not request.args.get("user_id"):
            return graph_error(100, "platform and user_id are required")
        match = re.fullmatch(r"messages\.limit\((\d+)\)\{message,from,created_time\}", request.args.get("fields", ""))
        limit = int(match.group(1)) if match else 25
        with self._lock:
            messages = list(reversed(self.conversations.get(request.args["user_id"], [])))
        if not messages:
            return json_response({"data": []})
        return json_response({"data": [{"id": "t_1", "messages": {"data": messages[:limit]}}]})

    def _send(self, body: Any) -> Response:
        if not isinstance(body, dict) or not isinstance(body.get("recipient"), dict):
            return graph_error(100, "param recipient must be non-empty.")
        psid = body["recipient"].get("id")
        if "sender_action" in body:
            return json_response({"recipient_id": psid})
        if body.get("messaging_type") != "RESPONSE":
            return graph_error(100, "messaging_type is required")
        text = (body.get("message") or {}).get("text", "")
        if not text or len(text.encode("utf-16-le")) // 2 > 2000:
            return graph_error(100, "(#100) Length of param message[text] must be less than or equal to 2000")
        mid = self.add_message(psid, text, from_page=True)
        with self._delivery:
            self.delivered.append((psid, text))
            self.delivered_at.append(time.monotonic())
            self._delivery.notify_all()
        return json_response({"recipient_id": psid, "message_id": mid})


def completion(content: str | None, finish_reason: str = "stop") -> dict:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
        "model": "test-model",
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


class FakeOpenAI(FakeServer):
    """`POST /v1/chat/completions`, answering with a default reply or scripted responses."""

    API_KEY = "sk-test-fake-openai-key"  # not a real key, and not shaped like one

    def __init__(self, reply: str = "Hello from the model.", echo: bool = False):
        super().__init__()
        self.reply = reply
        self.echo = echo  # answer "re: <last user turn>", to see which prompt a reply came from
        self.requests: list[dict] = []
        self.scripted: list[Response] = []
        self.delay = 0.0

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def handle(self, request: Request) -> Response:
        if request.method != "POST" or request.path != "/v1/chat/completions":
            return json_response({"error": {"message": "not found"}}, 404)
        self.requests.append({"headers": dict(request.headers), "json": request.get_json(silent=True)})
        if self.delay:
            time.sleep(self.delay)
        if request.headers.get("Authorization") != f"Bearer {self.API_KEY}":
            return json_response({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                            "code": "invalid_api_key"}}, 401, {"x-request-id": "req_auth"})
        if self.scripted:
            return self.scripted.pop(0)
        reply = self.reply
        if self.echo:
            reply = "re: " + request.get_json()["messages"][-1]["content"].rsplit(" : ", 1)[-1]
        return json_response(completion(reply), headers={"x-request-id": "req_ok"})
