"""Prometheus metrics, shared across gunicorn workers through multiprocess mode.

gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a folder under DATA_DIR
before any worker imports prometheus_client, so /metrics sums every worker.
"""
from __future__ import annotations

import logging
import os

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess

WEBHOOKS = Counter("messenger_webhooks_received_total", "Webhook POSTs, by result.", ["result"])
EVENTS = Counter("messenger_events_total", "Webhook events, by outcome.", ["outcome"])
REPLIES = Counter("messenger_replies_sent_total", "Reply messages the Send API accepted.")
FAILED = Counter("messenger_replies_failed_total", "Messages given up on, by reason.", ["reason"])
MODEL_ERRORS = Counter("openai_errors_total", "Model calls that ended in the fallback, by error class.", ["error_class"])
HISTORY_READS = Counter("messenger_history_reads_total", "Where a prompt's history came from.", ["source"])
class _ByChannel:
    """`labels(outcome, page)` as before, with the channel of the account added (`channel=` for the web)."""

    def __init__(self, counter: Counter):
        self.counter = counter
        self.channels: dict[str, str] = {}  # account id -> instagram (bot/replies/wiring.py); others messenger

    def labels(self, outcome: str, page: str, channel: str | None = None):
        return self.counter.labels(outcome, page, channel or self.channels.get(page, "messenger"))


EXCHANGES = _ByChannel(Counter("messenger_exchanges_total", "Answered batches, by outcome (as in the exchange log),"
                               " by Page or Instagram account and by channel (messenger, instagram, web).",
                               ["outcome", "page", "channel"]))
WEBCHAT_REQUESTS = Counter("webchat_requests_total", "Website chat requests, by how they ended (answered, "
                           "rate-limited, bad-request...).", ["result"])
TRACKING = Counter("messenger_tracking_posts_total", "POSTs to TRACKING_URL, by result.", ["result"])
GRAPH_ERRORS = Counter("graph_errors_total", "Graph API errors, by Meta error code.", ["code"])
SENDS_IN_DOUBT = Counter("messenger_sends_in_doubt_total", "Looks for a reply that may have gone out (a process died "
                         "mid-send, a send went unanswered), by result: went-out, not-sent, cannot-tell (looked for "
                         "again later), sent-unknowing (sent without knowing).", ["result"])
FEEDBACK = Counter("messenger_response_feedback_total", "Users' thumbs up (good) and down (bad) on the bot's replies.",
                   ["feedback"])
ATTACHMENTS = Counter("messenger_attachments_total", "Attachments users sent, by kind and what became of them.",
                      ["kind", "outcome"])
KNOWLEDGE = Counter("knowledge_searches_total", "Knowledge base searches for a reply, by result (used, "
                    "nothing-relevant, error).", ["result"])
EMBEDDING_TOKENS = Counter("openai_embedding_tokens_total", "Embedding tokens spent on users' questions "
                           "(they count toward DAILY_TOKEN_BUDGET too).")
CONNECTIONS_CLOSED = Counter("http_connections_closed_total", "Connections the web workers cut off, by reason: "
                             "header-timeout (HEADER_TIMEOUT passed), unread (an answer unsent for 30 s), room (one "
                             "closed to make room at the most connections a worker holds), refused (a new one, "
                             "every other being answered and no open file left).", ["reason"])
REPLY_LATENCY = Histogram(
    "messenger_reply_latency_seconds", "From webhook received to the reply's last part sent.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120),
)


def render() -> tuple[bytes, str]:
    """The exposition text: every worker's samples when running under gunicorn."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def count_taken_in(new: int, redelivered: int) -> None:
    """Messages that entered the queue, and redeliveries dropped by their mid: counted where that
    is known - the reply process's drain (SQLite's inbox files), or the webhooks' commit
    (PostgreSQL)."""
    if new:
        EVENTS.labels("accepted").inc(new)
    if redelivered:
        EVENTS.labels("duplicate").inc(redelivered)
        logging.getLogger(__name__).info("%d redelivered message(s) dropped", redelivered)
