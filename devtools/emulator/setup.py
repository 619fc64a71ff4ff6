"""What a Page's setup looks like to Meta: the token debugger, the token's permissions, the app's
webhook subscription, the app node, and the Messenger Profile. Each Page's state is scriptable
(`GraphEmulator.setup(page_id)`), so `python -m bot doctor` and `profile` are tested against
every answer they must explain.

Sources (Meta's docs, 2026): debug_token
https://developers.facebook.com/docs/graph-api/reference/debug_token (needs an app token
`APP_ID|APP_SECRET`; `data.{app_id,type,application,expires_at,is_valid,profile_id,scopes}`);
Page subscribed_apps https://developers.facebook.com/docs/graph-api/reference/page/subscribed_apps
(`data: [{id, name, subscribed_fields}]`); Messenger Profile API
https://developers.facebook.com/docs/messenger-platform/reference/messenger-profile-api (greeting
text 160 characters, ice breakers at most 4, persistent menu at most 20 items with titles of 30
characters and payloads of 1,000, a menu needs Get Started). The answers' wording is ours where
Meta's is not documented.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from werkzeug.wrappers import Request, Response

from devtools.emulator import errors
from devtools.emulator.accounts import Accounts, Page
from devtools.emulator.errors import graph_error
from devtools.emulator.http import json_response

# What `python -m bot doctor` looks for, and what a well set-up Page has.
FULL_SCOPES = ("pages_messaging", "pages_manage_metadata", "pages_read_engagement", "pages_show_list")
INSTAGRAM_SCOPES = ("instagram_basic", "instagram_manage_messages")  # a Page with an Instagram account's too
MESSENGER_FIELDS = ("messages", "messaging_postbacks", "message_echoes")
PROFILE_FIELDS = ("get_started", "greeting", "ice_breakers", "persistent_menu", "commands", "whitelisted_domains")
MAX_GREETING, MAX_ICE_BREAKERS, MAX_MENU_ITEMS, MAX_MENU_TITLE, MAX_PAYLOAD = 160, 4, 20, 30, 1000


@dataclass
class PageSetup:
    """One Page as the doctor sees it. Change the fields to script an answer."""
    scopes: list[str] = field(default_factory=lambda: list(FULL_SCOPES))
    expires_at: int = 0  # unix seconds; 0 = never (a Page token made from a long-lived user token)
    token_type: str = "PAGE"  # "USER": a user token pasted where a Page token belongs
    token_app_id: str | None = None  # the app that made the token (None: this emulator's app)
    subscribed_fields: list[str] | None = field(default_factory=lambda: list(MESSENGER_FIELDS))  # None: not subscribed
    profile: dict[str, Any] = field(default_factory=dict)  # the Messenger Profile, as GET returns it


class Setup:
    """Mixed into GraphEmulator: the app's own endpoints and each Page's setup, by token."""

    accounts: Accounts
    app_id: str
    app_name: str = "Messenger GPT bot"
    development_mode: bool = False  # the app node is hidden from Page tokens: only role users get answers
    _lock: threading.Lock

    def setup(self, page_id: str | None = None) -> PageSetup:
        """The scriptable setup of a Page (the first by default)."""
        setups = self.__dict__.setdefault("_setups", {})
        page_id = page_id or self.accounts.first.id
        if page_id not in self.accounts.pages:
            raise ValueError(f"no Page {page_id} in this emulator")
        if page_id not in setups:
            linked = self.accounts.pages[page_id].instagram_id is not None
            setups[page_id] = PageSetup(scopes=[*FULL_SCOPES, *(INSTAGRAM_SCOPES if linked else ())])
        return setups[page_id]

    @property
    def app_token(self) -> str:
        """What Meta calls an app access token: `APP_ID|APP_SECRET`."""
        return f"{self.app_id}|{self.accounts.app_secret}"

    def profile_calls(self) -> list:
        return [c for c in self.calls if c.path.endswith("/messenger_profile")]

    # -- routing (called by GraphEmulator before any Page token is required) -------------------------
    def app_route(self, request: Request, path: str) -> Response | None:
        """The calls made with the app token (debug_token, the app node); None: not one of them."""
        token = _token(request)
        if not token or "|" not in token:
            return None
        if token != self.app_token:
            return graph_error(190, "Invalid OAuth access token signature.")
        if request.args.get("appsecret_proof") not in (None, errors.expected_appsecret_proof(token, self.accounts.app_secret)):
            return errors.wrong_proof()
        if request.method == "GET" and path == "debug_token":
            return self._debug_token(request.args.get("input_token", ""))
        if request.method == "GET" and path == self.app_id:
            return self._app_node(by_app=True)
        return graph_error(100, "Unknown path components", status=404)

    def setup_route(self, request: Request, page: Page, path: str, body: Any) -> Response | None:
        """The Page-token calls of the setup; None: not one of them."""
        if request.method == "GET" and path in ("me", page.id):
            node = {"id": page.id, "name": page.name}
            if "instagram_business_account" in request.args.get("fields", "") and page.instagram_id:
                node["instagram_business_account"] = {"id": page.instagram_id}  # absent when none is linked
            return json_response(node)
        if request.method == "GET" and path == "me/permissions":
            return json_response({"data": [{"permission": s, "status": "granted"} for s in self.setup(page.id).scopes]})
        if request.method == "GET" and path.endswith("/subscribed_apps"):
            return self._subscribed_apps(page, path.split("/")[0])
        if request.method == "GET" and path == self.app_id:
            return self._app_node(by_app=False)
        if path in ("me/messenger_profile", f"{page.id}/messenger_profile"):
            return self._messenger_profile(request, page, body)
        return None

    # -- the answers -----------------------------------------------------------------------------
    def _debug_token(self, input_token: str) -> Response:
        page = self.accounts.by_token(input_token)
        if page is None:
            return json_response({"data": {"error": {"code": 190, "message": "Invalid OAuth access token."},
                                            "is_valid": False, "scopes": []}})
        setup = self.setup(page.id)
        data = {"app_id": setup.token_app_id or self.app_id, "type": setup.token_type, "application": self.app_name,
                "expires_at": setup.expires_at, "is_valid": True, "issued_at": int(time.time()) - 3600,
                "scopes": list(setup.scopes), "user_id": "10000000000000001"}
        if setup.token_type == "PAGE":
            data["profile_id"] = page.id
        if page.expired or (setup.expires_at and setup.expires_at <= time.time()):
            data["is_valid"] = False
            data["expires_at"] = setup.expires_at or int(time.time()) - 86400
            data["error"] = {"code": 190, "subcode": errors.EXPIRED, "message": "Error validating access token: "
                             "Session has expired."}
        return json_response({"data": data})

    def _subscribed_apps(self, page: Page, owner: str) -> Response:
        if owner not in (page.id, "me"):
            return errors.not_permitted()
        fields = self.setup(page.id).subscribed_fields
        apps = [] if fields is None else [{"category": "Business", "link": "https://www.example.com/",
                                            "name": self.app_name, "id": self.app_id, "subscribed_fields": fields}]
        return json_response({"data": apps})

    def _app_node(self, *, by_app: bool) -> Response:
        """The app's node. Read with a Page token it is hidden while the app is in development mode
        (Meta: such apps "cannot be searched for by the public through our tools and APIs"); the
        error is the one Graph gives for a node it will not show (code 100, subcode 33)."""
        if self.development_mode and not by_app:
            return graph_error(100, f"Unsupported get request. Object with ID '{self.app_id}' does not exist, cannot "
                                    "be loaded due to missing permissions, or does not support this operation.",
                               subcode=33)
        return json_response({"id": self.app_id, "name": self.app_name})

    def _messenger_profile(self, request: Request, page: Page, body: Any) -> Response:
        if "pages_messaging" not in self.setup(page.id).scopes:
            return graph_error(200, "(#200) The page access token does not have pages_messaging", status=403)
        profile = self.setup(page.id).profile
        with self._lock:
            if request.method == "GET":
                wanted = [f for f in request.args.get("fields", "").split(",") if f]
                if not wanted:
                    return graph_error(100, "(#100) The parameter fields is required")
                shown = {f: profile[f] for f in wanted if f in profile}
                return json_response({"data": [shown] if shown else []})
            if request.method == "DELETE":
                fields = body.get("fields") if isinstance(body, dict) else None
                if not isinstance(fields, list) or not fields:
                    return graph_error(100, "(#100) The parameter fields is required")
                if "get_started" in fields and "persistent_menu" in profile and "persistent_menu" not in fields:
                    return graph_error(100, "(#100) You must delete the persistent menu before the Get Started button")
                for name in fields:
                    profile.pop(name, None)
                return json_response({"result": "success"})
            if request.method == "POST":
                problem = _profile_problem(body, profile)
                if problem:
                    return graph_error(100, f"(#100) {problem}")
                profile.update(body)
                return json_response({"result": "success"})
        return graph_error(100, "Unsupported method", status=405)


def _profile_problem(body: Any, current: dict) -> str | None:
    """The first of Meta's documented limits the POST breaks, if any."""
    if not isinstance(body, dict) or not body:
        return "Requires one of the params: " + ", ".join(PROFILE_FIELDS)
    unknown = [k for k in body if k not in PROFILE_FIELDS]
    if unknown:
        return f"Param {unknown[0]} is not a Messenger Profile property"
    for greeting in body.get("greeting", []):
        if len(str(greeting.get("text", ""))) > MAX_GREETING:
            return f"greeting text must be at most {MAX_GREETING} characters"
    for locale in body.get("ice_breakers", []):
        if len(locale.get("call_to_actions", [locale])) > MAX_ICE_BREAKERS:
            return f"ice_breakers: at most {MAX_ICE_BREAKERS} questions"
    for menu in body.get("persistent_menu", []):
        items = menu.get("call_to_actions", [])
        if len(items) > MAX_MENU_ITEMS or any(len(str(i.get("title", ""))) > MAX_MENU_TITLE for i in items):
            return f"persistent_menu: at most {MAX_MENU_ITEMS} items, titles at most {MAX_MENU_TITLE} characters"
    if body.get("persistent_menu") and "get_started" not in body and "get_started" not in current:
        return "You must set a Get Started button if you also wish to use persistent menu."
    return None


def _token(request: Request) -> str | None:
    bearer = request.headers.get("Authorization", "")
    return bearer.removeprefix("Bearer ") if bearer.startswith("Bearer ") else request.args.get("access_token")
