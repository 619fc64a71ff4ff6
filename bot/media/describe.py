"""Attachments in words: what the model reads for the ones it cannot see, and the short label
each leaves in the mirror (later prompts read the label, never the photo again). Pure."""
from __future__ import annotations

from messenger.attachments import (AUDIO, FILE, IMAGE, LINK, LOCATION, SHARE, STICKER, STORY_MENTION, STORY_REPLY,
                                   VIDEO, Attachment, is_like)

# What each kind is called in the mirror and in notes to the model.
NAMES = {IMAGE: "photo", AUDIO: "voice note", VIDEO: "video", FILE: "file", STICKER: "sticker",
         LOCATION: "location", LINK: "link", SHARE: "shared post", STORY_MENTION: "story mention",
         STORY_REPLY: "story reply"}
# Kinds whose words are all there is: put into the prompt as text, nothing fetched.
DESCRIBED = frozenset({LOCATION, LINK, SHARE, STORY_MENTION, STORY_REPLY})


def name(kind: str) -> str:
    return NAMES.get(kind, "attachment")


def describe(attachment: Attachment) -> str:
    """A described kind in words for the model: coordinates, a link's title and address..."""
    kind = attachment.kind
    if kind == LOCATION:
        where = (f"{attachment.latitude:.5f}, {attachment.longitude:.5f}"
                 if attachment.latitude is not None else "coordinates not given")
        return f"[The user shared a location: {where}{_paren(attachment.title)}]"
    if kind == STORY_MENTION:
        return "[The user mentioned the Page in their story]"
    if kind == STORY_REPLY:
        return "[The user is replying to the Page's story]"
    what = "a link" if kind == LINK else "a post"
    return f"[The user shared {what}: {' - '.join(filter(None, (attachment.title, attachment.url))) or 'no title'}]"


def cannot_see(kind: str) -> str:
    """The note for an attachment the model does not get (a video, a file, a photo it cannot take)."""
    return f"[The user also sent a {name(kind)}, which you cannot see]"


def could_not_open(kind: str) -> str:
    return f"[The user also sent a {name(kind)}, which could not be opened]"


def label(attachment: Attachment, transcript: str | None = None) -> str:
    """How the attachment reads in the mirror, the history of later prompts and the exchange log."""
    if attachment.kind == STICKER:
        return "[like]" if is_like(attachment) else "[sticker]"
    if attachment.kind == AUDIO and transcript is not None:
        return f"[voice note] {transcript}"
    if attachment.kind in DESCRIBED:
        return describe(attachment)
    return f"[{name(attachment.kind)}]"


def _paren(text: str | None) -> str:
    return f" ({text})" if text else ""
