"""`python -m bot doctor [--url https://…]`: is this deployment set up so Meta delivers and the bot answers?

One line per check, ✓ or ✗ (– when it cannot be checked), each ✗ followed by what to do; exit
status 1 when anything failed. Every Page of the deployment is checked. Every call has a
timeout; no token or secret is ever printed (each line is scrubbed of them as a last guard).
"""
from __future__ import annotations

import argparse
import re
import secrets
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Iterator
from urllib.parse import urlparse

import openai
import requests

from bot.graph_admin import UNREACHABLE_HELP, AdminGraph, app_token
from config import Config, ConfigError, load_config
from messenger.graph import GraphAPIError

REQUIRED_FIELDS = ("messages", "messaging_postbacks", "message_echoes")
EXPIRY_MARGIN = 7 * 86400  # a token expiring sooner than this fails the check
TOKEN_HELP = 'make a Page token that does not expire (README, "A Page token that does not expire")'
NETWORK_HELP = f"{UNREACHABLE_HELP}, then run the doctor again"

# Graph API versions: release and expiry dates, from Meta's table at
# https://developers.facebook.com/docs/graph-api/changelog/versions/ (read 2026-11). A version
# expires two years after the next one is released; the newest has no date yet.
GRAPH_VERSIONS = {
    "v26.0": ("2026-07-29", None), "v25.0": ("2026-02-18", "2028-07-29"), "v24.0": ("2025-10-08", "2028-02-18"),
    "v23.0": ("2025-05-29", "2027-10-08"), "v22.0": ("2025-01-21", "2027-05-20"), "v21.0": ("2024-10-02", "2027-01-21"),
    "v20.0": ("2024-05-21", "2026-09-24"), "v19.0": ("2024-01-23", "2026-05-21"), "v18.0": ("2023-09-12", "2026-01-26"),
    "v17.0": ("2023-05-23", "2025-09-12"), "v16.0": ("2023-02-02", "2025-05-14"), "v15.0": ("2022-09-15", "2024-11-20"),
}
NEWEST = "v26.0"


@dataclass
class Line:
    ok: bool | None  # None: not checked
    text: str
    advice: str = ""


def main(args: argparse.Namespace) -> int:
    lines = list(_all_checks(args))
    scrub = _scrubber(args.secrets)
    for line in lines:
        mark = "–" if line.ok is None else "✓" if line.ok else "✗"
        print(scrub(f"{mark} {line.text}"))
        if line.advice and line.ok is False:
            print(scrub(f"    → {line.advice}"))
    failed = sum(line.ok is False for line in lines)
    print(scrub(f"\n{failed} problem{'s' * (failed != 1)} found." if failed else "\nAll checks passed."))
    return 1 if failed else 0


INSTAGRAM_SCOPES = ("instagram_basic", "instagram_manage_messages")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the bot's public HTTPS address (https://host or https://host/webhook): "
                                      "check that it answers Meta's verify handshake")


def _all_checks(args: argparse.Namespace) -> Iterator[Line]:
    args.secrets = []
    try:
        config = load_config()
    except ConfigError as error:
        for problem in error.problems:
            yield Line(False, f"settings: {problem}", "fix it in the environment or .env, then run the doctor again")
        return
    args.secrets = [*config.secrets, app_token(config.fb_app_id, config.fb_app_secret)] if config.fb_app_id else list(config.secrets)
    pages = [a for a in config.accounts if a.platform == "messenger"]
    yield Line(True, f"settings: valid ({len(pages)} Page{'s' * (len(pages) != 1)})")
    now = time.time()  # one moment for every check: the expiry margins are decided on it
    yield graph_version(config.fb_api_url, date.fromtimestamp(now))
    valid_tokens = []
    for account in pages:
        instagram = [a.id for a in config.accounts if a.platform == "instagram" and a.page_id == account.id]
        page_lines = list(token_checks(config, account.config.fb_page_id, account.label,
                                       account.config.fb_page_access_token, now, instagram=bool(instagram)))
        yield from page_lines
        if page_lines and page_lines[0].ok:
            valid_tokens.append(account.config.fb_page_access_token)
            yield subscription(config, account.config.fb_page_id, account.label, account.config.fb_page_access_token)
            for instagram_id in instagram:
                yield instagram_link(config, account.config.fb_page_id, account.label,
                                     account.config.fb_page_access_token, instagram_id)
        else:
            yield Line(None, f"Page {account.label}: webhook subscription not checked (the token did not pass)")
    yield app_mode(config, valid_tokens[0] if valid_tokens else None)
    for model in sorted({a.config.openai_model for a in config.accounts} or {config.openai_model}):
        yield model_check(config, model)
    if args.url:
        yield public_url(args.url, config.fb_verify_token)


# -- the checks ---------------------------------------------------------------------------------
def graph_version(api_url: str, today: date) -> Line:
    match = re.search(r"/(v\d+\.\d+)/?$", urlparse(api_url).path)
    if not match:
        return Line(False, f"Graph API version: FB_API_URL {api_url} names none",
                    f"end it with a version, e.g. https://graph.facebook.com/{NEWEST}/ (without one Meta "
                    "serves the app's oldest available version)")
    version = match.group(1)
    if version not in GRAPH_VERSIONS:
        newer = _number(version) > _number(NEWEST)
        return Line(newer, f"Graph API version {version}: " + ("newer than this doctor's table (it knows up to "
                    f"{NEWEST})" if newer else "retired long ago"), f"use {NEWEST} in FB_API_URL")
    expires = GRAPH_VERSIONS[version][1]
    if expires is None:
        return Line(True, f"Graph API version {version}: the newest, no expiry date yet")
    if date.fromisoformat(expires) <= today:
        return Line(False, f"Graph API version {version}: expired on {expires} (Meta now answers with its "
                           "oldest live version instead)", f"use {NEWEST} in FB_API_URL")
    return Line(True, f"Graph API version {version}: available until {expires}")


def token_checks(config: Config, page_id: str, label: str, token: str, now: float,
                 instagram: bool = False) -> Iterator[Line]:
    """The Page token: valid, of this Page (and app), not expiring soon, with pages_messaging (and
    the Instagram permissions when the Page's Instagram account is answered too)."""
    if config.fb_app_id:
        yield from _debug_token(config, page_id, label, token, now, instagram)
        return
    page = AdminGraph(config.fb_api_url, token, config.fb_app_secret)
    try:
        me = page.get("me", fields="id,name")
    except GraphAPIError as error:
        yield _failed(f"Page {label}", "the token is refused", error, TOKEN_HELP)
        return
    if str(me.get("id")) != page_id:
        yield _other_page(label, page_id, f"{me.get('id')}'s ({me.get('name', '')})")
        return
    yield Line(True, f"Page {label}: the token is valid and speaks for this Page ({me.get('name', '')})")
    yield Line(None, f"Page {label}: expiry and app of the token not checked: set FB_APP_ID so the doctor can ask "
                     "Meta's token debugger (debug_token)")
    try:
        granted = {p.get("permission") for p in page.get("me/permissions").get("data", []) if p.get("status") == "granted"}
    except GraphAPIError as error:
        yield _failed(f"Page {label}", "the token's permissions cannot be read", error,
                      "set FB_APP_ID: the doctor then reads them from Meta's token debugger")
        return
    yield from _scope_lines(label, granted, instagram)


def _debug_token(config: Config, page_id: str, label: str, token: str, now: float,
                 instagram: bool) -> Iterator[Line]:
    app = AdminGraph(config.fb_api_url, app_token(config.fb_app_id, config.fb_app_secret), config.fb_app_secret)
    try:
        data = app.get("debug_token", input_token=token).get("data") or {}
    except GraphAPIError as error:
        yield _failed(f"Page {label}", "the token cannot be checked: Meta refuses the app token", error,
                      "check FB_APP_ID and FB_APP_SECRET: they must be the same app's (App settings → Basic)")
        return
    if not data.get("is_valid"):
        reason = (data.get("error") or {}).get("message", "no reason given")
        yield Line(False, f"Page {label}: the token is not valid (Meta: {reason})", TOKEN_HELP)
        return
    if str(data.get("type", "")).upper() != "PAGE":
        yield Line(False, f"Page {label}: this is a {data.get('type')} token, not a Page token", TOKEN_HELP)
        return
    if str(data.get("profile_id")) != page_id:
        yield _other_page(label, page_id, f"{data.get('profile_id')}'s")
        return
    if str(data.get("app_id")) != config.fb_app_id:
        yield Line(False, f"Page {label}: the token was made for app {data.get('app_id')}, not FB_APP_ID "
                          f"{config.fb_app_id}", "make the token with this app selected in the Graph API Explorer")
        return
    yield Line(True, f"Page {label}: the token is valid, a Page token of this Page and app")
    expires = int(data.get("expires_at") or 0)
    if not expires:
        yield Line(True, f"Page {label}: the token never expires")
    else:
        left = expires - now
        when = datetime.fromtimestamp(expires, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        yield Line(left > EXPIRY_MARGIN, f"Page {label}: the token expires on {when} "
                   f"(in {_duration(left)})", TOKEN_HELP)
    yield from _scope_lines(label, set(data.get("scopes") or []), instagram)


def _other_page(label: str, page_id: str, whose: str) -> Line:
    return Line(False, f"Page {label}: the token is Page {whose}, not this Page's",
                f"put the token of Page {page_id} in FB_PAGE_ACCESS_TOKEN (or its access_token in PAGES_FILE)")


def _scope_lines(label: str, granted: set, instagram: bool) -> Iterator[Line]:
    if "pages_messaging" in granted:
        yield Line(True, f"Page {label}: the token has pages_messaging")
    else:
        yield Line(False, f"Page {label}: the token lacks pages_messaging: the bot cannot send",
                   'make the token again with pages_messaging ticked (README, "Permissions and webhook fields")')
    if not instagram:
        return
    missing = [scope for scope in INSTAGRAM_SCOPES if scope not in granted]
    if missing:
        yield Line(False, f"Page {label}: the token lacks {' and '.join(missing)}: its Instagram account cannot "
                          "be answered", f"make the token again with {', '.join(INSTAGRAM_SCOPES)} ticked")
    else:
        yield Line(True, f"Page {label}: the token has {' and '.join(INSTAGRAM_SCOPES)}")


def instagram_link(config: Config, page_id: str, label: str, token: str, instagram_id: str) -> Line:
    """The Instagram account answered is the one linked to this Page (its webhooks come with that id)."""
    page = AdminGraph(config.fb_api_url, token, config.fb_app_secret)
    try:
        linked = (page.get(page_id, fields="instagram_business_account").get("instagram_business_account") or {})
    except GraphAPIError as error:
        return _failed(f"Page {label}", "its Instagram account cannot be read", error,
                       f"the token needs {INSTAGRAM_SCOPES[0]}")
    linked_id = str(linked.get("id") or "")
    if linked_id == instagram_id:
        return Line(True, f"Page {label}: Instagram account {instagram_id} is the one linked to this Page")
    if not linked_id:
        return Line(False, f"Page {label}: no Instagram account is linked to this Page, so {instagram_id} hears "
                           "nothing", "link it in the Page's settings (Linked accounts), or drop the Instagram id")
    return Line(False, f"Page {label}: the Page's Instagram account is {linked_id}, not {instagram_id}: that "
                       "account's messages would go unanswered", f"set the Instagram id to {linked_id}")


def subscription(config: Config, page_id: str, label: str, token: str) -> Line:
    page = AdminGraph(config.fb_api_url, token, config.fb_app_secret)
    command = (f"curl -X POST \"{config.fb_api_url}{page_id}/subscribed_apps\" -d subscribed_fields="
               f"{','.join(REQUIRED_FIELDS)} -d access_token=PAGE_TOKEN")
    try:
        apps = page.get(f"{page_id}/subscribed_apps").get("data") or []
    except GraphAPIError as error:
        return _failed(f"Page {label}", "its webhook subscriptions cannot be read", error,
                       "the token needs pages_manage_metadata (README, \"Permissions and webhook fields\")")
    if config.fb_app_id:
        apps = [a for a in apps if str(a.get("id")) == config.fb_app_id]
    if not apps:
        return Line(False, f"Page {label}: the app is not subscribed to this Page's webhooks: Meta delivers nothing",
                    f"subscribe it: {command}")
    if len(apps) > 1:
        names = ", ".join(f"{a.get('name')} ({a.get('id')})" for a in apps)
        return Line(False, f"Page {label}: several apps are subscribed ({names})", "set FB_APP_ID to say which is the bot's")
    missing = [f for f in REQUIRED_FIELDS if f not in (apps[0].get("subscribed_fields") or [])]
    if missing:
        return Line(False, f"Page {label}: the app is subscribed without {', '.join(missing)}", f"subscribe them: {command}")
    return Line(True, f"Page {label}: the app is subscribed with {', '.join(REQUIRED_FIELDS)}")


def app_mode(config: Config, page_token: str | None) -> Line:
    """Meta exposes no documented "mode" field on the app node. Its App Modes page says apps in
    Development mode "cannot be searched for by the public through our tools and APIs": so the app
    node is read with a Page token (not the app's own credentials). Shown: Live (or a Business app,
    which has no mode). Hidden (Graph's "does not exist … missing permissions"): Development mode."""
    if not config.fb_app_id:
        return Line(None, "app mode not checked: set FB_APP_ID (the app's numeric id)")
    if page_token is None:
        return Line(None, "app mode not checked: no Page token passed its check")
    try:
        AdminGraph(config.fb_api_url, page_token, config.fb_app_secret).get(config.fb_app_id, fields="id,name")
    except GraphAPIError as error:
        if error.code in (100, 803) and error.status is not None:
            return Line(False, f"app {config.fb_app_id} is hidden from the public: it is in Development mode, so "
                               "only people with a role on the app (admins, developers, testers) get answers",
                        "App Dashboard: switch the app to Live after App Review, or add the people as testers "
                        "(README, \"It only answers me\")")
        return _failed(f"app {config.fb_app_id}", "cannot be read", error, "check FB_APP_ID")
    return Line(True, f"app {config.fb_app_id} is public (Live mode, or a Business app: the public also needs "
                      "Advanced Access for pages_messaging)")


def model_check(config: Config, model: str) -> Line:
    where = config.openai_base_url or "api.openai.com"
    client = openai.OpenAI(api_key=config.openai_api_key, base_url=config.openai_base_url, timeout=10.0, max_retries=0)
    try:
        listed = _models_listed(client, model)
    except openai.AuthenticationError:
        return Line(False, f"model server {where}: refuses OPENAI_API_KEY (401)", "put a valid key in OPENAI_API_KEY")
    except openai.NotFoundError:  # neither route: most often a base URL without its /v1
        return Line(False, f"model server {where}: answers 404 to GET /models/{model} and to GET /models",
                    "check OPENAI_BASE_URL: an OpenAI-compatible server's address usually ends in /v1")
    except openai.APIStatusError as error:
        return Line(False, f"model server {where}: answered HTTP {error.status_code} for model {model}",
                    "check OPENAI_BASE_URL and the server's status")
    except openai.APIError as error:  # connection failures and timeouts
        return Line(False, f"model server {where}: unreachable ({type(error).__name__})",
                    "check OPENAI_BASE_URL and that this host can reach it")
    if listed is not None and model not in listed:
        shown = ", ".join(sorted(listed)[:5]) + (", ..." if len(listed) > 5 else "")
        return Line(False, f"model server {where}: does not know the model {model}"
                           + (f" (it lists {shown})" if listed else ""),
                    "set OPENAI_MODEL (or the Page's model) to one the server lists at GET /models")
    return Line(True, f"model server {where}: reachable, the key is accepted, model {model} is known")


def _models_listed(client: openai.OpenAI, model: str) -> set[str] | None:
    """None when GET /models/{model} knows the model; else the ids GET /models lists. vLLM and
    other servers have no GET /models/{id}: their 404 says nothing of the model."""
    try:
        client.models.retrieve(model)
        return None
    except openai.NotFoundError:
        return {entry.id for entry in client.models.list()}


def public_url(url: str, verify_token: str) -> Line:
    try:
        parts = urlparse(url)
        host = parts.hostname
    except ValueError:  # "https://[::1": a bracket left open
        parts, host = None, None
    if parts is None or parts.scheme != "https" or not host:
        return Line(False, f"public URL {url}: not an https:// address with a host", "Meta only calls HTTPS URLs with a valid "
                    "certificate: put a tunnel or an HTTPS proxy in front (README, \"Running it as a service\")")
    endpoint = url if parts.path.rstrip("/").endswith("/webhook") else url.rstrip("/") + "/webhook"
    challenge = str(secrets.randbelow(10 ** 9))
    try:
        response = requests.get(endpoint, params={"hub.mode": "subscribe", "hub.verify_token": verify_token,
                                                  "hub.challenge": challenge}, timeout=(5, 10), allow_redirects=False)
    except requests.exceptions.SSLError:
        return Line(False, f"public URL {endpoint}: its certificate is not trusted",
                    "Meta refuses self-signed certificates: use one from a public CA (Caddy and certbot get one)")
    except requests.RequestException as error:
        return Line(False, f"public URL {endpoint}: unreachable ({type(error).__name__})",
                    "check that the bot runs and the tunnel or proxy forwards to it")
    if response.status_code == 200 and response.text == challenge:
        return Line(True, f"public URL {endpoint}: answers Meta's verify handshake over HTTPS")
    if response.status_code == 403:
        return Line(False, f"public URL {endpoint}: refuses the verify token (403)",
                    "the bot behind it has another FB_VERIFY_TOKEN than this one")
    return Line(False, f"public URL {endpoint}: answered HTTP {response.status_code} instead of the challenge",
                "check that the address reaches the bot's /webhook")


# -- helpers ------------------------------------------------------------------------------------
def _failed(subject: str, says: str, error: GraphAPIError, advice: str) -> Line:
    """`subject` `says` what Meta answered; or, when Meta did not answer at all, that the Graph API
    could not be reached (a firewall or proxy is not a bad token)."""
    if error.status is None:
        return Line(False, f"{subject}: Meta's Graph API did not answer ({error.args[0]})", NETWORK_HELP)
    return Line(False, f"{subject}: {says} ({_meta(error)})", advice)


def _meta(error: GraphAPIError) -> str:
    code = f"code {error.code}" + (f"/{error.subcode}" if error.subcode else "") if error.code else f"HTTP {error.status}"
    return f"{code}: {error.args[0].split(': ', 1)[-1]}"


def _duration(seconds: float) -> str:
    if seconds <= 0:
        return "the past"
    return f"{seconds / 86400:.0f} days" if seconds >= 2 * 86400 else f"{seconds / 3600:.0f} hours"


def _number(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.lstrip("v").split("."))


def _scrubber(values: list[str]):
    values = sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)

    def scrub(text: str) -> str:
        for value in values:
            text = text.replace(value, "[redacted]")
        return text
    return scrub
