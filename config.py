"""Settings: read once from the environment (and `.env`), validated once, frozen.

Every problem is collected and reported in one ConfigError, so a Page owner
fixes their `.env` in one go instead of meeting one KeyError per start.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping
from urllib.parse import parse_qs, quote, unquote, urlparse

from dotenv import dotenv_values

from pages import TOKEN_EXPECTED, PageEntry, is_numeric_id, is_token, read_pages_file

DEFAULT_FB_API_URL = "https://graph.facebook.com/v26.0/"
# A small current chat model that still accepts temperature / top_p / max_tokens.
DEFAULT_OPENAI_MODEL = "gpt-4.1-mini"
DEFAULT_POLITENESS_PREFIX = "Answer polite and concisely in a single sentence : "
DEFAULT_FALLBACK_REPLY = "please try again later"
DEFAULT_UNSUPPORTED_REPLY = (
    "Sorry, I can only read text messages for now. Could you type your question?"
)
DEFAULT_MEDIA_ERROR_REPLY = "Sorry, I could not open that. Could you send it again, or type your question?"
DEFAULT_TOO_LARGE_REPLY = "Sorry, that is too large for me. Could you send something shorter or smaller, or type your question?"
DEFAULT_VOICE_ERROR_REPLY = "Sorry, I could not make out your voice message. Could you type it?"
DEFAULT_IMAGE_QUESTION = "What can you tell me about this picture?"
DEFAULT_TRANSCRIBE_MODEL = "gpt-4o-mini-transcribe"
# Meta's disclosure rule: {page} is the Page's name (FB_PAGE_NAME, or `name` in PAGES_FILE).
DEFAULT_DISCLOSURE_TEXT = "You are chatting with {page}'s automated assistant."
DEFAULT_DISCLOSURE_UNNAMED = "You are chatting with an automated assistant."
# A way to a person: a whole message that is one of these words (any case), or the button.
DEFAULT_HANDOFF_WORDS = ("human", "agent", "person", "operator", "humain", "persona", "mensch")
DEFAULT_HANDOFF_REPLY = "Thank you, a person from {page} will answer you here as soon as possible."
# The knowledge base (bot/knowledge/): KNOWLEDGE_MODE=only says this when nothing in it answers.
DEFAULT_KNOWLEDGE_UNKNOWN_REPLY = "I'm sorry, I don't know that. I would rather not guess."
DEFAULT_EMBEDDING_MODEL = "text-embedding-3-small"
DEFAULT_RATE_LIMIT_REPLY = "You are writing faster than I can answer. Please wait a minute before your next message."
DEFAULT_BUDGET_REPLY = "We have talked a lot today! I will be glad to answer again tomorrow."
DEFAULT_RESET_REPLY = "Done, I have forgotten our earlier conversation. What can I do for you?"
# Meta gives message details for the 20 newest messages of a conversation only.
MAX_MESSAGE_COUNT = 20
UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600,
         "d": 86400, "day": 86400}
DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)?\s*([a-z]*)\s*")
HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*")

DATABASE_FILE = "bot.sqlite3"  # inside DATA_DIR: the queue, the mirror and the exchange log

# What .env.example once gave as FB_VERIFY_TOKEN: a copied example is not a secret.
OLD_EXAMPLE_VERIFY_TOKEN = "choose-any-long-random-string"

# Set by gunicorn.conf.py for the webhook workers: replies run in their own process.
REPLY_PROCESS_ENV = "BOT_REPLY_PROCESS"
# Set by the gunicorn master in the processes it keeps (the reply process, the website chat): the
# `.env` values and the Pages file it validated, as JSON ({"env_file": {...}, "pages_file":
# [path, text] or null}). They read those instead of the files, so a file edited since (without
# a SIGHUP, or with a mistake the master refused) cannot reach them when they start again after
# a crash or a reload. In one variable, not as variables of their own: a `.env` key is a setting,
# never an environment variable that a library would act on in those two processes alone.
CHECKED_SETTINGS_ENV = "BOT_CHECKED_SETTINGS"


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
    fb_instagram_id: str | None = None  # the Page's linked Instagram account, answered too
    fb_page_name: str = ""  # how the disclosure names the Page
    fb_api_url: str = DEFAULT_FB_API_URL
    openai_base_url: str | None = None
    openai_model: str = DEFAULT_OPENAI_MODEL
    openai_temperature: float | None = 0.2
    openai_top_p: float | None = 0.2
    openai_max_tokens: int | None = 512
    openai_timeout: float = 20.0
    openai_max_retries: int = 2
    # Meta's 30-second rule: the model (retries included) has this long after the reply thread
    # takes a message; history read before and the send after fit in the rest (README).
    reply_deadline_seconds: float = 21.0
    slow_reply_notice: str = ""  # "" = at the deadline send the fallback; else this, then the answer
    slow_reply_limit_seconds: float = 120.0  # with a notice: how long the answer may still take
    system_prompt: str = ""
    message_count: int = 10
    politeness_prefix: str = DEFAULT_POLITENESS_PREFIX
    fallback_reply: str = DEFAULT_FALLBACK_REPLY
    unsupported_reply: str = DEFAULT_UNSUPPORTED_REPLY
    error_log_file: str = "openai_api_errors.log"
    # Meta's rules (bot/replies/meta_rules.py): the bot says it is one at the first message,
    # after a silence, and when it answers again after a person did.
    disclosure: bool = True
    disclosure_text: str = DEFAULT_DISCLOSURE_TEXT
    disclosure_after_seconds: float = 86400.0
    handoff_words: tuple[str, ...] = DEFAULT_HANDOFF_WORDS
    handoff_reply: str = DEFAULT_HANDOFF_REPLY
    handoff_button: str = ""  # a "Talk to a person" quick reply under the bot's answers; "" = none
    handoff_thread_control: bool = False  # pass the thread to the Page inbox (Meta's handover protocol)
    handoff_webhook: str | None = None  # POSTed the user, the Page and a summary at each handoff
    # Photos and voice notes (bot/media/): fetched from Meta's CDN within these bounds.
    vision: bool = True  # off: photos get UNSUPPORTED_REPLY, as videos do
    image_question: str = DEFAULT_IMAGE_QUESTION  # asked of a photo sent without words
    image_max_mb: float = 8.0
    audio_max_mb: float = 25.0  # OpenAI's limit for one transcription
    voice_max_seconds: float = 300.0
    media_timeout: float = 10.0  # one fetch, start to last byte
    media_memory_mb: float = 64.0  # photos in memory at once, all reply threads together
    transcribe_model: str = DEFAULT_TRANSCRIBE_MODEL
    sticker_reply: str = ""  # "" = stickers (the "like" too) get no reply
    media_error_reply: str = DEFAULT_MEDIA_ERROR_REPLY
    too_large_reply: str = DEFAULT_TOO_LARGE_REPLY
    voice_error_reply: str = DEFAULT_VOICE_ERROR_REPLY
    graph_timeout: float = 5.0
    reply_threads: int = 100
    data_dir: str = "data"
    # postgresql://user@host/db: every host sharing it acts as one bot; empty = SQLite in DATA_DIR.
    database_url: str | None = field(default=None, repr=False)
    database_pool_size: int = 10
    max_attempts: int = 5
    retry_base_seconds: float = 1.0
    lease_seconds: float = 8.0
    host: str = "0.0.0.0"  # the address gunicorn (and the website chat) listen on
    port: int = 8000
    web_concurrency: int = 2  # webhook worker processes
    header_timeout: float = 10.0  # a new connection must send its request's headers within this
    log_level: str = "INFO"
    fb_app_id: str = ""
    rate_limit: tuple[int, float] | None = (5, 60.0)  # (messages, per seconds); None = off
    rate_limit_reply: str = DEFAULT_RATE_LIMIT_REPLY
    daily_token_budget: int = 0  # tokens per user per UTC day; 0 = off
    budget_reply: str = DEFAULT_BUDGET_REPLY
    human_pause_seconds: float = 1800.0  # 0 = never pause for a human
    reset_word: str = "reset"  # "" = off
    reset_reply: str = DEFAULT_RESET_REPLY
    mirror_max_age_seconds: float = 86400.0
    graph_reads_per_second: float = 2.0
    history_wait_seconds: float = 2.0  # a user the mirror does not know waits this long for a Graph read
    answer_cache_ttl_seconds: float = 0.0  # 0 = off
    retention_days: int = 90  # 0 = keep forever
    tracking_url: str | None = None
    # Peers whose X-Forwarded-For / -Proto are believed: the tunnel or proxy on this host.
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    # /readyz says "not ready" once a message has waited this long for its reply.
    ready_max_wait_seconds: float = 300.0
    # The website chat (bot/webchat/): off unless WEBCHAT=on; its own listener on WEBCHAT_PORT.
    webchat: bool = False
    webchat_port: int = 8001
    webchat_page: str = ""  # the Page whose prompt and settings the web chat uses ("" = the only one)
    webchat_origins: tuple[str, ...] = ()  # sites allowed to call it from a browser (CORS); "*" = any
    webchat_secret: str = field(default="", repr=False)  # HMAC key for signed user ids
    webchat_signatures_expire: bool = False  # on: a signed user id must carry user_signature_expires
    webchat_rate_limit: tuple[int, float] | None = (5, 60.0)  # per IP (an IPv6 /64)
    webchat_conversation_limit: tuple[int, float] | None = (5, 60.0)  # per conversation
    webchat_daily_limit: int = 200  # messages per IP per UTC day; 0 = off
    webchat_daily_tokens: int = 1_000_000  # model tokens of the whole web channel per UTC day; 0 = off
    webchat_ip_daily_tokens: int = 200_000  # of those, what one address (an IPv6 /64) may spend; 0 = off
    webchat_max_chars: int = 2000  # longest message a visitor may send
    webchat_threads: int = 256  # web answers prepared at once (each mostly waits on the model)
    # The knowledge base (bot/knowledge/, README "Teach the bot your business").
    knowledge_mode: str = "prefer"  # prefer: excerpts when relevant; only: else say so; off: never searched
    knowledge_top_k: int = 4
    knowledge_max_tokens: int = 1200  # of excerpts in one prompt
    knowledge_min_score: float = 0.3  # cosine similarity for an excerpt to count as relevant
    knowledge_unknown_reply: str = DEFAULT_KNOWLEDGE_UNKNOWN_REPLY
    knowledge_cite: bool = False  # a "Source: …" line under answers drawn from the knowledge base
    knowledge_max_mb: float = 10.0  # largest file or page added
    knowledge_fetch_timeout: float = 15.0  # one web page, start to last byte
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    # Where messages come from: each Page (and linked Instagram account) with its own Config
    # (PAGES_FILE); one Page from FB_PAGE_ID otherwise. Empty only in a Page's own Config.
    accounts: tuple["Account", ...] = field(default=(), repr=False)
    pages_file: str | None = None

    def account(self, account_id: str) -> "Account | None":
        return next((a for a in self.accounts if a.id == account_id), None)

    @property
    def account_ids(self) -> frozenset[str]:
        return frozenset(a.id for a in self.accounts)

    @property
    def model_deadline_seconds(self) -> float:
        """How long after a reply starts the model must have answered, retries included."""
        return self.slow_reply_limit_seconds if self.slow_reply_notice else self.reply_deadline_seconds

    @property
    def worst_reply_seconds(self) -> int:
        """The slowest honest reply: history read and model within the model's deadline, then a
        send (connect + read timeout), plus a margin. For the graceful stop."""
        send = min(3.05, self.graph_timeout) + self.graph_timeout
        return int(self.model_deadline_seconds + send + 5)

    @property
    def stop_seconds(self) -> int:
        """The graceful stop: the slowest Page's worst_reply_seconds (a Page may set its own
        deadlines); a shorter one would give its answers in flight back, to be paid for again."""
        return max([self.worst_reply_seconds, *(a.config.worst_reply_seconds for a in self.accounts)])

    @property
    def database_path(self) -> str:
        return database_path(self.data_dir)

    @property
    def inbox_dir(self) -> str | None:
        """The webhooks' inbox files (SQLite); None with PostgreSQL, where they write to the database."""
        return None if self.database_url else os.path.join(self.data_dir, "inbox")

    @property
    def handoff_text(self) -> str:
        return self.handoff_reply.replace("{page}", self.fb_page_name or "our team")

    @property
    def disclosure_line(self) -> str | None:
        """What the bot says of itself (None: DISCLOSURE=off), with the Page's name in it."""
        if not self.disclosure:
            return None
        if "{page}" in self.disclosure_text and not self.fb_page_name:
            return DEFAULT_DISCLOSURE_UNNAMED if self.disclosure_text == DEFAULT_DISCLOSURE_TEXT else \
                self.disclosure_text.replace("{page}", "this Page")
        return self.disclosure_text.replace("{page}", self.fb_page_name)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The values that must never be written anywhere."""
        tokens = {a.config.fb_page_access_token for a in self.accounts}
        return tuple(filter(None, (self.fb_verify_token, self.fb_app_secret, self.fb_page_access_token,
                                   self.openai_api_key, self.webchat_secret, *url_passwords(self.database_url),
                                   *sorted(tokens))))


@dataclass(frozen=True)
class Account:
    """Where messages arrive and replies leave: a Page on Messenger, or its linked Instagram account."""

    id: str  # what webhooks call it (entry.id, recipient.id): the Page's id or the Instagram account's
    page_id: str  # the Page whose token speaks for it
    platform: str  # messenger | instagram (messenger/platforms.py)
    name: str
    config: Config = field(repr=False)  # its Page's settings: FB_PAGE_ID, the token, the Page's overrides

    @property
    def label(self) -> str:
        return f"{self.name} ({self.id})" if self.name else self.id


def database_path(data_dir: str) -> str:
    return os.path.join(data_dir, DATABASE_FILE)


def load_config_or_exit(environ: Mapping[str, str] | None = None, env_file: str | None = ".env") -> Config:
    """load_config for a command's start-up: every problem in one message on stderr, exit status 1."""
    try:
        return load_config(environ, env_file)
    except ConfigError as error:
        raise SystemExit(str(error)) from None


def read_environment(environ: Mapping[str, str] | None = None, env_file: str | None = ".env") -> dict[str, str]:
    """The process environment over the `.env` file: a real variable always wins."""
    values = read_env_file(env_file) if env_file else {}
    values.update(os.environ if environ is None else environ)
    return values


def checked_settings() -> dict | None:
    """What the gunicorn master validated, in a process it started (CHECKED_SETTINGS_ENV); None
    elsewhere, and for anything that is not what the master writes."""
    try:
        checked = json.loads(os.environ.get(CHECKED_SETTINGS_ENV) or "null")
    except ValueError:
        return None
    if not isinstance(checked, dict) or not isinstance(checked.get("env_file"), dict):
        return None
    return checked


def read_env_file(env_file: str = ".env") -> dict[str, str]:
    """The `.env` file's values: {} without one; in a process the gunicorn master started, the
    values it validated (checked_settings)."""
    if (checked := checked_settings()) is not None:
        return {str(k): str(v) for k, v in checked["env_file"].items()}
    try:
        if not os.path.exists(env_file):
            return {}
        with open(env_file, encoding="utf-8") as stream:  # opened here: python-dotenv skips a folder in silence
            return {k: v for k, v in dotenv_values(stream=stream).items() if v is not None}
    except UnicodeDecodeError:
        raise ConfigError([f"{env_file} is not UTF-8: save it as UTF-8"]) from None
    except OSError as exc:  # a folder, or not readable by this user: its settings must not be skipped
        raise ConfigError([f"cannot read {env_file} ({exc.strerror}): make it a file this user can read"]) from None


def load_config(environ: Mapping[str, str] | None = None, env_file: str | None = ".env",
                pages_text: str | None = None) -> Config:
    """Build the Config or raise one ConfigError listing every problem (the Pages file's too:
    `pages_text` is its text as read before, or the text the master validated)."""
    env = read_environment(environ, env_file)
    pages_path = env.get("PAGES_FILE", "").strip()
    if pages_path and pages_text is None and (checked := checked_settings()):
        handed = checked.get("pages_file")
        if isinstance(handed, list) and len(handed) == 2 and handed[0] == pages_path and isinstance(handed[1], str):
            pages_text = handed[1]
    entries, problems = ([], []) if not pages_path else read_pages_file(pages_path, pages_text)
    if pages_path:
        if env.get("FB_PAGE_ID", "").strip() or env.get("FB_PAGE_ACCESS_TOKEN", "").strip():
            problems.append("set either PAGES_FILE or FB_PAGE_ID and FB_PAGE_ACCESS_TOKEN, not both")
        # One Page's identity, which would be ignored (its Instagram account silently unanswered)
        # or given to every Page without a name of its own.
        problems += [f"{name} belongs to one Page: with PAGES_FILE write it as that Page's {key}"
                     for name, key in (("FB_INSTAGRAM_ID", "instagram_id"), ("FB_PAGE_NAME", "name"))
                     if env.get(name, "").strip()]
        # The deployment-wide settings are read with the first Page standing in for FB_PAGE_*.
        first = entries[0] if entries else PageEntry("0", "-")
        env = {**env, "FB_PAGE_ID": first.id or "0", "FB_PAGE_ACCESS_TOKEN": first.access_token or "-"}
    values, base_problems = _read_values(env)
    # With PAGES_FILE, a Page's id and token are the file's: read_pages_file names their problems.
    stand_ins = ("FB_PAGE_ID ", "FB_PAGE_ACCESS_TOKEN ") if entries else ()
    base_problems = [p for p in base_problems if not p.startswith(stand_ins)] if stand_ins else base_problems
    page_configs = []
    for entry in entries:  # each Page's settings: the environment's, its own overrides over them
        page_values, own = _read_values({**env, **entry.settings, "FB_PAGE_ID": entry.id or "0",
                                         "FB_PAGE_ACCESS_TOKEN": entry.access_token or "-",
                                         "FB_PAGE_NAME": entry.name})
        problems += [f"PAGES_FILE, page {entry.label}: {p}" for p in own
                     if p not in base_problems and not p.startswith(stand_ins)]
        page_configs.append(page_values)
    problems = base_problems + problems + _webchat_problems(values, entries)
    if problems:
        raise ConfigError(problems)
    config = Config(**values)
    accounts = _accounts(config, entries, [Config(**v) for v in page_configs])
    return replace(config, accounts=accounts, pages_file=env.get("PAGES_FILE", "").strip() or None)


def _accounts(config: Config, entries: list[PageEntry], page_configs: list[Config]) -> tuple[Account, ...]:
    """Every Page and Instagram account answered, each with its Page's own Config."""
    if not entries:
        accounts = [Account(config.fb_page_id, config.fb_page_id, "messenger", "", config)]
        if config.fb_instagram_id:
            accounts.append(Account(config.fb_instagram_id, config.fb_page_id, "instagram", "", config))
        return tuple(accounts)
    accounts = []
    for entry, page_config in zip(entries, page_configs):
        accounts.append(Account(entry.id, entry.id, "messenger", entry.name, page_config))
        if entry.instagram_id:
            accounts.append(Account(entry.instagram_id, entry.id, "instagram", entry.name, page_config))
    return tuple(accounts)


def _read_values(env: Mapping[str, str]) -> tuple[dict, list[str]]:
    """Every setting's value from `env`, and every problem with them."""
    problems: list[str] = []
    reader = _Reader(env, problems)
    values = dict(
        fb_verify_token=reader.required("FB_VERIFY_TOKEN", lambda v: v != OLD_EXAMPLE_VERIFY_TOKEN,
                                        "a string of your own, not the example's"),
        fb_app_secret=reader.required("FB_APP_SECRET"),
        fb_page_access_token=reader.required("FB_PAGE_ACCESS_TOKEN", check=is_token, expect=TOKEN_EXPECTED),
        fb_page_id=reader.required("FB_PAGE_ID", check=is_numeric_id, expect="digits only (the Page's numeric id)"),
        fb_instagram_id=reader.text("FB_INSTAGRAM_ID", "").strip() or None,
        fb_page_name=reader.text("FB_PAGE_NAME", "").strip(),
        disclosure=reader.switch("DISCLOSURE", True),
        disclosure_text=reader.text("DISCLOSURE_TEXT", DEFAULT_DISCLOSURE_TEXT, allow_empty=False),
        disclosure_after_seconds=reader.duration("DISCLOSURE_AFTER", 86400.0, bare_unit="h", low=60),
        handoff_words=reader.words("HANDOFF_WORDS", DEFAULT_HANDOFF_WORDS),
        handoff_reply=reader.text("HANDOFF_REPLY", DEFAULT_HANDOFF_REPLY, allow_empty=False),
        handoff_button=reader.text("HANDOFF_BUTTON", "").strip(),
        handoff_thread_control=reader.switch("HANDOFF_THREAD_CONTROL", False),
        handoff_webhook=reader.url("HANDOFF_WEBHOOK", None, trailing_slash=False),
        openai_api_key=reader.required("OPENAI_API_KEY"),
        fb_api_url=reader.url("FB_API_URL", DEFAULT_FB_API_URL),
        openai_base_url=reader.url("OPENAI_BASE_URL", None),
        openai_model=reader.text("OPENAI_MODEL", DEFAULT_OPENAI_MODEL, allow_empty=False),
        openai_temperature=reader.number("OPENAI_TEMPERATURE", 0.2, float, 0, 2, optional=True),
        openai_top_p=reader.number("OPENAI_TOP_P", 0.2, float, 0, 1, optional=True),
        openai_max_tokens=reader.number("OPENAI_MAX_TOKENS", 512, int, 1, 1_000_000, optional=True),
        openai_timeout=reader.number("OPENAI_TIMEOUT", 20.0, float, 0.1, 600),
        openai_max_retries=reader.number("OPENAI_MAX_RETRIES", 2, int, 0, 10),
        # The bounds keep a typo (21h for 21s) from holding every stop and every reply for hours.
        reply_deadline_seconds=reader.duration("REPLY_DEADLINE", 21.0, bare_unit="s", low=2, high=600),
        slow_reply_notice=reader.text("SLOW_REPLY_NOTICE", "").strip(),
        slow_reply_limit_seconds=reader.duration("SLOW_REPLY_LIMIT", 120.0, bare_unit="s", low=2, high=3600),
        system_prompt=reader.text("SYSTEM_PROMPT", ""),
        message_count=reader.number(
            "MESSAGE_COUNT", 10, int, 1, MAX_MESSAGE_COUNT,
            hint="Meta returns message details for the 20 newest messages only",
        ),
        # A space before the user's words even when the file lost it (dotenv strips an unquoted
        # value's trailing space; docker --env-file keeps quotes, so .env.example cannot quote it).
        politeness_prefix=_spaced(reader.text("POLITENESS_PREFIX", DEFAULT_POLITENESS_PREFIX)),
        fallback_reply=reader.text("FALLBACK_REPLY", DEFAULT_FALLBACK_REPLY, allow_empty=False),
        unsupported_reply=reader.text("UNSUPPORTED_REPLY", DEFAULT_UNSUPPORTED_REPLY, allow_empty=False),
        error_log_file=reader.text("ERROR_LOG_FILE", "openai_api_errors.log", allow_empty=False),
        vision=reader.switch("VISION", True),
        image_question=reader.text("IMAGE_QUESTION", DEFAULT_IMAGE_QUESTION, allow_empty=False),
        image_max_mb=reader.number("IMAGE_MAX_MB", 8.0, float, 0.01, 20,
                                   hint="OpenAI takes images of up to 20 MB"),
        audio_max_mb=reader.number("AUDIO_MAX_MB", 25.0, float, 0.01, 25,
                                   hint="OpenAI transcribes files of up to 25 MB"),
        voice_max_seconds=reader.duration("VOICE_MAX_LENGTH", 300.0, bare_unit="s", low=1),
        media_timeout=reader.duration("MEDIA_TIMEOUT", 10.0, bare_unit="s", low=0.5),
        media_memory_mb=reader.number("MEDIA_MEMORY_MB", 64.0, float, 1, 100_000),
        transcribe_model=reader.text("TRANSCRIBE_MODEL", DEFAULT_TRANSCRIBE_MODEL, allow_empty=False).strip(),
        sticker_reply=reader.text("STICKER_REPLY", "").strip(),
        media_error_reply=reader.text("MEDIA_ERROR_REPLY", DEFAULT_MEDIA_ERROR_REPLY, allow_empty=False),
        too_large_reply=reader.text("TOO_LARGE_REPLY", DEFAULT_TOO_LARGE_REPLY, allow_empty=False),
        voice_error_reply=reader.text("VOICE_ERROR_REPLY", DEFAULT_VOICE_ERROR_REPLY, allow_empty=False),
        graph_timeout=reader.number("GRAPH_TIMEOUT", 5.0, float, 0.1, 120),
        reply_threads=reader.number("REPLY_THREADS", 100, int, 1, 256),
        data_dir=reader.text("DATA_DIR", "data", allow_empty=False),
        database_url=reader.database_url("DATABASE_URL"),
        database_pool_size=reader.number("DATABASE_POOL_SIZE", 10, int, 2, 200),
        max_attempts=reader.number("MAX_ATTEMPTS", 5, int, 1, 100),
        retry_base_seconds=reader.number("RETRY_BASE_SECONDS", 1.0, float, 0.01, 600),
        lease_seconds=reader.number("LEASE_SECONDS", 8.0, float, 1, 3600),
        host=reader.host("HOST", "0.0.0.0"),
        port=reader.number("PORT", 8000, int, 1, 65535),
        web_concurrency=reader.number("WEB_CONCURRENCY", 2, int, 1, 64),
        header_timeout=reader.duration("HEADER_TIMEOUT", 10.0, bare_unit="s", low=0.1),
        log_level=reader.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        fb_app_id=reader.text("FB_APP_ID", "").strip(),
        rate_limit=reader.rate("RATE_LIMIT", (5, 60.0)),
        rate_limit_reply=reader.text("RATE_LIMIT_REPLY", DEFAULT_RATE_LIMIT_REPLY, allow_empty=False),
        daily_token_budget=reader.number("DAILY_TOKEN_BUDGET", 0, int, 0, 10**10, off=True),
        budget_reply=reader.text("BUDGET_REPLY", DEFAULT_BUDGET_REPLY, allow_empty=False),
        human_pause_seconds=reader.duration("HUMAN_PAUSE", 1800.0, bare_unit="m"),
        reset_word=reader.text("RESET_WORD", "reset").strip(),
        reset_reply=reader.text("RESET_REPLY", DEFAULT_RESET_REPLY, allow_empty=False),
        mirror_max_age_seconds=reader.duration("MIRROR_MAX_AGE", 86400.0, bare_unit="h"),
        graph_reads_per_second=reader.number("GRAPH_READS_PER_SECOND", 2.0, float, 0.01, 1000),
        history_wait_seconds=reader.duration("HISTORY_WAIT", 2.0, bare_unit="s", high=60),
        answer_cache_ttl_seconds=reader.duration("ANSWER_CACHE_TTL", 0.0, bare_unit="s"),
        retention_days=reader.number("RETENTION_DAYS", 90, int, 0, 36500),
        tracking_url=reader.url("TRACKING_URL", None, trailing_slash=False),
        forwarded_allow_ips=reader.networks("FORWARDED_ALLOW_IPS", ("127.0.0.1", "::1")),
        ready_max_wait_seconds=reader.duration("READY_MAX_WAIT", 300.0, bare_unit="s"),
        **_webchat_values(reader),
        **_knowledge_values(reader),
    )
    if values["slow_reply_notice"] and values["slow_reply_limit_seconds"] <= values["reply_deadline_seconds"]:
        problems.append("SLOW_REPLY_LIMIT must be longer than REPLY_DEADLINE (the notice goes at the deadline, "
                        "the answer may come until the limit)")
    if values["fb_app_id"] and not is_numeric_id(values["fb_app_id"]):
        problems.append("FB_APP_ID must be digits only (the app's numeric id)")
    if len(values["handoff_button"]) > 20:
        problems.append("HANDOFF_BUTTON must be at most 20 characters (Meta's limit for a quick reply)")
    if values["fb_instagram_id"] and not is_numeric_id(values["fb_instagram_id"]):
        problems.append("FB_INSTAGRAM_ID must be digits only (the linked Instagram account's numeric id)")
    elif values["fb_instagram_id"] and values["fb_instagram_id"] == values["fb_page_id"]:
        problems.append("FB_INSTAGRAM_ID must be the Instagram account's id, not the Page's (FB_PAGE_ID)")
    return values, problems


def _webchat_values(reader: "_Reader") -> dict:
    """WEBCHAT_*: the website chat (README, "Chat on your website")."""
    return dict(
        webchat=reader.switch("WEBCHAT", False),
        webchat_port=reader.number("WEBCHAT_PORT", 8001, int, 1, 65535),
        webchat_page=reader.text("WEBCHAT_PAGE", "").strip(),
        webchat_origins=reader.origins("WEBCHAT_ORIGINS"),
        webchat_secret=reader.text("WEBCHAT_SECRET", "").strip(),
        webchat_signatures_expire=reader.switch("WEBCHAT_SIGNATURES_EXPIRE", False),
        webchat_rate_limit=reader.rate("WEBCHAT_RATE_LIMIT", (5, 60.0)),
        webchat_conversation_limit=reader.rate("WEBCHAT_CONVERSATION_LIMIT", (5, 60.0)),
        webchat_daily_limit=reader.number("WEBCHAT_DAILY_LIMIT", 200, int, 0, 10**9, off=True),
        webchat_daily_tokens=reader.number("WEBCHAT_DAILY_TOKENS", 1_000_000, int, 0, 10**12, off=True),
        webchat_ip_daily_tokens=reader.number("WEBCHAT_IP_DAILY_TOKENS", 200_000, int, 0, 10**12, off=True),
        webchat_max_chars=reader.number("WEBCHAT_MAX_CHARS", 2000, int, 1, 8000),
        webchat_threads=reader.number("WEBCHAT_THREADS", 256, int, 1, 4096),
    )


def _knowledge_values(reader: "_Reader") -> dict:
    """KNOWLEDGE_* and EMBEDDING_MODEL: the knowledge base (README, "Teach the bot your business")."""
    return dict(
        knowledge_mode=reader.choice("KNOWLEDGE_MODE", "PREFER", ("PREFER", "ONLY", "OFF")).lower(),
        knowledge_top_k=reader.number("KNOWLEDGE_TOP_K", 4, int, 1, 20),
        knowledge_max_tokens=reader.number("KNOWLEDGE_MAX_TOKENS", 1200, int, 100, 100_000),
        knowledge_min_score=reader.number("KNOWLEDGE_MIN_SCORE", 0.3, float, 0.0, 1.0),
        knowledge_unknown_reply=reader.text("KNOWLEDGE_UNKNOWN_REPLY", DEFAULT_KNOWLEDGE_UNKNOWN_REPLY,
                                            allow_empty=False),
        knowledge_cite=reader.switch("KNOWLEDGE_CITE", False),
        knowledge_max_mb=reader.number("KNOWLEDGE_MAX_MB", 10.0, float, 0.01, 1000),
        knowledge_fetch_timeout=reader.duration("KNOWLEDGE_FETCH_TIMEOUT", 15.0, bare_unit="s", low=0.5),
        embedding_model=reader.text("EMBEDDING_MODEL", DEFAULT_EMBEDDING_MODEL, allow_empty=False).strip(),
    )


def _webchat_problems(values: dict, entries: list[PageEntry]) -> list[str]:
    """With several Pages the web chat must be told whose prompt it speaks with."""
    if not values.get("webchat"):
        return []
    problems = []
    ids = [entry.id for entry in entries] or [values["fb_page_id"]]
    page = values["webchat_page"]
    if page and page not in ids:
        problems.append(f"WEBCHAT_PAGE must be one of the Pages' ids ({', '.join(ids)}), got {page!r}")
    elif not page and len(ids) > 1:
        problems.append("WEBCHAT_PAGE is required with several Pages: the id of the Page whose prompt the "
                        "website chat uses")
    if values["webchat_secret"] and len(values["webchat_secret"]) < 16:
        problems.append("WEBCHAT_SECRET must be at least 16 characters (it signs user ids)")
    if is_quoted(values["webchat_secret"]):
        problems.append("WEBCHAT_SECRET is wrapped in quotes: write the value without them")
    if values["webchat_signatures_expire"] and not values["webchat_secret"]:
        problems.append("WEBCHAT_SIGNATURES_EXPIRE=on needs WEBCHAT_SECRET (the key the signatures are made with)")
    if values["webchat_port"] == values["port"]:
        problems.append("WEBCHAT_PORT must differ from PORT (the website chat has a listener of its own)")
    return problems


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
        elif is_quoted(value):
            # docker --env-file and systemd's Environment= keep quotes that .env readers remove: every
            # signature would be "wrong" and every Graph call refused, long after a quiet start.
            self.problems.append(f"{name} is wrapped in quotes: write the value without them")
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

    def url(self, name: str, default: str | None, trailing_slash: bool = True) -> str | None:
        value = self._raw(name)
        if not value:
            return default
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            self.problems.append(f"{name} must be an http(s) URL, got {value!r}")
            return default
        return value if value.endswith("/") or not trailing_slash else value + "/"

    def rate(self, name: str, default: tuple[int, float]) -> tuple[int, float] | None:
        """`5/minute` (also 30/hour, 1/s, 2/30s...) or `off`."""
        value = self._raw(name)
        if not value:
            return default
        if value.lower() == "off":
            return None
        count, _, per = value.partition("/")
        window = parse_seconds(per, bare_unit=None) if count.strip().isdigit() else None
        if not window or int(count) < 1:
            self.problems.append(f"{name} must look like 5/minute, 30/hour or off, got {value!r}")
            return default
        return int(count), window

    def duration(self, name: str, default: float, bare_unit: str, low: float | None = None,
                 high: float | None = None) -> float:
        """`30m`, `2h`, `90s`, `1d`, or a bare number in `bare_unit`; 0 or off = 0 (unless `low`
        is given: then at least `low` seconds, and no off); at most `high` seconds when given."""
        value = self._raw(name)
        if not value:
            return default
        if value.lower() == "off" and low is None:
            return 0.0
        seconds = parse_seconds(value, bare_unit)
        if seconds is None:
            self.problems.append(f"{name} must be a duration such as 30m, 2h or 90s, got {value!r}")
            return default
        if low is not None and seconds < low:
            self.problems.append(f"{name} must be at least {low:g} s, got {value!r}")
            return default
        if high is not None and seconds > high:
            self.problems.append(f"{name} must be at most {high:g} s, got {value!r}")
            return default
        return seconds

    def number(self, name, default, kind, low, high, optional: bool = False, hint: str = "", off: bool = False):
        value = self._raw(name)
        if value is None:
            return default
        if off and value.lower() in ("off", ""):
            return 0
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

    def database_url(self, name: str) -> str | None:
        """postgresql://user:password@host:port/database (postgres:// too); empty = SQLite."""
        value = self._raw(name)
        if not value:
            return None
        try:
            parsed = urlparse(value)
        except ValueError:  # an unclosed [ of an IPv6 address
            self.problems.append(f"{name} must look like postgresql://user@host:5432/database "
                                 "(an IPv6 address goes in [ ])")
            return None
        if parsed.scheme not in ("postgresql", "postgres") or not (parsed.hostname or parsed.path.strip("/")):
            # Never echo it: the URL may hold a password.
            self.problems.append(f"{name} must look like postgresql://user@host:5432/database")
            return None
        try:
            parsed.port
        except ValueError:
            self.problems.append(f"{name}'s port is not a number (postgresql://user@host:5432/database)")
            return None
        query = parse_qs(parsed.query)
        if not parsed.path.strip("/") and not any(query.get(key, [""])[0] for key in ("dbname", "service")):
            # libpq would take the user's name for the database: hosts set up with different users
            # would each be a bot of their own, answering the same messages. (A pg_service.conf
            # entry names its own.)
            self.problems.append(f"{name} names no database: end it with /DATABASE "
                                 "(postgresql://user@host:5432/DATABASE)")
            return None
        return value

    def host(self, name: str, default: str) -> str:
        """An IP address (0.0.0.0, ::, 127.0.0.1) or a host name such as localhost."""
        value = (self._raw(name) or default).strip()
        if not (_is_network(value) and "/" not in value) and not HOST_NAME.fullmatch(value):
            self.problems.append(f"{name} must be an IP address such as 127.0.0.1 or 0.0.0.0, or a host name, "
                                 f"not {value!r}")
            return default
        return value

    def networks(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """Comma-separated addresses or networks (10.0.0.0/8), or "*" for any peer."""
        raw = self._raw(name)
        if raw is None:
            return default
        items = tuple(item.strip() for item in raw.split(",") if item.strip())
        bad = [item for item in items if item != "*" and not _is_network(item)]
        if bad:
            self.problems.append(f"{name} must list IP addresses or networks (or *), not {', '.join(bad)}")
        return items

    def origins(self, name: str) -> tuple[str, ...]:
        """Comma-separated origins (https://shop.example, http://localhost:3000) or "*"."""
        raw = self._raw(name) or ""
        items = tuple(item.strip().rstrip("/") for item in raw.split(",") if item.strip())
        bad = [item for item in items if item != "*" and not _is_origin(item)]
        if bad:
            self.problems.append(f"{name} must list origins such as https://shop.example (scheme and host, "
                                 f"no path), or *, not {', '.join(bad)}")
        return tuple(item for item in items if item not in bad)

    def words(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """Comma-separated words or phrases, compared in lower case; empty = none."""
        value = self._raw(name)
        if value is None:
            return default
        return tuple(w.strip().lower() for w in value.split(",") if w.strip())

    def switch(self, name: str, default: bool) -> bool:
        """on/off (also true/false, yes/no, 1/0)."""
        value = (self._raw(name) or "").lower()
        if not value:
            return default
        if value in ("on", "true", "yes", "1"):
            return True
        if value in ("off", "false", "no", "0"):
            return False
        self.problems.append(f"{name} must be on or off, got {value!r}")
        return default

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        value = (self._raw(name) or default).upper()
        if value not in options:
            self.problems.append(f"{name} must be one of {', '.join(options)}, got {value!r}")
        return value


def is_quoted(value: str) -> bool:
    """A value pasted with its quotes ("…" or '…'), as docker --env-file and systemd keep them."""
    return len(value) > 1 and value[0] == value[-1] and value[0] in "\"'"


def _spaced(prefix: str) -> str:
    return prefix + " " if prefix and not prefix[-1].isspace() else prefix


def url_passwords(url: str | None) -> list[str]:
    """A database URL's password however it is given (postgresql://u:PW@h/db or ?password=PW) and
    spelled (as written, %-decoded, %-encoded): every form a line might quote."""
    if not url:
        return []
    try:
        parsed = urlparse(url)
        user_part = parsed.netloc.rpartition("@")[0].partition(":")[2] if "@" in parsed.netloc else ""
    except ValueError:
        return []
    # As written (libpq decodes %XX only: a "+" is a "+"), not through parse_qs, which reads "+" as
    # a space and would decode twice.
    written = [user_part] + [value for name, _, value in (item.partition("=") for item in parsed.query.split("&"))
                             if name == "password"]
    spellings = {form for value in written if value for form in (value, unquote(value), quote(unquote(value), safe=""))}
    return sorted(spellings, key=len, reverse=True)  # the longest first: no part of one left behind


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _is_origin(text: str) -> bool:
    parsed = urlparse(text)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc) and not parsed.path and not parsed.query


def parse_seconds(text: str, bare_unit: str | None) -> float | None:
    """`30s`, `5m`, `minute`, `2 hours`... in seconds; None when it is not a duration."""
    match = DURATION.fullmatch(text.lower())
    if not match or not (match.group(1) or match.group(2)):
        return None
    unit = match.group(2) or bare_unit or ""
    if len(unit) > 3 and unit.endswith("s"):
        unit = unit[:-1]  # hours, minutes
    if unit not in UNITS:
        return None
    return float(match.group(1) or 1) * UNITS[unit]
