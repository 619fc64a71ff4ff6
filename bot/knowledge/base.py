"""The knowledge base as the command line uses it: add, sync, list, remove, search.

Each source is read, chunked and embedded first, then written in one short transaction of
its own (the old chunks out, the new ones in, the version bumped): a source is either wholly
there or not at all, a failed one leaves what was there, and the bot's own writes wait at most
for one source's INSERTs - never for a download or an embedding call.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import requests

from bot.knowledge import dictionary, readers, store
from bot.knowledge.embeddings import Embedder, EmbeddingsUnavailable, to_bytes, to_int8
from bot.knowledge.readers import Limits, SourceError
from bot.knowledge.retrieval import STORE_ERRORS, Found, Retriever

logger = logging.getLogger(__name__)
ADDED, UPDATED, UNCHANGED, FAILED, REMOVED = "added", "updated", "unchanged", "failed", "removed"


@dataclass(frozen=True)
class Report:
    """What became of one source."""

    location: str
    status: str  # added, updated, unchanged, failed, removed
    chunks: int = 0
    reason: str = ""
    tokens: int = 0  # embedding tokens spent on it
    unit: str = "chunk"  # what `chunks` counts: a dictionary's are words

    def line(self) -> str:
        detail = self.reason if self.status == FAILED else f"{self.chunks} {self.unit}{'s' if self.chunks != 1 else ''}"
        return f"{self.status:9} {self.location}: {detail}"


class KnowledgeBase:
    def __init__(self, database, embedder: Embedder | None, limits: Limits = Limits(), *,
                 min_score: float = 0.3, clock: Callable[[], float] = time.time):
        self.database = database
        self.embedder = embedder
        self.limits = limits
        self.clock = clock
        self.retriever = Retriever(database, embedder, min_score=min_score)
        self._session = requests.Session()
        self._probed = False

    def add(self, locations: Iterable[str], page_id: str | None = None,
            on_report: Callable[[Report], None] | None = None) -> list[Report]:
        """`on_report` hears of each source as it is done (the command prints it then)."""
        return [_told(self.add_one(location, page_id), on_report) for location in locations]

    def add_one(self, location: str, page_id: str | None = None) -> Report:
        """One source read, chunked, embedded and stored in one transaction - or a FAILED report
        saying why: whatever goes wrong with one source, the others go on."""
        for attempt in (1, 2):
            try:
                return self._add_one(location, page_id or store.EVERY_PAGE)
            except SourceError as error:
                return Report(location, FAILED, reason=str(error))
            except Exception as error:  # noqa: BLE001 - a reader's or the database's surprise: this source only
                if attempt == 1 and _already_added(error):
                    continue  # another process added it meanwhile: read what it holds, and compare
                logger.debug("knowledge: %s could not be added", location, exc_info=True)
                return Report(location, FAILED, reason=_one_line(error))
        raise AssertionError("unreachable")

    def _add_one(self, location: str, page: str) -> Report:
        document = readers.read(location, self.limits, self._session)
        with self.database.read() as db:
            old = store.find_source(db, page, document.location)
        model = self._model()
        if old and old.content_hash == document.content_hash and (old.embedding_model == model or model is None):
            return Report(document.location, UNCHANGED, old.chunks)
        try:
            embedded = self.embedder.embed([f"{c.heading}\n{c.text}" for c in document.chunks]) if model else None
        except EmbeddingsUnavailable as error:
            return Report(document.location, FAILED, reason=f"the model server failed the embeddings ({error});"
                                                              " nothing of it was added, try again")
        vectors = [None] * len(document.chunks) if embedded is None or embedded.vectors is None else \
            [(to_bytes(row), to_int8(row)) for row in embedded.vectors]
        used_model = model if embedded is not None and embedded.vectors is not None else None
        with self.database.write() as db:
            store.put_source(db, page, document.title, document.location, document.url, document.kind,
                             document.content_hash, document.chunks, vectors, used_model, self.clock())
        return Report(document.location, UPDATED if old else ADDED, len(document.chunks),
                      tokens=embedded.tokens if embedded else 0)

    def sync(self, directory: str, page_id: str | None = None,
             on_report: Callable[[Report], None] | None = None) -> list[Report]:
        """Every readable file under `directory` added (changed ones re-read, by content hash), and
        the sources that were under it but are gone, removed."""
        root = os.path.abspath(directory)
        if not os.path.isdir(root):
            return [_told(Report(directory, FAILED, reason="not a folder"), on_report)]
        found = _one_path_per_file(sorted(
            os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
            if os.path.splitext(name)[1].lower() in readers.SUFFIXES and not name.startswith(".")))
        reports = [_told(self.add_one(path, page_id), on_report) for path in found]
        present = set(found)
        for source in self.sources(page_id, exact=True):
            if source.location.startswith(root + os.sep) and source.location not in present:
                reports.append(_told(self._remove(source), on_report))
        return reports

    def sources(self, page_id: str | None = None, exact: bool = False) -> list[store.Source]:
        with self.database.read() as db:
            listed = store.sources(db, page_id)
        return [s for s in listed if s.page_id == (page_id or store.EVERY_PAGE)] if exact else listed

    def remove(self, what: str, page_id: str | None = None) -> Report:
        """A source by its id (as `list` shows it), or by its path or URL: with `page_id`, that
        Page's own; without, the one every Page answers from (or the only Page's that has it)."""
        location = readers.canonical_url(what) if readers.is_url(what) else \
            what if not os.path.exists(what) else os.path.abspath(what)
        everyone = self.sources()
        if by_id := [source for source in everyone if str(source.id) == what]:
            if page_id and by_id[0].page_id not in (page_id, store.EVERY_PAGE):
                return Report(what, FAILED, reason=f"source {what} is Page {by_id[0].page_id}'s, not Page {page_id}'s")
            return self._remove(by_id[0])
        named = [source for source in everyone if source.location in (what, location)]
        if own := [source for source in named if source.page_id == (page_id or store.EVERY_PAGE)]:
            return self._remove(own[0])
        if page_id is None and len(named) == 1:
            return self._remove(named[0])
        if named:
            pages = ", ".join(sorted({s.page_id or "every Page" for s in named}))
            return Report(what, FAILED, reason=f"not a source of {'Page ' + page_id if page_id else 'every Page'}; "
                                               f"it is one of: {pages} (name the Page with --page, or the id)")
        return Report(what, FAILED, reason="no such source (see `knowledge list`)")

    def _remove(self, source: store.Source) -> Report:
        with self.database.write() as db:
            store.remove_source(db, source.id)
        return Report(source.location, REMOVED, source.chunks)

    def search(self, question: str, page_id: str | None = None, top_k: int = 4) -> Found:
        return self.retriever.search(question, page_id or store.EVERY_PAGE, top_k)

    # -- bilingual dictionaries, for full-text search in other languages (bot/knowledge/dictionary.py)
    def add_dictionary(self, path: str) -> Report:
        """A dictd dictionary read whole, then stored in one transaction (replacing its earlier
        copy): there entirely or not at all; `chunks` of the report counts its words."""
        try:
            found = dictionary.locate(path)
            entries = list(dictionary.entries(found))
            if not entries:
                return Report(path, FAILED, reason=f"no one-word entry with a translation in {found.index.name}")
            with self.database.write() as db:
                count, replaced = store.put_dictionary(db, found.name, entries)
        except dictionary.DictionaryError as error:
            return Report(path, FAILED, reason=str(error))
        except STORE_ERRORS as error:  # this dictionary only: the store keeps what it had, the next one goes on
            logger.debug("knowledge: dictionary %s could not be stored", path, exc_info=True)
            return Report(path, FAILED, reason=f"the store refused it ({_one_line(error)})")
        return Report(found.name, UPDATED if replaced else ADDED, count, unit="word")

    def dictionaries(self) -> list[tuple[str, int]]:
        with self.database.read() as db:
            return store.dictionaries(db)

    def remove_dictionary(self, name: str) -> Report:
        with self.database.write() as db:
            removed = store.remove_dictionary(db, name)
        if not removed:
            return Report(name, FAILED, reason="no such dictionary (see: knowledge dictionary list)")
        return Report(name, REMOVED, removed, unit="word")

    def _model(self) -> str | None:
        """The embedding model in use; None when the server has none (full text only)."""
        if self.embedder is None:
            return None
        if not self._probed:
            self._probed = True
            try:  # ask once, with a word, so an unsupported server is known before the first source
                self.embedder.embed(["probe"])
            except EmbeddingsUnavailable:
                return self.embedder.model  # it may work for the source; if not, that source fails
        return None if self.embedder.unsupported else self.embedder.model


def _one_line(error: BaseException) -> str:
    """An unexpected error as a report's reason: its type and its message's first line."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"


def _told(report: Report, on_report: Callable[[Report], None] | None) -> Report:
    if on_report is not None:
        on_report(report)
    return report


def _already_added(error: Exception) -> bool:
    """The database refused a second row for one Page's source: another `add` of the same new
    file committed first (SQLite serialises the two; PostgreSQL lets both read "not there")."""
    return type(error).__name__ in ("UniqueViolation", "IntegrityError") and "knowledge_sources" in str(error)


def _one_path_per_file(paths: list[str]) -> list[str]:
    """A file reached by several names in a synced folder (a symlink beside its target, two links
    to one file, hard links) is one source: its own name where it has one, else the first link's."""
    chosen: dict[object, str] = {}
    for path in sorted(paths, key=os.path.islink):  # the real names first
        try:
            status = os.stat(path)
            same = (status.st_dev, status.st_ino)
        except OSError:  # a broken link: its own source, which fails with its own line
            same = path
        chosen.setdefault(same, path)
    kept = set(chosen.values())
    return [path for path in paths if path in kept]
