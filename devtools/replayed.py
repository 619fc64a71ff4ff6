"""Deliveries the emulator did not send (`devtools.replay`, curl), shown in the sandbox as if
Meta had sent them: their users' messages join the conversation and the timeline.

Only a correctly signed POST /webhook is looked at, and nothing is taken from the bot's
request: the body read here is handed on unchanged, and any error in showing it is logged.
"""
from __future__ import annotations

import io
import json
import logging
import time

from devtools.emulator import GraphEmulator, Timeline
from messenger.signature import LEGACY_SIGNATURE_HEADER, SIGNATURE_256_HEADER, is_valid_signature

logger = logging.getLogger("devtools.sandbox")

MAX_SHOWN_BODY = 1 << 20  # a larger POST /webhook goes to the bot without being looked at


class ReplayedDeliveries:
    """Wraps the bot's WSGI app for the sandbox."""

    def __init__(self, graph: GraphEmulator, timeline: Timeline, app_secret: str):
        self.graph = graph
        self.timeline = timeline
        self.app_secret = app_secret

    def around(self, app):
        """The bot's WSGI app, with signed deliveries that did not come from the emulator
        (`devtools.replay`, curl) put in the conversation and on the timeline, as Meta would have them."""
        def wsgi(environ, start_response):
            if environ.get("REQUEST_METHOD") != "POST" or environ.get("PATH_INFO") != "/webhook":
                return app(environ, start_response)
            try:
                length = int(environ.get("CONTENT_LENGTH") or -1)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_SHOWN_BODY:
                return app(environ, start_response)
            body = environ["wsgi.input"].read(length)
            environ["wsgi.input"] = io.BytesIO(body)
            signatures = {name: environ[key] for name, key in ((SIGNATURE_256_HEADER, "HTTP_X_HUB_SIGNATURE_256"),
                                                              (LEGACY_SIGNATURE_HEADER, "HTTP_X_HUB_SIGNATURE"))
                          if key in environ}
            try:
                psids = self._show(body) if is_valid_signature(body, signatures, self.app_secret) else []
            except Exception:  # showing it must never stop the bot from getting it
                logger.exception("could not show a replayed webhook on the page")
                psids = []
            if not psids:
                return app(environ, start_response)
            started, answered = time.monotonic(), {}

            def recording_start_response(status, response_headers, exc_info=None):
                answered["status"] = int(status.split()[0])
                return start_response(status, response_headers, exc_info)

            result = app(environ, recording_start_response)
            ms = round((time.monotonic() - started) * 1000)
            for psid in psids:
                self.timeline.add("webhook", psid, attempt=1, status=answered.get("status"), ms=ms,
                                  body=json.loads(body), replayed=True, account=self.graph.accounts.account_of(psid).id)
            return result
        return wsgi

    def _show(self, body: bytes) -> list[str]:
        """The users of a delivery the emulator did not make (none for its own: their ids are known);
        their messages, and echoes of what other apps sent, join the conversation and the timeline."""
        try:
            entries = [entry for entry in json.loads(body)["entry"]
                       if str(entry["id"]) in self.graph.accounts.accounts]
            events = [(str(entry["id"]), event) for entry in entries for event in entry.get("messaging", [])
                      if isinstance(event, dict)]
        except (ValueError, KeyError, TypeError, AttributeError):
            return []  # not a delivery: the bot says so
        known = {m["id"] for conversation in list(self.graph.conversations.values()) for m in list(conversation)}
        if any(_mid(event) in known for _, event in events):
            return []  # the emulator's own delivery, or a replay of what was already shown
        psids: list[str] = []
        for account, event in events:
            sender, recipient = (str((event.get(key) or {}).get("id")) for key in ("sender", "recipient"))
            psid = recipient if sender == account else sender
            if psid not in psids:
                psids.append(psid)
            if _mid(event):  # a read, a delivery, a reaction: only the webhook step shows it
                self._add(account, psid, sender == account, event)
        return psids

    def _add(self, account: str, psid: str, from_account: bool, event: dict) -> None:
        """A replayed user's message, or an echo of what another app sent, in the conversation."""
        message, postback, mid = event.get("message"), event.get("postback"), _mid(event)
        message = message if isinstance(message, dict) else {}
        if from_account:
            # An echo of the bot's own send is already shown; another app's (the inbox's) is a person.
            app_id = message.get("app_id")
            if message.get("is_echo") and app_id is not None and str(app_id) != self.graph.app_id:
                text = message.get("text") or "[attachment]"
                self.graph.add_message(psid, text, from_page=True, mid=mid, page_id=account)
                self.timeline.add("message", psid, mid=mid, sender="page", by="inbox", text=text,
                                  quick_replies=[], account=account)
            return
        if postback:
            text, kind = str(postback.get("title") or postback.get("payload") or ""), "postback"
        elif message.get("text"):
            text, kind = str(message["text"]), "quick_reply" if message.get("quick_reply") else "text"
        else:  # attachments only, as Graph shows them: no text
            text, kind = "", str((message.get("attachments") or [{}])[0].get("type") or "attachment")
        self.graph.add_message(psid, text, mid=mid, page_id=account)
        self.timeline.add("message", psid, mid=mid, sender="user", text=text, type=kind, image_url=None,
                          replayed=True, account=account)


def _mid(event: dict) -> str | None:
    """The message id of a `messaging` event (a message, an echo or a postback), if it has one."""
    for key in ("message", "postback"):
        if isinstance(event.get(key), dict) and event[key].get("mid"):
            return str(event[key]["mid"])
    return None
