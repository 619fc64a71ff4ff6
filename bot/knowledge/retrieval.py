"""Finding the chunks that answer a question: full text and embeddings, fused by reciprocal rank.

Full text (bm25 / ts_rank over the question's words, any of them) finds exact names,
prices and codes; cosine over embeddings finds the same meaning in other words (and, with a
multilingual model, in another language). Reciprocal rank fusion (1/(60 + rank), summed)
needs no calibration between the two scores. Whether a hit is relevant at all is a separate,
absolute test: cosine similarity at least KNOWLEDGE_MIN_SCORE, or half the question's words
in the chunk (two at least, and not far fewer than the best chunk has) - what decides whether an excerpt goes
into the prompt at all, and what `KNOWLEDGE_MODE=only` decides on.

The vectors live in each process's memory (one int8 matrix per Page, an exhaustive search: the
int8 cosine of every row by simsimd's SIMD kernels picks the candidates, and the hits' own
similarity is made from their stored float32s), reloaded when the knowledge version in the store
has moved.
"""
from __future__ import annotations

import heapq
import logging
import math
import re
import sqlite3
import threading
import unicodedata
from array import array
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import psycopg
import simsimd

from bot.knowledge import store
from bot.knowledge.embeddings import Embedder, EmbeddingsUnavailable, from_bytes, to_int8

logger = logging.getLogger(__name__)
RRF_K = 60
CANDIDATES = 50  # from each ranking, before fusion
# A word in more than this share of all chunks ranks nothing and makes ranking slow (every
# chunk holding it is scored): left out of the full-text query, as the common terms of a
# search engine are - the two rarest words of a question always stay.
COMMON_SHARE = 0.1
MAX_TERMS = 32
# Words whose chunk counts a process keeps between changes to the knowledge base (~10 MB at most):
# past it they are counted afresh, as after a change, rather than kept for every word ever asked.
COUNTS_KEPT = 50_000
# Questions being embedded at once in one process: the larger of REPLY_THREADS' and
# WEBCHAT_THREADS' defaults (each process has its own); a thread is made only when none is idle.
EMBEDDING_THREADS = 256
# The cosine over every chunk is bound by memory bandwidth: 20,000 chunks at 1,536 wide are 31 MB
# as int8s, compared in ~1.6 ms by one core (AVX-512; ~2 ms with AVX2 only). One thread leaves
# the other core to full text.
COSINE_THREADS = 1
# Chunks given their int8 vectors per transaction when older code added them without: short
# writes (an add or a remove of a source waits for one at most).
INT8_BATCH = 1000
WORD = re.compile(r"\w+", re.UNICODE)
# Endings tried, in this order, on a word a dictionary has no entry for: plurals and the commonest
# inflections of the languages FreeDict covers ("domingos", "Postleitzahlen", "amandes").
ENDINGS = ("s", "es", "en", "n", "e", "er", "x")
# Words that say nothing of what is asked (English, and the commonest of es/fr/de): left out of
# the full-text query, where they would match every chunk.
ENGLISH_STOP_WORDS = frozenset("""
a an and are as at be but by can could do does for from had has have how i if in into is it its me my get got
need want like some much many also just still really ok okay yes
no not of on or our so than that the their them then there these they this to too us was we were what
when where which who why will with would you your yours please hi hello thanks thank tell know about
any anything there's i'm it's do you'd i'd can't don't
""".split())
OTHER_STOP_WORDS = frozenset("""
a el la los las un una de del y o en que es por para con se su al lo como mas pero sus le ya
le la les un une des du et ou en est que qui pour par avec dans sur au aux ce cette vous nous je
der die das ein eine und oder ist in im zu den dem des mit fur von auf wie was ich sie wir es
yo tu usted ustedes nosotros ellos ella mi mis tus nuestro nuestra cual cuales cuando donde quien hay
je tu il elle on nous vous ils elles mon ma mes ton ta tes votre vos notre nos leur leurs quand ou comment quel quelle qu
du er ihr euch uns mein meine dein deine euer eure unser unsere welche welcher welches wann wo bei
""".split())
STOP_WORDS = ENGLISH_STOP_WORDS | OTHER_STOP_WORDS


STORE_ERRORS = (sqlite3.Error, psycopg.Error, OSError)


class SearchFailed(Exception):
    """The knowledge base could not be read; `tokens`: what the question's embedding cost anyway."""

    def __init__(self, error: BaseException, tokens: int):
        super().__init__(f"{type(error).__name__}: {str(error)[:200]}")
        self.tokens = tokens


@dataclass(frozen=True)
class Hit:
    chunk_id: int
    source: str  # the location as added: a path or a URL
    title: str
    url: str | None
    heading: str
    text: str
    score: float  # the fused score (ordering only)
    similarity: float | None  # cosine with the question (None: no embeddings)
    coverage: float  # share of the question's words in the chunk
    relevant: bool

    def label(self) -> str:
        """How the prompt and the citation name it: its title, and its source's file name or URL."""
        where = self.url or self.source.rsplit("/", 1)[-1]
        return f"{self.title} ({where})"


@dataclass(frozen=True)
class Found:
    hits: list[Hit]  # best first, at most top_k
    embedding_tokens: int = 0
    searched: bool = True  # False: nothing was ever added, the knowledge base is not in use


def terms(text: str) -> list[str]:
    """The question's words for full-text search: folded, without stop words, once each."""
    seen: dict[str, None] = {}
    for word in WORD.findall(fold(text)):
        if len(word) > 1 and word not in STOP_WORDS and not word.isdigit() or (word.isdigit() and len(word) > 1):
            seen.setdefault(word)
    return list(seen)[:MAX_TERMS]


def fold(text: str) -> str:
    """Lower case without accents: "Café" and "cafe" are one word."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c)).replace("_", " ")


def stem(word: str) -> str:
    """A light suffix stripper for the coverage test (the search itself stems properly)."""
    for suffix in ("ing", "ies", "es", "ed", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def maybe_foreign(text: str) -> bool:
    """Whether a dictionary should translate the question's unknown words: not when its little
    words are English ("what kind of cake for a kid?" is no German "Kind"); when they are of
    another language, or there are none to tell by ("Zimtschnecke?")."""
    words = WORD.findall(fold(text))
    english = sum(word in ENGLISH_STOP_WORDS and word not in OTHER_STOP_WORDS for word in words)
    other = sum(word in OTHER_STOP_WORDS and word not in ENGLISH_STOP_WORDS for word in words)
    return other >= english


def base_forms(word: str) -> list[str]:
    """A word a dictionary may not hold as it is written: the word, then the word without each
    ending it has (at least 3 letters left)."""
    return [word] + [word[: -len(ending)] for ending in ENDINGS
                     if word.endswith(ending) and len(word) - len(ending) >= 3]


def coverage(question_terms: list[str], text: str, translated: dict[str, list[str]] | None = None) -> float:
    """The share of the question's words in `text`; a word counts when one of its translations is there."""
    if not question_terms:
        return 0.0
    words = {stem(w) for w in WORD.findall(fold(text))}
    translated = translated or {}
    return sum(1 for t in question_terms
               if stem(t) in words or any(stem(other) in words for other in translated.get(t, ()))) / len(question_terms)


def common_bound(chunks: int) -> float:
    """A word more chunks than this hold is a common one: COMMON_SHARE of them, at least 50."""
    return max(50, COMMON_SHARE * chunks)


def uncommon(question_terms: list[str], counts: dict[str, int], chunks: int) -> list[str]:
    """The words fewer than COMMON_SHARE of the `chunks` hold (at least 50), and the two rarest -
    but not one that half the chunks hold when a rarer word is held: bm25 gives it no weight
    (FTS5 floors its idf, log((N - n + 0.5) / (n + 0.5)), at 1e-6), and matching it would score
    most chunks for nothing."""
    common = common_bound(chunks)
    rarest = sorted(question_terms, key=counts.__getitem__)[:2]
    if len(rarest) == 2 and counts[rarest[0]] > 0 and 2 * counts[rarest[1]] >= chunks:
        rarest.pop()
    return [term for term in question_terms if counts[term] <= common or term in rarest]


class _Vectors:
    """One Page's chunk vectors for one model, as of one knowledge version: `matrix` is the
    rows as int8s (embeddings.to_int8), one buffer of [chunks, dimensions]: a quarter of
    float32's bytes in memory and read by every search, compared by simsimd's int8 cosine to pick
    the candidates (the hits' own similarity is then made from their float32s: _Scored.of)."""

    def __init__(self, version: int, ids: list[int], matrix: memoryview | None):
        self.version, self.ids, self.matrix = version, ids, matrix
        self.width = matrix.shape[1] if matrix is not None else 0
        self.row_of = {chunk_id: row for row, chunk_id in enumerate(ids)}

    @classmethod
    def of(cls, version: int, rows: list[tuple[int, bytes]]) -> "_Vectors":
        """From (chunk id, int8s) rows, those of the commonest width: one model gives one width,
        unless its server's changed (the others wait to be added again); none stored empty."""
        widths = Counter(len(row[1]) for row in rows if row[1])
        if not widths:
            return cls(version, [], None)
        width = widths.most_common(1)[0][0]
        if len(widths) > 1 or len(rows) > widths[width]:
            logger.warning("knowledge: %d of %d chunks have vectors %s wide, the others' are left out of searches"
                           " (re-add their sources)", widths[width], len(rows), width)
            rows = [row for row in rows if len(row[1]) == width]
        matrix = bytearray().join(row[1] for row in rows)
        return cls(version, [row[0] for row in rows], memoryview(matrix).cast("b", [len(rows), width]))

    def distances(self, question: array) -> list[float]:
        """The question's cosine distance (1 - cosine) to every row."""
        if not any(question):  # as a zero row is: like nothing
            return [1.0] * len(self.ids)
        query = memoryview(to_int8(question)).cast("b", [1, len(question)])
        return memoryview(simsimd.cdist(query, self.matrix, metric="cosine", dtype="int8", threads=COSINE_THREADS)
                          ).cast("B").cast("d").tolist()


class _Scored:
    """The question's cosine distance to each of a Page's chunks."""

    def __init__(self, vectors: _Vectors, distances: list[float], question: array):
        self.vectors, self.distances, self.question = vectors, distances, question

    def top(self, count: int) -> list[int]:
        """The ids of the `count` most similar chunks, most similar first."""
        rows = heapq.nsmallest(count, range(len(self.distances)), key=self.distances.__getitem__)
        return [self.vectors.ids[row] for row in rows]

    def of(self, chunk_id: int, stored: bytes | None = None) -> float | None:
        """The chunk's cosine similarity with the question: exact from its `stored` float32s when
        given (what decides relevance, and what the log keeps), else from its int8s (within
        ~0.001 when a vector's values are evenly spread, ~0.01 when one dimension is 50 times the
        others)."""
        row = self.vectors.row_of.get(chunk_id)
        if row is None:
            return None
        if stored is not None and len(stored) == 4 * len(self.question):
            exact = simsimd.dot(self.question, from_bytes(stored))  # both unit vectors: their cosine
            if math.isfinite(exact):
                return exact
        return 1.0 - self.distances[row]


class Retriever:
    def __init__(self, database, embedder: Embedder | None, *, min_score: float = 0.3, min_coverage: float = 0.5,
                 counts_kept: int = COUNTS_KEPT):
        self.database = database
        self.embedder = embedder
        self.min_score = min_score
        self.min_coverage = min_coverage
        self.counts_kept = counts_kept
        self._vectors: dict[str, _Vectors] = {}
        self._counts: dict[str, int] = {}  # chunks holding each word ("": all chunks), as of _counts_version
        self._stats: store.TextStats | None = None  # of every chunk, as of _counts_version
        self._counts_version = -1
        self._dictionaries: tuple[int, bool] | None = None  # (knowledge version, any dictionary then)
        # Two locks, never held while waiting for a database connection by the one and while
        # holding one by the other: a PostgreSQL pool full of searches waiting on a vector
        # reload would otherwise leave the reload (its read, and the write of int8s it made)
        # no connection.
        self._counts_lock = threading.Lock()
        self._vectors_lock = threading.Lock()
        # Threads are made only as searches need them.
        self._pool = ThreadPoolExecutor(max_workers=EMBEDDING_THREADS, thread_name_prefix="knowledge-embed")

    def search(self, question: str, page_id: str, top_k: int, timeout: float | None = None) -> Found:
        """The `top_k` best chunks for `question` in this Page's (and every Page's) sources."""
        question_terms = terms(question)
        by_meaning, failed = None, None
        try:
            with self.database.read() as db:
                current = store.version(db)
                if current == 0:  # nothing was ever added: no embedding call for nothing
                    return Found([], searched=False)
                # The question's embedding (a round trip to the model server) and its cosine with
                # every chunk run on another thread while full text ranks on this one, so the two
                # overlap (the SQL and the SIMD product run outside the interpreter lock).
                if self.embedder is not None and not self.embedder.unsupported:
                    by_meaning = self._pool.submit(self._ranked_by_meaning, question, page_id, current, timeout)
                query, translated = self._full_text_query(db, question_terms, current, maybe_foreign(question))
                ranked_text = self._ranked_by_words(db, query, page_id, current)
        except STORE_ERRORS as error:
            failed = error
        except BaseException:
            if by_meaning:  # no embeddings call outlives the search that made it
                wait([by_meaning])
            raise
        try:
            scored, ranked_vectors, tokens = by_meaning.result() if by_meaning else (None, [], 0)
        except STORE_ERRORS as error:  # the vectors could not be read: no embedding was made
            raise SearchFailed(failed or error, 0) from error
        if failed is not None:  # the embedding was paid for all the same: it is counted
            raise SearchFailed(failed, tokens) from failed
        fused: dict[int, float] = {}
        for ranking in (ranked_text, ranked_vectors):
            for rank, chunk_id in enumerate(ranking):
                fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank + 1)
        best = sorted(fused, key=lambda chunk_id: (-fused[chunk_id], chunk_id))[:top_k]
        try:
            with self.database.read() as db:
                rows = store.chunks(db, best, embeddings=scored is not None)
        except STORE_ERRORS as error:
            raise SearchFailed(error, tokens) from error
        best = [chunk_id for chunk_id in best if chunk_id in rows]  # one removed in between is gone
        covered = {chunk_id: coverage(question_terms, rows[chunk_id].heading + " " + rows[chunk_id].text, translated)
                   for chunk_id in best}
        # By words, a chunk is relevant with half the question's words, and not far fewer than the
        # best chunk has: "gluten free" is not answered by a chunk that only says "free". One
        # word in common is too little ("What is my name?"), unless the question is that one
        # word and the chunk's heading names it ("hours?").
        enough_words = max(self.min_coverage, 0.75 * max(covered.values(), default=0.0))
        hits = []
        for chunk_id in best:
            row, similarity = rows[chunk_id], scored.of(chunk_id, rows[chunk_id].embedding) if scored else None
            by_words = covered[chunk_id] >= enough_words and (
                covered[chunk_id] * len(question_terms) >= 2
                or (len(question_terms) == 1 and coverage(question_terms, row.heading, translated) == 1.0))
            relevant = (similarity is not None and similarity >= self.min_score) or by_words
            hits.append(Hit(chunk_id, row.location, row.title, row.url, row.heading, row.text, round(fused[chunk_id], 5),
                            None if similarity is None else round(similarity, 4), round(covered[chunk_id], 3), relevant))
        return Found(hits, tokens)

    def _ranked_by_meaning(self, question: str, page_id: str, version: int,
                           timeout: float | None) -> tuple["_Scored | None", list[int], int]:
        scored, tokens = self._similarities(question, page_id, version, timeout)
        return scored, scored.top(CANDIDATES) if scored else [], tokens

    def _ranked_by_words(self, db, query: list[str], page_id: str, version: int) -> list[int]:
        """store.full_text, with this version's stats and word counts (read once, kept)."""
        return store.full_text(db, query, page_id, CANDIDATES, self._stats_of(db, version),
                               counts_of=lambda words: self._counts_of(db, list(words), version))

    def _full_text_query(self, db, question_terms: list[str], version: int,
                         translate: bool = True) -> tuple[list[str], dict[str, list[str]]]:
        """The full-text query: the question's words but the commonest; with dictionaries (and
        `translate`), the words no chunk holds give way to their translations the knowledge base
        holds ("domingos" → "sunday"), also returned per word (a translated word counts toward a
        chunk's coverage)."""
        translating = translate and self._has_dictionaries(db, version)
        if len(question_terms) < 2 and not translating:
            return question_terms, {}
        counts = self._counts_of(db, question_terms, version)
        query = uncommon(question_terms, counts, counts[""]) if len(question_terms) > 1 else question_terms
        unknown = [term for term in question_terms if not counts[term] and not term.isdigit()] if translating else []
        if not unknown:
            return query, {}
        forms = {term: base_forms(term) for term in unknown}
        found = store.translations(db, sorted({form for some in forms.values() for form in some}))
        translated = {}
        for term in unknown:
            texts = next((found[form] for form in forms[term] if form in found), None)
            if texts:
                translated[term] = [word for word in terms(", ".join(texts)) if word not in question_terms]
        held = self._counts_of(db, [word for words in translated.values() for word in words], version)
        translated = {term: kept for term, words in translated.items()
                      if (kept := [word for word in words if 0 < held[word] <= common_bound(held[""])])}
        # A word no chunk holds matches nothing: its place in the query (MAX_TERMS) goes to translations.
        query = [term for term in query if counts[term]]
        extra = dict.fromkeys(word for words in translated.values() for word in words if word not in query)
        return (query + list(extra))[:MAX_TERMS], translated

    def _at_version(self, db, version: int) -> None:
        """(_counts_lock held) The counts and stats start afresh at another knowledge version."""
        if self._counts_version != version:
            stats = store.text_stats(db)
            self._counts, self._stats, self._counts_version = {"": stats.chunks}, stats, version

    def _stats_of(self, db, version: int) -> store.TextStats:
        """store.text_stats, read once per knowledge version (a pass over every chunk on PostgreSQL)."""
        with self._counts_lock:
            self._at_version(db, version)
            return self._stats

    def _counts_of(self, db, words: list[str], version: int) -> dict[str, int]:
        """How many chunks hold each of `words` ("": all chunks), kept per knowledge version."""
        with self._counts_lock:
            self._at_version(db, version)
            known = {word: self._counts[word] for word in ["", *words] if word in self._counts}
        missing = [word for word in words if word not in known]
        counts = store.term_counts(db, missing) if missing else {}
        with self._counts_lock:
            if self._counts_version == version:  # counted at this version: kept (a newer one starts afresh)
                if len(self._counts) + len(counts) > self.counts_kept:  # every word ever asked, for months
                    self._counts = {"": self._counts[""]}
                self._counts.update(counts)
        return {**known, **counts}

    def _has_dictionaries(self, db, version: int) -> bool:
        """Whether any dictionary was added (looked up once per knowledge version: adding one bumps it)."""
        known = self._dictionaries
        if known is not None and known[0] == version:
            return known[1]
        has = store.has_dictionaries(db)
        self._dictionaries = (version, has)
        return has

    def _similarities(self, question: str, page_id: str, version: int,
                      timeout: float | None) -> tuple["_Scored | None", int]:
        """The question's cosine distance to every chunk of the Page (None: no embeddings now)."""
        if self.embedder is None or self.embedder.unsupported:
            return None, 0
        vectors = self._page_vectors(page_id, version)
        if not vectors.ids:
            return None, 0
        try:
            embedded = self.embedder.embed([question], timeout=timeout)
        except EmbeddingsUnavailable as error:
            logger.warning("could not embed the question (%s): full-text search only for this answer", error)
            return None, 0
        if embedded.vectors is None:
            return None, embedded.tokens
        question_vector = embedded.vectors[0]
        if len(question_vector) != vectors.width:
            logger.warning("the question's embedding has %d dimensions, the knowledge base's %d: re-add the sources"
                           " (EMBEDDING_MODEL changed?); full text only", len(question_vector), vectors.width)
            return None, embedded.tokens
        return _Scored(vectors, vectors.distances(question_vector), question_vector), embedded.tokens

    def _page_vectors(self, page_id: str, version: int) -> _Vectors:
        cached = self._vectors.get(page_id)
        if cached is not None and cached.version == version:
            return cached
        with self._vectors_lock:
            cached = self._vectors.get(page_id)
            if cached is None or cached.version != version:
                with self.database.read() as db:
                    rows = store.vectors(db, page_id, self.embedder.model)
                cached = _Vectors.of(version, self._with_int8(rows))
                self._vectors[page_id] = cached
            return cached

    def _with_int8(self, rows: list[tuple[int, bytes | None, bytes | None]]) -> list[tuple[int, bytes]]:
        """(chunk id, int8s) of every row. Those that older code added without them are made here
        (~0.2-0.4 ms each at 1,536 wide: seconds for thousands, in the first search after the
        upgrade) and stored, a short transaction per INT8_BATCH, so later loads in every process
        find them; a failed write only means they are made again at the next load."""
        older = {chunk_id: from_bytes(float32) for chunk_id, int8, float32 in rows
                 if int8 is None and float32 and len(float32) % 4 == 0}
        made = {chunk_id: to_int8(vector) for chunk_id, vector in older.items() if all(map(math.isfinite, vector))}
        if len(made) < len(older):  # stored before embed() refused NaN and infinity: nothing to compare
            logger.warning("knowledge: %d chunks hold vectors that are not numbers (NaN, infinity), stored by an older"
                           " version: left out of searches by meaning (re-add their sources)", len(older) - len(made))
        if made:
            logger.info("knowledge: %d chunks added by an older version had no int8 vectors: made and stored",
                        len(made))
            pending = sorted(made.items())
            try:
                for start in range(0, len(pending), INT8_BATCH):
                    with self.database.write() as db:
                        store.put_int8(db, pending[start:start + INT8_BATCH])
            except STORE_ERRORS as error:
                logger.warning("knowledge: could not store the int8 vectors made (%s): made again at the next load",
                               type(error).__name__)
        return [(chunk_id, int8 if int8 is not None else made[chunk_id]) for chunk_id, int8, float32 in rows
                if int8 is not None or chunk_id in made]
