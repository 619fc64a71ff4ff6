"""The Page's own knowledge: its FAQ, documents and web pages, searched for every answer.

    readers.py     a file or web page -> titled text, chunked (chunking.py)
    embeddings.py  the model server's /embeddings, and what to do when it has none
    store.py       the SQL, both backends (full text: FTS5 / tsvector)
    retrieval.py   full text + cosine, fused by reciprocal rank; relevant or not
    prompt.py      the excerpts as a system message, the follow-up query, the citation
    base.py        add / sync / list / remove / search, as `python -m bot knowledge` uses them
"""
from __future__ import annotations

import openai

from bot.knowledge.base import KnowledgeBase
from bot.knowledge.embeddings import Embedder
from bot.knowledge.readers import Limits


def embedder_for(config, client: openai.OpenAI | None = None) -> Embedder:
    client = client or openai.OpenAI(api_key=config.openai_api_key, base_url=config.openai_base_url,
                                     timeout=config.openai_timeout, max_retries=0)
    return Embedder(client, config.embedding_model, timeout=config.openai_timeout)


def open_knowledge(config, database=None) -> KnowledgeBase:
    """The knowledge base in the bot's own store (SQLite in DATA_DIR, or DATABASE_URL)."""
    if database is None:
        from bot.storage.queue import open_queue

        database = open_queue(config, pool_size=2).conversations.database
    return KnowledgeBase(database, embedder_for(config),
                         Limits(int(config.knowledge_max_mb * 1024 * 1024), config.knowledge_fetch_timeout),
                         min_score=config.knowledge_min_score)
