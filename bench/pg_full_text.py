"""PostgreSQL's full-text step at 20,000 chunks, narrowed (store.narrowed) and not, paired.

    .venv/bin/python bench/pg_full_text.py --database-url postgresql://postgres@127.0.0.1:5432/test
        [--chunks 20000] [--queries 200] [--runs 3] [--budget 1000]

The knowledge base of bench/knowledge.py's latency figure (Ana's Bakery and seeded filler, full
text only) in a schema of its own, analysed as autovacuum would leave it. For each of the 200
questions (the corpus's 100 and filler-worded ones), in turn with and without narrowing (no
narrowing: VISIT_BUDGET past any count), so both meet the same moment of the machine:
  time      the retriever's full-text step (the question's words, their counts kept by the
            retriever, the SQL): p50/p95, each question's best of --runs, and their ratio.
  agreement the candidates against the exact bm25 order over every match (what the step
            approximates: it orders ts_rank's best RERANKED by bm25): the share of questions
            whose top 3 are the exact top 3, whose top 10 are the exact top 10 (as sets), and the
            mean share of the exact top 50 found.
  hit@3     the corpus's 100 questions among the 20,000 chunks, full text only (KnowledgeBase.search).
One JSON line per figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.knowledge import bot_env, ingest, model_server, open_kb  # noqa: E402
from bench.knowledge_quality import QUESTIONS, hit_at_3  # noqa: E402
from bench.knowledge_speed import fill, filler_queries, full_text_alone, percentiles, total_chunks  # noqa: E402
from bench.run import PAGE_ID, fresh_store  # noqa: E402
from bot.knowledge import retrieval, store  # noqa: E402

UNBOUNDED = 10 ** 12


def narrowing(on: bool, budget: int) -> None:
    store.VISIT_BUDGET = budget if on else UNBOUNDED


def exact(kb, question: str) -> list[int]:
    """bm25 over every match (slow: what the step approximates)."""
    with kb.database.read() as db:
        version = store.version(db)
        words, _ = kb.retriever._full_text_query(db, retrieval.terms(question), version)
        if not words:
            return []
        ids = [row[0] for row in db.execute("SELECT id FROM knowledge_chunks WHERE tsv @@ to_tsquery('english', ?)",
                                            (" | ".join(words),)).fetchall()]
        return store._by_bm25(db, words, ids, kb.retriever._stats_of(db, version))[:retrieval.CANDIDATES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--budget", type=int, default=store.VISIT_BUDGET)
    args = parser.parse_args()
    args.pg_option = []
    print(json.dumps({"bench": "machine", "cores": os.cpu_count(), "load": [round(x, 2) for x in os.getloadavg()]}),
          flush=True)
    with model_server("fulltext") as server, tempfile.TemporaryDirectory(prefix="bench-pg-fts-") as data, \
            fresh_store("postgres", args) as where:
        env = {**bot_env(server, data), "DATABASE_URL": where.url}
        if ingest("fulltext", env)["exit"] != 0:
            sys.exit("bench: the corpus could not be added")
        _, kb = open_kb(env)
        fill(kb, Path(data) / "filler", args.chunks - total_chunks(kb))
        with kb.database.write() as db:  # the statistics autovacuum gathers a minute after a large add
            db.execute("ANALYZE knowledge_chunks")
        asked = [question["question"] for question in QUESTIONS] + filler_queries(max(0, args.queries - len(QUESTIONS)))
        times = {True: [], False: []}
        for question in asked:
            for on in (True, False):
                narrowing(on, args.budget)
                best = float("inf")
                for _ in range(args.runs):
                    started = time.perf_counter()
                    full_text_alone(kb, question, PAGE_ID)
                    best = min(best, (time.perf_counter() - started) * 1000)
                times[on].append(best)
        line = {"chunks": total_chunks(kb), "queries": len(asked), "budget": args.budget}
        figures = {on: percentiles(sorted(times[on])) for on in times}
        print(json.dumps({"bench": "full_text_step", **line, "narrowed": figures[True], "every_match": figures[False],
                          "p50_ratio": round(figures[True]["p50_ms"] / figures[False]["p50_ms"], 2),
                          "p95_ratio": round(figures[True]["p95_ms"] / figures[False]["p95_ms"], 2)}), flush=True)
        agree = {True: [0, 0, 0.0], False: [0, 0, 0.0]}
        for question in asked:
            truth = exact(kb, question)
            for on in (True, False):
                narrowing(on, args.budget)
                found = full_text_alone(kb, question, PAGE_ID)
                agree[on][0] += found[:3] == truth[:3]
                agree[on][1] += set(found[:10]) == set(truth[:10])
                agree[on][2] += len(set(found) & set(truth)) / len(truth) if truth else 1.0
        print(json.dumps({"bench": "agreement_with_exact_bm25", **line, **{
            ("narrowed" if on else "every_match"): {"top3_same": round(a[0] / len(asked), 3),
                                                    "top10_same": round(a[1] / len(asked), 3),
                                                    "top50_found": round(a[2] / len(asked), 3)}
            for on, a in agree.items()}}), flush=True)
        for on in (True, False):
            narrowing(on, args.budget)
            found = hit_at_3(kb, PAGE_ID)
            print(json.dumps({"bench": "hit_at_3_full_text", **line, "narrowed": on,
                              "hit_at_3": found["hit_at_3"], "hit_at_1": found["hit_at_1"]}), flush=True)


if __name__ == "__main__":
    main()
