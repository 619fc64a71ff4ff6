"""Meta's side of one Page: the Conversations API, the Send API, users who write in.

Faithful where the bot depends on it (see MESSENGER.md): token and
appsecret_proof on every call, newest-first history with details for the 20
newest messages, the 2000-character limit, Meta's error shapes, an optional
Conversations rate limit. It records every call, and takes scripted failures
(`fail_next`, `fail_call`) and latency (`delays`), so tests drive every error
path through real sockets and never replace its methods.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import itertools
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from werkzeug.wrappers import Request, Response

from devtools.emulator import webhooks
from devtools.emulator.cdn import PREFIX as CDN_PREFIX, AttachmentFetch, AttachmentStore
from devtools.emulator.http import LocalServer, json_response
from devtools.emulator.media import png_bytes, wav_bytes
from devtools.emulator.model_inputs import text_of
from devtools.emulator.timeline import Timeline

VERSION = "v26.0"
DETAILED_MESSAGES = 20  # Meta gives message details for the 20 newest messages only
MAX_QUICK_REPLIES, MAX_QUICK_REPLY_TITLE = 13, 20
# The app id Meta puts on echoes of messages a person typed in the Page inbox.
PAGE_INBOX_APP_ID = "263902037430900"


def expected_appsecret_proof(token: str, app_secret: str) -> str:
    """The proof Meta expects: hex HMAC-SHA256, key = the app secret, message = the access token.

    Written out here rather than imported from the bot (messenger.graph), so a
    wrong proof in the bot is refused instead of agreed with."""
    return hmac.new(app_secret.encode(), token.encode(), hashlib.sha256).hexdigest()


def graph_error(code: int, message: str = "error", status: int = 400, subcode: int | None = None) -> Response:
    error = {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": f"trace-{code}"}
    if subcode is not None:
        error["error_subcode"] = subcode
    return json_response({"error": error}, status)


@dataclass
class GraphCall:
    method: str
    path: str
    args: dict
    body: Any
    at: float = field(default_factory=time.monotonic)


class GraphEmulator(LocalServer):
    """The Graph API of one Page, and the users who write to it."""

    def __init__(self, page_id: str, token: str, app_secret: str, *, app_id: str = "1",
                 conversations_per_second: float | None = None, timeline: Timeline | None = None,
                 webhooks: "webhooks.WebhookSender | None" = None, port: int = 0):
        super().__init__(port=port)
        self.page_id = page_id
        self.token = token
        self.app_id = app_id  # the bot's app: echoes of what it sends carry this id
        self.proof = expected_appsecret_proof(token, app_secret)
        self.conversations_per_second = conversations_per_second
        self.timeline = timeline or Timeline()
        self.webhooks = webhooks  # when set, users' messages and echoes are delivered to the bot
        self.users: dict[str, str] = {}  # psid -> display name
        self.calls: list[GraphCall] = []
        self.conversations: dict[str, list[dict]] = {}  # psid -> messages, oldest first
        self.delivered: list[tuple[str, str]] = []  # (psid, text) the Send API accepted
        self.delivered_at: list[float] = []  # time.monotonic() of each, after the injected latency
        self.rate_limited = 0  # Conversations calls refused for the rate limit
        # Scripted answers per kind: entry i answers the (i+1)-th call from now; None lets that call through.
        self.failures: dict[str, list[Response | None]] = {"history": [], "send": [], "action": []}
        self.delays: dict[str, float] = {"history": 0.0, "send": 0.0, "action": 0.0}
        self._ids = itertools.count(1)
        self._order = itertools.count(1)
        self._recent_reads: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self._delivery = threading.Condition(self._lock)
        self.cdn = AttachmentStore(self.url, self.timeline)  # what users send, served from this port under /cdn/

    @property
    def api_url(self) -> str:
        return f"{self.url}/{VERSION}/"

    # -- the people on the other side --------------------------------------------------
    def add_user(self, psid: str, name: str) -> None:
        with self._lock:
            self.users[psid] = name
            self.conversations.setdefault(psid, [])

    def add_message(self, psid: str, text: str, from_page: bool = False, mid: str | None = None,
                    extra: dict | None = None) -> str:
        """Put a message in the conversation (as history); nothing is delivered.

        `extra` holds Graph fields beyond the text (`attachments`, `sticker`), returned when asked for."""
        mid = mid or f"m_{next(self._ids)}"
        with self._lock:
            name = self.users.setdefault(psid, f"User {psid[-4:]}")
            sender = {"id": self.page_id, "name": "Page"} if from_page else {"id": psid, "name": name}
            self.conversations.setdefault(psid, []).append({
                "id": mid, "message": text, "from": sender,
                "created_time": time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime()),
                "_order": next(self._order), **(extra or {}),
            })
        return mid

    def psid_for_prompt(self, messages: list[dict]) -> str | None:
        """Whose turn a model request answers: the user whose newest words end its last message."""
        last = text_of(messages[-1].get("content", "")) if messages else ""
        with self._lock:
            candidates = [(m["_order"], psid) for psid, conversation in self.conversations.items()
                          for m in conversation
                          if m["from"]["id"] == psid and m["message"] and m["message"] in last]
        return max(candidates)[1] if candidates else None

    def user_writes(self, psid: str, *, text: str = "", quick_reply: str | None = None,
                    postback: str | None = None, image_url: str | None = None) -> str:
        """A user types, taps a quick reply or a button, or sends an image: stored and delivered."""
        mid = self.add_message(psid, text)
        event = webhooks.user_event(self.page_id, psid, mid, text=text, quick_reply=quick_reply,
                                    postback=postback, image_url=image_url)
        kind = "postback" if postback else "image" if image_url else "quick_reply" if quick_reply else "text"
        self.timeline.add("message", psid, mid=mid, sender="user", text=text, type=kind, image_url=image_url)
        if self.webhooks:
            self.webhooks.deliver(self.page_id, [event], psid)
        return mid

    def user_sends(self, psid: str, attachments: list[dict], text: str = "", reply_to: dict | None = None) -> str:
        """A user sends attachments (built with the `webhooks.*_attachment` helpers), with a caption or not.

        The history holds the caption ("" without one, as Meta gives it) and, for files served
        here, the Graph `attachments` field."""
        urls = dict.fromkeys(str((a.get("payload") or {}).get("url") or "") for a in attachments)
        nodes = [node for node in (self.cdn.sent_by(url, psid) for url in urls) if node]
        sticker = next((a["payload"]["url"] for a in attachments if "sticker_id" in (a.get("payload") or {})), None)
        # Graph shows a sticker as the message's `sticker` (its image URL), other files as `attachments`.
        extra = {"sticker": sticker} if sticker else {"attachments": {"data": nodes}} if nodes else {}
        mid = self.add_message(psid, text, extra=extra)
        event = webhooks.user_event(self.page_id, psid, mid, text=text, attachments=attachments, reply_to=reply_to)
        kind = "sticker" if sticker else attachments[0]["type"] if attachments else "text"
        image = next((a["payload"]["url"] for a in attachments if a["type"] == "image" and not sticker), None)
        self.timeline.add("message", psid, mid=mid, sender="user", text=text, type=kind, image_url=image,
                          attachments=attachments, reply_to=reply_to)
        if self.webhooks:
            self.webhooks.deliver(self.page_id, [event], psid)
        return mid

    def user_sends_photo(self, psid: str, data: bytes | None = None, text: str = "",
                         content_type: str = "image/png") -> str:
        """A photo from the phone: real bytes on the CDN, an image attachment in the webhook."""
        url = self.add_attachment(data if data is not None else png_bytes(64, 48), content_type, name="image",
                                  psid=psid)
        return self.user_sends(psid, [webhooks.image_attachment(url)], text)

    def user_sends_voice(self, psid: str, data: bytes | None = None, content_type: str = "audio/wav") -> str:
        """A voice note (Meta's are audio/mp4 "audioclip-….mp4"; a WAV by default, which any decoder plays)."""
        url = self.add_attachment(data if data is not None else wav_bytes(2.0), content_type, name="audioclip",
                                  psid=psid)
        return self.user_sends(psid, [webhooks.audio_attachment(url)])

    def user_sends_sticker(self, psid: str, sticker_id: int = webhooks.LIKE_STICKER_ID) -> str:
        """A sticker (the "like" by default), in the shape Meta sends during its move to type "sticker"."""
        url = self.add_attachment(png_bytes(32, 32), "image/png", name="sticker", psid=psid)
        return self.user_sends(psid, webhooks.sticker_attachments(url, sticker_id))

    # -- Meta's CDN ------------------------------------------------------------------------------
    def add_attachment(self, data: bytes, content_type: str, *, name: str = "file", delay: float = 0.0,
                       redirects: int = 0, chunk_delay: float = 0.0, psid: str | None = None) -> str:
        """Serve `data` at a signed CDN URL (see `cdn.AttachmentStore`) and return the URL."""
        return self.cdn.add(data, content_type, name=name, psid=psid, delay=delay, redirects=redirects,
                            chunk_delay=chunk_delay)

    def expire_attachments(self) -> None:
        """Every attachment URL handed out so far answers 403 "URL signature expired"."""
        self.cdn.expire()

    @property
    def attachment_fetches(self) -> list[AttachmentFetch]:
        return list(self.cdn.fetches)

    def psid_for_media(self, data: bytes) -> str | None:
        """Whose attachment these bytes are, for the model's timeline events."""
        return self.cdn.psid_of(data)

    def inbox_reply(self, psid: str, text: str) -> str:
        """A person answers from the Page inbox: Meta echoes it with the inbox's app id."""
        return self._page_message(psid, text, PAGE_INBOX_APP_ID, by="inbox")

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

        Calls count as for `fail_next`: those past the token, proof and rate-limit
        checks. "send" counts Send API messages only, sender actions are "action"."""
        if n < 1:
            raise ValueError(f"n counts from 1, not {n}")
        with self._lock:
            script = self.failures[kind]
            if n <= len(script) and script[n - 1] is not None:
                raise ValueError(f"{kind} call {n} is already scripted")
            _script(script, n - 1, response)

    def sent_texts(self, psid: str | None = None) -> list[str]:
        """Texts the Send API accepted (failed attempts are in `calls` only)."""
        return [text for to, text in self.delivered if psid is None or to == psid]

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
        self.calls.append(GraphCall(request.method, request.path, dict(request.args), body))
        response = self._route(request, body)
        if not self.timeline.enabled:
            return response
        psid = request.args.get("user_id")
        if psid is None and isinstance(body, dict) and isinstance(body.get("recipient"), dict):
            psid = body["recipient"].get("id")
        self.timeline.add("graph", psid, method=request.method, path=request.path, status=response.status_code,
                          ms=round((time.monotonic() - started) * 1000), request=_safe_args(request.args, body),
                          response=response.get_json(silent=True))
        return response

    def _route(self, request: Request, body: Any) -> Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}" and request.args.get("access_token") != self.token:
            return graph_error(190, "Invalid OAuth access token.")
        if request.args.get("appsecret_proof") != self.proof:
            return graph_error(100, "Invalid appsecret_proof provided in the API argument")
        if request.method == "GET" and request.path == f"/{VERSION}/{self.page_id}/conversations":
            # Meta counts a call when it arrives, before any of its own latency.
            return self._rate_limit() or self._scripted("history") or self._conversations(request)
        if request.method == "POST" and request.path in (f"/{VERSION}/me/messages", f"/{VERSION}/{self.page_id}/messages"):
            kind = "action" if isinstance(body, dict) and "sender_action" in body else "send"
            return self._scripted(kind) or self._send(body)
        return graph_error(100, "Unknown path components", status=404)

    def _scripted(self, kind: str) -> Response | None:
        if self.delays[kind]:
            time.sleep(self.delays[kind])
        with self._lock:
            return self.failures[kind].pop(0) if self.failures[kind] else None

    def _rate_limit(self) -> Response | None:
        """About 2 Conversations calls per second per Page: more within any second are refused."""
        if not self.conversations_per_second:
            return None
        now = time.monotonic()
        with self._lock:
            while self._recent_reads and now - self._recent_reads[0] >= 1.0:
                self._recent_reads.popleft()
            if len(self._recent_reads) >= self.conversations_per_second:
                self.rate_limited += 1
                return graph_error(613, "Calls to this api have exceeded the rate limit.")
            self._recent_reads.append(now)
        return None

    def _conversations(self, request: Request) -> Response:
        if request.args.get("platform") != "messenger" or not request.args.get("user_id"):
            return graph_error(100, "platform and user_id are required")
        psid = request.args["user_id"]
        with self._lock:
            messages = list(reversed(self.conversations.get(psid, [])))
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

    def _send(self, body: Any) -> Response:
        if not isinstance(body, dict) or not isinstance(body.get("recipient"), dict) or not body["recipient"].get("id"):
            return graph_error(100, "param recipient must be non-empty.")
        psid = str(body["recipient"]["id"])
        if "sender_action" in body:
            if "message" in body:
                return graph_error(100, "sender_action cannot be sent with message")
            if body["sender_action"] not in ("typing_on", "typing_off", "mark_seen"):
                return graph_error(100, "param sender_action must be one of {typing_on, typing_off, mark_seen}")
            self.timeline.add("action", psid, action=body["sender_action"])
            return json_response({"recipient_id": psid})
        if body.get("messaging_type") not in ("RESPONSE", "UPDATE", "MESSAGE_TAG"):
            return graph_error(100, "messaging_type is required")
        message = body.get("message") if isinstance(body.get("message"), dict) else {}
        text = message.get("text", "")
        if not text or len(text.encode("utf-16-le")) // 2 > 2000:
            return graph_error(100, "(#100) Length of param message[text] must be less than or equal to 2000")
        quick_replies = message.get("quick_replies") or []
        if len(quick_replies) > MAX_QUICK_REPLIES or any(
                len(str(q.get("title", ""))) > MAX_QUICK_REPLY_TITLE for q in quick_replies):
            return graph_error(100, "(#100) quick_replies: at most 13, titles at most 20 characters")
        mid = self._page_message(psid, text, self.app_id, by="bot", quick_replies=quick_replies,
                                 metadata=message.get("metadata"))
        with self._delivery:
            self.delivered.append((psid, text))
            self.delivered_at.append(time.monotonic())
            self._delivery.notify_all()
        return json_response({"recipient_id": psid, "message_id": mid})

    def _page_message(self, psid: str, text: str, app_id: str, by: str, quick_replies=(), metadata=None) -> str:
        mid = self.add_message(psid, text, from_page=True)
        self.timeline.add("message", psid, mid=mid, sender="page", by=by, text=text,
                          quick_replies=[q.get("title") for q in quick_replies])
        if self.webhooks and self.webhooks.echoes:
            echo = webhooks.echo_event(self.page_id, psid, mid, text, app_id, metadata)
            self.webhooks.deliver(self.page_id, [echo], psid)
        return mid


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
