"""The chat model: one OpenAI-compatible chat completions call per reply, never raising.

Any failure becomes the fallback reply plus one ERROR line in the error log
file naming the error class, HTTP status and request id - never the key,
never the user's text. The call, its retries included, ends by a deadline:
Meta wants an answer within 30 seconds of the user's message.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import openai
from openai.types.chat import ChatCompletion

from gpt.plaintext import to_plain_text
from gpt.retries import DeadlineExceeded, RetryPolicy, Tries
from messenger.text import clean_text

logger = logging.getLogger(__name__)

LENGTH_MARK = "..."
MAX_MODEL_CHARS = 200
# The chat completions endpoint, called through the client's documented generic
# `post` (same retries, timeout, errors and request ids as chat.completions.create).
# create() first walks every message through the library's typed-params transform:
# measured 7.8 ms of CPU per call here against 2.0 ms, on the path of every reply.
CHAT_COMPLETIONS = "/chat/completions"


@dataclass(frozen=True)
class ModelReply:
    """The text to send; `error_class` names the failure when it is the fallback.

    `usage` is (prompt, completion, total) tokens as the server counted them.
    """

    text: str
    error_class: str | None = None
    model: str | None = None
    usage: tuple[int | None, int | None, int | None] = (None, None, None)


class EmptyCompletion(Exception):
    """The server answered 200 but without a usable message."""


class ImagesRefused(Exception):
    """The model server refused image input (a model without vision): said once by the caller."""


# What a server says when the model cannot take images: OpenAI's "image_url is only supported by
# certain models", vLLM's "... is not a multimodal model", others' "does not support images" or
# "vision". Not "You uploaded an unsupported image": that one image is bad, not the model.
IMAGE_REFUSALS = ("only supported by", "multimodal", "multi-modal", "vision", "not support image",
                  "does not support image", "not supported for this model")


# What the server or the network can do to a call: the user gets the fallback. Anything else
# is a bug here, and is left to raise, so it is logged with its traceback and retried by the
# queue instead of hiding behind "please try again later".
# (A body that is not JSON comes out of the client as JSONDecodeError; a text no codec can
# send - a lone surrogate that got past the edge - as UnicodeError.)
MODEL_FAILURES = (openai.OpenAIError, EmptyCompletion, DeadlineExceeded, json.JSONDecodeError, UnicodeError)


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    model: str
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None

    def to_params(self) -> dict[str, Any]:
        """Only the parameters that are set: some reasoning models reject the others."""
        optional = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}
        return {"model": self.model, **{k: v for k, v in optional.items() if v is not None}}


# Ids a server or a proxy gives each call, for finding it in their logs; the first present wins.
REQUEST_ID_HEADERS = ("x-request-id", "x-litellm-call-id", "apim-request-id", "x-ms-request-id")
# What a model may refuse that the bot can do without (None) or say another way.
ADJUSTABLE = {"temperature": None, "top_p": None, "max_tokens": "max_completion_tokens"}
SETTING_OF = {"temperature": "OPENAI_TEMPERATURE", "top_p": "OPENAI_TOP_P", "max_tokens": "OPENAI_MAX_TOKENS"}


class ChatModel:
    """One OpenAI client, built once (with its own retries off), shared by every reply."""

    def __init__(self, client: openai.OpenAI, settings: ModelSettings, *, fallback: str, error_log_file: str,
                 attempt_timeout: float = 20.0, max_retries: int = 2,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], object] = time.sleep):
        self.client = client
        self.settings = settings
        self.fallback = fallback
        self.error_log_file = error_log_file
        self.clock = clock
        self.retries = RetryPolicy(attempt_timeout=attempt_timeout, max_retries=max_retries, clock=clock, sleep=sleep)
        # Parameters this model refused, and what replaces each (None: dropped), for the
        # life of the process: reasoning models refuse temperature, top_p and max_tokens.
        self.adjusted: dict[str, str | None] = {}

    def reply(self, messages: Sequence[dict], deadline: float | None = None) -> ModelReply:
        """The model's answer as plain text, `...` when cut for length, or the fallback.

        `deadline` (on `clock`) bounds every attempt and retry; None: attempts and retries
        as configured, however long they take.
        """
        started, tries = self.clock(), Tries()
        try:
            completion = self.retries.call(lambda timeout: self._attempt(messages, timeout), deadline, tries)
            return ModelReply(to_reply_text(completion), model=_model_name(completion) or self.settings.model,
                              usage=_usage(completion))
        except ImagesRefused:
            return ModelReply(self.fallback, error_class=ImagesRefused.__name__)
        except MODEL_FAILURES as exc:
            log_failure("model call", exc, tries.count, self.clock() - started, self.error_log_file)
            return ModelReply(self.fallback, error_class=type(exc).__name__)

    def _attempt(self, messages: Sequence[dict[str, str]], timeout: float) -> ChatCompletion:
        """One call; a parameter the model refuses is dropped (or renamed) and the call made
        again at once, so a model/settings mismatch never reaches the user."""
        for _ in range(len(ADJUSTABLE) + 1):
            try:
                return self.client.post(CHAT_COMPLETIONS, cast_to=ChatCompletion,
                                        body={"messages": list(messages), **self._params()},
                                        options={"timeout": timeout, "max_retries": 0})
            except openai.BadRequestError as exc:
                if has_images(messages) and is_image_refusal(exc):
                    raise ImagesRefused(str(exc)[:200]) from None
                if not self._adjust(exc):
                    raise
        raise RuntimeError("the model kept refusing parameters")  # unreachable: each is adjusted once

    def _params(self) -> dict[str, Any]:
        params = self.settings.to_params()
        for name, replacement in self.adjusted.items():
            value = params.pop(name, None)
            if replacement and value is not None:
                params[replacement] = value
        return params

    def _adjust(self, exc: openai.BadRequestError) -> bool:
        param = getattr(exc, "param", None)
        if getattr(exc, "code", None) not in ("unsupported_parameter", "unsupported_value") \
                or param not in ADJUSTABLE or param in self.adjusted:
            return False
        replacement = ADJUSTABLE[param]
        self.adjusted[param] = replacement
        how = (f"sent as {replacement} from now on" if replacement else
               f"left out from now on; set {SETTING_OF[param]}= (empty) in .env to stop this warning")
        logger.warning("model %s refused %s (%s): %s", self.settings.model, param, exc.code, how)
        return True

def has_images(messages: Sequence[dict]) -> bool:
    return any(isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
               for m in messages)


def is_image_refusal(exc: openai.BadRequestError) -> bool:
    text = str(getattr(exc, "message", "") or "").lower()
    return "image" in text and any(words in text for words in IMAGE_REFUSALS) or "multimodal" in text


def log_failure(what: str, exc: Exception, attempts: int, seconds: float, error_log_file: str) -> None:
    """One ERROR line, in the log and in ERROR_LOG_FILE: the error's class, status, type, code,
    param and request id - never the key, never the user's words."""
    status = getattr(exc, "status_code", None)
    details = " ".join(f"{name}={value}" for name in ("type", "code", "param")
                       if isinstance(value := getattr(exc, name, None), str))
    line = (f"{what} failed: {type(exc).__name__} status={status}{' ' + details if details else ''}"
            f" request_id={_request_id(exc)} attempts={attempts} after={seconds:.1f}s")
    logger.error(line)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        with open(error_log_file, "a", encoding="utf-8") as log:
            log.write(f"{stamp} ERROR {line}\n")
    except OSError as write_error:
        logger.error("cannot write %s: %s", error_log_file, type(write_error).__name__)


def _request_id(exc: Exception) -> str | None:
    """The server's id for the failed call, or the proxy's when it sends its own."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    for name in REQUEST_ID_HEADERS:
        if value := headers.get(name):
            return clean_text(value)[:100]
    return None


# The client does not validate a response (a proxy can put anything in any field), and
# these are stored with the exchange: a dict for a name or 10**30 tokens must not stop it.
def _model_name(completion: Any) -> str | None:
    name = getattr(completion, "model", None)
    return clean_text(name)[:MAX_MODEL_CHARS] if isinstance(name, str) else None


def _usage(completion: Any) -> tuple[int | None, int | None, int | None]:
    usage = getattr(completion, "usage", None)
    return (_token_count(getattr(usage, "prompt_tokens", None)),
            _token_count(getattr(usage, "completion_tokens", None)),
            _token_count(getattr(usage, "total_tokens", None)))


def _token_count(value: Any) -> int | None:
    """A count SQLite can store, or None."""
    is_count = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 63
    return value if is_count else None


def to_reply_text(completion: Any) -> str:
    """The first choice's text, markdown flattened, with `...` when it stopped for length."""
    try:
        choice = completion.choices[0]
        content = choice.message.content
    except (AttributeError, IndexError, TypeError):
        raise EmptyCompletion("no choices in the completion") from None
    if not isinstance(content, str) or not content.strip():
        raise EmptyCompletion(f"empty content (finish_reason={getattr(choice, 'finish_reason', None)})")
    # A model or a proxy can return anything: a lone surrogate could be neither sent nor stored.
    text = to_plain_text(clean_text(content))
    if choice.finish_reason == "length":
        text += LENGTH_MARK
    return text
