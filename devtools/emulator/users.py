"""The people on the other side of the Graph emulator: users who write to a Page or to its
Instagram account, and people who answer from the Page inbox.

Each user belongs to one account (`page_id=`: a Page id or an Instagram account id; the first
Page by default): what they do is stored as history and delivered to the bot in that account's
webhook shape (`"object": "page"` or `"object": "instagram"`, entry.id = the account's id).
"""
from __future__ import annotations

import time

from devtools.emulator import webhooks
from devtools.emulator.accounts import Account
from devtools.emulator.cdn import AttachmentFetch
from devtools.emulator.media import png_bytes, wav_bytes
from devtools.emulator.model_inputs import text_of

# The app id Meta puts on echoes of messages a person typed in the Page inbox. On Instagram too:
# an assumption (Meta's Instagram examples show no app_id), which is how the bot tells a person apart.
PAGE_INBOX_APP_ID = "263902037430900"


class Users:
    """Mixed into GraphEmulator: everything a user or a person in the inbox does."""

    def now_ms(self) -> int:
        """Now by Meta's clock (`self.clock`): webhook times, like created_time, follow it."""
        return round(self.clock() * 1000)

    def add_user(self, psid: str, name: str, *, page_id: str | None = None) -> None:
        """A user (PSID, or IGSID for an Instagram account) of the account `page_id`."""
        self.accounts.assign(psid, page_id)
        with self._lock:
            self.users[psid] = name
            self.conversations.setdefault(psid, [])

    def add_message(self, psid: str, text: str, from_page: bool = False, mid: str | None = None,
                    extra: dict | None = None, *, page_id: str | None = None) -> str:
        """Put a message in the conversation (as history); nothing is delivered.

        `extra` holds Graph fields beyond the text (`attachments`, `sticker`), returned when asked for."""
        mid = mid or f"m_{next(self._ids)}"
        account = self.accounts.assign(psid, page_id)
        with self._lock:
            name = self.users.setdefault(psid, f"User {psid[-4:]}")
            sender = account.sender() if from_page else account.sender(psid, name)
            self.conversations.setdefault(psid, []).append({
                "id": mid, "message": text, "from": sender,
                "created_time": time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(self.clock())),
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
                    postback: str | None = None, image_url: str | None = None, page_id: str | None = None) -> str:
        """A user types, taps a quick reply or a button, or sends an image: stored and delivered."""
        mid = self.add_message(psid, text, page_id=page_id)
        account = self.accounts.account_of(psid)
        event = webhooks.user_event(account.id, psid, mid, text=text, quick_reply=quick_reply,
                                    postback=postback, image_url=image_url, at_ms=self.now_ms())
        kind = "postback" if postback else "image" if image_url else "quick_reply" if quick_reply else "text"
        self.timeline.add("message", psid, mid=mid, sender="user", text=text, type=kind, image_url=image_url,
                          account=account.id)
        self.deliver(psid, [event])
        return mid

    def user_sends(self, psid: str, attachments: list[dict], text: str = "", reply_to: dict | None = None, *,
                   page_id: str | None = None) -> str:
        """A user sends attachments (built with the `webhooks.*_attachment` helpers), with a caption or not.

        The history holds the caption ("" without one, as Meta gives it) and, for files served
        here, the Graph `attachments` field."""
        urls = dict.fromkeys(str((a.get("payload") or {}).get("url") or "") for a in attachments)
        nodes = [node for node in (self.cdn.sent_by(url, psid) for url in urls) if node]
        sticker = next((a["payload"]["url"] for a in attachments if "sticker_id" in (a.get("payload") or {})), None)
        # Graph shows a sticker as the message's `sticker` (its image URL), other files as `attachments`.
        extra = {"sticker": sticker} if sticker else {"attachments": {"data": nodes}} if nodes else {}
        mid = self.add_message(psid, text, extra=extra, page_id=page_id)
        account = self.accounts.account_of(psid)
        event = webhooks.user_event(account.id, psid, mid, text=text, attachments=attachments, reply_to=reply_to,
                                    at_ms=self.now_ms())
        kind = "sticker" if sticker else attachments[0]["type"] if attachments else "text"
        image = next((a["payload"]["url"] for a in attachments if a["type"] == "image" and not sticker), None)
        self.timeline.add("message", psid, mid=mid, sender="user", text=text, type=kind, image_url=image,
                          attachments=attachments, reply_to=reply_to, account=account.id)
        self.deliver(psid, [event])
        return mid

    def user_sends_photo(self, psid: str, data: bytes | None = None, text: str = "",
                         content_type: str = "image/png", *, page_id: str | None = None) -> str:
        """A photo from the phone: real bytes on the CDN, an image attachment in the webhook."""
        url = self.add_attachment(data if data is not None else png_bytes(64, 48), content_type, name="image",
                                  psid=psid)
        return self.user_sends(psid, [webhooks.image_attachment(url)], text, page_id=page_id)

    def user_sends_voice(self, psid: str, data: bytes | None = None, content_type: str = "audio/wav", *,
                         page_id: str | None = None) -> str:
        """A voice note (Meta's are audio/mp4 "audioclip-….mp4"; a WAV by default, which any decoder plays)."""
        url = self.add_attachment(data if data is not None else wav_bytes(2.0), content_type, name="audioclip",
                                  psid=psid)
        return self.user_sends(psid, [webhooks.audio_attachment(url)], page_id=page_id)

    def user_sends_sticker(self, psid: str, sticker_id: int = webhooks.LIKE_STICKER_ID, *,
                           page_id: str | None = None) -> str:
        """A sticker (the "like" by default), in the shape Meta sends during its move to type "sticker"."""
        url = self.add_attachment(png_bytes(32, 32), "image/png", name="sticker", psid=psid)
        return self.user_sends(psid, webhooks.sticker_attachments(url, sticker_id), page_id=page_id)

    def user_edits(self, psid: str, mid: str, text: str) -> None:
        """A user edits a message they sent: the history shows the new text, the bot gets message_edit."""
        with self._lock:
            message = next(m for m in self.conversations.get(psid, []) if m["id"] == mid)
            message["message"], edits = text, message.get("_edits", 0) + 1
            message["_edits"] = edits
        account = self.accounts.account_of(psid)
        self.timeline.add("edit", psid, mid=mid, text=text, account=account.id)
        self.deliver(psid, [webhooks.message_edit_event(account.id, psid, mid, text, edits, at_ms=self.now_ms())])

    def user_unsends(self, psid: str, mid: str) -> None:
        """A user unsends a message: gone from the history; an Instagram account's webhook is told
        (`is_deleted`), Messenger sends no webhook for it."""
        with self._lock:
            self.conversations[psid] = [m for m in self.conversations.get(psid, []) if m["id"] != mid]
        account = self.accounts.account_of(psid)
        self.timeline.add("unsend", psid, mid=mid, account=account.id)
        if account.webhook_object == "instagram":
            self.deliver(psid, [webhooks.message_deleted_event(account.id, psid, mid, at_ms=self.now_ms())])

    def deliver(self, psid: str, events: list[dict], key: str | None = None) -> None:
        """Deliver `events` (e.g. `webhooks.reaction_event`, `read_event`) of `psid`'s account to the bot,
        with that account's id and `object`; nothing without a webhook sender. Under `standby` while
        another app (the Page inbox) owns the thread, as Meta does; `key` says otherwise."""
        if self.webhooks:
            account = self.accounts.account_of(psid)
            key = key or ("messaging" if self.thread_owner(psid) == self.app_id else "standby")
            self.webhooks.deliver(account.id, events, psid, object=account.webhook_object, at_ms=self.now_ms(),
                                  key=key)

    def inbox_reply(self, psid: str, text: str, *, page_id: str | None = None) -> str:
        """A person answers from the Page inbox: Meta echoes it with the inbox's app id."""
        return self._page_message(self.accounts.assign(psid, page_id), psid, text, PAGE_INBOX_APP_ID, by="inbox")

    def _page_message(self, account: Account, psid: str, text: str, app_id: str | None, by: str,
                      quick_replies=(), metadata=None) -> str:
        """A message from the account to `psid`: in the history, on the timeline, echoed to the bot."""
        mid = self.add_message(psid, text, from_page=True, page_id=account.id)
        self.timeline.add("message", psid, mid=mid, sender="page", by=by, text=text,
                          quick_replies=[q.get("title") for q in quick_replies], account=account.id)
        if self.webhooks and self.webhooks.echoes:
            self.deliver(psid, [webhooks.echo_event(account.id, psid, mid, text, app_id, metadata, at_ms=self.now_ms())])
        return mid

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
