"""The model's answer as it is written, for the website chat's server-sent events.

`StreamingChatModel` is `ChatModel` (gpt/model.py) with one change: while the calling
thread has a sink (`streaming_to`), each attempt asks for `"stream": true` and hands every
piece of text to the sink as it arrives. Everything else is ChatModel's own: the retries
within the deadline, the parameters a model refuses, the fallback and the error log line,
`...` when the model stopped for length. Two rules of its own:

- once text has been shown, a failure is not retried (the reader would see the answer
  start twice): it ends the call as the fallback does (`StreamInterrupted`);
- a sink whose reader went away stops the call at the next piece: the HTTP stream to the
  model is closed, so the server stops generating (`StreamCancelled`, for the caller to log).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Iterator, Protocol, Sequence

import openai

from gpt.model import ADJUSTABLE, CHAT_COMPLETIONS, MODEL_FAILURES, ChatModel, EmptyCompletion
from messenger.text import clean_text


class DeltaSink(Protocol):
    """Where the pieces go: `delta(text)` for each; `cancelled` once nobody reads them."""

    cancelled: bool

    def delta(self, text: str) -> None: ...


class StreamCancelled(Exception):
    """The reader went away: the model call was closed. `text`: what the model had written."""

    def __init__(self, text: str, model: str | None, prompt_bytes: int = 0):
        super().__init__(f"stream cancelled after {len(text)} characters")
        self.text = text
        self.model = model
        self.prompt_bytes = prompt_bytes  # the model read all of it, whenever the reader went away


def prompt_bytes(messages: Sequence[dict]) -> int:
    """The UTF-8 bytes of the prompt's text (a part that is not text, an image, counts none)."""
    total = 0
    for message in messages:
        content = message.get("content")
        parts = [content] if isinstance(content, str) else content if isinstance(content, list) else []
        for part in parts:
            text = part if isinstance(part, str) else (part.get("text") or "") if isinstance(part, dict) else ""
            total += len(text.encode())
    return total


class StreamInterrupted(EmptyCompletion):
    """The model failed after part of its answer was shown: not retried."""


_SINK: ContextVar[DeltaSink | None] = ContextVar("delta_sink", default=None)


@contextmanager
def streaming_to(sink: DeltaSink) -> Iterator[None]:
    """Model calls made by this thread (context) inside the block stream into `sink`."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


class StreamingChatModel(ChatModel):
    def _attempt(self, messages: Sequence[dict], timeout: float):
        sink = _SINK.get()
        if sink is None:
            return super()._attempt(messages, timeout)
        for _ in range(len(ADJUSTABLE) + 1):
            try:
                return self._stream(messages, timeout, sink)
            except openai.BadRequestError as exc:
                if not self._adjust(exc):
                    raise
        raise RuntimeError("the model kept refusing parameters")  # unreachable: each is adjusted once

    def _stream(self, messages: Sequence[dict], timeout: float, sink: DeltaSink) -> SimpleNamespace:
        """One streamed attempt, as a completion-shaped object for ChatModel.reply."""
        ends = self.clock() + timeout
        # Chunks as the JSON they are: building a ChatCompletionChunk for each was a quarter of the
        # website chat's CPU with 200 chats open (bench/webchat.py); errors are raised all the same.
        stream = self.client.post(
            CHAT_COMPLETIONS, cast_to=object, stream=True, stream_cls=openai.Stream[object],
            body={"messages": list(messages), **self._params(), "stream": True, "stream_options": {"include_usage": True}},
            options={"timeout": timeout, "max_retries": 0})
        parts: list[str] = []
        finish = model = usage = None
        pieces = _Pieces()
        try:
            for chunk in stream:
                text, finish, model, usage = read_chunk(chunk, finish, model, usage)
                if text := pieces.clean(text):
                    parts.append(text)
                    sink.delta(text)
                if sink.cancelled:
                    raise StreamCancelled("".join(parts), model, prompt_bytes(messages))
                if self.clock() > ends:
                    raise openai.APITimeoutError(request=stream.response.request)
            if finish is None:  # the connection ended before the model said it was done
                raise StreamInterrupted("the stream ended without a finish_reason")
            if text := pieces.rest():
                parts.append(text)
                sink.delta(text)
        except MODEL_FAILURES as exc:
            if parts:
                raise StreamInterrupted(f"{type(exc).__name__} after {len(parts)} pieces of the answer") from exc
            raise
        finally:
            stream.close()
        message = SimpleNamespace(content="".join(parts), role="assistant")
        return SimpleNamespace(choices=[SimpleNamespace(message=message, finish_reason=finish)], model=model,
                               usage=SimpleNamespace(**usage) if isinstance(usage, dict) else None)


class _Pieces:
    """The model's pieces made safe to encode (clean_text) as they come: a lone surrogate in one
    (a model or a proxy can send anything) had ended the stream with an encoding error. A high
    surrogate ending a piece waits for the next, which may begin with its pair."""

    def __init__(self):
        self._held = ""

    def clean(self, text: str | None) -> str:
        text = self._held + (text or "")
        self._held = ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self._held = text[:-1], text[-1]
        return clean_text(text) if text else ""

    def rest(self) -> str:
        held, self._held = self._held, ""
        return clean_text(held) if held else ""


def read_chunk(chunk: object, finish: str | None, model: str | None, usage: dict | None) -> tuple:
    """A `chat.completion.chunk`'s text for choice 0, and the finish, model and usage so far."""
    if not isinstance(chunk, dict):
        return None, finish, model, usage
    text = None
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict) and choice.get("index") == 0:
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            text = content if isinstance(content, str) and content else text
            finish = choice.get("finish_reason") or finish
    return text, finish, chunk.get("model") or model, chunk.get("usage") or usage
