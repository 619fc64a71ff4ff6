"""The knowledge base in the bot: stored on both backends, searched by full text and embeddings,
its excerpts in the prompt, "I don't know" in `only` mode, sources cited, every excerpt logged -
and a knowledge base that fails, or is being filled, never costs a reply."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from werkzeug.wrappers import Request, Response

from bot.knowledge import open_knowledge, prompt
from bot.knowledge.retrieval import terms, uncommon
from config import load_config
from devtools.emulator import LocalServer, ModelStandIn
from tests.support import PSID, ROOT, answer_queue, post_signed, replay, text_body
from tests.support.processes import wait_until
from tests.support.webchat import WebchatProcess

HOURS = """# Opening hours

We are open Monday to Friday from 8:00 to 18:00, and on Saturdays from 9:00 to 14:00.

On Sundays and public holidays the shop is closed.
"""
DELIVERY = """# Delivery

We deliver within 5 km of the shop for 3 euros. Orders above 40 euros are delivered for free.
"""
FAQ = "question,answer\nDo you have gluten-free bread?,Yes: our buckwheat loaf is gluten-free and costs 6.50 euros.\n"
FAQ_HEADING = "Faq › Do you have gluten-free bread?"
UNKNOWN = "I'm sorry, I don't know that. I would rather not guess."


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "hours.md").write_text(HOURS)
    (folder / "delivery.md").write_text(DELIVERY)
    (folder / "faq.csv").write_text(FAQ)
    return folder


def knowledge_of(env, **settings):
    return open_knowledge(load_config({**env, **settings}, env_file=None))


def chat_requests(model) -> list[list[dict]]:
    return [r["json"]["messages"] for r in model.requests if "messages" in (r["json"] or {})]


def excerpts_in(messages: list[dict]) -> str | None:
    return next((m["content"] for m in messages if m["role"] == "system"
                 and m["content"].startswith("Excerpts from")), None)


def say(client, n: int, text: str) -> None:
    post_signed(client, text_body(f"m_kb_{n}", text, timestamp=int(time.time() * 1000) + n))
    answer_queue(client)


# -- the store, on both backends ---------------------------------------------------------------

def test_sources_are_per_page_replaced_whole_and_removed_whole(env, backend, docs):
    _, settings = backend
    kb = knowledge_of(env, **settings)
    other = knowledge_of(env, **settings)  # another process or host on the same store
    kb.add([str(docs / "hours.md")])  # every Page's
    kb.add([str(docs / "delivery.md")], page_id="2000000000000002")  # another Page's
    assert [h.title for h in other.search("open saturdays", env["FB_PAGE_ID"]).hits] == ["Opening hours"]
    assert not any(h.title == "Delivery" for h in other.search("deliver euros", env["FB_PAGE_ID"]).hits)
    assert any(h.title == "Delivery" for h in other.search("deliver euros", "2000000000000002").hits)

    (docs / "hours.md").write_text(HOURS.replace("18:00", "19:30"))
    [report] = kb.add([str(docs / "hours.md")])
    assert report.status == "updated"
    texts = [h.text for h in other.search("open monday friday", env["FB_PAGE_ID"]).hits]
    assert any("19:30" in t for t in texts) and not any("18:00" in t for t in texts)

    assert kb.remove(str(docs / "hours.md")).status == "removed"
    assert other.search("open monday friday", env["FB_PAGE_ID"]).hits == []
    assert [s.title for s in other.sources()] == ["Delivery"]


def test_two_adds_of_one_new_file_at_once_both_end_well(env, pg_url, docs, monkeypatch):
    """Two `add`s of the same new file at the same moment on PostgreSQL: both saw it absent, and
    the second INSERT failed on the unique key ("failed: UniqueViolation", exit status 1) though
    the source was in. Here the other add commits right after this one's look inside its write.
    (SQLite takes its write lock before that look: the two cannot meet there.)"""
    from bot.knowledge import store

    settings = {"DATABASE_URL": pg_url}
    kb, other = knowledge_of(env, **settings), knowledge_of(env, **settings)
    looked, real_put = store.find_source, store.put_source
    raced = []

    def find_source_before_the_other_commits(db, page_id, location):
        # The look inside this add's write: absent; the other add, all of it, lands just after.
        monkeypatch.setattr(store, "find_source", looked)
        monkeypatch.setattr(store, "put_source", real_put)
        raced.append(other.add_one(location))
        return None

    def put_source(db, *args, **kwargs):
        monkeypatch.setattr(store, "find_source", find_source_before_the_other_commits)
        return real_put(db, *args, **kwargs)
    monkeypatch.setattr(store, "put_source", put_source)
    [report] = kb.add([str(docs / "hours.md")])
    assert raced and raced[0].status == "added"
    assert report.status == "unchanged", report.reason
    assert len(kb.sources()) == 1


def true_word_counts(url: str) -> dict[str, int]:
    """PostgreSQL's knowledge_terms (its count of the chunks holding each word), checked against
    what counting the rows gives."""
    import psycopg

    with psycopg.connect(url) as conn:
        kept = dict(conn.execute("SELECT lexeme, chunks FROM knowledge_terms WHERE chunks <> 0").fetchall())
        real = dict(conn.execute("SELECT word, ndoc FROM ts_stat('SELECT tsv FROM knowledge_chunks')").fetchall())
    assert kept == real
    return kept


def test_postgresqls_word_counts_follow_every_add_update_and_remove(env, pg_url, docs):
    """knowledge_terms (PostgreSQL's count of the chunks holding each word, what makes a word
    common) is what counting the rows would give, after adds at once, an update and a remove."""
    for n in range(6):  # words shared by every file: the adds at once take the same rows
        (docs / f"more-{n}.md").write_text(f"# Extra {n}\n\nOpening hours and delivery, file {n}.\n")
    kbs = [knowledge_of(env, DATABASE_URL=pg_url) for _ in range(3)]
    threads = [threading.Thread(target=kb.add, args=([str(docs / f"more-{n}.md") for n in range(k, 6, 3)],))
               for k, kb in enumerate(kbs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kb = kbs[0]
    assert len(kb.sources()) == 6 and true_word_counts(pg_url)["deliveri"] == 6
    kb.add([str(docs / "hours.md"), str(docs / "delivery.md")])
    assert true_word_counts(pg_url)["deliveri"] == 7
    (docs / "delivery.md").write_text(DELIVERY.replace("deliver ", "bring orders "))
    [updated] = kb.add([str(docs / "delivery.md")])
    counts = true_word_counts(pg_url)
    assert updated.status == "updated" and counts["deliveri"] == 7 and counts["bring"] == 1
    assert kb.remove(str(docs / "delivery.md")).status == "removed"
    assert true_word_counts(pg_url)["deliveri"] == 6 and "bring" not in true_word_counts(pg_url)
    assert not any("bring" in hit.text for hit in kb.search("bring", env["FB_PAGE_ID"]).hits)


def test_the_word_counts_a_process_keeps_are_bounded_and_searches_stay_right_past_the_bound(env, backend, docs):
    """Counts are kept per knowledge version, which may not move for months: every word ever asked
    would stay in memory. Past the bound they start afresh, and the counts read again are right."""
    from bot.knowledge import store
    from bot.knowledge.retrieval import Retriever

    _, settings = backend
    kb = knowledge_of(env, **settings)
    kb.add([str(docs / "hours.md"), str(docs / "delivery.md")])
    retriever = Retriever(kb.database, None, counts_kept=8)
    for number in range(30):
        found = retriever.search(f"open on saturdays word{number} other{number} more{number}", "", 1)
        assert found.hits[0].source.endswith("hours.md")
        assert len(retriever._counts) <= 8
    with kb.database.read() as db:
        counts = retriever._counts_of(db, ["saturdays", "delivered", "nowhere"], store.version(db))
    assert (counts["saturdays"], counts["delivered"], counts["nowhere"]) == (1, 1, 0)


def full_text_titles(kb, page_id: str, *words: str) -> list[str]:
    """The titles of the chunks full text finds for `words` (any of them), best first."""
    from bot.knowledge import store

    with kb.database.read() as db:
        ids = store.full_text(db, words, page_id, 10)
        found = store.chunks(db, ids)
    return [found[chunk_id].heading for chunk_id in ids]


def test_both_backends_read_a_chunks_words_as_a_question_spells_them(env, backend, docs):
    """Accents off, and split at every punctuation mark: a question's words ("cafe", "50",
    "anasbakery", "gluten") find "Café", "3.50", a host, an address and "gluten-free" on both
    backends - PostgreSQL's own parser keeps all but the first whole, and the accent."""
    _, settings = backend
    (docs / "cafe.md").write_text("# Café Ana\n\nA flat white costs 3.50 at the counter.\n")
    (docs / "web.md").write_text("# Web shop\n\nOrder at shop.anasbakery.example or from orders@anasbakery.example.\n")
    kb = knowledge_of(env, **settings)
    kb.add([str(docs / "cafe.md"), str(docs / "web.md"), str(docs / "faq.csv")])
    page = env["FB_PAGE_ID"]
    assert full_text_titles(kb, page, "cafe") == ["Café Ana"]
    assert sorted(full_text_titles(kb, page, "50")) == ["Café Ana", FAQ_HEADING]  # "6.50" too
    assert full_text_titles(kb, page, "anasbakery") == ["Web shop"]
    assert full_text_titles(kb, page, "gluten") == [FAQ_HEADING]


def test_both_backends_rank_full_text_alike_by_bm25(env, pg_url, docs):
    """A rare word outweighs a common one said four times, and a short chunk outranks a long one
    holding the word as often: bm25 (PostgreSQL's ts_rank would rank both the other way), and
    the same order from SQLite and PostgreSQL for every question."""
    (docs / "long-rye.md").write_text("# Breads\n\nRye. " + "Our loaves are shaped by hand and baked at dawn. " * 12)
    for n in range(6):
        (docs / f"bun-{n}.md").write_text(f"# Bun {n}\n\nOur bun of the day, number {n}.\n")
    (docs / "basket.md").write_text("# Bun basket\n\nA bun, a bun and another bun for the table.\n")
    (docs / "lucia.md").write_text("# Lucia\n\nSaffron in December.\n")
    (docs / "short-rye.md").write_text("# Dark bread\n\nRye, every day.\n")
    page, questions = env["FB_PAGE_ID"], [("saffron", "bun"), ("rye",), ("bun", "day"), ("bread", "dawn", "rye")]
    orders = []
    for settings in ({}, {"DATABASE_URL": pg_url}):
        kb = knowledge_of(env, **settings)
        kb.add([str(docs / "long-rye.md")])  # the older chunk: first, were the two ranked alike
        kb.add([str(docs / name) for name in sorted(os.listdir(docs)) if name != "long-rye.md"])
        assert full_text_titles(kb, page, "saffron", "bun")[0] == "Lucia"
        assert full_text_titles(kb, page, "rye") == ["Dark bread", "Breads"]
        orders.append([full_text_titles(kb, page, *words) for words in questions])
    assert orders[0] == orders[1]


def test_past_its_budget_postgresql_matches_on_the_weighty_words_and_tries_the_fewest_rows_first():
    """Which matches PostgreSQL reads and ranks (store.narrowed): every one while the words'
    chunk counts fit VISIT_BUDGET; past it, not those of a word most chunks hold (bm25 weighs it
    ~0) nor of a word no chunk holds, and for words alike in weight the chunks holding two of
    them first, then the rarest word's within the budget, then all."""
    from bot.knowledge.store import VISIT_BUDGET, narrowed

    assert narrowed(["cake", "welcome"], {"cake": 600, "welcome": 80}, 20_000) == [("cake | welcome",) * 2]
    assert narrowed(["cake", "welcome"], {"cake": 12_000, "welcome": 800}, 20_000) == [("welcome",) * 2]
    assert narrowed(["until", "breakfast"], {"until": 0, "breakfast": 1_887}, 20_000) == [("breakfast",) * 2]
    alike = narrowed(["number", "phone", "cake"], {"number": 3_126, "phone": 3_019, "cake": 12_000}, 20_000)
    assert alike == [("(phone & number)", "number | phone"), ("phone", "number | phone"), ("number | phone",) * 2]
    three = narrowed(["a", "b", "c"], {"a": 900, "b": 700, "c": 90}, 20_000)
    assert three == [("(c & b) | (c & a) | (b & a)", "a | b | c"), ("c | b", "a | b | c"), ("a | b | c",) * 2]
    assert 900 + 700 + 90 > VISIT_BUDGET >= 700 + 90


def faq_of(rows: list[tuple[str, str]]) -> str:
    return "question,answer\n" + "".join(f"{question},{answer}\n" for question, answer in rows)


def test_past_its_budget_postgresql_still_ranks_full_text_as_sqlite_does(env, pg_url, docs):
    """1,100 chunks, all holding "cake": a question with "cake" matches more than VISIT_BUDGET
    rows, and PostgreSQL reads only those holding its weightier word - in SQLite's order. Two
    words that 520 chunks each hold, 100 of them both, likewise: the chunks holding both first."""
    rows = []
    for n in range(1_100):
        words = ["cake"] + ["breakfast"] * (1 + n // 20 % 3) * (n % 20 == 0)
        words += ["scone"] * (n < 520) + ["muffin"] * (420 <= n < 940) + ["plain"] * (n % 7)
        rows.append((f"Part {n}?", " ".join(words)))
    (docs / "parts.csv").write_text(faq_of(rows))
    page, questions = env["FB_PAGE_ID"], [("cake", "breakfast"), ("scone", "muffin"), ("breakfast",)]
    orders = []
    for settings in ({}, {"DATABASE_URL": pg_url}):
        kb = knowledge_of(env, **settings)
        kb.add([str(docs / "parts.csv")])
        orders.append([full_text_titles(kb, page, *words) for words in questions])
    part = lambda title: int(title.split()[-1][:-1])  # noqa: E731  "Parts › Part 427?"
    assert len(orders[1][0]) == 10 and all(part(title) % 20 == 0 for title in orders[1][0])  # breakfast
    assert len(orders[1][1]) == 10 and all(420 <= part(title) < 520 for title in orders[1][1])  # both
    assert orders[0] == orders[1]


def test_postgresqls_full_text_statements_are_planned_for_their_own_words_each_time(env, pg_url, docs):
    """None is kept prepared, so none keeps a plan for any words: one made while the knowledge
    base was small (read every chunk, fine for 200) read every chunk of it grown to 20,000, and
    the full-text step's p95 went from 10.7 ms to 41.6 (bench/knowledge.py, PostgreSQL, hit_at_3
    before latency). psycopg keeps a statement prepared after five runs on a connection."""
    from bot.knowledge import store

    kb = knowledge_of(env, DATABASE_URL=pg_url)
    kb.add([str(docs / "hours.md"), str(docs / "delivery.md")])
    with kb.database.read() as db:
        for _ in range(8):
            assert store.full_text(db, ["shop", "saturdays"], "", 10)
        kept = [row[0] for row in db.execute("SELECT statement FROM pg_prepared_statements").fetchall()]
    assert not [statement for statement in kept if "tsv @@" in statement or "ts_filter" in statement], kept


def test_postgresqls_bm25_never_fails_nor_loses_a_match_on_counts_out_of_step(env, pg_url, docs):
    """Stats a moment older than the word counts (fewer chunks than hold a word: no logarithm of
    a negative), or a word the counts lack, still rank every match."""
    import psycopg

    from bot.knowledge import store

    kb = knowledge_of(env, DATABASE_URL=pg_url)
    kb.add([str(docs / "hours.md"), str(docs / "delivery.md")])
    with kb.database.read() as db:
        assert len(store.full_text(db, ["shop"], "", 10, store.TextStats(1, 5.0))) == 2
    with psycopg.connect(pg_url) as conn:
        conn.execute("DELETE FROM knowledge_terms WHERE lexeme = 'shop'")
    with kb.database.read() as db:
        assert len(store.full_text(db, ["shop"], "", 10)) == 2


def added_by_older_code(url: str, schema: int, text: str, *more: str) -> None:
    """A PostgreSQL knowledge base at `schema`, with one source ("Café Ana": `text`) added as that
    version's code adds it (then the statements `more`)."""
    from bot.storage.postgres import PostgresDatabase
    from bot.storage.schema import POSTGRES_SCHEMA

    older = PostgresDatabase(url, POSTGRES_SCHEMA[:schema], max_size=1)
    with older.write() as db:
        db.execute("INSERT INTO knowledge_sources (id, page_id, location, title, url, kind, content_hash, chunks,"
                   " added_at) VALUES (1, '', '/docs/cafe.md', 'Café', NULL, 'markdown', 'h', 1, 0)")
        db.execute("INSERT INTO knowledge_chunks (source_id, page_id, position, heading, text)"
                   " VALUES (1, '', 0, 'Café Ana', ?)", (text,))
        for statement in more:
            db.execute(statement)
    older.close()


def test_postgresql_schema_20_reads_the_chunks_anew_and_counts_their_words_again(env, pg_url):
    """A knowledge base added before schema 20 is searchable the new way once a host migrates it:
    its chunks' words are read again and knowledge_terms counts those."""
    import psycopg

    added_by_older_code(pg_url, 19, "A flat white costs 3.50 at shop.anasbakery.example.",
                        "INSERT INTO knowledge_terms (lexeme, chunks)"
                        " SELECT word, ndoc FROM ts_stat('SELECT tsv FROM knowledge_chunks')")
    kb = knowledge_of(env, DATABASE_URL=pg_url)
    assert full_text_titles(kb, "", "cafe") == full_text_titles(kb, "", "anasbakery") == ["Café Ana"]
    kept = true_word_counts(pg_url)
    assert "cafe" in kept and "café" not in kept
    with psycopg.connect(pg_url) as conn:
        # "Café Ana A flat white costs 3 50 at shop anasbakery example"
        assert conn.execute("SELECT words FROM knowledge_chunks").fetchone()[0] == 12


def pending_index(url: str) -> tuple[int, int]:
    """(pages, entries) waiting in the full-text index's pending list, which every search reads
    through (pgstattuple's pgstatginindex, wherever the extension is installed)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        where = conn.execute("SELECT extnamespace::regnamespace::text FROM pg_extension"
                             " WHERE extname = 'pgstattuple'").fetchone()[0]
        return conn.execute(f"SELECT pending_pages, pending_tuples FROM {where}.pgstatginindex('knowledge_chunks_tsv')"
                            ).fetchone()


def test_postgresqls_full_text_index_keeps_its_pending_list_short_for_searches_to_read(env, pg_url, docs):
    """GIN's default parks added chunks' words in a pending list of up to 4 MB that every search
    reads, whole, until a vacuum: schema 21 folds the list in and bounds it at 64 kB (8 pages),
    so a search after a large add reads at most that much of it. (pgstattuple: as a superuser.)"""
    added_by_older_code(pg_url, 20, "A flat white costs 3.50.")
    assert pending_index(pg_url)[1] > 0  # what schema 21 finds
    kb = knowledge_of(env, DATABASE_URL=pg_url)
    assert pending_index(pg_url) == (0, 0)
    # ~12,000 words to index (the default list would hold them all: ~35 pages)
    letters = "abcdefghijklmnopqrstuvwxyz"
    word = lambda n: "".join(letters[n // 26 ** k % 26] for k in range(3))  # noqa: E731
    parts = (f"## Part {p}\n\n" + " ".join(word(p * 40 + i) for i in range(40)) + ".\n\n" for p in range(300))
    (docs / "glossary.md").write_text("".join(parts))
    kb.add([str(docs / "glossary.md"), str(docs / "hours.md")])
    assert pending_index(pg_url)[0] <= 8
    assert full_text_titles(kb, env["FB_PAGE_ID"], "saturdays") == ["Opening hours"]
    assert full_text_titles(kb, env["FB_PAGE_ID"], word(299 * 40)) == ["Glossary › Part 299"]


def lock_wait(url: str) -> bool:
    """Whether some session waits for a lock (the other write reached the row this one holds)."""
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0] > 0


@pytest.mark.parametrize("meanwhile", ["remove", "update"])
def test_a_remove_meeting_another_write_of_the_same_source_leaves_true_word_counts(env, pg_url, docs, monkeypatch,
                                                                                   meanwhile):
    """A remove (or an update) of a source paused just after it counted its words, while a second
    remove of the same source runs: the second had counted the same words away again (negative
    counts), or deadlocked with the update."""
    import psycopg
    from bot.knowledge import store

    kb, other = knowledge_of(env, DATABASE_URL=pg_url), knowledge_of(env, DATABASE_URL=pg_url)
    kb.add([str(docs / "hours.md"), str(docs / "delivery.md")])
    real, others, statuses = store._count_words, [], []

    def count_then_let_the_other_remove(db, source_id, up_to):
        real(db, source_id, up_to)
        monkeypatch.setattr(store, "_count_words", real)
        thread = threading.Thread(target=lambda: statuses.append(other.remove(str(docs / "delivery.md")).status))
        thread.start()
        others.append(thread)
        assert wait_until(lambda: lock_wait(pg_url) or not thread.is_alive(), 10)
    monkeypatch.setattr(store, "_count_words", count_then_let_the_other_remove)
    if meanwhile == "remove":
        assert kb.remove(str(docs / "delivery.md")).status == "removed"
    else:
        (docs / "delivery.md").write_text(DELIVERY.replace("5 km", "5 miles"))
        assert kb.add([str(docs / "delivery.md")])[0].status == "updated"
    others[0].join(10)
    assert statuses == ["removed"]
    true_word_counts(pg_url)
    with psycopg.connect(pg_url) as conn:
        orphans = conn.execute("SELECT COUNT(*) FROM knowledge_chunks c WHERE NOT EXISTS"
                               " (SELECT 1 FROM knowledge_sources s WHERE s.id = c.source_id)").fetchone()[0]
    assert orphans == 0
    assert [s.title for s in kb.sources()] == ["Opening hours"]


def test_remove_by_path_takes_the_copy_of_the_page_it_names(env, backend, docs):
    """The same file added for every Page and for one Page: `remove PATH --page P` had removed the
    every-Page copy (listed first)."""
    _, settings = backend
    kb = knowledge_of(env, **settings)
    page, other = "2000000000000002", "3000000000000003"
    kb.add([str(docs / "hours.md")])
    kb.add([str(docs / "hours.md")], page_id=page)
    refused = kb.remove(str(docs / "hours.md"), page_id=other)
    assert refused.status == "failed" and f"not a source of Page {other}" in refused.reason
    [own] = [s for s in kb.sources() if s.page_id == page]
    refused = kb.remove(str(own.id), page_id=other)  # by id: still only a source the named Page has
    assert refused.status == "failed" and f"is Page {page}'s, not Page {other}'s" in refused.reason
    assert kb.remove(str(docs / "hours.md"), page_id=page).status == "removed"
    assert [s.page_id for s in kb.sources()] == [""]  # every Page's copy stays
    kb.add([str(docs / "hours.md")], page_id=page)
    assert kb.remove(str(docs / "hours.md")).status == "removed"  # without --page: every Page's
    assert [s.page_id for s in kb.sources()] == [page]


def test_a_source_whose_embeddings_fail_is_not_added_and_its_old_version_stays(env, backend, docs):
    _, settings = backend
    knowledge_of(env, **settings).add([str(docs / "hours.md")])
    failing = Failing().start()
    try:
        (docs / "hours.md").write_text(HOURS.replace("18:00", "19:30"))
        kb = knowledge_of(env, OPENAI_BASE_URL=failing.url + "/v1", **settings)
        [report] = kb.add([str(docs / "hours.md")])
    finally:
        failing.stop()
    assert report.status == "failed" and "the model server failed the embeddings (HTTP 500" in report.reason
    hits = knowledge_of(env, **settings).search("open monday friday", env["FB_PAGE_ID"]).hits
    assert "18:00" in hits[0].text  # the old version, whole


@pytest.mark.parametrize("vector", [[], [float("nan"), 1.0], [float("inf"), 1.0]], ids=["empty", "nan", "infinity"])
def test_a_server_giving_vectors_that_are_no_vectors_adds_nothing_and_breaks_no_search(env, backend, docs, vector):
    """Empty or NaN embeddings had been stored: every later search then failed with a TypeError
    (a reply lost more than its excerpts), or ranked by NaN."""
    _, settings = backend
    knowledge_of(env, **settings).add([str(docs / "hours.md")])
    odd = Vectors(vector).start()
    try:
        kb = knowledge_of(env, OPENAI_BASE_URL=odd.url + "/v1", **settings)
        [report] = kb.add([str(docs / "delivery.md")])
        assert report.status == "failed" and "the server's embeddings" in report.reason, report.reason
        # The question's vector is refused too: full text answers it.
        assert "18:00" in kb.search("open monday friday", env["FB_PAGE_ID"]).hits[0].text
    finally:
        odd.stop()
    assert [s.title for s in knowledge_of(env, **settings).sources()] == ["Opening hours"]
    assert "18:00" in knowledge_of(env, **settings).search("open monday friday", env["FB_PAGE_ID"]).hits[0].text


class Vectors(LocalServer):
    """A model server whose every embedding is `vector`."""

    def __init__(self, vector):
        super().__init__()
        self.vector = vector

    def handle(self, request: Request) -> Response:
        texts = request.get_json()["input"]
        texts = [texts] if isinstance(texts, str) else texts
        data = [{"object": "embedding", "index": i, "embedding": self.vector} for i in range(len(texts))]
        return Response(json.dumps({"object": "list", "data": data, "model": "m",
                                    "usage": {"prompt_tokens": 1, "total_tokens": 1}}), content_type="application/json")


class Failing(LocalServer):
    def handle(self, request: Request) -> Response:
        return Response(json.dumps({"error": {"message": "overloaded"}}), status=500, content_type="application/json")


# -- retrieval -----------------------------------------------------------------------------------

def test_a_follow_up_question_searches_with_the_message_before():
    assert prompt.question(["and on Sundays?"], ["What are your opening hours?", "hi"]) == \
        "What are your opening hours? and on Sundays?"
    long = "Do you deliver to the other side of the river near the station?"
    assert prompt.question([long], ["What are your opening hours?"]) == long


def test_question_words_leave_out_what_matches_every_chunk():
    assert terms("What are your opening hours on Sundays, please?") == ["opening", "hours", "sundays"]
    assert terms("¿Abrís el domingo?") == ["abris", "domingo"]


def test_one_word_in_common_is_not_enough_unless_the_heading_names_it(env, docs):
    (docs / "team.md").write_text("# Our team\n\nEvery cake box carries the name of the baker who made it.\n")
    model = ModelStandIn(embeddings=False).start()  # by words alone
    try:
        kb = knowledge_of(env, OPENAI_BASE_URL=model.base_url)
        kb.add([str(docs / "team.md"), str(docs / "delivery.md")])
        assert [h.relevant for h in kb.search("What is my name?", env["FB_PAGE_ID"]).hits] == [False]
        assert [(h.title, h.relevant) for h in kb.search("delivery?", env["FB_PAGE_ID"]).hits] == [("Delivery", True)]
    finally:
        model.stop()


def test_a_button_tap_searches_nothing(client, env, model, docs):
    knowledge_of(env).add([str(docs / "hours.md")])
    before = len(model.requests)
    replay(client, "postback")  # "Get Started"
    assert [r for r in model.requests[before:] if "input" in (r["json"] or {})] == []
    assert excerpts_in(chat_requests(model)[-1]) is None


def test_words_most_chunks_hold_are_left_out_of_the_full_text_query_but_the_two_rarest_stay_if_they_weigh():
    counts = {"bakery": 900, "open": 400, "sourdough": 12, "class": 30, "nowhere": 0}
    assert uncommon(["bakery", "open", "sourdough", "class"], counts, 1000) == ["sourdough", "class"]
    assert uncommon(["bakery", "open", "class"], counts, 1000) == ["open", "class"]  # the two rarest stay
    assert uncommon(["bakery", "open", "sourdough"], {**counts, "open": 40, "bakery": 60}, 100) == [
        "open", "sourdough"]  # 50 at least
    # ... but not one that half the chunks hold, which bm25 weighs at ~0, beside a rarer word held
    assert uncommon(["bakery", "class"], counts, 1000) == ["class"]
    assert uncommon(["open", "bakery"], counts, 1000) == ["open"]
    assert uncommon(["open", "bakery"], counts, 2000) == ["open", "bakery"]  # under half of 2,000
    assert uncommon(["nowhere", "bakery"], counts, 1000) == ["nowhere", "bakery"]
    assert uncommon(["bakery"], counts, 1000) == ["bakery"]


def test_embeddings_and_full_text_both_rank(env, docs):
    kb = knowledge_of(env)
    kb.add([str(docs / name) for name in ("hours.md", "delivery.md", "faq.csv")])
    found = kb.search("gluten-free loaf", env["FB_PAGE_ID"], top_k=3)
    assert found.hits[0].title == "Faq" and found.hits[0].relevant
    assert found.hits[0].similarity is not None and found.embedding_tokens > 0  # the emulator's /embeddings


def test_without_an_embeddings_endpoint_it_searches_full_text_and_says_so_once(make_client, env, docs, caplog):
    model = ModelStandIn(embeddings=False).start()
    try:
        settings = {"OPENAI_BASE_URL": model.base_url}
        [added] = knowledge_of(env, **settings).add([str(docs / "hours.md")])
        assert added.status == "added"
        client = make_client(**settings)
        with caplog.at_level("WARNING"):
            say(client, 1, "When are you open on Saturdays?")
            say(client, 2, "Are you open on Sundays?")
        [excerpts, _] = [excerpts_in(m) for m in chat_requests(model)]
    finally:
        model.stop()
    assert "9:00 to 14:00" in excerpts
    assert sum("searches full text only" in r.getMessage() for r in caplog.records) == 1


# -- in a reply ----------------------------------------------------------------------------------

def test_the_prompt_carries_the_relevant_excerpts_with_their_sources(make_client, env, model, graph, docs, backend):
    _, settings = backend
    knowledge_of(env, **settings).add([str(docs / name) for name in ("hours.md", "delivery.md", "faq.csv")])
    client = make_client(FB_PAGE_NAME="Ana's Bakery", SYSTEM_PROMPT="You answer for Ana's Bakery.", **settings)
    say(client, 1, "Do you have gluten-free bread?")
    [messages] = chat_requests(model)
    assert messages[0] == {"role": "system", "content": "You answer for Ana's Bakery."}
    excerpts = messages[1]["content"]
    assert excerpts.startswith("Excerpts from Ana's Bakery's own documents, most relevant first.")
    assert "[1] Faq (faq.csv)\nQ: Do you have gluten-free bread?\nA: Yes: our buckwheat loaf" in excerpts
    assert "Delivery" not in excerpts  # shares no meaning, below the bar: not sent
    assert messages[-1]["role"] == "user" and messages[-1]["content"].endswith("Do you have gluten-free bread?")
    [record] = client.application.extensions["dispatcher"].store.conversations.export()
    used = json.loads(record["knowledge"])
    assert [chunk_id for chunk_id, _ in used] == [
        knowledge_of(env, **settings).search("gluten", env["FB_PAGE_ID"]).hits[0].chunk_id]


def test_a_follow_up_gets_the_excerpts_of_the_question_before(make_client, env, model, docs):
    knowledge_of(env).add([str(docs / name) for name in ("hours.md", "delivery.md")])
    client = make_client()
    say(client, 1, "What are your opening hours?")
    say(client, 2, "and on Sundays?")
    assert "On Sundays and public holidays the shop is closed." in excerpts_in(chat_requests(model)[-1])


def test_only_mode_says_it_does_not_know_without_asking_the_model_and_offers_a_person(make_client, env, model,
                                                                                      graph, docs):
    knowledge_of(env).add([str(docs / "hours.md")])
    client = make_client(KNOWLEDGE_MODE="only", HANDOFF_BUTTON="Talk to a person")
    say(client, 1, "What is the capital of Australia?")
    assert chat_requests(model) == []
    assert graph.sent_texts(PSID) == [UNKNOWN]
    [send] = [c.body for c in graph.calls if c.path.endswith("me/messages") and "message" in (c.body or {})]
    assert send["message"]["quick_replies"][0]["title"] == "Talk to a person"
    [record] = client.application.extensions["dispatcher"].store.conversations.export()
    assert record["outcome"] == "unknown"
    say(client, 2, "Are you open on Saturdays?")  # this one it knows
    assert len(chat_requests(model)) == 1


def test_prefer_mode_answers_without_excerpts_when_none_is_relevant(make_client, env, model, docs):
    knowledge_of(env).add([str(docs / "hours.md")])
    client = make_client()
    say(client, 1, "What is the capital of Australia?")
    [messages] = chat_requests(model)
    assert excerpts_in(messages) is None


def test_a_cited_answer_names_its_source_and_its_url(make_client, env, model, graph, docs):
    site = Page().start()
    try:
        knowledge_of(env).add([site.url + "/delivery"])
    finally:
        site.stop()
    client = make_client(KNOWLEDGE_CITE="on")
    say(client, 1, "How much does delivery cost?")
    assert graph.sent_texts(PSID) == [f"Hello from the model.\n\nSource: Delivery prices \u2013 {site.url}/delivery"]


class Page(LocalServer):
    def handle(self, request: Request) -> Response:
        return Response("<html><head><title>Delivery prices</title></head><body><article><h1>Delivery prices</h1>"
                        "<p>Delivery costs 3 euros within 5 km of the shop; above 40 euros it is free.</p>"
                        "</article></body></html>", content_type="text/html")


def test_embedding_tokens_count_toward_the_users_tokens(make_client, env, model, docs):
    knowledge_of(env).add([str(docs / "hours.md")])
    with_knowledge, without = make_client(), make_client(KNOWLEDGE_MODE="off")
    post_signed(with_knowledge, text_body("m_kb_1", "When are you open on Saturdays?", psid="1111"))
    answer_queue(with_knowledge)
    post_signed(without, text_body("m_kb_2", "When are you open on Saturdays?", psid="2222"))
    answer_queue(without)
    records = {r["psid"]: r for r in without.application.extensions["dispatcher"].store.conversations.export()}
    assert records["1111"]["total_tokens"] > records["2222"]["total_tokens"]  # the question's embedding


def test_knowledge_off_never_searches(make_client, env, model, docs):
    knowledge_of(env).add([str(docs / "hours.md")])
    before = len(model.requests)
    client = make_client(KNOWLEDGE_MODE="off")
    say(client, 1, "When are you open on Saturdays?")
    assert excerpts_in(chat_requests(model)[-1]) is None
    assert [r for r in model.requests[before:] if "input" in (r["json"] or {})] == []


def test_a_broken_knowledge_base_costs_the_reply_nothing(make_client, env, model, graph, docs, caplog):
    knowledge_of(env).add([str(docs / "hours.md")])
    with sqlite3.connect(os.path.join(env["DATA_DIR"], "bot.sqlite3")) as db:
        db.execute("DROP TABLE knowledge_fts")  # the full-text index lost
    client, without = make_client(), make_client(KNOWLEDGE_MODE="off")
    embeddings_before = embedding_requests(model)
    with caplog.at_level("WARNING"):
        post_signed(client, text_body("m_kb_broken", "When are you open on Saturdays?", psid="1111"))
        answer_queue(client)
    assert graph.sent_texts("1111") == ["Hello from the model."]
    assert any("could not search the knowledge base" in r.getMessage() for r in caplog.records)
    assert embedding_requests(model) > embeddings_before  # the question was embedded before the search failed...
    post_signed(without, text_body("m_kb_without", "When are you open on Saturdays?", psid="2222"))
    answer_queue(without)
    records = {r["psid"]: r for r in without.application.extensions["dispatcher"].store.conversations.export()}
    assert records["1111"]["total_tokens"] > records["2222"]["total_tokens"]  # ...and its tokens count all the same
    searched = subprocess.run([sys.executable, "-m", "bot", "knowledge", "search", "saturday"], cwd=ROOT,
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert searched.returncode == 1
    assert "could not search the knowledge base: OperationalError: no such table" in searched.stderr


def embedding_requests(model) -> int:
    return sum(1 for r in model.requests if "input" in (r["json"] or {}))


class SlowEmbeddings(LocalServer):
    """An embeddings server that takes its time: an ingest waits on it, the bot must not."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.called = threading.Event()

    def handle(self, request: Request) -> Response:
        self.called.set()
        time.sleep(self.delay)
        inputs = request.get_json()["input"]
        inputs = [inputs] if isinstance(inputs, str) else inputs
        return Response(json.dumps({"object": "list", "model": "m", "usage": {"prompt_tokens": 1, "total_tokens": 1},
                                    "data": [{"object": "embedding", "index": i, "embedding": [1.0, 0.0]}
                                             for i in range(len(inputs))]}), content_type="application/json")


def test_an_ingest_in_its_own_process_never_holds_up_the_bot(make_client, env, model, graph, docs):
    slow = SlowEmbeddings(delay=2.5).start()
    try:
        ingest = subprocess.Popen(
            [sys.executable, "-m", "bot", "knowledge", "sync", str(docs)], cwd=ROOT, text=True,
            env={**os.environ, **env, "OPENAI_BASE_URL": slow.url + "/v1", "OPENAI_TIMEOUT": "10"}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        assert slow.called.wait(20), "the ingest reached the embeddings server"
        client = make_client(KNOWLEDGE_MODE="off")
        started = time.monotonic()
        say(client, 1, "hello")  # acknowledged, stored and answered while the ingest waits
        took = time.monotonic() - started
        out, err = ingest.communicate(timeout=60)
    finally:
        slow.stop()
    assert graph.sent_texts(PSID) == ["Hello from the model."]
    assert took < 1.5, f"the reply waited {took:.1f} s on the ingest"
    assert ingest.returncode == 0, err
    assert "3 of 3 source(s)" in out


def test_the_website_chat_answers_from_the_same_knowledge(graph, model, tmp_path, docs):
    web = WebchatProcess(graph, model, tmp_path)
    try:
        knowledge_of(web.env).add([str(docs / "faq.csv")])
        response = web.chat("Do you have gluten-free bread?")
        assert response.status_code == 200, response.text
        assert "buckwheat loaf" in excerpts_in(chat_requests(model)[-1])
        [record] = list(web.store().conversations.export(channel="web"))
    finally:
        web.stop()
    assert json.loads(record["knowledge"])
