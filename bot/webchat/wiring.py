"""Assembling the website chat from Config: the store, one Page's pipeline with the store's history
and a streaming model, the limits, the routes and the listener's ASGI app."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import openai

from bot.media.budget import MemoryBudget
from bot.media.download import Downloader, allowed_for
from bot.media.prepare import MB
from bot.replies.composer import Composer
from bot.replies.wiring import Shared, build_composer
from bot.storage.queue import Queue, open_queue
from bot.web.proxy import TrustedPeers
from bot.webchat.routes import cors_settings, create_webchat_app
from bot.webchat.server import WebchatServer
from bot.webchat.service import Limits, StoreHistory, WebChat
from config import Account, Config
from gpt.streaming import StreamingChatModel


def web_account(config: Config) -> Account:
    """The Page whose prompt and settings the web chat speaks with: WEBCHAT_PAGE, or the only one."""
    pages = [a for a in config.accounts if a.platform == "messenger"] or \
        [Account(config.fb_page_id, config.fb_page_id, "messenger", "", config)]
    return next((a for a in pages if a.id == config.webchat_page), pages[0])


def build_webchat(config: Config, store: Queue | None = None, *, clock: Callable[[], float] = time.time) -> WebChat:
    store = store or open_queue(config, clock, pool_size=config.database_pool_size, wait=5.0)
    account = web_account(config)
    client = openai.OpenAI(api_key=config.openai_api_key, base_url=config.openai_base_url,
                           timeout=config.openai_timeout, max_retries=0)
    shared = Shared(client, Downloader(timeout=config.media_timeout, pool_size=4, allows=allowed_for(config.fb_api_url)),
                    MemoryBudget(int(config.media_memory_mb * MB)))
    base = build_composer(account, store, shared, 4, wall_clock=clock)
    page = account.config
    model = StreamingChatModel(client, base.model.settings, fallback=page.fallback_reply,
                               error_log_file=page.error_log_file, attempt_timeout=page.openai_timeout,
                               max_retries=page.openai_max_retries)
    # The web's limits are counted per address and conversation at the edge (service.py), not per
    # user; and no person can answer a web conversation (no Page inbox): no way to one, no pause.
    composer = Composer(base.graph, model, base.prompt, store.conversations, base.media,
                        policy=replace(base.policy, rate_limit=None, handoff_words=()), timing=base.timing,
                        answer_cache_ttl=base.answer_cache_ttl, wall_clock=clock,
                        history=StoreHistory(store.conversations, account.id, page.message_count),
                        knowledge=base.knowledge)
    limits = Limits(per_ip=config.webchat_rate_limit, per_conversation=config.webchat_conversation_limit,
                    daily_per_ip=config.webchat_daily_limit, daily_tokens=config.webchat_daily_tokens,
                    daily_tokens_per_ip=config.webchat_ip_daily_tokens)
    return WebChat(composer, store.conversations, page_id=account.id, limits=limits, secret=config.webchat_secret,
                   expiring_signatures=config.webchat_signatures_expire,
                   reply_deadline=page.reply_deadline_seconds, retention_days=config.retention_days, clock=clock)


def build_server(config: Config) -> WebchatServer:
    chat = build_webchat(config)
    app = create_webchat_app(config, chat)
    return WebchatServer(app, chat, TrustedPeers(config.forwarded_allow_ips), cors_settings(config),
                         origins=config.webchat_origins, max_chars=config.webchat_max_chars,
                         threads=config.webchat_threads)
