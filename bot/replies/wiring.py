"""Assembling the reply side: model client, Graph client, pipeline, dispatcher."""
from __future__ import annotations

import openai

from bot.replies.dispatcher import Dispatcher
from bot.storage.doorbell import Doorbell
from bot.replies.composer import Policy, PromptSettings, Responder, Timing
from bot.storage.queue import SQLiteStore, open_store
from bot.replies.tracking import Tracker
from config import Config
from gpt.model import ModelSettings, ReplyGenerator
from messenger.graph import GraphClient


def build_dispatcher(config: Config, store: SQLiteStore | None = None) -> Dispatcher:
    """The queue, the reply pipeline and the doorbell between them."""
    store = store or open_store(config)
    tracker = Tracker(store.conversations, config.tracking_url) if config.tracking_url else None
    return Dispatcher(store, build_responder(config, store), Doorbell(config.database_path),
                      threads=config.reply_threads, lease_seconds=config.lease_seconds,
                      retry_base=config.retry_base_seconds, retention_days=config.retention_days, tracker=tracker,
                      inbox_dir=config.inbox_dir)


def build_responder(config: Config, store: SQLiteStore) -> Responder:
    """The reply pipeline with its two API clients, each built once."""
    graph = GraphClient(config.fb_api_url, config.fb_page_id, config.fb_page_access_token,
                        config.fb_app_secret, timeout=config.graph_timeout, pool_size=config.reply_threads + 8)
    # Retries are the generator's, within the reply's deadline (gpt/retries.py).
    client = openai.OpenAI(api_key=config.openai_api_key, base_url=config.openai_base_url,
                           timeout=config.openai_timeout, max_retries=0)
    model = ModelSettings(config.openai_model, config.openai_temperature, config.openai_top_p,
                          config.openai_max_tokens)
    generator = ReplyGenerator(client, model, config.fallback_reply, config.error_log_file,
                               attempt_timeout=config.openai_timeout, max_retries=config.openai_max_retries)
    prompt = PromptSettings(config.fb_page_id, config.politeness_prefix, config.message_count,
                            config.system_prompt, config.unsupported_reply)
    policy = Policy(config.rate_limit, config.rate_limit_reply, config.daily_token_budget, config.budget_reply,
                    config.reset_word, config.reset_reply, config.mirror_max_age_seconds,
                    config.graph_reads_per_second)
    timing = Timing(config.reply_deadline_seconds, config.slow_reply_notice, config.slow_reply_limit_seconds)
    return Responder(graph, generator, prompt, store.conversations, policy, timing)
