"""gpt/streaming.py reads the model's stream chunks as plain JSON: what it takes from each."""
from __future__ import annotations

import pytest

from gpt.streaming import read_chunk

USAGE = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}


def chunk(*choices: dict, **fields) -> dict:
    return {"object": "chat.completion.chunk", "choices": list(choices), **fields}


@pytest.mark.parametrize("given, expected", [
    (chunk({"index": 0, "delta": {"role": "assistant", "content": "Hello"}, "finish_reason": None}, model="m"),
     ("Hello", None, "m", None)),
    (chunk({"index": 0, "delta": {}, "finish_reason": "stop"}), (None, "stop", None, None)),
    (chunk(usage=USAGE), (None, None, None, USAGE)),
    (chunk({"index": 1, "delta": {"content": "other"}, "finish_reason": "length"}), (None, None, None, None)),
    (chunk({"index": 0, "delta": {"content": ""}}), (None, None, None, None)),
    (chunk({"index": 0, "delta": {"content": 7}}), (None, None, None, None)),
    (chunk({"index": 0, "delta": None}), (None, None, None, None)),
    (chunk("not a choice"), (None, None, None, None)),
    ({"choices": None}, (None, None, None, None)),
    (["not", "a", "chunk"], (None, None, None, None)),
], ids=["text-and-model", "finish", "usage-only", "another-choice", "empty-text", "text-not-a-string",
        "no-delta", "choice-not-an-object", "choices-null", "chunk-not-an-object"])
def test_read_chunk(given, expected):
    assert read_chunk(given, None, None, None) == expected


def test_read_chunk_keeps_what_earlier_chunks_said():
    assert read_chunk(chunk(), "stop", "m", USAGE) == (None, "stop", "m", USAGE)
