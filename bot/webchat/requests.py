"""What a website visitor sent, checked before anything is stored or asked: pure functions, no I/O.

Every problem is a `Refused` with a status and words a person can read; none reaches the model.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import urlparse

from messenger.nesting import loads
from messenger.text import clean_text

# The body of a chat request: a message of WEBCHAT_MAX_CHARS (at most 8,000) characters and a few ids.
MAX_BODY_BYTES = 64 * 1024
MAX_LABEL_CHARS = 200
CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{32}")
SIGNATURE = re.compile(r"[0-9a-fA-F]{64}")
EXPIRING = "webchat-user-until"  # what an expiring signature signs first
USER_KEY_CONTEXT = b"webchat-user:"


@dataclass(frozen=True)
class Refused(Exception):
    """A request answered with an error: `status`, a short `code` and a `message` for people."""

    status: int
    code: str
    message: str
    retry_after: int | None = None
    headers: dict = field(default_factory=dict, compare=False)

    def body(self) -> dict:
        extra = {"retry_after": self.retry_after} if self.retry_after is not None else {}
        return {"error": self.code, "message": self.message, **extra}


@dataclass(frozen=True)
class ChatInput:
    message: str
    conversation: str | None = None
    user_id: str | None = None  # a label, unless signed
    user_signature: str | None = None
    signature_expires: int | None = None  # Unix seconds after which the signature is refused


def parse_json_body(raw: bytes, max_chars: int) -> ChatInput:
    """`{"message", "user_id"?, "conversation"?, "user_signature"?, "user_signature_expires"?}` from a POST body."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, "invalid_utf8", "The request body is not valid UTF-8.") from None
    try:
        data = loads(text)  # refused before it recurses towards Python's stack limit
    except (ValueError, RecursionError):  # RecursionError: in case the guard ever misses
        raise Refused(400, "invalid_json", 'The request body must be JSON, like {"message": "Hello"}.') from None
    if not isinstance(data, dict):
        raise Refused(400, "invalid_json", 'The request body must be a JSON object, like {"message": "Hello"}.')
    return to_input(data, max_chars)


def parse_query(args: Mapping[str, str], max_chars: int) -> ChatInput:
    """`GET /chat?query=...` (the second document's contract) with `conversation` and `user_id` too."""
    return to_input({"message": args.get("query"), "conversation": args.get("conversation"),
                     "user_id": args.get("user_id"), "user_signature": args.get("user_signature"),
                     "user_signature_expires": args.get("user_signature_expires")}, max_chars, field_name="query")


def to_input(data: Mapping, max_chars: int, field_name: str = "message") -> ChatInput:
    message = data.get("message")
    if not isinstance(message, str):
        raise Refused(400, "invalid_message", f'"{field_name}" is required and must be text.')
    message = clean_text(message).strip()
    if not message:
        raise Refused(400, "empty_message", f'"{field_name}" is empty: write something to ask.')
    if len(message) > max_chars:
        raise Refused(413, "message_too_long", f"The message is {len(message)} characters long; the limit is "
                                               f"{max_chars}. Please shorten it.")
    ids = {name: _optional_text(data, name) for name in ("conversation", "user_id", "user_signature")}
    if ids["conversation"] is not None and not CONVERSATION_ID.fullmatch(ids["conversation"]):
        raise Refused(400, "invalid_conversation", "This conversation id was not issued by this server.")
    if ids["user_signature"] is not None and not SIGNATURE.fullmatch(ids["user_signature"]):
        raise Refused(403, "bad_signature", "The user id's signature is not valid.")
    if ids["user_signature"] is not None and ids["user_id"] is None:
        raise Refused(400, "invalid_user_id", '"user_signature" needs the "user_id" it signs.')
    return ChatInput(message, ids["conversation"], ids["user_id"], ids["user_signature"], _expiry(data))


def _expiry(data: Mapping) -> int | None:
    """`user_signature_expires`: Unix seconds, a JSON number or (in a query) its digits."""
    value = data.get("user_signature_expires")
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 10**12:
        raise Refused(400, "invalid_user_signature_expires", '"user_signature_expires" must be a time in Unix '
                                                             "seconds, like 1767225600.")
    return value


def _optional_text(data: Mapping, name: str) -> str | None:
    value = data.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Refused(400, f"invalid_{name}", f'"{name}" must be text.')
    if len(value) > MAX_LABEL_CHARS:
        raise Refused(400, f"invalid_{name}", f'"{name}" is longer than {MAX_LABEL_CHARS} characters.')
    return clean_text(value)


def sign_user_id(user_id: str, secret: str, expires: int | None = None) -> str:
    """What a site's backend sends as `user_signature`: HMAC-SHA256 of the user id, in hex; with
    `expires` (Unix seconds, sent as `user_signature_expires`), of EXPIRING, the time and the id,
    NUL-separated (no user id holds a NUL: clean_text replaces it), so neither form passes for the other."""
    signed = user_id if expires is None else f"{EXPIRING}\0{expires}\0{user_id}"
    return hmac.new(secret.encode(), signed.encode(), hashlib.sha256).hexdigest()


def user_key(chat: ChatInput, secret: str, now: float, expiry_required: bool = False) -> str | None:
    """The key of a signed user's conversation (None: not signed); Refused for a bad signature, an
    expired one, or (`expiry_required`) one that never expires."""
    if chat.user_signature is None:
        return None
    if not secret:
        raise Refused(400, "signing_disabled", "Signed user ids are not enabled on this server (WEBCHAT_SECRET).")
    if chat.signature_expires is None and expiry_required:
        raise Refused(403, "signature_expiry_required", 'This server takes only signatures that expire: sign the '
                                                        'user id with "user_signature_expires".')
    if not hmac.compare_digest(sign_user_id(chat.user_id or "", secret, chat.signature_expires),
                               chat.user_signature.lower()):
        raise Refused(403, "bad_signature", "The user id's signature is not valid.")
    if chat.signature_expires is not None and chat.signature_expires <= now:
        raise Refused(403, "signature_expired", "The user id's signature has expired: reload the page for a new one.")
    # Keyed, so the key column gives no user id away and a leaked table no signature (the
    # conversation's label, shown to the Page owner, is the id as the site gave it).
    return hmac.new(secret.encode(), USER_KEY_CONTEXT + (chat.user_id or "").encode(), hashlib.sha256).hexdigest()


def client_key(address: str | None) -> str:
    """Whom the per-IP limits count: the address, or an IPv6 address's /64 (one subscriber's block,
    whose 2**64 addresses a script could otherwise rotate through). A port some proxies append
    (203.0.113.7:1001, [2001:db8::1]:443) is no part of it: each port was a bucket of its own."""
    address = _without_port(address or "")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address or "unknown"
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


def _without_port(address: str) -> str:
    if address.startswith("["):
        return address[1:address.index("]")] if "]" in address else address
    if address.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has several
        return address.split(":")[0]
    return address


# Browsers send no Origin with a cross-site <img> or <script> GET, but do send Sec-Fetch-Site
# (all current ones): without it any site could spend the model budget through its visitors.
CROSS_SITE = ("cross-site", "same-site")


def origin_allowed(headers: Mapping[str, str], allowed: tuple[str, ...], own: str) -> bool:
    """A browser's Origin is one the owner listed (or the bot's own pages). No Origin: not a
    browser's cross-site call (curl, a site's backend; the limits still count it) - unless
    Sec-Fetch-Site says it is one, then the Referer's origin must be allowed."""
    origin = headers.get("Origin")
    if origin is None:
        if headers.get("Sec-Fetch-Site") not in CROSS_SITE:
            return True
        referer = re.match(r"[a-z][a-z0-9+.-]*://[^/?#]+", headers.get("Referer") or "", re.IGNORECASE)
        origin = referer.group(0) if referer else "null"
    origin = origin.rstrip("/")
    return "*" in allowed or origin in allowed or (origin == own and _by_address(own))


def _by_address(origin: str) -> bool:
    """The bot's own pages, reached by an IP address or localhost. Reached by a name, "own" is
    what the Host header says: a DNS-rebinding page (its name pointed at this server) would send
    its own name in both and pass for the bot's. A name of the bot's goes in WEBCHAT_ORIGINS."""
    host = urlparse(origin).hostname or ""
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
