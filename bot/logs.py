"""Logging set up once at start-up, with secrets scrubbed as a last line of defence."""
from __future__ import annotations

import logging
from typing import Iterable

REDACTED = "[redacted]"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SecretFilter(logging.Filter):
    """Replaces any configured secret that slipped into a record's final text."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        # Short values would redact ordinary words; real tokens are long.
        self.secrets = tuple(s for s in secrets if len(s) >= 8)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(secret in message for secret in self.secrets):
            for secret in self.secrets:
                message = message.replace(secret, REDACTED)
            record.msg, record.args = message, None
        return True


# LOG_LEVEL applies to the bot's own code. Libraries stay at WARNING: at DEBUG the
# openai client logs whole request bodies (users' messages) and urllib3 whole URLs.
OWN_LOGGERS = ("bot", "messenger", "gpt", "config")


def configure_logging(level: str, secrets: Iterable[str]) -> None:
    """One stderr handler on the root logger; every line passes the secret filter."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
