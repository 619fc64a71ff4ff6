"""The Pages file (PAGES_FILE): several Pages, and their linked Instagram accounts, answered by
one deployment, each with its own token and, if it likes, its own reply settings.

    [[pages]]
    id = "1122334455"
    access_token = "EAA…"
    name = "Ana's Bakery"
    system_prompt = "You answer for Ana's Bakery."
    instagram_id = "17841400000000000"   # optional

Read and checked here (no token ever in a message); config.py turns the entries into
each Page's own Config, validated exactly as the environment is.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from typing import Any

# Per-Page keys -> the setting they override. Short names for the usual ones; any other
# per-Page setting may be written as its variable's name in lower case (sticker_reply).
ALIASES = {"model": "OPENAI_MODEL", "temperature": "OPENAI_TEMPERATURE", "top_p": "OPENAI_TOP_P",
           "max_tokens": "OPENAI_MAX_TOKENS"}
PER_PAGE = frozenset({
    "SYSTEM_PROMPT", "OPENAI_MODEL", "OPENAI_TEMPERATURE", "OPENAI_TOP_P", "OPENAI_MAX_TOKENS", "POLITENESS_PREFIX",
    "MESSAGE_COUNT", "FALLBACK_REPLY", "UNSUPPORTED_REPLY", "RATE_LIMIT", "RATE_LIMIT_REPLY", "DAILY_TOKEN_BUDGET",
    "BUDGET_REPLY", "HUMAN_PAUSE", "RESET_WORD", "RESET_REPLY", "SLOW_REPLY_NOTICE", "REPLY_DEADLINE",
    "GRAPH_READS_PER_SECOND", "HISTORY_WAIT", "MIRROR_MAX_AGE", "ANSWER_CACHE_TTL", "VISION", "IMAGE_QUESTION",
    "TRANSCRIBE_MODEL", "STICKER_REPLY", "MEDIA_ERROR_REPLY", "TOO_LARGE_REPLY", "VOICE_ERROR_REPLY",
    "DISCLOSURE", "DISCLOSURE_TEXT", "DISCLOSURE_AFTER", "HANDOFF_WORDS", "HANDOFF_REPLY", "HANDOFF_BUTTON",
    "HANDOFF_THREAD_CONTROL", "HANDOFF_WEBHOOK", "KNOWLEDGE_MODE", "KNOWLEDGE_TOP_K", "KNOWLEDGE_MAX_TOKENS",
    "KNOWLEDGE_MIN_SCORE", "KNOWLEDGE_UNKNOWN_REPLY", "KNOWLEDGE_CITE",
})
IDENTITY = frozenset({"id", "access_token", "name", "instagram_id"})
TOKEN_EXPECTED = "the token as Meta shows it: printable ASCII, no spaces (was a placeholder pasted?)"


def is_token(value: str) -> bool:
    """What can go in an HTTP header, and no quote (a value pasted with its quotes): anything else
    would fail every Graph call, not start-up."""
    return value.isascii() and value.isprintable() and not any(c.isspace() or c in "\"'" for c in value)


def is_numeric_id(value: str) -> bool:
    return value.isascii() and value.isdigit()  # str.isdigit alone takes "１２" and "²"


@dataclass(frozen=True)
class PageEntry:
    id: str
    access_token: str = field(repr=False)
    name: str = ""
    instagram_id: str | None = None
    settings: dict[str, str] = field(default_factory=dict)  # variable name -> value, as the environment holds them
    position: int = 0  # 1 for the first [[pages]] table

    @property
    def label(self) -> str:
        return self.id or f"#{self.position}"


def read_pages_file(path: str, text: str | None = None) -> tuple[list[PageEntry], list[str]]:
    """The entries of the file (or of `text`, the file's as read before), and every problem found
    in it (none: the entries are usable)."""
    try:
        data = tomllib.loads(read_pages_text(path) if text is None else text)
    except OSError as exc:
        return [], [f"PAGES_FILE {path} cannot be read: {exc.strerror or type(exc).__name__}"]
    except tomllib.TOMLDecodeError as exc:
        # The decoder names the line and column; it never quotes a value back.
        return [], [f"PAGES_FILE {path} is not valid TOML: {exc}"]
    except UnicodeDecodeError:
        return [], [f"PAGES_FILE {path} is not UTF-8: save it as UTF-8"]
    pages = data.get("pages")
    if not isinstance(pages, list) or not pages or not all(isinstance(p, dict) for p in pages):
        return [], [f"PAGES_FILE {path} must hold at least one [[pages]] table"]
    problems: list[str] = []
    entries = [_entry(page, n, problems) for n, page in enumerate(pages, 1)]
    _check_unique(entries, problems)
    return entries, problems


def read_pages_text(path: str) -> str:
    """The file's text (OSError, UnicodeDecodeError)."""
    with open(path, encoding="utf-8-sig") as file:  # a BOM, as some editors write, is no statement
        return file.read()


def _entry(page: dict[str, Any], n: int, problems: list[str]) -> PageEntry:
    where = f"PAGES_FILE, page {n}"
    page_id, token = page.get("id"), page.get("access_token")
    if isinstance(page_id, int) and not isinstance(page_id, bool):
        page_id = str(page_id)
    if not isinstance(page_id, str) or not is_numeric_id(page_id):
        problems.append(f"{where}: id must be the Page's numeric id, as a string")
        page_id = ""
    else:
        where = f"PAGES_FILE, page {page_id}"
    if not isinstance(token, str) or not token.strip():
        problems.append(f"{where}: access_token is required")  # never echoed: it is a secret
        token = ""
    elif not is_token(token.strip()):
        problems.append(f"{where}: access_token must be {TOKEN_EXPECTED}")
    name = page.get("name", "")
    if not isinstance(name, str):
        problems.append(f"{where}: name must be a string")
        name = ""
    instagram = page.get("instagram_id")
    if isinstance(instagram, int) and not isinstance(instagram, bool):
        instagram = str(instagram)
    if instagram is not None and (not isinstance(instagram, str) or not is_numeric_id(instagram)):
        problems.append(f"{where}: instagram_id must be the Instagram account's numeric id, as a string")
        instagram = None
    return PageEntry(page_id, token.strip(), name, instagram, _settings(page, where, problems), n)


def _settings(page: dict[str, Any], where: str, problems: list[str]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for key, value in page.items():
        if key in IDENTITY:
            continue
        variable = ALIASES.get(key, key.upper())
        if variable not in PER_PAGE or key != key.lower():
            problems.append(f"{where}: {key!r} is not a per-Page setting (see the README's list)")
        elif isinstance(value, bool):
            settings[variable] = "on" if value else "off"
        elif isinstance(value, (str, int, float)):
            settings[variable] = str(value)
        else:
            problems.append(f"{where}: {key} must be a string, a number or true/false")
    return settings


def _check_unique(entries: list[PageEntry], problems: list[str]) -> None:
    seen: set[str] = set()
    for entry in entries:
        for account in filter(None, (entry.id, entry.instagram_id)):
            if account in seen:
                problems.append(f"PAGES_FILE: id {account} is listed twice")
            seen.add(account)
