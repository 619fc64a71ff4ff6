"""Webhook event bodies as Meta writes them, Messenger's and Instagram's (the sender is in sender.py).

Messenger: https://developers.facebook.com/docs/messenger-platform/reference/webhook-events
Instagram: https://developers.facebook.com/docs/messenger-platform/instagram/features/webhook
(the same `messaging` events, with the Instagram account's id where Messenger has the Page's).
"""
from __future__ import annotations

import json
import time
from typing import Iterable
from urllib.parse import quote


def now_ms() -> int:
    return round(time.time() * 1000)


def _at(at_ms: int | None) -> int:
    """An event's time: Meta's clock's (the emulator passes its own), or now."""
    return at_ms if at_ms is not None else now_ms()


def user_event(page_id: str, psid: str, mid: str, *, text: str = "", quick_reply: str | None = None,
               postback: str | None = None, image_url: str | None = None, attachments: list[dict] | None = None,
               reply_to: dict | None = None, at_ms: int | None = None) -> dict:
    """One `messaging` event for what a user did, in Meta's shape.

    https://developers.facebook.com/docs/messenger-platform/reference/webhook-events/messages"""
    event = {"sender": {"id": psid}, "recipient": {"id": page_id}, "timestamp": _at(at_ms)}
    if postback is not None:
        event["postback"] = {"title": text, "payload": postback, "mid": mid}
        return event
    message: dict = {"mid": mid}
    if text:
        message["text"] = text
    if image_url:
        attachments = [image_attachment(image_url), *(attachments or [])]
    if attachments:
        message["attachments"] = attachments
    if not text and not attachments:
        message["text"] = text
    if quick_reply is not None:
        message["quick_reply"] = {"payload": quick_reply}
    if reply_to is not None:
        message["reply_to"] = reply_to
    event["message"] = message
    return event


# -- what an attachment looks like in a webhook, one builder per kind ------------------------------
LIKE_STICKER_ID = 369239263222822  # Meta's example id: the "like" (thumbs-up) sticker


def _url_attachment(kind: str, url: str) -> dict:
    return {"type": kind, "payload": {"url": url}}


def image_attachment(url: str) -> dict:
    return _url_attachment("image", url)


def audio_attachment(url: str) -> dict:
    """A voice note is an audio attachment (an .mp4 clip on Meta's CDN)."""
    return _url_attachment("audio", url)


def video_attachment(url: str) -> dict:
    return _url_attachment("video", url)


def file_attachment(url: str) -> dict:
    return _url_attachment("file", url)


def sticker_attachment(url: str, sticker_id: int = LIKE_STICKER_ID, kind: str = "image") -> dict:
    """A sticker: type image with the sticker_id beside the url. Meta is moving stickers to type
    "sticker"; until 30 August 2026 a sticker message carries both (see `sticker_attachments`)."""
    return {"type": kind, "payload": {"url": url, "sticker_id": sticker_id}}


def sticker_attachments(url: str, sticker_id: int = LIKE_STICKER_ID) -> list[dict]:
    """A sticker message as Meta sends it during the transition: the image and the sticker attachment."""
    return [sticker_attachment(url, sticker_id), sticker_attachment(url, sticker_id, kind="sticker")]


def location_attachment(lat: float, long: float, title: str = "Pinned Location") -> dict:
    """A shared location, in the shape Meta documented for it (coordinates in the payload)."""
    map_url = f"https://www.bing.com/maps/default.aspx?cp={lat}~{long}"
    return {"type": "location", "title": title, "url": "https://l.facebook.com/l.php?u=" + quote(map_url, safe=""),
            "payload": {"coordinates": {"lat": lat, "long": long}}}


def fallback_attachment(title: str, url: str) -> dict:
    """A shared link (Webhooks v6.0+): its page title and URL; the message text usually holds the link too."""
    return {"type": "fallback", "payload": {"url": url, "title": title}}


def share_attachment(url: str, title: str | None = None, post_id: int | None = None, kind: str = "post") -> dict:
    """A shared Facebook post ("post"; "ig_post" for Instagram): its URL, title and id when known."""
    payload: dict = {"url": url}
    if title is not None:
        payload["title"] = title
    if post_id is not None:
        payload["id"] = post_id
    return {"type": kind, "payload": payload}


def story_reply(url: str, story_id: str) -> dict:
    """`message.reply_to` of a reply to the Page's story: the story's CDN URL and id."""
    return {"story": {"url": url, "id": story_id}}


def story_mention(url: str) -> dict:
    """Instagram: the user mentioned the account in their story (an attachment of type story_mention).
    https://developers.facebook.com/docs/messenger-platform/instagram/features/story-mention"""
    return _url_attachment("story_mention", url)


def echo_event(account_id: str, user_id: str, mid: str, text: str, app_id: str | None = None,
               metadata: str | None = None, *, at_ms: int | None = None) -> dict:
    """What Meta sends for a message the Page (or its Instagram account) sent: message_echoes on
    Messenger, the `messages` field on Instagram. Messenger's carry the sending app's id; Meta's
    Instagram examples show `is_echo` without `app_id` or `metadata`, so Instagram echoes of the
    bot's sends carry neither (`app_id=None`)."""
    message: dict = {"mid": mid, "is_echo": True}
    if app_id is not None:
        message["app_id"] = int(app_id)
    message["text"] = text
    if metadata:
        message["metadata"] = metadata
    return {"sender": {"id": account_id}, "recipient": {"id": user_id}, "timestamp": _at(at_ms), "message": message}


def _user_side(account_id: str, user_id: str, at_ms: int | None = None, **payload) -> dict:
    return {"sender": {"id": user_id}, "recipient": {"id": account_id}, "timestamp": _at(at_ms), **payload}


def reaction_event(account_id: str, user_id: str, mid: str, reaction: str = "love", emoji: str = "\u2764\ufe0f",
                   action: str = "react") -> dict:
    """A user reacts to a message (`mid`), or takes the reaction back (`action="unreact"`, no emoji)."""
    body = {"mid": mid, "action": action}
    if action == "react":
        body.update(reaction=reaction, emoji=emoji)
    return _user_side(account_id, user_id, reaction=body)


def read_event(account_id: str, user_id: str, *, mid: str | None = None, watermark: int | None = None) -> dict:
    """A user saw the account's messages: Instagram's messaging_seen names the last message read
    (`mid`); Messenger's message_reads gives a `watermark` time."""
    read = {"mid": mid} if mid is not None else {"watermark": watermark if watermark is not None else now_ms()}
    return _user_side(account_id, user_id, read=read)


def message_edit_event(account_id: str, user_id: str, mid: str, text: str, num_edit: int = 1, *,
                       at_ms: int | None = None) -> dict:
    """A user edited a message they sent (message_edits): its mid, the new text, how many edits so far."""
    return _user_side(account_id, user_id, at_ms, message_edit={"mid": mid, "text": text, "num_edit": num_edit})


def message_deleted_event(account_id: str, user_id: str, mid: str, *, at_ms: int | None = None) -> dict:
    """A user unsent a message they sent (Instagram's `messages` field: its mid and `is_deleted`)."""
    return _user_side(account_id, user_id, at_ms, message={"mid": mid, "is_deleted": True})


def delivery_body(account_id: str, events: Iterable[dict], object: str = "page", key: str = "messaging", *,
                  at_ms: int | None = None) -> bytes:
    """The POST body byte for byte as Meta writes it: ASCII only, `/` escaped. `object` is "page"
    for a Page's Messenger, "instagram" (with the Instagram account's id) for its Instagram.
    `key="standby"`: as an app that does not own the thread (handover) gets the events."""
    data = {"object": object, "entry": [{"id": account_id, "time": _at(at_ms), key: list(events)}]}
    return json.dumps(data, ensure_ascii=True, separators=(",", ":")).replace("/", "\\/").encode("ascii")


def _handover_event(kind: str, account_id: str, user_id: str, previous_owner: str | None, new_owner: str,
                    metadata: str | None, at_ms: int | None) -> dict:
    body: dict = {"previous_owner_app_id": previous_owner, "new_owner_app_id": new_owner}
    if metadata is not None:
        body["metadata"] = metadata
    return _user_side(account_id, user_id, at_ms, **{kind: body})


def pass_thread_control_event(account_id: str, user_id: str, previous_owner: str | None, new_owner: str,
                              metadata: str | None = None, *, at_ms: int | None = None) -> dict:
    """messaging_handovers: the thread was passed to the receiving app (`new_owner`), e.g. the Page inbox
    gave it back. `previous_owner` None: the thread was idle.
    https://developers.facebook.com/docs/messenger-platform/reference/webhook-events/messaging_handovers"""
    return _handover_event("pass_thread_control", account_id, user_id, previous_owner, new_owner, metadata, at_ms)


def take_thread_control_event(account_id: str, user_id: str, previous_owner: str | None, new_owner: str,
                              metadata: str | None = None, *, at_ms: int | None = None) -> dict:
    """messaging_handovers: the thread was taken from the receiving app (`previous_owner`) by `new_owner`."""
    return _handover_event("take_thread_control", account_id, user_id, previous_owner, new_owner, metadata, at_ms)


def response_feedback_event(account_id: str, user_id: str, mid: str, feedback: str = "Good response") -> dict:
    """A user rated one of the app's messages (thumbs up / down): `{"feedback", "mid"}` (MESSENGER.md,
    "Newer webhooks"; the feedback strings are ours)."""
    return _user_side(account_id, user_id, response_feedback={"feedback": feedback, "mid": mid})

