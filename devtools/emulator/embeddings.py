"""Offline embeddings for the stand-in's `POST /v1/embeddings`: deterministic, no model, no key.

Feature hashing: a text's words (lower-cased, accents folded, a light suffix stemming) and their
character trigrams, each hashed with blake2b (stable across processes, unlike hash()) to a signed
position in 256 dimensions (or the request's `dimensions`), then L2-normalised - so texts that
share words, or most of a word, are close in cosine. Nothing here knows meaning: "bread" and
"loaf" are strangers. Pure functions, no I/O.

The request and answer are OpenAI's: https://platform.openai.com/docs/api-reference/embeddings
"""
from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
import unicodedata
from functools import lru_cache

DIMENSIONS = 256
MAX_DIMENSIONS = 4096
WORD_WEIGHT, TRIGRAM_WEIGHT = 1.0, 0.25  # a word's trigrams together weigh about as much as the word
SUFFIXES = ("ings", "ing", "edly", "ed", "ies", "es", "ly", "s")  # longest first


class Invalid(ValueError):
    """A request OpenAI would refuse with 400: the message and the offending parameter."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def fold(text: str) -> str:
    """Lower-case, accents dropped: "Crème Brûlée" -> "creme brulee"."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def stem(word: str) -> str:
    """A light English stemming: "baking" and "bakes" -> "bak", "berries" -> "berry"."""
    for suffix in SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


def features(text: str) -> list[tuple[str, float]]:
    """The weighted features of `text`: its stemmed words and the trigrams of each (padded) word."""
    found = []
    for word in re.findall(r"\w+", fold(text)):
        found.append(("w:" + stem(word), WORD_WEIGHT))
        padded = f" {word} "
        found += [("g:" + padded[i:i + 3], TRIGRAM_WEIGHT) for i in range(len(padded) - 2)]
    return found


@lru_cache(maxsize=200_000)
def _slot(feature: str, dimensions: int) -> tuple[int, float]:
    digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
    return int.from_bytes(digest[:6], "little") % dimensions, 1.0 if digest[7] & 1 else -1.0


def embed(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """The unit vector of `text` (all zeros for a text without a word)."""
    vector = [0.0] * dimensions
    for feature, weight in features(text):
        index, sign = _slot(feature, dimensions)
        vector[index] += sign * weight
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


def tokens(text: str) -> int:
    """A rough token count without a tokenizer: words x 4/3, rounded up (at least 1)."""
    return max(1, math.ceil(len(text.split()) * 4 / 3))


def to_base64(vector: list[float]) -> str:
    """As OpenAI sends `encoding_format: "base64"`: little-endian float32, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def parse(body) -> tuple[str, list[str], int, str]:
    """The request's model, inputs, dimensions and encoding - or Invalid."""
    if not isinstance(body, dict):
        raise Invalid("We could not parse the JSON body of your request.", "body")
    model, texts = body.get("model"), body.get("input")
    if not isinstance(model, str) or not model:
        raise Invalid("you must provide a model parameter", "model")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise Invalid("'$.input' is invalid: a non-empty string or a list of non-empty strings.", "input")
    dimensions = body.get("dimensions", DIMENSIONS)
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= MAX_DIMENSIONS:
        raise Invalid(f"dimensions must be an integer from 1 to {MAX_DIMENSIONS}.", "dimensions")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise Invalid("encoding_format must be 'float' or 'base64'.", "encoding_format")
    return model, texts, dimensions, encoding


def answer(model: str, texts: list[str], dimensions: int, encoding: str) -> dict:
    """The `/embeddings` answer: one embedding per text, in order, and the token estimate."""
    data = []
    for index, text in enumerate(texts):
        vector = embed(text, dimensions)
        data.append({"object": "embedding", "index": index,
                     "embedding": to_base64(vector) if encoding == "base64" else vector})
    used = sum(map(tokens, texts))
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": used, "total_tokens": used}}
