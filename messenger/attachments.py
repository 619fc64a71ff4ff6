"""What a user attached to a message, parsed once at the edge into small records.

https://developers.facebook.com/docs/messenger-platform/reference/webhook-events/messages
Meta sends stickers as images with a `sticker_id`, shared links as `fallback`, a
location as `location` with coordinates; a reply to the Page's story comes as
`message.reply_to.story`. Everything here is pure: the bytes behind a URL are
fetched later, by the reply process (bot/media/).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

from messenger.text import clean_text

IMAGE, AUDIO, VIDEO, FILE = "image", "audio", "video", "file"
STICKER, LOCATION, LINK, SHARE = "sticker", "location", "link", "share"
STORY_MENTION, STORY_REPLY, OTHER = "story_mention", "story_reply", "other"

# Meta's attachment `type` -> ours (stickers are told apart by their sticker_id).
KINDS = {"image": IMAGE, "audio": AUDIO, "video": VIDEO, "file": FILE, "location": LOCATION,
         "fallback": LINK, "share": SHARE, "post": SHARE, "ig_reel": SHARE, "reel": SHARE, "ig_post": SHARE,
         "template": SHARE, "story_mention": STORY_MENTION, "sticker": STICKER}
# The Messenger "like" thumbs-up, in its three sizes: a sticker like any other, named for the README.
LIKE_STICKER_IDS = frozenset({"369239263222822", "369239343222814", "369239383222810"})

MAX_URL_CHARS = 4096  # Meta's CDN links run to ~600 characters
MAX_TITLE_CHARS = 500


class Attachment(NamedTuple):
    """One attachment. A NamedTuple: it goes into the queue's JSON as a plain list, at no cost.

    `url` is Meta's signed, expiring CDN link: it is fetched, stored with the message, never logged.
    """

    kind: str
    url: str | None = None
    title: str | None = None  # a link's or a share's title or caption, a location's name
    sticker_id: str | None = None
    latitude: float | None = None
    longitude: float | None = None


def parse_attachments(message: dict) -> tuple[Attachment, ...]:
    """The attachments of a `message` object (and its story reply), skipping what is not an object."""
    items = message.get("attachments")
    found = [to_attachment(item) for item in items if isinstance(item, dict)] if isinstance(items, list) else []
    story = (message.get("reply_to") or {}).get("story") if isinstance(message.get("reply_to"), dict) else None
    if isinstance(story, dict):
        found.append(Attachment(STORY_REPLY, url=_url(story.get("url"))))
    return tuple(found)


def to_attachment(item: dict) -> Attachment:
    """One entry of `message.attachments`; anything unknown is OTHER, never an error."""
    payload = item.get("payload") if isinstance(item.get("payload"), dict) else {}
    kind = KINDS.get(item.get("type"), OTHER) if isinstance(item.get("type"), str) else OTHER
    sticker = payload.get("sticker_id")
    # A sticker is an image with a sticker_id; Meta is moving them to a type of their own.
    if kind in (IMAGE, STICKER) and isinstance(sticker, (str, int)) and not isinstance(sticker, bool):
        return Attachment(STICKER, sticker_id=clean_text(str(sticker))[:32])
    if kind == STICKER:
        return Attachment(STICKER)
    if kind == LOCATION:
        latitude, longitude = _coordinates(payload.get("coordinates"))
        return Attachment(LOCATION, title=_title(item.get("title") or payload.get("title")),
                          latitude=latitude, longitude=longitude)
    # Shared links carry title and url at the top level; shares and reels inside the payload.
    title = _title(payload.get("title")) or _title(item.get("title"))
    return Attachment(kind, url=_url(payload.get("url")) or _url(item.get("url")), title=title)


def is_like(attachment: Attachment) -> bool:
    return attachment.kind == STICKER and attachment.sticker_id in LIKE_STICKER_IDS


def _url(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > MAX_URL_CHARS:
        return None
    value = value.strip()
    return value if value.startswith(("https://", "http://")) else None


def _title(value: Any) -> str | None:
    return clean_text(value).strip()[:MAX_TITLE_CHARS] or None if isinstance(value, str) else None


def _coordinates(value: Any) -> tuple[float | None, float | None]:
    if not isinstance(value, dict):
        return None, None
    latitude, longitude = value.get("lat"), value.get("long")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
           for v in (latitude, longitude)) and abs(latitude) <= 90 and abs(longitude) <= 180:
        return float(latitude), float(longitude)
    return None, None
