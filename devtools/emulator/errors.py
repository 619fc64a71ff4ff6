"""Meta's Graph API errors, in the shapes and codes the bot must tell apart.

https://developers.facebook.com/docs/graph-api/guides/error-handling (codes 190, 100, 200-299,
subcode 463); https://developers.facebook.com/docs/messenger-platform/reference/send-api/error-codes
(100 / 2018001 "No matching user found").
"""
from __future__ import annotations

import hashlib
import hmac

from werkzeug.wrappers import Response

from devtools.emulator.http import json_response

NO_MATCHING_USER = 2018001  # Send API: the recipient is not a user of the token's Page (or its Instagram account)
EXPIRED = 463  # subcode of 190: "Access token has expired"


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


def invalid_token() -> Response:
    """No token, or one that belongs to no Page here."""
    return graph_error(190, "Invalid OAuth access token - Cannot parse access token")


def expired_token() -> Response:
    """A Page token that has expired (`GraphEmulator.expire_token`)."""
    return graph_error(190, "Error validating access token: Session has expired on Thursday, 01-Jan-26 "
                            "00:00:00 PST. The current time is Friday, 02-Jan-26 00:00:00 PST.", subcode=EXPIRED)


def wrong_proof() -> Response:
    return graph_error(100, "Invalid appsecret_proof provided in the API argument")


def not_permitted() -> Response:
    """Another Page's conversations read with this Page's token. Meta documents codes 200-299 as
    "API Permission: permission is either not granted or has been removed"; the wording is ours."""
    return graph_error(200, "(#200) Permissions error: the access token does not belong to this Page", status=403)


def no_matching_user() -> Response:
    """A send to someone who never wrote to the token's Page: the answer to a send made with the
    wrong Page's token."""
    return graph_error(100, "(#100) No matching user found", subcode=NO_MATCHING_USER)


def text_too_long(limit: int) -> Response:
    return graph_error(100, f"(#100) Length of param message[text] must be less than or equal to {limit}")


def not_thread_owner() -> Response:
    """A send while another app (the Page inbox) owns the thread: the handover protocol lets only
    the thread's owner send. Code 10 (permission) and the wording are what developers report;
    Meta's error-code pages list no subcode for it, so none is made up here."""
    return graph_error(10, "(#10) Message failed to send because another app is controlling this thread now.")
