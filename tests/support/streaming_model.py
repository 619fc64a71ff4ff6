"""A tiny OpenAI-shaped chat completions server that can stream, for the website chat's tests
and bench/webchat.py (the emulator's stand-in, devtools/emulator/model.py, answers in one piece).

`POST /v1/chat/completions` answers as OpenAI does: a `chat.completion` object, or with
`"stream": true` server-sent `chat.completion.chunk` events - one per word, a last one with
`finish_reason`, one with `usage` when `stream_options.include_usage` asks, then `[DONE]`.
It records every request, when each stream's first piece left (for the first-token overhead)
and which streams the client closed before the end (a cancelled call).
"""
from __future__ import annotations

import json
import threading
import time
from typing import Callable

from werkzeug.wrappers import Request, Response

from devtools.emulator.http import LocalServer, json_response

PROMPT_TOKENS = 10


class StreamingModel(LocalServer):
    def __init__(self, reply: str | Callable[[list[dict]], str] = "Hello from the streaming model.", *,
                 first_token_delay: float = 0.0, piece_delay: float = 0.0, api_key: str | None = None):
        super().__init__()
        self.reply = reply
        self.first_token_delay = first_token_delay  # before the first piece (or the whole answer)
        self.piece_delay = piece_delay  # between pieces
        self.api_key = api_key
        self.break_after: int | None = None  # close the stream after this many pieces, without [DONE]
        self.requests: list[dict] = []
        self.first_piece_at: dict[int, float] = {}  # request number -> time.time() the first piece left
        self.closed_early: list[int] = []  # request numbers whose reader went away mid-stream
        self.finished: list[int] = []
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def handle(self, request: Request) -> Response:
        if request.method != "POST" or request.path != "/v1/chat/completions":
            return json_response({"error": {"message": "not found"}}, 404)
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return json_response({"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}, 401)
        body = request.get_json(silent=True) or {}
        with self._lock:
            number = len(self.requests)
            self.requests.append(body)
        messages = body.get("messages") or []
        text = self.reply(messages) if callable(self.reply) else self.reply
        if not body.get("stream"):
            time.sleep(self.first_token_delay)
            return json_response(_completion(text))
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return Response(self._events(number, text, usage), mimetype="text/event-stream",
                        headers={"x-request-id": f"req_{number}"}, direct_passthrough=True)

    def _events(self, number: int, text: str, usage: bool):
        done = False
        try:
            time.sleep(self.first_token_delay)
            pieces = [word + " " for word in text.split(" ")]
            pieces[-1] = pieces[-1][:-1]
            for index, piece in enumerate(pieces):
                if self.break_after is not None and index >= self.break_after:
                    done = True  # a server that dies mid-answer: no finish, no [DONE]
                    return
                if index:
                    time.sleep(self.piece_delay)
                event = _event(_chunk({"content": piece, **({"role": "assistant"} if not index else {})}, None))
                if not index:  # as it is handed to the server to write: a slow writer counts against the reader
                    self.first_piece_at[number] = time.time()
                yield event
            yield _event(_chunk({}, "stop"))
            if usage:
                yield _event({**_chunk({}, None), "choices": [], "usage": _usage(len(pieces))})
            yield b"data: [DONE]\n\n"
            done = True
        finally:  # GeneratorExit: the client closed the connection before the end
            (self.finished if done else self.closed_early).append(number)


def _event(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def _chunk(delta: dict, finish: str | None) -> dict:
    return {"id": "chatcmpl-stream", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": "stream-model", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _usage(completion: int) -> dict:
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion, "total_tokens": PROMPT_TOKENS + completion}


def _completion(text: str) -> dict:
    return {"id": "chatcmpl-plain", "object": "chat.completion", "created": int(time.time()), "model": "stream-model",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": _usage(len(text.split(" ")))}
