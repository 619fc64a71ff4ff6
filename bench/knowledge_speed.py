"""bench/knowledge.py's speed figure: search at N chunks, the corpus topped up with filler
documents (seeded, from the corpus's own words as often as it uses them, so full-text search
has as much to rank as in a real business's documents), each query's embedding made beforehand."""
from __future__ import annotations

import random
import re
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from bench.knowledge_quality import QUESTIONS

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "examples" / "knowledge" / "anas-bakery"
SECTIONS = 40  # per filler document: one chunk each (a section stays well under a chunk's size)


def latency(kb, folder: Path, page_id: str, top_k: int, chunks: int, queries: int, runs: int,
            settle: Callable[[], float] = lambda: 0.0) -> dict:
    """p50/p95 of kb.search at `chunks` chunks (filler written to `folder`), and of its full-text
    step alone; `settle` runs just before the timing (waits for a quiet machine, says how long)."""
    filler_chunks, filler_seconds = fill(kb, folder, chunks - total_chunks(kb))
    asked = [question["question"] for question in QUESTIONS] + filler_queries(max(0, queries - len(QUESTIONS)))
    embedding_ms = precompute(kb, asked)
    search = lambda query: kb.search(query, page_id, top_k=top_k)  # noqa: E731
    first = timed(search, asked[:1], 1)  # after a change each process loads every vector once
    waited = settle()
    times = timed(search, asked, runs)
    full_text = timed(lambda query: full_text_alone(kb, query, page_id), asked, runs)
    cosine = timed(lambda query: cosine_alone(kb, query, page_id), asked, runs)
    return {"chunks": total_chunks(kb), "queries": len(times), **percentiles(times), "target_p95_ms": 20,
            "full_text_part": percentiles(full_text), "cosine_part": percentiles(cosine),
            "first_search_after_a_change_ms": round(first[0], 1),
            "query_embedding_excluded": True,
            "query_embedding_ms_p50": embedding_ms, "waited_for_quiet_s": waited,
            "filler_ingest_chunks_per_s": round(filler_chunks / filler_seconds, 1) if filler_seconds else None}


def fill(kb, folder: Path, wanted: int) -> tuple[int, float]:
    """Filler documents added (in this process) until the knowledge base has `wanted` more chunks."""
    if wanted <= 0:
        return 0, 0.0
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


class PrecomputedEmbedder:
    """An Embedder whose answers for the remembered texts are ready: retrieval timed alone."""

    def __init__(self, embedder):
        self.embedder = embedder
        self.model = embedder.model
        self.unsupported = embedder.unsupported
        self._known = {}

    def remember(self, text: str) -> None:
        self._known[text] = self.embedder.embed([text])

    def embed(self, texts: list[str], timeout: float | None = None):
        if len(texts) == 1 and texts[0] in self._known:
            return self._known[texts[0]]
        return self.embedder.embed(texts, timeout=timeout)


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


def full_text_alone(kb, query: str, page_id: str) -> list[int]:
    """The retriever's full-text step by itself (its SQL over the question's uncommon words and,
    with dictionaries, their translations, as many candidates)."""
    from bot.knowledge import retrieval, store

    with kb.database.read() as db:
        version = store.version(db)
        words, _ = kb.retriever._full_text_query(db, retrieval.terms(query), version)
        return kb.retriever._ranked_by_words(db, words, page_id, version)


def cosine_alone(kb, query: str, page_id: str) -> list[int]:
    """The retriever's cosine step by itself: every chunk's similarity, the best candidates (the
    retriever's own parts; the query's embedding is the precomputed one)."""
    from bot.knowledge import retrieval, store

    with kb.database.read() as db:
        version = store.version(db)
    scored, _ = kb.retriever._similarities(query, page_id, version, None)
    return scored.top(retrieval.CANDIDATES) if scored else []


def total_chunks(kb) -> int:
    return sum(source.chunks for source in kb.sources())


class Vocabulary:
    """The corpus's words, drawn as often as the corpus uses them (a few common, many rare)."""

    def __init__(self, seed: int):
        counts = Counter(word for path in sorted(CORPUS.rglob("*")) if path.is_file()
                         for word in re.findall(r"[^\W\d_]{3,}", path.read_text(encoding="utf-8").lower()))
        self.words, self.weights = sorted(counts), [counts[word] for word in sorted(counts)]
        self.rng = random.Random(seed)

    def draw(self, count: int) -> str:
        return " ".join(self.rng.choices(self.words, self.weights, k=count))

    def sentence(self) -> str:
        return self.draw(self.rng.randint(8, 14)).capitalize() + "."


def filler_documents(folder: Path, chunks: int, seed: int = 18) -> list[Path]:
    """Markdown files of about `chunks` chunks in all: SECTIONS headed sections of 5 sentences each."""
    words = Vocabulary(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(-(-chunks // SECTIONS)):
        body = [f"# Filler {number}: {words.draw(3)}"]
        for _ in range(min(SECTIONS, chunks - number * SECTIONS)):
            body += [f"## {words.draw(2).capitalize()}", " ".join(words.sentence() for _ in range(5))]
        path = folder / f"filler-{number:04d}.md"
        path.write_text("\n\n".join(body) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def filler_queries(count: int, seed: int = 6) -> list[str]:
    words = Vocabulary(seed)
    return [f"Do you have {words.draw(words.rng.randint(2, 5))}?" for _ in range(count)]
