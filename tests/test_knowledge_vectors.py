"""The knowledge base's vectors: float32 as stored, int8 as compared (made when a chunk is added,
or once for chunks older code added), ranked as the exact cosines rank."""
from __future__ import annotations

import logging
import math
import random
import sqlite3
import threading
from array import array

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bot.knowledge import store
from bot.knowledge.embeddings import from_bytes, to_bytes, to_int8
from bot.knowledge.retrieval import _Scored, _Vectors
from tests.test_knowledge import DELIVERY, FAQ, HOURS, knowledge_of

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, database=None)
@example([0.0, -0.0, 0.0])
@example([1e-45, -3.4028234663852886e38, 2.5e-3])  # the smallest float32s beside the largest: 0
@given(st.lists(finite32, min_size=1, max_size=64))
def test_each_value_becomes_the_nearest_int8_on_its_vectors_own_scale(values):
    vector = array("f", values)
    held = array("b", to_int8(vector))
    assert len(held) == len(values)
    largest = max(abs(value) for value in vector)
    if largest == 0:
        assert not any(held)
        return
    assert max(abs(value) for value in held) == 127  # the whole range is used
    for value, rounded in zip(vector, held):
        assert abs(rounded - value * 127 / largest) <= 0.5 + 1e-9, (value, rounded)


@given(st.lists(finite32, max_size=64))
def test_float32s_come_back_from_their_stored_bytes_as_they_went(values):
    vector = array("f", values)
    assert from_bytes(to_bytes(vector)) == vector


def test_float32s_are_stored_little_endian_on_any_machine():
    assert to_bytes(array("f", [1.0, -2.0])) == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"
    assert from_bytes(b"\x00\x00\x80\x3f\x00\x00\x00\xc0") == array("f", [1.0, -2.0])


def unit(values) -> array:
    norm = math.sqrt(sum(x * x for x in values))
    return array("f", (x / norm for x in values))


def test_int8_cosines_rank_as_exact_ones_do():
    rng = random.Random(7)
    width, count = 1536, 300
    question = unit([rng.gauss(0, 1) for _ in range(width)])
    # Chunks at every similarity to the question, as real neighbours are: a mix of it and noise.
    stored, exact = [], {}
    for chunk_id in range(1000, 1000 + count):
        mix = rng.random()
        vector = unit([mix * q + (1 - mix) * rng.gauss(0, 1) / 39 for q in question])
        stored.append((chunk_id, to_int8(vector)))
        exact[chunk_id] = sum(q * x for q, x in zip(question, vector))
    vectors = _Vectors.of(1, stored)
    scored = _Scored(vectors, vectors.distances(question), question)
    assert len(vectors.matrix.obj) == count * width  # a quarter of float32's bytes
    for chunk_id in exact:
        assert abs(scored.of(chunk_id) - exact[chunk_id]) < 0.002, chunk_id
    top = scored.top(20)
    assert top[0] == max(exact, key=exact.get)
    # Only near ties may change places.
    for higher, lower in zip(top, top[1:]):
        assert exact[higher] > exact[lower] - 0.005, (higher, lower)


def test_a_hits_similarity_is_exact_from_its_float32s_where_int8s_are_coarse():
    """One dimension 50 times the others: the int8s keep 1/254 of it as their step, too coarse
    for the rest, and the int8 cosine is off by ~0.005; the hit's own similarity is not."""
    rng = random.Random(1)
    width = 1536
    question = unit([rng.gauss(0, 1) for _ in range(width - 1)] + [0.0])
    chunk = unit([0.3 * rng.gauss(0, 1) + 38 * q for q in question[:-1]] + [50.0])  # its cosine: ~0.6
    exact = sum(q * x for q, x in zip(question, chunk))
    vectors = _Vectors.of(1, [(7, to_int8(chunk))])
    scored = _Scored(vectors, vectors.distances(question), question)
    assert abs(scored.of(7) - exact) > 0.003  # the int8s alone
    assert abs(scored.of(7, to_bytes(chunk)) - exact) < 1e-6
    assert abs(scored.of(7, b"\0" * 8) - scored.of(7)) == 0  # another width: the int8s'
    assert scored.of(8, to_bytes(chunk)) is None  # not among the vectors searched


def test_a_zero_question_or_row_is_like_nothing():
    vectors = _Vectors.of(1, [(1, bytes(4)), (2, to_int8(array("f", [1, 0, 0, 0])))])
    zero, one = array("f", [0, 0, 0, 0]), array("f", [1, 0, 0, 0])
    assert _Scored(vectors, vectors.distances(zero), zero).top(2) == [1, 2]  # ties: in order
    scored = _Scored(vectors, vectors.distances(one), one)
    assert scored.of(1) == 0.0 and abs(scored.of(2) - 1.0) < 1e-6
    assert scored.top(1) == [2]


@pytest.fixture
def docs(tmp_path):
    for name, text in (("hours.md", HOURS), ("delivery.md", DELIVERY), ("faq.csv", FAQ)):
        (tmp_path / name).write_text(text)
    return tmp_path


def test_rows_of_another_width_or_none_are_left_out_and_said(caplog):
    rows = [(1, to_int8(array("f", [1, 0, 0]))), (2, b""), (3, to_int8(array("f", [0, 1, 0, 0]))),
            (4, to_int8(array("f", [0, 0, 1]))), (5, to_int8(array("f", [0, 1, 1])))]
    vectors = _Vectors.of(1, rows)
    assert vectors.ids == [1, 4, 5] and vectors.width == 3
    assert "3 of 5 chunks have vectors 3 wide" in caplog.text
    caplog.clear()
    assert _Vectors.of(1, [rows[0], rows[3]]).ids == [1, 4] and not caplog.text
    assert _Vectors.of(1, [(2, b"")]).ids == [] and _Vectors.of(1, []).ids == []


def stored_vectors(kb) -> dict[int, tuple[bytes | None, bytes]]:
    with kb.database.read() as db:
        return {row[0]: (row[1] and bytes(row[1]), bytes(row[2])) for row in db.execute(
            "SELECT id, embedding_i8, embedding FROM knowledge_chunks ORDER BY id").fetchall()}


def search(kb, page: str) -> list[tuple[int, float]]:
    return [(hit.chunk_id, hit.similarity) for hit in kb.search("gluten-free loaf", page, top_k=3).hits]


def test_chunks_older_code_added_without_int8s_are_searched_alike_and_get_them_once(env, backend, docs, caplog):
    _, settings = backend
    kb = knowledge_of(env, **settings)
    kb.add([str(docs / name) for name in ("hours.md", "delivery.md", "faq.csv")])
    added = stored_vectors(kb)
    assert added and all(int8 == to_int8(from_bytes(float32)) for int8, float32 in added.values())
    page = env["FB_PAGE_ID"]
    before = search(kb, page)
    assert all(similarity is not None for _, similarity in before)

    with kb.database.write() as db:  # half as the code before schema 23 (SQLite) / 22 (PostgreSQL) left them
        older = db.execute("UPDATE knowledge_chunks SET embedding_i8 = NULL WHERE id % 2 = 0").rowcount
    assert 0 < older < len(added)
    caplog.set_level(logging.INFO, logger="bot.knowledge.retrieval")
    upgraded = knowledge_of(env, **settings)  # another process, after the upgrade: loads afresh
    assert search(upgraded, page) == before
    assert f"{older} chunks added by an older version had no int8 vectors: made and stored" in caplog.text
    assert stored_vectors(kb) == added  # stored for every process

    caplog.clear()
    again = knowledge_of(env, **settings)
    assert search(again, page) == before
    assert "no int8 vectors" not in caplog.text
    with again.database.read() as db:
        assert len(store.vectors(db, page, again.embedder.model)) == len(added)


def test_an_older_chunks_vector_of_nan_leaves_it_out_of_searches_by_meaning_not_the_others(env, backend, docs,
                                                                                           caplog):
    _, settings = backend
    kb = knowledge_of(env, **settings)
    kb.add([str(docs / name) for name in ("hours.md", "delivery.md", "faq.csv")])
    page = env["FB_PAGE_ID"]
    before = search(kb, page)
    broken = next(chunk_id for chunk_id, _ in before[1:])  # not the best hit
    width = len(stored_vectors(kb)[broken][1]) // 4
    with kb.database.write() as db:  # as code before embed() refused NaN could store it
        db.execute("UPDATE knowledge_chunks SET embedding_i8 = NULL, embedding = ? WHERE id = ?",
                   (to_bytes(array("f", [math.nan] * width)), broken))
    caplog.set_level(logging.INFO, logger="bot.knowledge.retrieval")
    hits = search(knowledge_of(env, **settings), page)
    assert hits[0] == before[0]
    assert all(similarity is not None for chunk_id, similarity in hits if chunk_id != broken)
    assert "1 chunks hold vectors that are not numbers" in caplog.text


def test_int8s_that_cannot_be_stored_are_used_and_made_again_at_the_next_load(env, docs, caplog, monkeypatch):
    kb = knowledge_of(env)
    kb.add([str(docs / name) for name in ("hours.md", "delivery.md", "faq.csv")])
    page = env["FB_PAGE_ID"]
    before = search(kb, page)
    with kb.database.write() as db:
        db.execute("UPDATE knowledge_chunks SET embedding_i8 = NULL")

    def locked(db, rows):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "put_int8", locked)
    caplog.set_level(logging.INFO, logger="bot.knowledge.retrieval")
    assert search(knowledge_of(env), page) == before
    assert "could not store the int8 vectors made (OperationalError): made again at the next load" in caplog.text
    assert all(int8 is None for int8, _ in stored_vectors(kb).values())

    monkeypatch.undo()
    caplog.clear()
    assert search(knowledge_of(env), page) == before
    assert "had no int8 vectors: made and stored" in caplog.text
    assert all(int8 is not None for int8, _ in stored_vectors(kb).values())


def test_on_postgresql_the_write_back_skips_a_row_another_transaction_holds_instead_of_waiting(env, pg_url, docs,
                                                                                               caplog):
    """A remove deletes its rows in its own order while a write-back takes them in id order: were
    the write-back to wait for a held row, the two could deadlock."""
    import psycopg

    kb = knowledge_of(env, DATABASE_URL=pg_url)
    kb.add([str(docs / name) for name in ("hours.md", "delivery.md", "faq.csv")])
    page = env["FB_PAGE_ID"]
    before = search(kb, page)
    with kb.database.write() as db:
        db.execute("UPDATE knowledge_chunks SET embedding_i8 = NULL")
    held = before[0][0]
    found = {}
    searching = threading.Thread(target=lambda: found.update(hits=search(knowledge_of(env, DATABASE_URL=pg_url), page)))
    with psycopg.connect(pg_url) as other:  # another transaction holds one row until it ends
        other.execute("SELECT id FROM knowledge_chunks WHERE id = %s FOR UPDATE", (held,))
        searching.start()
        searching.join(10)
        waited = searching.is_alive()
        stored = stored_vectors(kb)
    searching.join()  # the row is free once `other` has ended
    assert not waited, "the write-back waited for a row another transaction held"
    assert found["hits"] == before
    assert stored[held][0] is None and all(int8 is not None for key, (int8, _) in stored.items() if key != held)
