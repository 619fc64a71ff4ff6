"""The knowledge base's SQL, both backends: sources, their chunks, the full-text index, the
version every change bumps. Full-text search is the one statement that differs: SQLite's FTS5
ranks by bm25; PostgreSQL ranks the matches by bm25 too (the same formula and constants, over the
same words - bot/storage/schema.py's SEARCH_TEXT), so the two backends answer alike; past
VISIT_BUDGET matches it reads the likeliest first (narrowed). Both stem English.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Iterable, Mapping, Sequence

from bot.knowledge.chunking import Chunk

EVERY_PAGE = ""  # a source added without --page: every Page's


@dataclass(frozen=True)
class Source:
    id: int
    page_id: str
    location: str
    title: str
    url: str | None
    kind: str
    content_hash: str
    embedding_model: str | None
    chunks: int
    added_at: float


@dataclass(frozen=True)
class StoredChunk:
    id: int
    source_id: int
    location: str
    title: str
    url: str | None
    heading: str
    text: str
    embedding: bytes | None = None  # float32s, as stored (chunks(..., embeddings=True))


SOURCE_COLUMNS = "id, page_id, location, title, url, kind, content_hash, embedding_model, chunks, added_at"


def version(db) -> int:
    return db.execute("SELECT version FROM knowledge_version WHERE id = 1").fetchone()[0]


def _bump(db) -> None:
    db.execute("UPDATE knowledge_version SET version = version + 1 WHERE id = 1")


def find_source(db, page_id: str, location: str) -> Source | None:
    row = db.execute(f"SELECT {SOURCE_COLUMNS} FROM knowledge_sources WHERE page_id = ? AND location = ?",
                     (page_id, location)).fetchone()
    return Source(*row) if row else None


def sources(db, page_id: str | None = None) -> list[Source]:
    """Every source (one Page's and every Page's with `page_id`), oldest first."""
    where, params = (" WHERE page_id IN (?, ?)", (page_id, EVERY_PAGE)) if page_id else ("", ())
    return [Source(*row) for row in db.execute(
        f"SELECT {SOURCE_COLUMNS} FROM knowledge_sources{where} ORDER BY id", params).fetchall()]


def put_source(db, page_id: str, title: str, location: str, url: str | None, kind: str, content_hash: str,
               chunks: Sequence[Chunk], vectors: Sequence[tuple[bytes, bytes] | None], embedding_model: str | None,
               now: float) -> int:
    """The source with these chunks, replacing what it had: the caller's one transaction.
    `vectors`: each chunk's embedding as float32s and as int8s (embeddings.py), or None."""
    old = find_source(db, page_id, location)
    if old and db.execute("UPDATE knowledge_sources SET title = ?, url = ?, kind = ?, content_hash = ?,"
                          " embedding_model = ?, chunks = ?, added_at = ? WHERE id = ?",
                          (title, url, kind, content_hash, embedding_model, len(chunks), now, old.id)).rowcount:
        source_id = old.id
    else:  # new, or removed since it was looked up (the update waited for that remove's commit)
        source_id = db.execute(
            "INSERT INTO knowledge_sources (page_id, location, title, url, kind, content_hash, embedding_model, chunks,"
            " added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (page_id, location, title, url, kind, content_hash, embedding_model, len(chunks), now)).fetchone()[0]
    replaced_up_to = db.execute("SELECT COALESCE(MAX(id), 0) FROM knowledge_chunks WHERE source_id = ?",
                                (source_id,)).fetchone()[0]  # the old chunks: these ids and below
    for chunk, vector in zip(chunks, vectors):
        chunk_id = db.execute(
            "INSERT INTO knowledge_chunks (source_id, page_id, position, heading, text, embedding, embedding_i8,"
            " embedding_model) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (source_id, page_id, chunk.position, chunk.heading, chunk.text, *(vector or (None, None)),
             embedding_model if vector is not None else None)).fetchone()[0]
        if _is_sqlite(db):  # PostgreSQL's index is a generated column
            db.execute("INSERT INTO knowledge_fts (rowid, heading, text) VALUES (?, ?, ?)",
                       (chunk_id, chunk.heading, chunk.text))
    _count_words(db, source_id, replaced_up_to)
    if replaced_up_to:
        _delete_chunks(db, source_id, replaced_up_to)
    _bump(db)
    return source_id


def remove_source(db, source_id: int) -> bool:
    # The source's row first, as an update takes it: a remove and an add (or another remove) of
    # the same source wait for each other instead of each counting its words away.
    if not db.execute("SELECT id FROM knowledge_sources WHERE id = ?" + ("" if _is_sqlite(db) else " FOR UPDATE"),
                      (source_id,)).fetchone():
        return False
    _count_words(db, source_id, ALL_CHUNKS)
    _delete_chunks(db, source_id, ALL_CHUNKS)
    db.execute("DELETE FROM knowledge_sources WHERE id = ?", (source_id,))
    _bump(db)
    return True


ALL_CHUNKS = 2**62  # as `up_to`: every chunk of the source


def _delete_chunks(db, source_id: int, up_to: int) -> None:
    if _is_sqlite(db):
        db.execute("INSERT INTO knowledge_fts (knowledge_fts, rowid, heading, text)"
                   " SELECT 'delete', id, heading, text FROM knowledge_chunks WHERE source_id = ? AND id <= ?",
                   (source_id, up_to))
    db.execute("DELETE FROM knowledge_chunks WHERE source_id = ? AND id <= ?", (source_id, up_to))


def _count_words(db, source_id: int, old_up_to: int) -> None:
    """PostgreSQL: knowledge_terms gains the source's new chunks (ids past `old_up_to`) and loses
    its old ones, in one statement that takes the words' rows in order - so two adds at once
    never wait for each other in a circle (the caller holds the source's row)."""
    if _is_sqlite(db):
        return
    db.execute("INSERT INTO knowledge_terms (lexeme, chunks)"
               " SELECT lexeme, SUM(CASE WHEN id > ? THEN 1 ELSE -1 END) FROM knowledge_chunks, unnest(tsv)"
               " WHERE source_id = ? GROUP BY lexeme HAVING SUM(CASE WHEN id > ? THEN 1 ELSE -1 END) <> 0"
               " ORDER BY lexeme ON CONFLICT (lexeme) DO UPDATE SET chunks = knowledge_terms.chunks + excluded.chunks",
               (old_up_to, source_id, old_up_to))


@dataclass(frozen=True)
class TextStats:
    """What bm25 needs of all chunks (every Page's): how many, and their mean length in words
    (None on SQLite, whose FTS5 keeps its own)."""

    chunks: int
    mean_words: float | None


def text_stats(db) -> TextStats:
    if _is_sqlite(db):
        return TextStats(chunk_count(db), None)
    chunks, mean = db.execute("SELECT COUNT(*), AVG(words) FROM knowledge_chunks").fetchone()
    return TextStats(chunks, float(mean or 0.0))


# FTS5's bm25() constants. PostgreSQL has no bm25: it scores the RERANKED matches ts_rank ranks
# best (a common word matches thousands, and scoring one takes ~15 µs: at 200, p95 +2 ms at
# 20,000 chunks; a hundred ranked the example questions as well).
BM25_K1, BM25_B = 1.2, 0.75
RERANKED = 100
# PostgreSQL reads and ranks every match (~2-3 µs each on a 2-core machine, where FTS5 reads
# its index): past this many, by the words' chunk counts, it looks at fewer (narrowed, below).
VISIT_BUDGET = 1_000
# The commonest words only add to the candidates' scores (neither match nor rank) while the most
# bm25 can give a chunk for them together, idf x (k1 + 1) each, stays within this share of what
# the next word gives a chunk of average length holding it once (its idf).
ESSENTIAL_SHARE = 0.5
PAIRED = 6  # the rarest words whose pairs are tried first


def full_text(db, terms: Sequence[str], page_id: str, limit: int, stats: TextStats | None = None,
              counts_of: Callable[[Sequence[str]], Mapping[str, int]] | None = None) -> list[int]:
    """Chunk ids matching any of `terms` (plain words), best first; `stats`: text_stats(db), if
    known; `counts_of`: term_counts, or a cache of it (PostgreSQL reads it)."""
    if not terms:
        return []
    if _is_sqlite(db):
        match = " OR ".join(f'"{term}"' for term in terms)
        rows = db.execute(
            "SELECT f.rowid FROM knowledge_fts f JOIN knowledge_chunks c ON c.id = f.rowid"
            " WHERE knowledge_fts MATCH ? AND c.page_id IN (?, ?) ORDER BY f.rank LIMIT ?",
            (match, page_id, EVERY_PAGE, limit))
        return [row[0] for row in rows.fetchall()]
    stats = stats or text_stats(db)
    counts = (counts_of or (lambda words: term_counts(db, words)))(terms)
    matches = []
    for matched, ranked_by in narrowed(terms, counts, stats.chunks):
        matches = [row[0] for row in db.execute(
            "SELECT id FROM knowledge_chunks, to_tsquery('english', ?) matched, to_tsquery('english', ?) ranked_by"
            " WHERE tsv @@ matched AND page_id IN (?, ?) ORDER BY ts_rank(tsv, ranked_by) DESC, id LIMIT ?",
            (matched, ranked_by, page_id, EVERY_PAGE, RERANKED), prepare=False).fetchall()]
        if len(matches) == RERANKED:  # enough candidates (the last try takes what there is)
            break
    return _by_bm25(db, terms, matches, stats)[:limit] if matches else []


def narrowed(terms: Sequence[str], counts: Mapping[str, int], chunks: int) -> list[tuple[str, str]]:
    """PostgreSQL: the (match, rank by) tsqueries full_text tries in turn for `terms`, given how
    many of the `chunks` hold each, until one finds RERANKED chunks (the last: whatever it finds).
    While all the words' matches fit VISIT_BUDGET, one try: every match ranked, in SQLite's order.
    Past it, MaxScore's idea: the commonest words, while their weight together stays under
    ESSENTIAL_SHARE of the next one's (a word most chunks hold weighs ~0), neither match nor rank
    - bm25 still counts them in the candidates' order. When the rest still match too many, first
    the chunks holding two of their PAIRED rarest (the best by bm25, as a rule), then those
    holding the rarest within the budget, and only then all of them."""
    everything = " | ".join(terms)
    held = [term for term in terms if counts.get(term, 0) > 0]
    if sum(counts[term] for term in held) <= VISIT_BUDGET:
        return [(everything, everything)]
    weight = {term: max(math.log((max(chunks - counts[term], 0) + 0.5) / (counts[term] + 0.5)), 1e-6)
              for term in held}
    essential = sorted(held, key=lambda term: (weight[term], term))  # commonest first
    dropped = 0.0
    while len(essential) > 1 and dropped + weight[essential[0]] * (BM25_K1 + 1) <= ESSENTIAL_SHARE * weight[essential[1]]:
        dropped += weight[essential.pop(0)] * (BM25_K1 + 1)
    rest = " | ".join(term for term in terms if term in essential)
    tries = [(rest, rest)]
    if len(essential) > 1 and sum(counts[term] for term in essential) > VISIT_BUDGET:
        rarest = essential[::-1]
        within, visited = rarest[:1], counts[rarest[0]]
        for term in rarest[1:]:
            visited += counts[term]
            if visited > VISIT_BUDGET:
                break
            within.append(term)
        if len(within) < len(essential):
            tries.insert(0, (" | ".join(within), rest))
        tries.insert(0, (" | ".join(f"({a} & {b})" for a, b in combinations(rarest[:PAIRED], 2)), rest))
    return tries


def _by_bm25(db, terms: Sequence[str], ids: list[int], stats: TextStats) -> list[int]:
    """PostgreSQL: chunks `ids` ordered as FTS5's bm25 orders them. Per word of the question
    (twice if two of its words stem alike): idf = ln((N - n + 0.5) / (n + 0.5)), at least 1e-6,
    times tf (k1 + 1) / (tf + k1 (1 - b + b len / mean len)). N - n is kept from going below 0
    (`stats` may be a moment older than the counts), and a word knowledge_terms lacks counts as
    held by none, so no match is lost. A chunk's own positions of the question's words are picked
    out before they are read (setweight marks them, ts_filter keeps them: its other words are
    never unnested; the chunks' words carry no weight of their own)."""
    words = " ".join(terms)
    return [row[0] for row in db.execute(
        "WITH asked AS (SELECT w.lexeme, cardinality(w.positions) * GREATEST(ln("
        "   (GREATEST(? - COALESCE(t.chunks, 0), 0) + 0.5) / (COALESCE(t.chunks, 0) + 0.5)), 1e-6) AS idf"
        "   FROM unnest(to_tsvector('english', ?)) w LEFT JOIN knowledge_terms t ON t.lexeme = w.lexeme)"
        " SELECT c.id FROM knowledge_chunks c"
        " CROSS JOIN LATERAL unnest(ts_filter(setweight(c.tsv, 'A', tsvector_to_array(to_tsvector('english', ?))),"
        "   '{a}')) held JOIN asked a ON a.lexeme = held.lexeme"
        " WHERE c.id = ANY(?) GROUP BY c.id, c.words"
        " ORDER BY SUM(a.idf * cardinality(held.positions) * ?"
        "   / (cardinality(held.positions) + ? * (? + ? * c.words / ?))) DESC, c.id",
        (float(stats.chunks), words, words, ids, BM25_K1 + 1, BM25_K1, 1 - BM25_B, BM25_B,
         max(stats.mean_words or 0.0, 1.0)), prepare=False).fetchall()]


def term_counts(db, terms: Sequence[str]) -> dict[str, int]:
    """How many chunks (of every Page) hold each word: what makes a word common here."""
    if _is_sqlite(db):
        sql = "SELECT COUNT(*) FROM knowledge_fts WHERE knowledge_fts MATCH ?"
        return {term: db.execute(sql, (f'"{term}"',)).fetchone()[0] for term in terms}
    # PostgreSQL: kept in knowledge_terms by lexeme (a word with none, one of its stop words: 0).
    rows = db.execute("SELECT word, COALESCE((SELECT chunks FROM knowledge_terms"
                      " WHERE lexeme = (tsvector_to_array(to_tsvector('english', word)))[1]), 0)"
                      " FROM unnest(?::text[]) AS word", (list(terms),)).fetchall()
    return {word: count for word, count in rows}


def chunk_count(db) -> int:
    return db.execute("SELECT COUNT(*) FROM knowledge_chunks").fetchone()[0]


def vectors(db, page_id: str, model: str) -> list[tuple[int, bytes | None, bytes | None]]:
    """(chunk id, embedding as int8s, None) of one Page's chunks embedded with `model`; for a
    chunk older code added, without its int8s: (chunk id, None, embedding as float32s)."""
    return [(row[0], row[1] and bytes(row[1]), row[2] and bytes(row[2])) for row in db.execute(
        "SELECT id, embedding_i8, CASE WHEN embedding_i8 IS NULL THEN embedding END FROM knowledge_chunks"
        " WHERE page_id IN (?, ?) AND embedding_model = ? AND embedding IS NOT NULL ORDER BY id",
        (page_id, EVERY_PAGE, model)).fetchall()]


def put_int8(db, rows: Sequence[tuple[int, bytes]]) -> None:
    """The int8s of chunks that older code added without them (not a change: no version bump).
    On PostgreSQL a row another transaction holds (a remove deleting it, in its own order) is
    skipped, never waited for: this write takes part in no deadlock, and the next load makes what
    it skipped again."""
    skip_locked = "" if _is_sqlite(db) else " FOR UPDATE SKIP LOCKED"
    db.executemany("UPDATE knowledge_chunks SET embedding_i8 = ? WHERE id = (SELECT id FROM knowledge_chunks"
                   f" WHERE id = ? AND embedding_i8 IS NULL{skip_locked})", [(int8, chunk_id) for chunk_id, int8 in rows])


def chunks(db, ids: Sequence[int], embeddings: bool = False) -> dict[int, StoredChunk]:
    """The chunks by id (a removed one is missing); with `embeddings`, their float32s too."""
    if not ids:
        return {}
    marks = ", ".join("?" * len(ids))
    rows = db.execute(
        "SELECT c.id, c.source_id, s.location, s.title, s.url, c.heading, c.text"
        f"{', c.embedding' if embeddings else ''} FROM knowledge_chunks c"
        f" JOIN knowledge_sources s ON s.id = c.source_id WHERE c.id IN ({marks})", tuple(ids)).fetchall()
    return {row[0]: StoredChunk(*row[:7], bytes(row[7]) if embeddings and row[7] is not None else None)
            for row in rows}


# -- bilingual dictionaries (bot/knowledge/dictionary.py) --------------------------------------------

def put_dictionary(db, name: str, entries: Iterable[tuple[str, str]]) -> tuple[int, bool]:
    """Replace dictionary `name`'s words with `entries` (folded word, translations): how many,
    and whether it replaced an earlier copy."""
    if not _is_sqlite(db):  # two adds at once: the second waits, then replaces what the first put (searches go on)
        db.execute("LOCK TABLE knowledge_translations IN SHARE ROW EXCLUSIVE MODE")
    replaced = db.execute("DELETE FROM knowledge_translations WHERE dictionary = ?", (name,)).rowcount > 0
    rows = [(word, name, words) for word, words in entries]
    if _is_sqlite(db):
        db.executemany("INSERT INTO knowledge_translations (word, dictionary, words) VALUES (?, ?, ?)", rows)
    else:  # COPY: a 400,000-word dictionary in seconds, not the minutes of one INSERT each
        copying = "COPY knowledge_translations (word, dictionary, words) FROM STDIN"
        with db.conn.cursor() as cursor, cursor.copy(copying) as copy:
            for row in rows:
                copy.write_row(row)
    _bump(db)  # each process looks again whether there are dictionaries
    return len(rows), replaced


def remove_dictionary(db, name: str) -> int:
    removed = db.execute("DELETE FROM knowledge_translations WHERE dictionary = ?", (name,)).rowcount
    if removed:
        _bump(db)
    return removed


def dictionaries(db) -> list[tuple[str, int]]:
    """(name, words) of each dictionary, by name."""
    return [(row[0], row[1]) for row in db.execute(
        "SELECT dictionary, COUNT(*) FROM knowledge_translations GROUP BY dictionary ORDER BY dictionary").fetchall()]


def has_dictionaries(db) -> bool:
    return db.execute("SELECT EXISTS (SELECT 1 FROM knowledge_translations)").fetchone()[0] in (1, True)


def translations(db, words: Sequence[str]) -> dict[str, list[str]]:
    """Each of `words` any dictionary holds: its translations, a text per dictionary."""
    if not words:
        return {}
    found: dict[str, list[str]] = {}
    marks = ", ".join("?" * len(words))
    for word, text in db.execute(f"SELECT word, words FROM knowledge_translations WHERE word IN ({marks})"
                                 " ORDER BY word, dictionary", tuple(words)).fetchall():
        found.setdefault(word, []).append(text)
    return found


def _is_sqlite(db) -> bool:
    return type(db).__module__ == "sqlite3"
