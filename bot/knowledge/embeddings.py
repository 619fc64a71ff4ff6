"""Embeddings from the model server's OpenAI-compatible `/embeddings` (EMBEDDING_MODEL).

A server without the endpoint (or the model) answers 404 or 405: that is said once in the
log and the knowledge base works on full text alone from then on in this process. Any other
failure (a timeout, a 5xx) costs only the call at hand: the caller decides (a reply searches
full text only; an ingest gives up on that source and adds nothing of it).
"""
from __future__ import annotations

import logging
import math
import sys
import threading
from array import array
from dataclasses import dataclass

import openai

logger = logging.getLogger(__name__)
BATCH = 64  # texts per request: well under every server's limit, few round trips


class EmbeddingsUnavailable(Exception):
    """This call got no embeddings (the server failed it); the next one may."""


@dataclass(frozen=True)
class Embedded:
    vectors: list[array] | None  # one normalised float32 row per text; None: the server has no embeddings
    tokens: int  # what the server counted (embedding tokens count toward the budget)


class Embedder:
    def __init__(self, client: openai.OpenAI, model: str, timeout: float = 10.0):
        self.client = client
        self.model = model
        self.timeout = timeout
        self.unsupported: str | None = None  # why, once the server has said it has no embeddings
        self._lock = threading.Lock()

    def embed(self, texts: list[str], timeout: float | None = None) -> Embedded:
        """Vectors for `texts`; raises EmbeddingsUnavailable when this call failed."""
        if self.unsupported or not texts:
            return Embedded(None, 0)
        rows, tokens = [], 0
        for start in range(0, len(texts), BATCH):
            try:
                response = self.client.with_options(timeout=timeout or self.timeout, max_retries=0).embeddings.create(
                    model=self.model, input=texts[start:start + BATCH])
            except openai.APIStatusError as error:
                if error.status_code in (404, 405, 501):
                    self._unsupported(f"HTTP {error.status_code}: {_message(error)}")
                    return Embedded(None, 0)
                raise EmbeddingsUnavailable(f"HTTP {error.status_code}: {_message(error)}") from None
            except (openai.APIError, ValueError) as error:  # timeouts, connection errors, a body not JSON
                raise EmbeddingsUnavailable(type(error).__name__) from None
            data = sorted(response.data, key=lambda item: item.index)
            if len(data) != len(texts[start:start + BATCH]):
                raise EmbeddingsUnavailable(f"{len(data)} embeddings for {len(texts[start:start + BATCH])} texts")
            rows += [item.embedding for item in data]
            tokens += (response.usage.total_tokens or response.usage.prompt_tokens or 0) if response.usage else 0
        if len({len(row) for row in rows}) != 1:
            raise EmbeddingsUnavailable("the server's embeddings differ in length")
        if not rows[0]:
            raise EmbeddingsUnavailable("the server's embeddings are empty")
        if not all(math.isfinite(math.hypot(*row)) for row in rows):  # one NaN or infinity makes it so
            raise EmbeddingsUnavailable("the server's embeddings hold values that are not numbers (NaN, infinity)")
        return Embedded([normalised(row) for row in rows], tokens)

    def _unsupported(self, why: str) -> None:
        with self._lock:
            if not self.unsupported:
                self.unsupported = why
                logger.warning("the model server has no embeddings for EMBEDDING_MODEL=%s (%s): the knowledge base"
                               " searches full text only", self.model, why)


def normalised(row) -> array:
    """A float32 vector of unit length, so a dot product is the cosine (a zero vector stays zero)."""
    norm = math.hypot(*row)
    return array("f", row if norm == 0 else (value / norm for value in row))


def to_bytes(vector: array) -> bytes:
    """Little-endian float32, as stored (and read back by from_bytes), whatever this machine is."""
    if sys.byteorder == "big":
        vector = array("f", vector)
        vector.byteswap()
    return vector.tobytes()


def to_int8(vector: array) -> bytes:
    """A vector as int8s, scaled so its value of largest magnitude is 127 or -127: what searches
    compare (simsimd's int8 cosine, which sees no scale), stored beside the float32s when a chunk
    is added. A quarter of float32's bytes. Each value is off by half a step at most (its
    largest's 1/254), so a vector with a few dimensions far larger than the rest keeps less of
    the others: for vectors of evenly spread values the cosines stay within ~0.001 of float32's,
    with one dimension 50 times the others within ~0.01. ~0.2-0.4 ms at 1,536 wide in Python:
    done once per chunk, not at each load."""
    largest = max(max(vector, default=0.0), -min(vector, default=0.0))
    if not largest:  # a zero vector stays zero (it is like nothing)
        return bytes(len(vector))
    scale = 127 / largest
    return array("b", [round(value * scale) for value in vector]).tobytes()


def from_bytes(stored: bytes) -> array:
    """Little-endian float32s, as stored, back into a vector."""
    vector = array("f", stored)
    if sys.byteorder == "big":
        vector.byteswap()
    return vector


def _message(error: openai.APIStatusError) -> str:
    body = error.body if isinstance(error.body, dict) else {}
    message = body.get("message") or (body.get("error") or {}).get("message") if isinstance(body, dict) else None
    return str(message or error.message)[:160]
