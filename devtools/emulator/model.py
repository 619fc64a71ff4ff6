"""The model side: an offline stand-in for OpenAI, or a recording proxy to the real one.

Either way the exact messages the bot sent land on the timeline, which is how
the sandbox shows why the bot answered what it did.
"""
from __future__ import annotations

import time
from typing import Callable

import requests
from werkzeug.wrappers import Request, Response

from devtools.emulator.http import LocalServer, json_response
from devtools.emulator.timeline import Timeline

CannedReply = str | Callable[[list[dict]], str]


def completion(content: str | None, finish_reason: str = "stop", model: str = "test-model") -> dict:
    """A Chat Completions answer in OpenAI's shape."""
    return {
        "id": "chatcmpl-standin", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def offline_reply(messages: list[dict]) -> str:
    """What the offline stand-in says: proof that it got the turn and the history."""
    last = str(messages[-1].get("content", "")) if messages else ""
    said = last.rsplit(" : ", 1)[-1].strip()  # the politeness prefix ends with " : "
    earlier = sum(1 for m in messages[:-1] if m.get("role") in ("user", "assistant"))
    return (f"[offline stand-in] You said \u201c{said}\u201d. I can see {earlier} earlier "
            f"message{'s' if earlier != 1 else ''} of this conversation. "
            "Set OPENAI_API_KEY to talk to a real model.")


class _ModelServer(LocalServer):
    """`POST /v1/chat/completions`; records each request and puts it on the timeline."""

    mode = "model"

    def __init__(self, timeline: Timeline | None, port: int = 0):
        super().__init__(port=port)
        self.timeline = timeline or Timeline()
        self.requests: list[dict] = []
        self.psid_of: Callable[[list[dict]], str | None] = lambda messages: None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def handle(self, request: Request) -> Response:
        if request.method != "POST" or request.path != "/v1/chat/completions":
            return json_response({"error": {"message": "not found"}}, 404)
        body = request.get_json(silent=True)
        self.requests.append({"headers": dict(request.headers), "json": body})
        started = time.monotonic()
        response = self.answer(request, body)
        if not self.timeline.enabled:
            return response
        answer = response.get_json(silent=True) or {}
        choices = answer.get("choices") or [{}]
        messages = body.get("messages") if isinstance(body, dict) else None
        self.timeline.add(
            "model", self.psid_of(messages) if isinstance(messages, list) else None, mode=self.mode, status=response.status_code,
            ms=round((time.monotonic() - started) * 1000),
            messages=messages,
            reply=((choices[0] or {}).get("message") or {}).get("content"),
            finish_reason=(choices[0] or {}).get("finish_reason"), error=answer.get("error"),
        )
        return response

    def answer(self, request: Request, body) -> Response:
        raise NotImplementedError


class ModelStandIn(_ModelServer):
    """Answers without any account: a fixed text, a function of the messages, or scripted responses."""

    API_KEY = "sk-test-fake-openai-key"  # not a real key, and not shaped like one
    mode = "offline"

    def __init__(self, reply: CannedReply = "Hello from the model.", echo: bool = False, *,
                 api_key: str = API_KEY, timeline: Timeline | None = None, port: int = 0):
        super().__init__(timeline, port)
        self.reply = reply
        self.echo = echo  # answer "re: <last user turn>", to see which prompt a reply came from
        self.api_key = api_key
        self.scripted: list[Response] = []
        self.delay = 0.0
        # Parameters refused as OpenAI refuses them for reasoning models: name -> the
        # replacement it names (or None). temperature is refused only when it is not 1.
        self.refuses: dict[str, str | None] = {}
        # The header carrying the request id: a proxy (LiteLLM...) sends its own instead.
        self.request_id_header = "x-request-id"

    def answer(self, request: Request, body) -> Response:
        if self.delay:
            time.sleep(self.delay)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return json_response({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                            "code": "invalid_api_key"}}, 401, {"x-request-id": "req_auth"})
        if self.scripted:
            return self.scripted.pop(0)
        if refused := self.refusal(body or {}):
            return refused
        messages = (body or {}).get("messages") or []
        if self.echo:
            reply = "re: " + messages[-1]["content"].rsplit(" : ", 1)[-1]
        else:
            reply = self.reply(messages) if callable(self.reply) else self.reply
        return json_response(completion(reply), headers={self.request_id_header: "req_ok"})

    def refusal(self, body: dict) -> Response | None:
        """A 400 shaped like OpenAI's for the first refused parameter in `body`, if any."""
        for param, replacement in self.refuses.items():
            if param not in body or (param == "temperature" and body[param] == 1):
                continue
            code = "unsupported_value" if param == "temperature" else "unsupported_parameter"
            message = f"Unsupported parameter: '{param}' is not supported with this model." + (
                f" Use '{replacement}' instead." if replacement else "")
            return json_response({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                            "code": code}}, 400, {self.request_id_header: "req_refused"})
        return None


class ModelProxy(_ModelServer):
    """Forwards to a real OpenAI-compatible server unchanged, so the sandbox can show the call."""

    mode = "real"

    def __init__(self, upstream: str, timeout: float = 120.0, *, timeline: Timeline | None = None, port: int = 0):
        super().__init__(timeline, port)
        self.upstream = upstream.rstrip("/")
        self._session = requests.Session()
        self._timeout = timeout

    def answer(self, request: Request, body) -> Response:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "content-type", "openai-organization", "openai-project")}
        try:
            upstream = self._session.post(f"{self.upstream}/chat/completions", data=request.get_data(),
                                          headers=headers, timeout=self._timeout)
        except requests.RequestException as exc:
            return json_response({"error": {"message": f"sandbox proxy: {type(exc).__name__}"}}, 502)
        passed = {k: v for k, v in upstream.headers.items() if k.lower().startswith(("x-request-id", "retry-after"))}
        return Response(upstream.content, status=upstream.status_code,
                        mimetype=upstream.headers.get("Content-Type", "application/json"), headers=passed)
