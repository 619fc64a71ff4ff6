"""Full text without embeddings, other ways: how far can words alone go on the example questions?

    .venv/bin/python bench/knowledge_lexical.py

The knowledge base's full-text-only hit@3 misses its 0.8 target (README, "Teach the bot your
business"). This measures the usual lexical remedies on the same corpus and questions, in
SQLite FTS5, each as a ranking alone and fused with today's by reciprocal rank (as the
retriever fuses full text with cosine):

- words: today's query (the question's uncommon words, Porter-stemmed, any of them);
- trigrams: FTS5's trigram tokenizer over the question's words of 4+ letters (catches
  "vegetarisches"/"vegetarian", "chocolat"/"chocolate");
- truncation: each word's first P letters as a prefix (a crude stemmer for any language);
- feedback: pseudo-relevance feedback - the first ranking's top K chunks lend the query their
  N most distinctive words (count × idf), and the ranking again is fused with the first;
- WordNet: a thesaurus - each word's synonyms, broader words ("pup" → "young mammal") and words
  of the same root in WordNet 3.0 (bench/thesaurus.py; `pip install -r requirements-bench.txt`).

One JSON line per variant: hit@3 overall and per kind. Nothing here is used by the bot; it
is the evidence for what was tried (and tuned on the same questions, so read it as a ceiling).
"""
from __future__ import annotations

import json
import math
import sqlite3
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.knowledge_quality import CORPUS, KINDS, QUESTIONS, share  # noqa: E402
from bot.knowledge import readers  # noqa: E402
from bot.knowledge.retrieval import RRF_K, terms, uncommon  # noqa: E402

TOKENIZERS = {"words": "porter unicode61 remove_diacritics 2", "trigrams": "trigram",
              "plain": "unicode61 remove_diacritics 2"}


def index() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, source TEXT, heading TEXT, text TEXT)")
    for name, tokenizer in TOKENIZERS.items():
        db.execute(f"CREATE VIRTUAL TABLE {name} USING fts5(heading, text, content='chunks', content_rowid='id',"
                   f" tokenize='{tokenizer}')")
    for path in sorted(p for p in (CORPUS / "anas-bakery").rglob("*") if p.is_file()):
        for chunk in readers.read(str(path), readers.Limits()).chunks:
            row = db.execute("INSERT INTO chunks (source, heading, text) VALUES (?, ?, ?)",
                             (str(path.relative_to(CORPUS)), chunk.heading, chunk.text)).lastrowid
            for name in TOKENIZERS:
                db.execute(f"INSERT INTO {name} (rowid, heading, text) VALUES (?, ?, ?)", (row, chunk.heading, chunk.text))
    return db


def ranked(db: sqlite3.Connection, table: str, query: list[str], limit: int = 50) -> list[int]:
    if not query:
        return []
    return [row[0] for row in db.execute(f"SELECT rowid FROM {table} WHERE {table} MATCH ? ORDER BY rank LIMIT ?",
                                         (" OR ".join(query), limit))]


def by_words(db, question: str) -> list[int]:
    words = terms(question)
    if len(words) > 2:  # the retriever's own rule: common words out, the two rarest kept
        counts = {w: db.execute("SELECT COUNT(*) FROM words WHERE words MATCH ?", (f'"{w}"',)).fetchone()[0]
                  for w in words}
        words = uncommon(words, counts, db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
    return ranked(db, "words", [f'"{w}"' for w in words])


def by_trigrams(db, question: str) -> list[int]:
    grams = {word[i:i + 3] for word in terms(question) if len(word) >= 4 for i in range(len(word) - 2)}
    return ranked(db, "trigrams", [f'"{gram}"' for gram in sorted(grams)])


def by_truncation(letters: int):
    def rank(db, question: str) -> list[int]:
        return ranked(db, "plain", [f'"{p}"*' for p in sorted({w[:letters] for w in terms(question)
                                                                if len(w) >= letters - 1})])
    return rank


def by_feedback(chunks: int, words: int):
    def rank(db, question: str) -> list[int]:
        first = by_words(db, question)
        asked = set(terms(question))
        counts: dict[str, int] = {}
        for chunk in first[:chunks]:
            heading, text = db.execute("SELECT heading, text FROM chunks WHERE id = ?", (chunk,)).fetchone()
            for word in terms(f"{heading or ''} {text}"):
                if word not in asked and len(word) > 2:
                    counts[word] = counts.get(word, 0) + 1
        total = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

        def weight(word: str) -> float:
            held = db.execute("SELECT COUNT(*) FROM words WHERE words MATCH ?", (f'"{word}"',)).fetchone()[0]
            return counts[word] * math.log(total / (1 + held)) if held else 0.0
        lent = sorted(counts, key=lambda word: (-weight(word), word))[:words]
        again = ranked(db, "words", [f'"{w}"' for w in sorted(asked) + lent])
        return fused(lambda *_: first, lambda *_: again)(db, question)
    return rank


def by_thesaurus(relations: str, senses: int, alone: bool = False, weight: float = 1.0):
    """The question's words and their WordNet relatives that the corpus holds (and not in a tenth
    of its chunks): in one query, or as a second ranking fused with today's at `weight`."""
    from bench.thesaurus import WordNet, wordnet_directory
    wordnet = WordNet(wordnet_directory())

    def rank(db, question: str) -> list[int]:
        words = terms(question)
        total = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        extra = set()
        for word in words:
            for other in wordnet.related(word, relations, senses):
                held = db.execute("SELECT COUNT(*) FROM words WHERE words MATCH ?", (f'"{other}"',)).fetchone()[0]
                if 0 < held <= max(50, 0.1 * total) and other not in words:
                    extra.add(other)
        if alone:
            return ranked(db, "words", [f'"{w}"' for w in words + sorted(extra)])
        again = ranked(db, "words", [f'"{w}"' for w in sorted(extra)])
        return fused(by_words, lambda *_: again, weights=(1.0, weight))(db, question)
    return rank


def fused(*rankers, weights=None):
    def rank(db, question: str) -> list[int]:
        scores: dict[int, float] = {}
        for ranker, weight in zip(rankers, weights or [1.0] * len(rankers)):
            for position, chunk in enumerate(ranker(db, question)):
                scores[chunk] = scores.get(chunk, 0.0) + weight / (RRF_K + position + 1)
        return sorted(scores, key=lambda chunk: (-scores[chunk], chunk))
    return rank


def hit_at_3(db, rank) -> dict:
    hits = {kind: [] for kind in KINDS}
    for question in QUESTIONS:
        top = [db.execute("SELECT source FROM chunks WHERE id = ?", (chunk,)).fetchone()[0]
               for chunk in rank(db, question["question"])[:3]]
        hits[question["kind"]].append(question["source"] in top)
    return {"hit_at_3": share(sum(hits.values(), [])), **{kind: share(values) for kind, values in hits.items()}}


def main() -> None:
    db = index()
    variants = {"words (today)": by_words, "trigrams": by_trigrams, "words + trigrams": fused(by_words, by_trigrams)}
    for letters in (4, 5, 6):
        variants[f"truncation {letters}"] = by_truncation(letters)
        variants[f"words + truncation {letters}"] = fused(by_words, by_truncation(letters))
    for chunks, words in ((1, 5), (2, 5), (3, 5)):
        variants[f"words + feedback from {chunks} chunk(s), {words} words"] = by_feedback(chunks, words)
    for relations, name in (("S", "synonyms"), ("S@", "synonyms + broader"), ("S@+", "synonyms + broader + same root")):
        for senses in (1, 2):
            variants[f"words + WordNet {name}, {senses} sense(s), one query"] = by_thesaurus(relations, senses, alone=True)
            for weight in (1.0, 0.2):
                variants[f"words + WordNet {name}, {senses} sense(s), fused x{weight}"] = by_thesaurus(
                    relations, senses, weight=weight)
    for name, rank in variants.items():
        print(json.dumps({"bench": "knowledge_lexical", "variant": name, "questions": len(QUESTIONS),
                          **hit_at_3(db, rank)}))


if __name__ == "__main__":
    main()
