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


# In a traceback, line breaks are its own; the rest is escaped as in a message.
TRACEBACK_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]")
_FORMATTER = logging.Formatter()


# Loaded now: out of open files (EMFILE), a lazy import of the codec at the first escape fails.
"\n".encode("unicode_escape")


def _escaped(match: re.Match) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def escape_controls(text: str) -> str:
    return CONTROL.sub(_escaped, text)


class LogScrubber(logging.Filter):
    """Replaces any configured secret in a record's final text and escapes control
    characters, so one line of the log is always one record."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        # Short values would redact ordinary words; real tokens are long.
        self.secrets = tuple(s for s in secrets if len(s) >= 8)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = escape_controls(self._redact(message))
        if clean is not message and clean != message:
            record.msg, record.args = clean, None
        # A traceback quotes exception messages, and those quote URLs and bodies: requests' errors
        # carry the URL with its access_token. Formatted here (the formatter keeps exc_text), so
        # the secrets go; its own line breaks stay.
        if record.exc_info and not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = TRACEBACK_CONTROL.sub(_escaped, self._redact(record.exc_text))
        if record.stack_info:
            record.stack_info = TRACEBACK_CONTROL.sub(_escaped, self._redact(record.stack_info))
        return True

    def _redact(self, text: str) -> str:
        if any(secret in text for secret in self.secrets):
            for secret in self.secrets:
                text = text.replace(secret, REDACTED)
        return text


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
