"""Chat Completions as OpenAI streams them (`"stream": true`): server-sent `chat.completion.chunk`
events - the role first, then the content a few words at a time, then the finish_reason, then the
usage when `stream_options.include_usage` asks - ending with `data: [DONE]`.

https://platform.openai.com/docs/api-reference/chat-streaming
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from werkzeug.wrappers import Response

EVENT_STREAM = "text/event-stream"
DONE = b"data: [DONE]\n\n"
WORDS_PER_DELTA = 3


def is_streamed(body) -> bool:
    return isinstance(body, dict) and body.get("stream") is True


def includes_usage(body) -> bool:
    options = body.get("stream_options") if isinstance(body, dict) else None
    return isinstance(options, dict) and options.get("include_usage") is True


def pieces(text: str, words: int = WORDS_PER_DELTA) -> list[str]:
    """`text` in pieces of a few words each, spaces kept, so that the pieces join back to `text`."""
    tokens = re.findall(r"\S+\s*", text)
    if not tokens:
        return [text] if text else []
    chunks = ["".join(tokens[i:i + words]) for i in range(0, len(tokens), words)]
    chunks[0] = text[:len(text) - len(text.lstrip())] + chunks[0]
    return chunks


def chunks(completion: dict, usage: bool) -> Iterator[dict]:
    """The `chat.completion.chunk` objects that stream `completion` (choice 0)."""
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    base = {"id": completion.get("id", "chatcmpl-standin"), "object": "chat.completion.chunk",
            "created": completion.get("created", int(time.time())), "model": completion.get("model", "test-model"),
            "system_fingerprint": None, **({"usage": None} if usage else {})}

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    yield chunk({"role": message.get("role", "assistant"), "content": "", "refusal": None})
    for piece in pieces(message.get("content") or ""):
        yield chunk({"content": piece})
    yield chunk({}, choice.get("finish_reason", "stop"))
    if usage:
        yield {**base, "choices": [], "usage": completion.get("usage")}


def event(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def streamed(completion: dict, usage: bool, delay: float = 0.0, headers: dict | None = None) -> Response:
    """A 200 event stream of `completion`, `delay` seconds between content deltas."""
    def events() -> Iterator[bytes]:
        for number, chunk in enumerate(chunks(completion, usage)):
            if delay and number > 1 and chunk["choices"] and "content" in chunk["choices"][0]["delta"]:
                time.sleep(delay)
            yield event(chunk)
        yield DONE
    return Response(events(), mimetype=EVENT_STREAM, headers=headers, direct_passthrough=True)


@dataclass
class Heard:
    """What a stream said so far, read from its bytes as they pass."""
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    error: object = None
    done: bool = False
    _buffer: bytes = b""

    def feed(self, data: bytes) -> None:
        self._buffer += data
        *blocks, self._buffer = re.split(rb"\r?\n\r?\n", self._buffer)
        for block in blocks:
            for line in block.splitlines():
                if line.startswith(b"data:"):
                    self._read(line[5:].strip())

    def _read(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            return
        if not isinstance(chunk, dict):
            return
        self.error = chunk.get("error") or self.error
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                content = (choice.get("delta") or {}).get("content")
                if isinstance(content, str):
                    self.text.append(content)
                self.finish_reason = choice.get("finish_reason") or self.finish_reason


def recorded(body: Iterable[bytes], on_end: Callable[[Heard], None]) -> Iterator[bytes]:
    """`body` passed through unchanged; `on_end` gets what it said once it ends or its reader leaves."""
    heard = Heard()
    try:
        for data in body:
            heard.feed(data)
            yield data
    finally:
        close = getattr(body, "close", None)
        if close:
            close()
        on_end(heard)
