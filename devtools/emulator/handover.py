"""Who answers a thread: Meta's handover between the bot's app and the Page inbox.

`POST me/pass_thread_control` {"recipient": {"id": PSID}, "target_app_id": …, "metadata": …} gives
the thread to another app (the Page inbox is 263902037430900); `POST me/take_thread_control`
{"recipient": {"id": PSID}, "metadata": …} takes it back; both answer {"success": true}. The inbox
gives it back with `inbox_passes_back` and takes it with `inbox_takes`, delivering the
`pass_thread_control` / `take_thread_control` webhook events Meta sends for them.

Sources: https://developers.facebook.com/docs/messenger-platform/handover-protocol (replaced by
Conversation Routing, which keeps these calls and events) and its messaging_handovers webhook
reference: `pass_thread_control: {previous_owner_app_id, new_owner_app_id, metadata}`, sent when
control is passed *to* the receiving app; `take_thread_control: {previous_owner_app_id,
new_owner_app_id, metadata}`, sent when it is taken *from* it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from werkzeug.wrappers import Response

from devtools.emulator import webhooks
from devtools.emulator.accounts import Accounts, Page
from devtools.emulator.errors import graph_error
from devtools.emulator.http import json_response
from devtools.emulator.users import PAGE_INBOX_APP_ID


@dataclass
class Handover:
    """One change of a thread's owner, by the bot's app (a Graph call) or by the inbox."""
    kind: str  # pass_thread_control | take_thread_control
    psid: str
    by_app: str
    new_owner: str
    metadata: str | None
    at: float = field(default_factory=time.monotonic)


class Handovers:
    """Mixed into GraphEmulator: `thread_owner(psid)`, `handovers` (every change, in order)."""

    accounts: Accounts
    app_id: str

    @property
    def handovers(self) -> list[Handover]:
        return self.__dict__.setdefault("_handovers", [])

    def _owners(self) -> dict[str, str]:
        return self.__dict__.setdefault("_thread_owners", {})

    def thread_owner(self, psid: str) -> str:
        """The app that owns the thread: the bot's app unless it was passed on."""
        return self._owners().get(psid, self.app_id)

    def handover_route(self, page: Page, path: str, body: Any) -> Response | None:
        """`me/pass_thread_control` and `me/take_thread_control` (POST); None: not one of them."""
        kind = next((k for k in ("pass_thread_control", "take_thread_control")
                     if path in (f"me/{k}", f"{page.id}/{k}")), None)
        if kind is None:
            return None
        recipient = body.get("recipient") if isinstance(body, dict) else None
        psid = str(recipient.get("id") or "") if isinstance(recipient, dict) else ""
        if not psid:
            return graph_error(100, "(#100) param recipient must be non-empty.")
        if self.accounts.account_of(psid).page_id != page.id:
            return graph_error(100, "(#100) No matching user found", subcode=2018001)
        if scripted := self._scripted("handover"):
            return scripted
        metadata = body.get("metadata")
        if kind == "pass_thread_control":
            target = str(body.get("target_app_id") or "")
            if not target.isdigit():
                return graph_error(100, "(#100) param target_app_id must be an app id")
        else:
            target = self.app_id
        self._owners()[psid] = target
        self.handovers.append(Handover(kind, psid, self.app_id, target, metadata))
        return json_response({"success": True})

    def inbox_passes_back(self, psid: str, metadata: str | None = None) -> None:
        """A person in the Page inbox marks the conversation done: the thread is the bot's again and the
        bot gets `pass_thread_control` (previous owner: the inbox)."""
        self._inbox_moves(psid, "pass_thread_control", self.app_id, metadata)

    def inbox_takes(self, psid: str, metadata: str | None = None) -> None:
        """The Page inbox takes the thread: the bot gets `take_thread_control` (new owner: the inbox)."""
        self._inbox_moves(psid, "take_thread_control", PAGE_INBOX_APP_ID, metadata)

    def _inbox_moves(self, psid: str, kind: str, new_owner: str, metadata: str | None) -> None:
        previous = self.thread_owner(psid)
        self._owners()[psid] = new_owner
        self.handovers.append(Handover(kind, psid, PAGE_INBOX_APP_ID, new_owner, metadata))
        account = self.accounts.account_of(psid)
        build = webhooks.pass_thread_control_event if kind == "pass_thread_control" else webhooks.take_thread_control_event
        # Handover events come under `messaging`, whoever owns the thread now.
        self.deliver(psid, [build(account.id, psid, previous, new_owner, metadata, at_ms=self.now_ms())], "messaging")
