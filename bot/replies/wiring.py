"""Assembling the reply side: model client, Graph clients, one pipeline per Page and Instagram
account, the dispatcher."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import openai

from bot.media.budget import MemoryBudget
from bot.media.download import Downloader, allowed_for
from bot.media.prepare import MB, MediaReader, MediaSettings
from bot.replies.composer import Composer, Composers, PromptSettings, Timing
from bot.replies.gate import Policy
from bot.knowledge import embedder_for
from bot.knowledge.retrieval import Retriever
from bot.replies.handoff import Handoff, HandoffSettings
from bot.replies.knowledge import Knowledge, KnowledgeSettings
from bot.replies.dispatcher import Dispatcher
from bot.replies.tracking import Tracker
from bot.storage.doorbell import open_doorbell
from bot.storage.queue import Queue, open_queue
from bot.telemetry import metrics
from config import Account, Config
from gpt.model import ChatModel, ModelSettings
from gpt.retries import RetryPolicy
from gpt.transcribe import Transcriber
from messenger.graph import GraphClient


def build_dispatcher(config: Config, store: Queue | None = None, *,
                     wall_clock: Callable[[], float] = time.time,
                     sleep: Callable[[float], object] = time.sleep) -> Dispatcher:
    """The queue, the reply pipelines and the doorbell between them."""
    store = store or open_queue(config, pool_size=config.database_pool_size, wait=10.0)
    tracker = Tracker(store.conversations, config.tracking_url) if config.tracking_url else None
    return Dispatcher(store, build_composers(config, store, wall_clock=wall_clock, sleep=sleep), open_doorbell(config),
                      threads=config.reply_threads, lease_seconds=config.lease_seconds,
                      retry_base=config.retry_base_seconds, retention_days=config.retention_days, tracker=tracker,
                      inbox_dir=config.inbox_dir, data_dir=config.data_dir)


@dataclass(frozen=True)
class Shared:
    """What every Page's pipeline shares: one model client, the photo downloads and their memory."""

    client: openai.OpenAI
    downloader: Downloader
    budget: MemoryBudget
    retrievers: dict[str, Retriever] = field(default_factory=dict)  # by embedding model: one per process

    def retriever(self, config: Config, database) -> Retriever:
        """The knowledge base's searcher for this embedding model: its vectors are held once."""
        key = f"{config.embedding_model}\0{config.knowledge_min_score}"
        if key not in self.retrievers:
            self.retrievers[key] = Retriever(database, embedder_for(config, self.client),
                                             min_score=config.knowledge_min_score)
        return self.retrievers[key]


def build_composers(config: Config, store: Queue, *, wall_clock: Callable[[], float] = time.time,
                    sleep: Callable[[float], object] = time.sleep) -> Composers:
    """A pipeline for each Page and Instagram account, with its Page's token and settings."""
    # The client's own retries are off: ChatModel retries within the reply's deadline (gpt/retries.py).
    shared = Shared(openai.OpenAI(api_key=config.openai_api_key, base_url=config.openai_base_url,
                                  timeout=config.openai_timeout, max_retries=0),
                    Downloader(timeout=config.media_timeout, pool_size=config.reply_threads,
                               allows=allowed_for(config.fb_api_url)),
                    MemoryBudget(int(config.media_memory_mb * MB)))
    accounts = config.accounts or (Account(config.fb_page_id, config.fb_page_id, "messenger", "", config),)
    # The exchange log's and the metric's `channel`: an Instagram account's exchanges are `instagram`.
    channels = {account.id: account.platform for account in accounts}
    store.conversations.channels.update(channels)
    metrics.EXCHANGES.channels.update(channels)
    # One pooled connection per reply thread for each Page: a pool only keeps the sockets it
    # has made, so idle ones across all Pages never outnumber the threads that made them.
    pool = config.reply_threads + 8
    return Composers({account.id: build_composer(account, store, shared, pool, wall_clock=wall_clock, sleep=sleep)
                      for account in accounts})


def build_composer(account: Account, store: Queue, shared: Shared, pool_size: int, *,
                   wall_clock: Callable[[], float] = time.time, sleep: Callable[[float], object] = time.sleep) -> Composer:
    """One account's pipeline: its Graph client (the Page's token), its model settings and replies."""
    config = account.config
    graph = GraphClient(base_url=config.fb_api_url, page_id=account.page_id, token=config.fb_page_access_token,
                        app_secret=config.fb_app_secret, timeout=config.graph_timeout, pool_size=pool_size,
                        platform=account.platform)
    settings = ModelSettings(model=config.openai_model, temperature=config.openai_temperature,
                             top_p=config.openai_top_p, max_tokens=config.openai_max_tokens)
    chat_model = ChatModel(shared.client, settings, fallback=config.fallback_reply,
                           error_log_file=config.error_log_file, attempt_timeout=config.openai_timeout,
                           max_retries=config.openai_max_retries)
    # The account's own id: the Conversations API names an Instagram account's messages by it.
    prompt = PromptSettings(page_id=account.id, prefix=config.politeness_prefix,
                            message_count=config.message_count, system_prompt=config.system_prompt,
                            disclosure=config.disclosure_line, disclosure_after=config.disclosure_after_seconds,
                            handoff_button=config.handoff_button)
    policy = Policy(rate_limit=config.rate_limit, rate_limit_reply=config.rate_limit_reply,
                    daily_token_budget=config.daily_token_budget, budget_reply=config.budget_reply,
                    reset_word=config.reset_word, reset_reply=config.reset_reply,
                    mirror_max_age=config.mirror_max_age_seconds,
                    graph_reads_per_second=config.graph_reads_per_second,
                    history_wait=config.history_wait_seconds, handoff_words=config.handoff_words,
                    handoff_reply=config.handoff_text, human_pause=config.human_pause_seconds)
    timing = Timing(reply_deadline=config.reply_deadline_seconds, slow_notice=config.slow_reply_notice,
                    slow_limit=config.slow_reply_limit_seconds)
    media = build_media_reader(config, shared, chat_model.retries)
    handoff = Handoff(graph, store.conversations, HandoffSettings(
        thread_control=config.handoff_thread_control, webhook=config.handoff_webhook, page_name=config.fb_page_name),
        page_id=account.id, clock=wall_clock)
    return Composer(graph, chat_model, prompt, store.conversations, media, handoff=handoff, policy=policy, timing=timing,
                    answer_cache_ttl=config.answer_cache_ttl_seconds, wall_clock=wall_clock, sleep=sleep,
                    knowledge=build_knowledge(account, store, shared))


def build_knowledge(account: Account, store: Queue, shared: Shared) -> Knowledge | None:
    """The knowledge base as this account's answers use it (None: KNOWLEDGE_MODE=off)."""
    config = account.config
    if config.knowledge_mode == "off":
        return None
    settings = KnowledgeSettings(mode=config.knowledge_mode, top_k=config.knowledge_top_k,
                                 max_tokens=config.knowledge_max_tokens, unknown_reply=config.knowledge_unknown_reply,
                                 cite=config.knowledge_cite, page_name=config.fb_page_name or account.name)
    # Sources are the Page's: its Instagram account answers from the same ones.
    return Knowledge(shared.retriever(config, store.conversations.database), settings, account.page_id)


def build_media_reader(config: Config, shared: Shared, retries: RetryPolicy) -> MediaReader:
    """Photos and voice notes: the shared downloads and memory, this Page's replies and models."""
    settings = MediaSettings(
        unsupported_reply=config.unsupported_reply, media_error_reply=config.media_error_reply,
        too_large_reply=config.too_large_reply, voice_error_reply=config.voice_error_reply,
        sticker_reply=config.sticker_reply, default_question=config.image_question, vision=config.vision,
        image_max_bytes=int(config.image_max_mb * MB), audio_max_bytes=int(config.audio_max_mb * MB),
        voice_max_seconds=config.voice_max_seconds)
    transcriber = Transcriber(shared.client, config.transcribe_model, error_log_file=config.error_log_file,
                              retries=retries)
    return MediaReader(settings, shared.downloader, transcriber, shared.budget)
