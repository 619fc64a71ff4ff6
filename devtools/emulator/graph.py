"""Meta's side of one or more Pages: the Conversations API, the Send API, users who write in.

Faithful where the bot depends on it (see MESSENGER.md): each call routed by its token
(one emulator, one FB_API_URL, any number of Pages, each with an optional Instagram
account), the appsecret_proof of that token, newest-first history with details for the 20
newest messages, Messenger's 2,000-character and Instagram's 1,000-byte limits, Meta's error
shapes, an optional Conversations rate limit per Page. It records every call, and takes
scripted failures (`fail_next`, `fail_call`) and latency (`delays`), so tests drive every
error path through real sockets and never replace its methods.
"""
from __future__ import annotations

import collections
import itertools
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from werkzeug.wrappers import Request, Response

from devtools.emulator import errors
from devtools.emulator.accounts import INSTAGRAM, MESSENGER, Account, Accounts, Page
from devtools.emulator.cdn import PREFIX as CDN_PREFIX, AttachmentStore
from devtools.emulator.errors import expected_appsecret_proof, graph_error  # noqa: F401 - their old home
from devtools.emulator.handover import Handovers
from devtools.emulator.http import LocalServer, json_response
from devtools.emulator.sender import WebhookSender
from devtools.emulator.setup import Setup
from devtools.emulator.timeline import Timeline
from devtools.emulator.users import PAGE_INBOX_APP_ID, Users  # noqa: F401 - PAGE_INBOX_APP_ID: its old home

VERSION = "v26.0"
DETAILED_MESSAGES = 20  # Meta gives message details for the 20 newest messages only
MAX_QUICK_REPLIES, MAX_QUICK_REPLY_TITLE = 13, 20
MAX_TEXT = {MESSENGER: 2000, INSTAGRAM: 1000}  # UTF-16 units on Messenger, UTF-8 bytes on Instagram
SENDER_ACTIONS = ("typing_on", "typing_off", "mark_seen")  # both platforms (Meta's Sender Actions docs)


@dataclass
class GraphCall:
    method: str
    path: str
    args: dict
    body: Any
    at: float = field(default_factory=time.monotonic)
    token_page: str | None = None  # whose token the call carried (None: no known token)
    account: str | None = None  # the Page or Instagram account it acted for


class GraphEmulator(Users, Setup, Handovers, LocalServer):
    """The Graph API of a deployment's Pages (the first given here, more with `add_page`), and their users.

    What tests read: `calls` (each with `token_page` and `account`), `delivered` [(psid, text)] and
    the parallel `delivered_by` [account id] and `delivered_at`, `sent_texts(psid)`."""

    def __init__(self, page_id: str, token: str, app_secret: str, *, app_id: str = "1", name: str = "",
                 instagram_id: str | None = None, conversations_per_second: float | None = None,
                 timeline: Timeline | None = None, webhooks: WebhookSender | None = None, port: int = 0):
        super().__init__(port=port)
        self.accounts = Accounts(app_secret)
        first = self.accounts.add_page(page_id, token, name=name, instagram_id=instagram_id)
        self.page_id, self.token, self.proof = page_id, token, first.proof  # the first Page's
        self.app_id = app_id  # the bot's app: Messenger echoes of what it sends carry this id
        self.conversations_per_second = conversations_per_second
        self.timeline = timeline or Timeline()
        self.webhooks = webhooks  # when set, users' messages and echoes are delivered to the bot
        self.users: dict[str, str] = {}  # psid -> display name
        self.clock = time.time  # Meta's clock (created_time, webhook times): a test may set it apart from the bot's
        self.calls: list[GraphCall] = []
        self.conversations: dict[str, list[dict]] = {}  # psid -> messages, oldest first
        self.delivered: list[tuple[str, str]] = []  # (psid, text) the Send API accepted
        self.delivered_by: list[str] = []  # the account (Page or Instagram id) each of them went out from
        self.delivered_at: list[float] = []  # time.monotonic() of each, after the injected latency
        self.rate_limited = 0  # Conversations calls refused for the rate limit
        # Scripted answers per kind: entry i answers the (i+1)-th call from now; None lets that call through.
        # "handover": pass_thread_control and take_thread_control calls
        self.failures: dict[str, list[Response | None]] = {"history": [], "send": [], "action": [], "handover": []}
        self.delays: dict[str, float] = {"history": 0.0, "send": 0.0, "action": 0.0, "handover": 0.0}
        self._ids = itertools.count(1)
        self._order = itertools.count(1)
        self._recent_reads: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()
        self._delivery = threading.Condition(self._lock)
        self.cdn = AttachmentStore(self.url, self.timeline)  # what users send, served from this port under /cdn/

    @property
    def api_url(self) -> str:
        return f"{self.url}/{VERSION}/"

    # -- the Pages -------------------------------------------------------------------------------
    def add_page(self, page_id: str, token: str, *, name: str = "", instagram_id: str | None = None) -> None:
        """Another Page on this emulator (same FB_API_URL), with its own token and, optionally, the
        Instagram account linked to it: its users write with `page_id=` the Page or Instagram id."""
        self.accounts.add_page(page_id, token, name=name, instagram_id=instagram_id)

    def expire_token(self, page_id: str) -> None:
        """From now on every call with that Page's token answers 190 / 463; the other Pages' work on."""
        self.accounts.pages[page_id].expired = True

    # -- what tests read -------------------------------------------------------------------
    def wait_for_deliveries(self, count: int, timeout: float) -> bool:
        """Block until the Send API has accepted `count` texts in all (no polling)."""
        with self._delivery:
            return self._delivery.wait_for(lambda: len(self.delivered) >= count, timeout)

    def fail_next(self, kind: str, response: Response) -> None:
        """The next call of `kind` not already scripted answers `response`: k calls fail the next k."""
        with self._lock:
            script = self.failures[kind]
            _script(script, script.index(None) if None in script else len(script), response)

    def fail_call(self, kind: str, n: int, response: Response) -> None:
        """The n-th call of `kind` from now (1 is the next) answers `response`; the ones before go through.

        Calls count as for `fail_next`: those past the token, proof, recipient and rate-limit
        checks. "send" counts Send API messages only, sender actions are "action"."""
        if n < 1:
            raise ValueError(f"n counts from 1, not {n}")
        with self._lock:
            script = self.failures[kind]
            if n <= len(script) and script[n - 1] is not None:
                raise ValueError(f"{kind} call {n} is already scripted")
            _script(script, n - 1, response)

    def sent_texts(self, psid: str | None = None, *, account: str | None = None) -> list[str]:
        """Texts the Send API accepted (failed attempts are in `calls` only), to `psid` and/or from `account`."""
        return [text for (to, text), by in zip(self.delivered, self.delivered_by)
                if (psid is None or to == psid) and (account is None or by == account)]

    def actions(self) -> list[str]:
        return [c.body["sender_action"] for c in self.calls if "sender_action" in (c.body or {})]

    def history_calls(self) -> list[GraphCall]:
        return [c for c in self.calls if c.path.endswith("/conversations")]

    # -- the API -------------------------------------------------------------------------------
    def handle(self, request: Request) -> Response:
        if request.path.startswith(CDN_PREFIX):  # Meta's CDN: no token, not a Graph call
            return self.cdn.serve(request)
        started = time.monotonic()
        body = request.get_json(silent=True)
        call = GraphCall(request.method, request.path, dict(request.args), body)
        self.calls.append(call)
        response = self._route(request, body, call)
        if not self.timeline.enabled:
            return response
        psid = request.args.get("user_id")
        if psid is None and isinstance(body, dict) and isinstance(body.get("recipient"), dict):
            psid = body["recipient"].get("id")
        self.timeline.add("graph", psid, method=request.method, path=request.path, status=response.status_code,
                          ms=round((time.monotonic() - started) * 1000), request=_safe_args(request.args, body),
                          response=response.get_json(silent=True), account=call.account)
        return response

    def _route(self, request: Request, body: Any, call: GraphCall) -> Response:
        path = request.path.removeprefix(f"/{VERSION}/")
        answered = self.app_route(request, path)  # debug_token and the app node, with the app token
        if answered is not None:
            return answered
        page = self.accounts.page_of(request)
        if page is None:
            return errors.invalid_token()
        call.token_page = call.account = page.id
        if page.expired:
            return errors.expired_token()
        if request.args.get("appsecret_proof") != page.proof:
            return errors.wrong_proof()
        answered = self.setup_route(request, page, path, body) or (
            self.handover_route(page, path, body) if request.method == "POST" else None)
        if answered is not None:
            return answered
        if request.method == "GET" and re.fullmatch(r"\d+/conversations", path):
            return self._history(request, page, path.split("/")[0], call)
        if request.method == "POST" and path in ("me/messages", f"{page.id}/messages"):
            return self._message(page, body, call)
        return graph_error(100, "Unknown path components", status=404)

    def _history(self, request: Request, page: Page, owner: str, call: GraphCall) -> Response:
        if owner != page.id:  # another Page's (or no Page's) conversations: not this token's to read
            return errors.not_permitted()
        platform = request.args.get("platform")
        if platform not in (MESSENGER, INSTAGRAM) or not request.args.get("user_id"):
            return graph_error(100, "platform and user_id are required")
        account = self.accounts.of_page(page, platform)
        if account is None:  # our wording: the Page has no Instagram account linked
            return graph_error(100, "(#100) This Page has no linked Instagram account")
        call.account = account.id
        # Meta counts a call when it arrives, before any of its own latency.
        return self._rate_limit(page.id) or self._scripted("history") or self._conversations(request, account)

    def _message(self, page: Page, body: Any, call: GraphCall) -> Response:
        kind = "action" if isinstance(body, dict) and "sender_action" in body else "send"
        recipient = body.get("recipient") if isinstance(body, dict) else None
        user_id = str(recipient.get("id") or "") if isinstance(recipient, dict) else ""
        account = self.accounts.account_of(user_id) if user_id else self.accounts.of_page(page, MESSENGER)
        if account.page_id != page.id:  # a user of another Page: the wrong Page's token, as Meta says it
            call.account = (self.accounts.of_page(page, account.platform) or self.accounts.of_page(page, MESSENGER)).id
            return errors.no_matching_user()
        call.account = account.id
        return self._scripted(kind) or self._send(body, account)

    def _scripted(self, kind: str) -> Response | None:
        if self.delays[kind]:
            time.sleep(self.delays[kind])
        with self._lock:
            return self.failures[kind].pop(0) if self.failures[kind] else None

    def _rate_limit(self, page_id: str) -> Response | None:
        """About 2 Conversations calls per second per Page: more within any second are refused."""
        if not self.conversations_per_second:
            return None
        now = time.monotonic()
        with self._lock:
            recent = self._recent_reads[page_id]
            while recent and now - recent[0] >= 1.0:
                recent.popleft()
            if len(recent) >= self.conversations_per_second:
                self.rate_limited += 1
                return graph_error(613, "Calls to this api have exceeded the rate limit.")
            recent.append(now)
        return None

    def _conversations(self, request: Request, account: Account) -> Response:
        """The thread of `user_id` with `account`: none for a user of another account or platform."""
        psid = request.args["user_id"]
        with self._lock:
            mine = self.accounts.user_accounts.get(psid, self.accounts.first.id) == account.id
            messages = list(reversed(self.conversations.get(psid, []))) if mine else []
        if not messages:
            return json_response({"data": []})
        thread = {"id": f"t_{psid}"}
        match = re.search(r"messages(?:\.limit\((\d+)\))?\{([^}]*)\}", request.args.get("fields", ""))
        if match:
            wanted = [f.strip() for f in match.group(2).split(",")]
            limit = int(match.group(1) or 25)
            thread["messages"] = {"data": [
                _fields(m, wanted if i < DETAILED_MESSAGES else ["created_time"])
                for i, m in enumerate(messages[:limit])
            ]}
        return json_response({"data": [thread]})

    def _send(self, body: Any, account: Account) -> Response:
        if not isinstance(body, dict) or not isinstance(body.get("recipient"), dict) or not body["recipient"].get("id"):
            return graph_error(100, "param recipient must be non-empty.")
        psid = str(body["recipient"]["id"])
        if "sender_action" in body:
            return self._sender_action(psid, body, account)
        # Instagram's Send API examples carry no messaging_type; Messenger's requires it.
        if account.platform == MESSENGER and body.get("messaging_type") not in ("RESPONSE", "UPDATE", "MESSAGE_TAG"):
            return graph_error(100, "messaging_type is required")
        if self.thread_owner(psid) != self.app_id:
            return errors.not_thread_owner()
        message = body.get("message") if isinstance(body.get("message"), dict) else {}
        text = message.get("text", "")
        if not text or _length(text, account.platform) > MAX_TEXT[account.platform]:
            return errors.text_too_long(MAX_TEXT[account.platform])
        quick_replies = message.get("quick_replies") or []
        if len(quick_replies) > MAX_QUICK_REPLIES or any(
                len(str(q.get("title", ""))) > MAX_QUICK_REPLY_TITLE for q in quick_replies):
            return graph_error(100, "(#100) quick_replies: at most 13, titles at most 20 characters")
        # Instagram: Meta's "Send a Message" page lists no `metadata`, and its echoes carry none; a
        # metadata field is accepted and dropped (not refused: no Meta page says it is an error).
        instagram = account.platform == INSTAGRAM
        mid = self._page_message(account, psid, text, None if instagram else self.app_id, by="bot",
                                 quick_replies=quick_replies, metadata=None if instagram else message.get("metadata"))
        with self._delivery:
            self.delivered.append((psid, text))
            self.delivered_by.append(account.id)
            self.delivered_at.append(time.monotonic())
            self._delivery.notify_all()
        return json_response({"recipient_id": psid, "message_id": mid})

    def _sender_action(self, psid: str, body: dict, account: Account) -> Response:
        if "message" in body:
            return graph_error(100, "sender_action cannot be sent with message")
        if body["sender_action"] not in SENDER_ACTIONS:
            return graph_error(100, "param sender_action must be one of {typing_on, typing_off, mark_seen}")
        self.timeline.add("action", psid, action=body["sender_action"], account=account.id)
        return json_response({"recipient_id": psid})


def _length(text: str, platform: str) -> int:
    """Messenger counts UTF-16 units (an emoji is 2); Instagram "1000 bytes or less" of UTF-8."""
    return len(text.encode("utf-8")) if platform == INSTAGRAM else len(text.encode("utf-16-le")) // 2


def _script(script: list[Response | None], index: int, response: Response) -> None:
    """Put `response` at `index`, letting the calls in any gap before it through."""
    script.extend([None] * (index + 1 - len(script)))
    script[index] = response


def _fields(message: dict, wanted: list[str]) -> dict:
    """Only the fields asked for (and the id), as Graph field expansion does."""
    return {"id": message["id"], **{k: message[k] for k in wanted if k in message}}


def _safe_args(args, body: Any) -> dict:
    """The call as the timeline shows it: never the token or the proof."""
    shown = {k: v for k, v in args.items() if k not in ("access_token", "appsecret_proof")}
    return {"query": shown, "body": body} if body is not None else {"query": shown}
