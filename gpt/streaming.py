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
from openai.types.chat import ChatCompletionChunk

from gpt.model import ADJUSTABLE, CHAT_COMPLETIONS, MODEL_FAILURES, ChatModel, EmptyCompletion


class DeltaSink(Protocol):
    """Where the pieces go: `delta(text)` for each; `cancelled` once nobody reads them."""

    cancelled: bool

    def delta(self, text: str) -> None: ...


class StreamCancelled(Exception):
    """The reader went away: the model call was closed. `text`: what the model had written."""

    def __init__(self, text: str, model: str | None):
        super().__init__(f"stream cancelled after {len(text)} characters")
        self.text = text
        self.model = model


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
        stream = self.client.post(
            CHAT_COMPLETIONS, cast_to=ChatCompletionChunk, stream=True, stream_cls=openai.Stream[ChatCompletionChunk],
            body={"messages": list(messages), **self._params(), "stream": True, "stream_options": {"include_usage": True}},
            options={"timeout": timeout, "max_retries": 0})
        parts: list[str] = []
        finish = model = usage = None
        try:
            for chunk in stream:
                model, usage = chunk.model or model, chunk.usage or usage
                for choice in chunk.choices or ():
                    if choice.index == 0 and choice.delta and choice.delta.content:
                        parts.append(choice.delta.content)
                        sink.delta(choice.delta.content)
                    finish = (choice.finish_reason if choice.index == 0 else None) or finish
                if sink.cancelled:
                    raise StreamCancelled("".join(parts), model)
                if self.clock() > ends:
                    raise openai.APITimeoutError(request=stream.response.request)
            if finish is None:  # the connection ended before the model said it was done
                raise StreamInterrupted("the stream ended without a finish_reason")
        except MODEL_FAILURES as exc:
            if parts:
                raise StreamInterrupted(f"{type(exc).__name__} after {len(parts)} pieces of the answer") from exc
            raise
        finally:
            stream.close()
        message = SimpleNamespace(content="".join(parts), role="assistant")
        return SimpleNamespace(choices=[SimpleNamespace(message=message, finish_reason=finish)], model=model,
                               usage=usage)
