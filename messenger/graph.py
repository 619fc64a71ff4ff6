"""A thin client for the two Graph API calls the bot makes: history and send.

The token travels in the Authorization header, never in a URL, so no access
log or urllib3 debug line can ever contain it; `appsecret_proof` goes with
every call. https://developers.facebook.com/docs/graph-api/securing-requests
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import requests
import urllib3
import requests.adapters

from messenger import nesting
from messenger.text import clean_text

logger = logging.getLogger(__name__)

# Put on every reply: Meta returns it in the echo, so the bot knows its own messages
# from a person's in the Page inbox (human takeover).
REPLY_METADATA = "messenger-gpt-bot"
HISTORY_FIELDS = "messages.limit({limit}){{message,from,created_time}}"


class GraphAPIError(Exception):
    """A failed Graph call: Meta's error answer, or no answer at all (status None)."""

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None,
                 subcode: int | None = None, fbtrace_id: str | None = None, in_doubt: bool = False):
        super().__init__(message)
        self.status = status
        self.code = code
        self.subcode = subcode
        self.fbtrace_id = fbtrace_id
        # No answer, but the request may have reached Meta and done its work (a read timeout, a
        # connection dropped after sending): a message "not sent" may well have gone out.
        self.in_doubt = in_doubt

    def __str__(self) -> str:
        return (f"{self.args[0]} (status={self.status} code={self.code} "
                f"subcode={self.subcode} fbtrace_id={self.fbtrace_id})")


# Meta's error codes that a later try can fix: temporary failures and rate limits.
# https://developers.facebook.com/docs/messenger-platform/error-codes
RETRYABLE_CODES = frozenset({1, 2, 4, 17, 32, 613, 1200, 80001, 80006})
RATE_LIMIT_CODES = frozenset({4, 17, 32, 613, 80001, 80006})
# Code 1 with this subcode: "received invalid JSON reply" - the message may have gone out.
MAYBE_DELIVERED_SUBCODES = frozenset({1357046})


# What a Page owner should know of some of Meta's refusals, logged with them.
# https://developers.facebook.com/docs/messenger-platform/error-codes
EXPLANATIONS = {
    (10, 2018278): "outside Meta's messaging window: the user's last message is more than 24 hours old"
                   " (7 days after a click-to-Messenger ad); the reply is dropped",
    (10, 1893063): "the Page is restricted from messaging: see the Page's quality and support inbox in Meta"
                   " Business Suite",
    (551, 1545041): "the person is not available (blocked the Page or left Messenger)",
    (100, 2018001): "no such user for this Page: a PSID of another Page, or the wrong Page token",
}


def explain(error: GraphAPIError) -> str | None:
    return EXPLANATIONS.get((error.code, error.subcode))


def is_rate_limited(error: GraphAPIError) -> bool:
    return error.code in RATE_LIMIT_CODES


def is_window_closed(error: GraphAPIError) -> bool:
    return (error.code, error.subcode) == (10, 2018278)


def is_retryable(error: GraphAPIError) -> bool:
    """True for timeouts, connection failures, 5xx and Meta's temporary codes.

    Token (190), 24-hour window (10), bad parameter (100), permissions (200, 230)
    and unavailable user (551) need a person or never succeed: no retry.
    """
    if error.subcode in MAYBE_DELIVERED_SUBCODES:
        return True  # in doubt (GraphAPIError.in_doubt): the retry looks for it before sending again
    if error.code is not None:
        return error.code in RETRYABLE_CODES
    return error.status is None or error.status >= 500 or error.status == 429


@dataclass(frozen=True)
class HistoryMessage:
    """One message of a conversation as the Conversations API returns it."""

    mid: str
    text: str
    from_id: str
    created_time: str = ""


def appsecret_proof(token: str, app_secret: str) -> str:
    """hex(HMAC-SHA256(key=app secret, message=access token))."""
    return hmac.new(app_secret.encode(), token.encode(), hashlib.sha256).hexdigest()


class GraphClient:
    """History reads and Send API calls for one Page over one pooled Session."""

    def __init__(self, *, base_url: str, page_id: str, token: str, app_secret: str,
                 timeout: float = 5.0, pool_size: int = 10, platform: str = "messenger"):
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.page_id = page_id
        self.platform = platform  # messenger, or instagram: the Page's linked Instagram account
        self.timeout = (min(3.05, timeout), timeout)  # (connect, read)
        self._proof = appsecret_proof(token, app_secret)
        self._session = requests.Session()
        # One pooled connection per reply thread, so none waits for or discards a socket.
        adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=pool_size)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["Authorization"] = f"Bearer {token}"
        # requests reads the proxy variables (HTTPS_PROXY, NO_PROXY), REQUESTS_CA_BUNDLE and
        # ~/.netrc again for every call: 0.12 ms of CPU, a fifth of a Send API call's 0.58 ms here
        # (bench/graph_calls.py). Every call goes to base_url and the environment does not change
        # while the bot runs, so they are read once. ~/.netrc not at all: its credentials would
        # replace the token's Authorization header.
        settings = self._session.merge_environment_settings(self.base_url, {}, None, None, None)
        self._session.trust_env = False
        self._session.proxies.update(settings["proxies"])
        self._session.verify = settings["verify"]

    def __repr__(self) -> str:
        return f"GraphClient(base_url={self.base_url!r}, page_id={self.page_id!r}, platform={self.platform!r})"

    def fetch_history(self, psid: str, limit: int) -> list[HistoryMessage]:
        """The newest `limit` messages with this user, newest first, in ONE request."""
        data = self._request("GET", f"{self.page_id}/conversations", params={
            "platform": self.platform,
            "user_id": psid,
            "fields": HISTORY_FIELDS.format(limit=limit),
        })
        threads = data.get("data") or []
        if not threads:
            return []  # no conversation yet
        return [to_history_message(item) for item in threads[0].get("messages", {}).get("data", [])]

    def send_text(self, psid: str, text: str, quick_replies: Sequence[tuple[str, str]] = ()) -> str | None:
        """Send one text (already within the platform's limit), with (title, payload) quick-reply
        buttons under it, and return its message id."""
        message: dict[str, Any] = {"text": text, "metadata": REPLY_METADATA}
        if self.platform == "instagram":
            del message["metadata"]  # not a field of Instagram's Send API
        if quick_replies:
            message["quick_replies"] = [{"content_type": "text", "title": title, "payload": payload}
                                        for title, payload in quick_replies]
        data = self._request("POST", "me/messages", json={
            "recipient": {"id": psid}, "messaging_type": "RESPONSE", "message": message,
        })
        return data.get("message_id")

    def pass_thread_control(self, psid: str, target_app_id: str, metadata: str = "") -> None:
        """Meta's handover protocol: the conversation goes to another app (the Page inbox).
        https://developers.facebook.com/docs/messenger-platform/handover-protocol/pass-thread-control"""
        self._request("POST", "me/pass_thread_control", json={
            "recipient": {"id": psid}, "target_app_id": int(target_app_id), "metadata": metadata[:1000]})

    def take_thread_control(self, psid: str, metadata: str = "") -> None:
        """The Page's primary receiver takes the conversation back from the app that has it.
        https://developers.facebook.com/docs/messenger-platform/handover-protocol/conversation-control"""
        self._request("POST", "me/take_thread_control", json={"recipient": {"id": psid}, "metadata": metadata[:1000]})

    def send_action(self, psid: str, action: str) -> None:
        """A sender action: mark_seen, typing_on or typing_off (never with a message)."""
        self._request("POST", "me/messages", json={"recipient": {"id": psid}, "sender_action": action})

    def _request(self, method: str, path: str, *, params: dict | None = None, json: Any = None) -> dict:
        params = {**(params or {}), "appsecret_proof": self._proof}
        try:
            response = self._session.request(method, self.base_url + path, params=params,
                                             json=json, timeout=self.timeout)
        except requests.RequestException as exc:
            # The exception text can hold the URL; the class name is enough to diagnose.
            raise GraphAPIError(f"{method} {path} failed: {type(exc).__name__}", in_doubt=_may_have_arrived(exc)) from None
        return _to_result(method, path, response)


# Failures raised before anything was sent: the request is malformed, nothing left this host.
NEVER_SENT = (requests.ConnectTimeout, requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
              requests.exceptions.InvalidSchema, requests.exceptions.InvalidHeader,
              requests.exceptions.InvalidJSONError, requests.exceptions.URLRequired)


def _may_have_arrived(exc: requests.RequestException) -> bool:
    """False only when the request surely never reached the server (no connection was made, or it
    was never sent); anything else - a read timeout, a dropped connection, a body cut short after
    the status line - may have done its work."""
    if isinstance(exc, NEVER_SENT):
        return False
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return not isinstance(reason, urllib3.exceptions.NewConnectionError)  # refused, no route, DNS


def _to_result(method: str, path: str, response: requests.Response) -> dict:
    try:  # Graph answers UTF-8; a body nested thousands deep would end json's recursion in RecursionError
        data = nesting.loads(response.content.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError, JSONDecodeError, nesting.TooDeep
        data = None
    if response.ok and isinstance(data, dict):
        return data
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):  # a gateway's 502 or 504: it may have reached Meta behind it
        raise GraphAPIError(f"{method} {path}: HTTP {response.status_code}, no Graph error body",
                            status=response.status_code, in_doubt=response.status_code in (502, 504))
    raise GraphAPIError(
        f"{method} {path}: {str(error.get('message', 'unknown error'))[:200]}",
        status=response.status_code, code=error.get("code"),
        subcode=error.get("error_subcode"), fbtrace_id=error.get("fbtrace_id"),
        in_doubt=error.get("error_subcode") in MAYBE_DELIVERED_SUBCODES,
    )


def to_history_message(item: dict) -> HistoryMessage:
    """One Conversations API message; attachment-only messages have text ''.

    clean_text: Graph's JSON can spell a lone surrogate too, which no storage could encode.
    """
    sender = item.get("from") or {}
    return HistoryMessage(
        mid=clean_text(str(item.get("id", ""))), text=clean_text(str(item.get("message") or "")),
        from_id=clean_text(str(sender.get("id", ""))),
        created_time=clean_text(str(item.get("created_time", ""))),
    )
