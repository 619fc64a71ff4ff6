"""The sandbox's knowledge base: the example bakery's documents loaded at start through the bot's
own API (README, "Teach the bot your business"), and the exchange log's excerpts named for the
side panel - each [chunk id, score] with its chunk's title and source."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bot.knowledge import open_knowledge, store

logger = logging.getLogger(__name__)

# 51 made-up documents about Ana's Bakery: Markdown, text, HTML, a CSV and a YAML FAQ.
EXAMPLE_FOLDER = Path(__file__).resolve().parents[2] / "examples" / "knowledge" / "anas-bakery"
# Outcomes whose turn searched the knowledge base: without excerpts logged, nothing relevant was found.
SEARCHED = frozenset({"answered", "cached", "fallback", "unknown"})


@dataclass(frozen=True)
class Loaded:
    """What the start-up sync put into the bot's store."""

    folder: str
    sources: int
    chunks: int
    failed: tuple[str, ...]  # one line per source that could not be read
    seconds: float
    search: str  # "embeddings (<model>)" or "full text only (...)"

    def summary(self) -> str:
        failed = f", {len(self.failed)} failed" if self.failed else ""
        return (f"{self.sources} sources, {self.chunks} chunks from {_shown(self.folder)}{failed}, "
                f"{self.search}, in {self.seconds:.1f} s")


def load_folder(config, database, page_id: str, folder: Path = EXAMPLE_FOLDER) -> Loaded | None:
    """The folder's documents into the bot's store for one Page (`knowledge sync --page`): what a
    user's message to that Page (or its Instagram account) is answered from. None: no such folder."""
    if not folder.is_dir():
        logger.warning("no example knowledge base at %s: the sandbox starts without one", folder)
        return None
    started = time.monotonic()
    knowledge = open_knowledge(config, database)
    reports = knowledge.sync(str(folder), page_id=page_id)
    failed = tuple(report.line() for report in reports if report.status == "failed")
    for line in failed:
        logger.warning("example knowledge base: %s", line)
    kept = [report for report in reports if report.status != "failed"]
    unsupported = knowledge.embedder.unsupported
    search = f"full text only ({unsupported})" if unsupported else f"embeddings ({config.embedding_model})"
    return Loaded(str(folder), len(kept), sum(report.chunks for report in kept), failed,
                  time.monotonic() - started, search)


def logged_excerpts(record: dict, database, mode: str) -> list[dict] | None:
    """An exchange-log record's excerpts, in the prompt's order ([1], [2], ...), each with its score and
    its chunk's title and source: [] when the turn searched and nothing was relevant, None when it did
    not search (KNOWLEDGE_MODE=off, or a turn with no model answer: paused, rate-limited...)."""
    pairs = record.get("knowledge")
    pairs = json.loads(pairs) if isinstance(pairs, str) else pairs or []
    if not pairs:
        return [] if mode != "off" and record.get("outcome") in SEARCHED else None
    ids = [int(chunk_id) for chunk_id, _ in pairs]
    with database.read() as db:
        named = store.chunks(db, ids)
    return [{"chunk_id": chunk_id, "score": score,
             "title": named[chunk_id].title if chunk_id in named else None,  # removed since
             "source": _source(named[chunk_id]) if chunk_id in named else None}
            for chunk_id, (_, score) in zip(ids, pairs)]


def _source(chunk: store.StoredChunk) -> str:
    return chunk.url or chunk.location.rsplit("/", 1)[-1]


def _shown(folder: str) -> str:
    """The folder relative to the working directory when it is under it (as a person would type it)."""
    relative = os.path.relpath(folder)
    return folder if relative.startswith("..") else relative
