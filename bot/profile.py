"""`python -m bot profile apply FILE [--dry-run] [--page ID]` and `python -m bot profile show [--page ID]`:
the Page's Get Started button, greeting, ice breakers and persistent menu, from a TOML file
(deploy/profile.example.toml), through Meta's Messenger Profile API.

Idempotent: the current profile is read first and only what differs is sent (one POST for
everything set, one DELETE for what `remove` lists), so a second apply sends nothing; Meta
allows about 10 profile calls per 10 minutes per Page. `show` prints the profile in the
file's format: `show > profile.toml` then `apply profile.toml` changes nothing.

Meta's limits, checked before anything is sent, every problem at once
(https://developers.facebook.com/docs/messenger-platform/reference/messenger-profile-api and its
greeting, ice-breakers and persistent-menu pages): a greeting of at most 160 characters with a
"default" locale; at most 4 ice breakers per locale, a "default" locale among them; a persistent
menu of at most 20 items per locale with titles of at most 30 characters and postback payloads
of at most 1,000, a "default" locale, and a Get Started button beside it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from typing import Any

from bot.graph_admin import UNREACHABLE_HELP, AdminGraph
from config import Account, ConfigError, load_config
from messenger.graph import GraphAPIError

FIELDS = ("get_started", "greeting", "ice_breakers", "persistent_menu")
MAX_GREETING, MAX_ICE_BREAKERS, MAX_MENU_ITEMS, MAX_TITLE, MAX_PAYLOAD = 160, 4, 20, 30, 1000
LOCALE = re.compile(r"default|[a-z]{2}_[A-Z]{2}")
MENU_TYPES = ("postback", "web_url")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    apply = actions.add_parser("apply", help="set the profile from a TOML file (only what differs)")
    apply.add_argument("file", help="the profile file (see deploy/profile.example.toml)")
    apply.add_argument("--dry-run", action="store_true", help="print what would change, send nothing")
    show = actions.add_parser("show", help="print the Page's profile in the file's format")
    for command in (apply, show):
        command.add_argument("--page", help="the Page's id (needed with several Pages in PAGES_FILE)")


def main(args: argparse.Namespace) -> int:
    if args.action == "apply":
        desired, remove, problems = read_profile_file(args.file)
        if problems:
            print(f"{args.file}: {len(problems)} problem{'s' * (len(problems) != 1)}, nothing sent:", file=sys.stderr)
            print("\n".join(f"  - {p}" for p in problems), file=sys.stderr)
            return 2
    account = _page(args.page)
    if account is None:
        return 2
    graph = AdminGraph(account.config.fb_api_url, account.config.fb_page_access_token, account.config.fb_app_secret)
    try:
        current = read_current(graph)
        if args.action == "show":
            print(f"# the Messenger Profile of Page {account.label}")
            print(to_toml(current), end="")
            return 0
        return _apply(graph, account, current, desired, remove, args.dry_run)
    except GraphAPIError as error:
        if error.status is None:  # no answer at all: the network, not Meta
            print(f"Page {account.label}: Meta's Graph API did not answer ({error.args[0]}): {UNREACHABLE_HELP}",
                  file=sys.stderr)
        else:
            print(f"Page {account.label}: Meta refused the call: {error}", file=sys.stderr)
        return 1


def _apply(graph: AdminGraph, account: Account, current: dict, desired: dict, remove: list[str], dry_run: bool) -> int:
    menu_after = desired.get("persistent_menu", None if "persistent_menu" in remove else current.get("persistent_menu"))
    started_after = "get_started" in desired or ("get_started" in current and "get_started" not in remove)
    if menu_after and not started_after:
        print("a persistent menu needs a Get Started button: add get_started to the file", file=sys.stderr)
        return 2
    changed = {k: v for k, v in desired.items() if canonical(k, current.get(k)) != canonical(k, v)}
    removed = [k for k in remove if k in current]
    print(f"Page {account.label}:")
    for name in FIELDS:
        if name in changed:
            verb = "change" if name in current else "set"
            print(f"  {verb} {name}: {_short(current.get(name))} -> {_short(changed[name])}" if name in current
                  else f"  {verb} {name}: {_short(changed[name])}")
        elif name in removed:
            print(f"  remove {name}: {_short(current[name])}")
        elif name in desired:
            print(f"  unchanged {name}")
    if not changed and not removed:
        print("nothing to change")
        return 0
    if dry_run:
        print("dry run: nothing sent")
        return 0
    if removed:
        graph.request("DELETE", "me/messenger_profile", json={"fields": removed})
    if changed:
        graph.request("POST", "me/messenger_profile", json=changed)
    print(f"applied: {len(changed) + len(removed)} field{'s' * (len(changed) + len(removed) != 1)}")
    return 0


def _page(page_id: str | None) -> Account | None:
    try:
        config = load_config()
    except ConfigError as error:
        print(error, file=sys.stderr)
        return None
    pages = [a for a in config.accounts if a.platform == "messenger"]
    if page_id:
        chosen = [a for a in pages if a.id == page_id]
        if not chosen:
            print(f"no Page {page_id} in the settings; the Pages are: {', '.join(a.label for a in pages)}", file=sys.stderr)
            return None
        return chosen[0]
    if len(pages) > 1:
        print(f"several Pages: choose one with --page ({', '.join(a.label for a in pages)})", file=sys.stderr)
        return None
    return pages[0]


def read_current(graph: AdminGraph) -> dict:
    data = graph.get("me/messenger_profile", fields=",".join(FIELDS)).get("data") or [{}]
    return {k: v for k, v in (data[0] or {}).items() if k in FIELDS}


# -- the file -----------------------------------------------------------------------------------
def read_profile_file(path: str) -> tuple[dict, list[str], list[str]]:
    """(what to set in Meta's shapes, the fields to remove, every problem found)."""
    try:
        with open(path, encoding="utf-8-sig") as file:  # a BOM, as some editors write, is no statement
            data = tomllib.loads(file.read())
    except OSError as exc:
        return {}, [], [f"cannot be read: {exc.strerror or type(exc).__name__}"]
    except tomllib.TOMLDecodeError as exc:
        return {}, [], [f"not valid TOML: {exc}"]
    except UnicodeDecodeError:
        return {}, [], ["not UTF-8: save it as UTF-8"]
    problems: list[str] = []
    desired: dict[str, Any] = {}
    for key in data:
        if key not in (*FIELDS, "remove"):
            problems.append(f"unknown key {key!r} (expected {', '.join(FIELDS)} or remove)")
    if "get_started" in data:
        payload = data["get_started"]
        if _text_problem(payload, MAX_PAYLOAD):
            problems.append(f"get_started: the payload must be {_text_problem(payload, MAX_PAYLOAD)}")
        desired["get_started"] = {"payload": payload}
    if "greeting" in data:
        desired["greeting"] = _greeting(data["greeting"], problems)
    if "ice_breakers" in data:
        desired["ice_breakers"] = _grouped("ice_breakers", data["ice_breakers"], MAX_ICE_BREAKERS, _ice_breaker, problems)
    if "persistent_menu" in data:
        menu = _grouped("persistent_menu", data["persistent_menu"], MAX_MENU_ITEMS, _menu_item, problems)
        desired["persistent_menu"] = [{"locale": g["locale"], "composer_input_disabled": False, **g} for g in menu]
    remove = data.get("remove", [])
    if not isinstance(remove, list) or any(r not in FIELDS for r in remove):
        problems.append(f"remove: a list of field names among {', '.join(FIELDS)}")
        remove = []
    for name in remove:
        if name in desired:
            problems.append(f"remove: {name} is also set in the file")
    return desired, list(remove), problems


def _greeting(value: Any, problems: list[str]) -> list[dict]:
    items = [{"locale": "default", "text": value}] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        problems.append("greeting: a text, or [[greeting]] tables with locale and text")
        return []
    greetings = []
    for n, item in enumerate(items, 1):
        locale = item.get("locale", "default")
        _check_keys(f"greeting #{n}", item, {"locale", "text"}, problems)
        if problem := _text_problem(item.get("text"), MAX_GREETING):
            problems.append(f"greeting #{n} ({locale}): the text must be {problem}")
        greetings.append({"locale": locale, "text": item.get("text")})
    _check_locales("greeting", [g["locale"] for g in greetings], problems, unique=True)
    return greetings


def _grouped(name: str, value: Any, limit: int, build, problems: list[str]) -> list[dict]:
    """[[name]] tables, each with an optional locale, grouped by locale in Meta's shape."""
    if not isinstance(value, list) or not all(isinstance(i, dict) for i in value):
        problems.append(f"{name}: [[{name}]] tables")
        return []
    groups: dict[str, list[dict]] = {}
    for n, item in enumerate(value, 1):
        groups.setdefault(item.get("locale", "default"), []).append(build(f"{name} #{n}", item, problems))
    _check_locales(name, list(groups), problems)
    for locale, items in groups.items():
        if len(items) > limit:
            problems.append(f"{name}: {len(items)} for locale {locale}, Meta allows at most {limit}")
    return [{"locale": locale, "call_to_actions": items} for locale, items in groups.items()]


def _ice_breaker(where: str, item: dict, problems: list[str]) -> dict:
    _check_keys(where, item, {"question", "payload", "locale"}, problems)
    if problem := _text_problem(item.get("question"), None):
        problems.append(f"{where}: the question must be {problem}")
    if problem := _text_problem(item.get("payload"), MAX_PAYLOAD):
        problems.append(f"{where}: the payload must be {problem}")
    return {"question": item.get("question"), "payload": item.get("payload")}


def _menu_item(where: str, item: dict, problems: list[str]) -> dict:
    _check_keys(where, item, {"type", "title", "payload", "url", "locale"}, problems)
    kind = item.get("type", "postback")
    if problem := _text_problem(item.get("title"), MAX_TITLE):
        problems.append(f"{where}: the title must be {problem}")
    if kind == "postback":
        if problem := _text_problem(item.get("payload"), MAX_PAYLOAD):
            problems.append(f"{where}: the payload must be {problem}")
        return {"type": kind, "title": item.get("title"), "payload": item.get("payload")}
    if kind == "web_url":
        if not re.match(r"https?://[^\s/]+", str(item.get("url", ""))):
            problems.append(f"{where}: a web_url item needs a url starting with https://")
        return {"type": kind, "title": item.get("title"), "url": item.get("url")}
    problems.append(f"{where}: type must be one of {', '.join(MENU_TYPES)}, not {kind!r}")
    return dict(item)


def _check_keys(where: str, item: dict, known: set[str], problems: list[str]) -> None:
    for key in item:
        if key not in known:
            problems.append(f"{where}: unknown key {key!r} (expected {', '.join(sorted(known))})")


def _check_locales(name: str, locales: list[str], problems: list[str], unique: bool = False) -> None:
    for locale in locales:
        if not isinstance(locale, str) or not LOCALE.fullmatch(locale):
            problems.append(f"{name}: locale {locale!r} is not \"default\" or like en_US")
    if locales and "default" not in locales:
        problems.append(f"{name}: Meta needs one for the \"default\" locale")
    if unique and len(set(locales)) != len(locales):
        problems.append(f"{name}: a locale is given twice")


def _text_problem(value: Any, limit: int | None) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "a non-empty text"
    if limit and len(value) > limit:
        return f"at most {limit} characters (it has {len(value)})"
    return None


# -- comparing and printing ----------------------------------------------------------------------
def canonical(name: str, value: Any) -> Any:
    """What matters of a field, so the file's form and Meta's answer compare equal."""
    if value is None:
        return None
    if name == "get_started":
        return value.get("payload") if isinstance(value, dict) else value
    if name == "greeting":
        return sorted((g.get("locale"), g.get("text")) for g in value)
    if name == "ice_breakers" and value and "question" in value[0]:  # Meta's older flat format
        value = [{"locale": "default", "call_to_actions": value}]
    keys = ("question", "payload") if name == "ice_breakers" else ("type", "title", "payload", "url")
    return sorted((g.get("locale", "default"), tuple(tuple(i.get(k) for k in keys) for i in g.get("call_to_actions", [])))
                  for g in value)


def to_toml(profile: dict) -> str:
    """The profile in the file's format (what `apply` reads)."""
    out = []
    if "get_started" in profile:
        out.append(f"get_started = {_string((profile['get_started'] or {}).get('payload', ''))}\n")
    for greeting in profile.get("greeting", []):
        out.append(f"\n[[greeting]]\nlocale = {_string(greeting.get('locale', 'default'))}\n"
                   f"text = {_string(greeting.get('text', ''))}\n")
    for name, keys in (("ice_breakers", ("question", "payload")), ("persistent_menu", ("type", "title", "payload", "url"))):
        groups = profile.get(name, [])
        if groups and "call_to_actions" not in groups[0]:
            groups = [{"locale": "default", "call_to_actions": groups}]
        for group in groups:
            for item in group.get("call_to_actions", []):
                out.append(f"\n[[{name}]]\n")
                if group.get("locale", "default") != "default":
                    out.append(f"locale = {_string(group['locale'])}\n")
                out.extend(f"{k} = {_string(item[k])}\n" for k in keys if item.get(k) is not None)
    return "".join(out) or "# (nothing set)\n"


def _string(value: Any) -> str:
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 200 else text[:197] + "..."
