"""The knowledge base in a reply: search with the user's words (and, for a short follow-up,
their message before), the relevant excerpts into the prompt, and - with KNOWLEDGE_MODE=only
and nothing relevant - the answer that says so instead of a guess.

A knowledge base that cannot be read (the database busy, the embeddings server down) costs
the reply nothing but its excerpts: it is logged, and the model answers as it would without.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from bot.knowledge import prompt
from bot.knowledge.retrieval import Hit, Retriever, SearchFailed
from bot.telemetry import metrics

logger = logging.getLogger(__name__)
PREFER, ONLY = "prefer", "only"


@dataclass(frozen=True, kw_only=True)
class KnowledgeSettings:
    mode: str = PREFER  # prefer | only (off: no Knowledge at all)
    top_k: int = 4
    max_tokens: int = 1200
    unknown_reply: str = ""
    cite: bool = False
    page_name: str = ""


@dataclass(frozen=True)
class Consulted:
    used: tuple[Hit, ...] = ()  # the relevant excerpts the prompt carries, best first
    tokens: int = 0  # embedding tokens spent on the question
    unknown: bool = False  # KNOWLEDGE_MODE=only and nothing relevant: say so, no model call

    @property
    def logged(self) -> tuple[tuple[int, float], ...]:
        """What the exchange log keeps: (chunk id, score) of each excerpt used."""
        return tuple((hit.chunk_id, hit.similarity if hit.similarity is not None else hit.score) for hit in self.used)


NOTHING = Consulted()


class Knowledge:
    def __init__(self, retriever: Retriever, settings: KnowledgeSettings, page_id: str):
        self.retriever = retriever
        self.settings = settings
        self.page_id = page_id

    def consult(self, new_texts: Sequence[str], earlier_user_texts: Sequence[str], timeout: float) -> Consulted:
        """The excerpts for this turn (`earlier_user_texts`: the user's earlier messages, newest first)."""
        question = prompt.question(new_texts, earlier_user_texts)
        if not question:
            return NOTHING
        try:
            found = self.retriever.search(question, self.page_id, self.settings.top_k, timeout=timeout)
        except Exception as error:  # noqa: BLE001 - the reply loses its excerpts, never more
            failed = error if isinstance(error, SearchFailed) else f"{type(error).__name__}: {str(error)[:200]}"
            tokens = error.tokens if isinstance(error, SearchFailed) else 0
            logger.warning("could not search the knowledge base (%s): answering without it", failed,
                           exc_info=not isinstance(error, SearchFailed))  # a surprise keeps its traceback
            metrics.KNOWLEDGE.labels("error").inc()
            metrics.EMBEDDING_TOKENS.inc(tokens)
            return Consulted(tokens=tokens)
        if found.embedding_tokens:
            metrics.EMBEDDING_TOKENS.inc(found.embedding_tokens)
        if not found.searched:  # nothing was ever added: the knowledge base is not in use
            return NOTHING
        used = tuple(prompt.within_budget([hit for hit in found.hits if hit.relevant], self.settings.max_tokens))
        metrics.KNOWLEDGE.labels("used" if used else "nothing-relevant").inc()
        return Consulted(used, found.embedding_tokens, unknown=not used and self.settings.mode == ONLY)

    def excerpts(self, consulted: Consulted) -> str | None:
        """The system message with the excerpts, None when there are none."""
        if not consulted.used:
            return None
        return prompt.message(consulted.used, self.settings.page_name, self.settings.max_tokens)

    def cited(self, text: str, consulted: Consulted) -> str:
        """The answer with KNOWLEDGE_CITE's source line under it (the best excerpt's source)."""
        if not self.settings.cite or not consulted.used:
            return text
        return f"{text}\n\n{prompt.citation(consulted.used[0])}"
