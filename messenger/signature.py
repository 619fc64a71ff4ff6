"""Webhook signatures: HMAC of the raw body bytes with the app secret.

Meta escapes non-ASCII as \\uXXXX and `/` as `\\/`, so a signature over
re-serialised JSON never matches: always hash the bytes exactly as received.
https://developers.facebook.com/docs/messenger-platform/webhooks#validate-payloads
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Mapping

SIGNATURE_256_HEADER = "X-Hub-Signature-256"
LEGACY_SIGNATURE_HEADER = "X-Hub-Signature"


def sign(body: bytes, secret: str, algorithm: str = "sha256") -> str:
    """The header value Meta would send for `body`, e.g. `sha256=<hex>`."""
    digest = hmac.new(secret.encode(), body, getattr(hashlib, algorithm)).hexdigest()
    return f"{algorithm}={digest}"


def is_valid_signature(body: bytes, headers: Mapping[str, str], secret: str) -> bool:
    """True when the SHA-256 header (or, only when it is absent, the legacy SHA-1 one) matches."""
    header = headers.get(SIGNATURE_256_HEADER)
    algorithm = "sha256"
    if header is None:
        header = headers.get(LEGACY_SIGNATURE_HEADER)
        algorithm = "sha1"
    if not header:
        return False
    # Hex digests are case-insensitive; compare in constant time either way.
    return hmac.compare_digest(sign(body, secret, algorithm).encode(), header.strip().lower().encode())


def is_verify_request(args: Mapping[str, str], verify_token: str) -> bool:
    """The dashboard's GET handshake: subscribe mode and the token typed there."""
    given = args.get("hub.verify_token", "")
    return args.get("hub.mode") == "subscribe" and hmac.compare_digest(given.encode(), verify_token.encode())
