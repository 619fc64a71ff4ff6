"""Logging set up once at start-up: secrets scrubbed and control characters escaped
as a last line of defence, for the bot's own lines and gunicorn's alike."""
from __future__ import annotations

import logging
import re
from typing import Iterable

REDACTED = "[redacted]"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A user's id or text holding "\n" must not be able to forge a log line, nor NULs
# and terminal escapes reach an operator's terminal. Tabs are harmless.
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\u2028\u2029]")


def escape_controls(text: str) -> str:
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class LogScrubber(logging.Filter):
    """Replaces any configured secret in a record's final text and escapes control
    characters, so one line of the log is always one record."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        # Short values would redact ordinary words; real tokens are long.
        self.secrets = tuple(s for s in secrets if len(s) >= 8)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = message
        if any(secret in clean for secret in self.secrets):
            for secret in self.secrets:
                clean = clean.replace(secret, REDACTED)
        clean = escape_controls(clean)
        if clean is not message and clean != message:
            record.msg, record.args = clean, None
        return True


# LOG_LEVEL applies to the bot's own code. Libraries stay at WARNING: at DEBUG the
# openai client logs whole request bodies (users' messages) and urllib3 whole URLs.
OWN_LOGGERS = ("bot", "messenger", "gpt", "config")


def configure_logging(level: str, secrets: Iterable[str]) -> None:
    """One stderr handler on the root logger; every line passes the scrubber."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(LogScrubber(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
