"""bench/embeddings_shim.py as the bot's openai client sees it: base64 by default, floats on
request, one vector per input in order, 400 for what it cannot embed, 404 with --model none."""
from __future__ import annotations

import base64
import subprocess
import sys

import numpy as np
import openai
import pytest
import requests

from tests.support import ROOT


def start_shim(*args: str) -> tuple[subprocess.Popen, str]:
    shim = subprocess.Popen([sys.executable, str(ROOT / "bench" / "embeddings_shim.py"), *args],
                            stdout=subprocess.PIPE, text=True)
    return shim, shim.stdout.readline().strip()


@pytest.fixture(scope="module")
def shim_url():
    shim, url = start_shim("--model", "random", "--dimensions", "8")
    yield url
    shim.terminate()
    shim.wait(10)


def test_the_openai_client_gets_one_vector_per_input_in_order(shim_url):
    client = openai.OpenAI(base_url=shim_url, api_key="any", max_retries=0, timeout=10)
    response = client.embeddings.create(model="random", input=["croissant", "sourdough", "croissant"])
    vectors = np.array([item.embedding for item in sorted(response.data, key=lambda item: item.index)])
    assert vectors.shape == (3, 8) and np.allclose(vectors[0], vectors[2]) and not np.allclose(vectors[0], vectors[1])
    assert response.usage.prompt_tokens == 3


@pytest.mark.parametrize("body, status", [
    ({"input": "one text", "encoding_format": "float"}, 200),
    ({"input": "one text", "encoding_format": "base64"}, 200),
    ({"input": [1, 2, 3]}, 400),
    ({"input": []}, 400),
    ({"input": "x", "encoding_format": "int8"}, 400),
], ids=["float", "base64", "token ids", "empty", "unknown encoding"])
def test_requests_it_answers_and_refuses(shim_url, body, status):
    response = requests.post(f"{shim_url}/embeddings", json=body, timeout=10)
    assert response.status_code == status
    if status == 200:
        embedding = response.json()["data"][0]["embedding"]
        if body["encoding_format"] == "base64":  # little-endian float32, as the openai client decodes it
            embedding = np.frombuffer(base64.b64decode(embedding), dtype="<f4").tolist()
        assert len(embedding) == 8


def test_without_a_model_it_answers_404_and_the_bot_searches_full_text():
    from bot.knowledge.embeddings import Embedder

    shim, url = start_shim("--model", "none")
    try:
        embedder = Embedder(openai.OpenAI(base_url=url, api_key="any", max_retries=0, timeout=10), "none")
        assert embedder.embed(["opening hours"]).vectors is None
        assert embedder.unsupported.startswith("HTTP 404")
    finally:
        shim.terminate()
        shim.wait(10)
