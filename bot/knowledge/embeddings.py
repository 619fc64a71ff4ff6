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
    """Little-endian float32, as stored (and read back by retrieval.py), whatever this machine is."""
    if sys.byteorder == "big":
        vector = array("f", vector)
        vector.byteswap()
    return vector.tobytes()


# bfloat16 is float32's upper half: its sign, its whole exponent and 7 of the 23 bits of
# mantissa (2-3 significant digits, plenty to rank cosines). Rounded to nearest (ties away from
# zero) by adding half of the dropped half to each float32 at once, as one big integer (C speed,
# no numpy), a slice at a time: ~4x the slice's size besides the result, however big the matrix.
# Only a float32 at 0xFFFF8000 or above, a NaN, would carry into the next one: `embed` refuses
# vectors that hold any, so none is ever stored.
SLICE_BYTES = 1 << 22
_HALF_OF_DROPPED = b"\x00\x80\x00\x00"


def to_bfloat16(stored: bytes | memoryview, slice_bytes: int = SLICE_BYTES) -> bytearray:
    """Little-endian float32s, as stored, rounded to bfloat16s in this machine's byte order (for
    a memoryview cast to "H", read by simsimd with dtype="bf16"); `slice_bytes`: a multiple of 4."""
    stored = memoryview(stored).cast("B")
    if len(stored) % 4 or slice_bytes <= 0 or slice_bytes % 4:
        raise ValueError("float32s come in 4 bytes each, and so are sliced")
    out = bytearray(len(stored) // 2)
    # A float32's upper half is its bytes 2 and 3 as stored: in that order into a little-endian
    # machine's uint16, the other way round into a big-endian one's.
    first, second = (2, 3) if sys.byteorder == "little" else (3, 2)
    half, size = 0, 0
    for start in range(0, len(stored), slice_bytes):
        part = stored[start:start + slice_bytes]
        if len(part) != size:
            half, size = int.from_bytes(_HALF_OF_DROPPED * (len(part) // 4), "little"), len(part)
        rounded = (int.from_bytes(part, "little") + half).to_bytes(len(part) + 1, "little")
        out[start // 2:(start + len(part)) // 2:2] = rounded[first:len(part):4]
        out[start // 2 + 1:(start + len(part)) // 2:2] = rounded[second:len(part):4]
    return out


def _message(error: openai.APIStatusError) -> str:
    body = error.body if isinstance(error.body, dict) else {}
    message = body.get("message") or (body.get("error") or {}).get("message") if isinstance(body, dict) else None
    return str(message or error.message)[:160]
