"""Settings: read once from the environment (and `.env`), validated once, frozen.

Every problem is collected and reported in one ConfigError, so a Page owner
fixes their `.env` in one go instead of meeting one KeyError per start.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping
from urllib.parse import urlparse

from dotenv import dotenv_values

DEFAULT_FB_API_URL = "https://graph.facebook.com/v26.0/"
# A small current chat model that still accepts temperature / top_p / max_tokens.
DEFAULT_OPENAI_MODEL = "gpt-4.1-mini"
DEFAULT_POLITENESS_PREFIX = "Answer polite and concisely in a single sentence : "
DEFAULT_FALLBACK_REPLY = "please try again later"
DEFAULT_UNSUPPORTED_REPLY = (
    "Sorry, I can only read text messages for now. Could you type your question?"
)
# Meta gives message details for the 20 newest messages of a conversation only.
MAX_MESSAGE_COUNT = 20

# Set by gunicorn.conf.py for the webhook workers: replies run in their own process.
REPLY_PROCESS_ENV = "BOT_REPLY_PROCESS"


class ConfigError(ValueError):
    """Start-up settings are missing or invalid; the message names every problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            "Invalid configuration (set these in the environment or in .env):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


@dataclass(frozen=True)
class Config:
    """Everything the bot needs, with secrets kept out of repr()."""

    fb_verify_token: str = field(repr=False)
    fb_app_secret: str = field(repr=False)
    fb_page_access_token: str = field(repr=False)
    fb_page_id: str
    openai_api_key: str = field(repr=False)
    fb_api_url: str = DEFAULT_FB_API_URL
    openai_base_url: str | None = None
    openai_model: str = DEFAULT_OPENAI_MODEL
    openai_temperature: float | None = 0.2
    openai_top_p: float | None = 0.2
    openai_max_tokens: int | None = 512
    openai_timeout: float = 20.0
    openai_max_retries: int = 2
    system_prompt: str = ""
    message_count: int = 10
    politeness_prefix: str = DEFAULT_POLITENESS_PREFIX
    fallback_reply: str = DEFAULT_FALLBACK_REPLY
    unsupported_reply: str = DEFAULT_UNSUPPORTED_REPLY
    error_log_file: str = "openai_api_errors.log"
    graph_timeout: float = 10.0
    reply_threads: int = 100
    data_dir: str = "data"
    max_attempts: int = 5
    retry_base_seconds: float = 1.0
    lease_seconds: float = 30.0
    port: int = 8000
    log_level: str = "INFO"

    @property
    def worst_reply_seconds(self) -> int:
        """The slowest honest reply: history read, every model attempt with the openai
        client's backoff (at most 8 s between tries), and a send, plus a margin."""
        graph_call = min(3.05, self.graph_timeout) + self.graph_timeout
        model = self.openai_timeout * (self.openai_max_retries + 1) + 8 * self.openai_max_retries
        return int(2 * graph_call + model + 5)

    @property
    def database_path(self) -> str:
        return os.path.join(self.data_dir, "bot.sqlite3")

    @property
    def secrets(self) -> tuple[str, ...]:
        """The values that must never be written anywhere."""
        return (self.fb_verify_token, self.fb_app_secret, self.fb_page_access_token, self.openai_api_key)


def read_environment(environ: Mapping[str, str] | None = None, env_file: str | None = ".env") -> dict[str, str]:
    """The process environment over the `.env` file: a real variable always wins."""
    values = {k: v for k, v in dotenv_values(env_file).items() if v is not None} if env_file and os.path.isfile(env_file) else {}
    values.update(os.environ if environ is None else environ)
    return values


def load_config(environ: Mapping[str, str] | None = None, env_file: str | None = ".env") -> Config:
    """Build the Config or raise one ConfigError listing every problem."""
    env = read_environment(environ, env_file)
    problems: list[str] = []
    reader = _Reader(env, problems)
    values = dict(
        fb_verify_token=reader.required("FB_VERIFY_TOKEN"),
        fb_app_secret=reader.required("FB_APP_SECRET"),
        fb_page_access_token=reader.required("FB_PAGE_ACCESS_TOKEN"),
        fb_page_id=reader.required("FB_PAGE_ID", check=str.isdigit, expect="digits only (the Page's numeric id)"),
        openai_api_key=reader.required("OPENAI_API_KEY"),
        fb_api_url=reader.url("FB_API_URL", DEFAULT_FB_API_URL),
        openai_base_url=reader.url("OPENAI_BASE_URL", None),
        openai_model=reader.text("OPENAI_MODEL", DEFAULT_OPENAI_MODEL, allow_empty=False),
        openai_temperature=reader.number("OPENAI_TEMPERATURE", 0.2, float, 0, 2, optional=True),
        openai_top_p=reader.number("OPENAI_TOP_P", 0.2, float, 0, 1, optional=True),
        openai_max_tokens=reader.number("OPENAI_MAX_TOKENS", 512, int, 1, 1_000_000, optional=True),
        openai_timeout=reader.number("OPENAI_TIMEOUT", 20.0, float, 0.1, 600),
        openai_max_retries=reader.number("OPENAI_MAX_RETRIES", 2, int, 0, 10),
        system_prompt=reader.text("SYSTEM_PROMPT", ""),
        message_count=reader.number(
            "MESSAGE_COUNT", 10, int, 1, MAX_MESSAGE_COUNT,
            hint="Meta returns message details for the 20 newest messages only",
        ),
        politeness_prefix=reader.text("POLITENESS_PREFIX", DEFAULT_POLITENESS_PREFIX),
        fallback_reply=reader.text("FALLBACK_REPLY", DEFAULT_FALLBACK_REPLY, allow_empty=False),
        unsupported_reply=reader.text("UNSUPPORTED_REPLY", DEFAULT_UNSUPPORTED_REPLY, allow_empty=False),
        error_log_file=reader.text("ERROR_LOG_FILE", "openai_api_errors.log", allow_empty=False),
        graph_timeout=reader.number("GRAPH_TIMEOUT", 10.0, float, 0.1, 120),
        reply_threads=reader.number("REPLY_THREADS", 100, int, 1, 256),
        data_dir=reader.text("DATA_DIR", "data", allow_empty=False),
        max_attempts=reader.number("MAX_ATTEMPTS", 5, int, 1, 100),
        retry_base_seconds=reader.number("RETRY_BASE_SECONDS", 1.0, float, 0.01, 600),
        lease_seconds=reader.number("LEASE_SECONDS", 30.0, float, 1, 3600),
        port=reader.number("PORT", 8000, int, 1, 65535),
        log_level=reader.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
    )
    if problems:
        raise ConfigError(problems)
    return Config(**values)


class _Reader:
    """Reads one variable at a time, noting problems instead of raising."""

    def __init__(self, env: Mapping[str, str], problems: list[str]):
        self.env = env
        self.problems = problems

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return None if value is None else value.strip()

    def required(self, name: str, check: Callable[[str], bool] | None = None, expect: str = "") -> str:
        value = self._raw(name)
        if not value:
            self.problems.append(f"{name} is required")
        elif check and not check(value):
            # Never echo the value: required settings are mostly secrets.
            self.problems.append(f"{name} must be {expect}")
        return value or ""

    def text(self, name: str, default: str, allow_empty: bool = True) -> str:
        value = self.env.get(name)
        if value is None:
            return default
        if not value.strip() and not allow_empty:
            self.problems.append(f"{name} must not be empty")
        return value

    def url(self, name: str, default: str | None) -> str | None:
        value = self._raw(name)
        if not value:
            return default
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            self.problems.append(f"{name} must be an http(s) URL, got {value!r}")
            return default
        return value if value.endswith("/") else value + "/"

    def number(self, name, default, kind, low, high, optional: bool = False, hint: str = ""):
        value = self._raw(name)
        if value is None:
            return default
        if value == "" and optional:
            return None  # empty = do not send the parameter at all
        try:
            number = kind(value)
        except ValueError:
            self.problems.append(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
            return default
        if not low <= number <= high:
            note = f" ({hint})" if hint else ""
            self.problems.append(f"{name} must be between {low} and {high}, got {value}{note}")
        return number

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        value = (self._raw(name) or default).upper()
        if value not in options:
            self.problems.append(f"{name} must be one of {', '.join(options)}, got {value!r}")
        return value
