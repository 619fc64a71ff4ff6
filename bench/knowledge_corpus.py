"""bench/knowledge.py's helpers: filler documents and queries (seeded, from the example corpus's
own words, so full-text search has work to do), precomputed query embeddings, the fact test."""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "examples" / "knowledge" / "anas-bakery"
SECTIONS = 40  # per filler document: one chunk each (a section stays well under a chunk's size)


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
    """Markdown files of about `chunks` chunks in all: SECTIONS headed sections of ~5 sentences each."""
    words = Vocabulary(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(-(-chunks // SECTIONS)):
        sections = min(SECTIONS, chunks - number * SECTIONS)
        body = [f"# Filler {number}: {words.draw(3)}"]
        for _ in range(sections):
            body += [f"## {words.draw(2).capitalize()}", " ".join(words.sentence() for _ in range(5))]
        path = folder / f"filler-{number:04d}.md"
        path.write_text("\n\n".join(body) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def filler_queries(count: int, seed: int = 6) -> list[str]:
    words = Vocabulary(seed)
    return [f"Do you have {words.draw(words.rng.randint(2, 5))}?" for _ in range(count)]


def has_fact(reply: str, fact: str) -> bool:
    """The fact is in the reply, whatever line breaks either has."""
    return " ".join(fact.split()) in " ".join(reply.split())


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
