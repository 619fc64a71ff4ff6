"""What a chat request holds, in words: its text, its images (content parts), what the offline
stand-in answers about them, and the light copy the timeline keeps. Pure functions, no I/O.

Content parts are OpenAI's: https://platform.openai.com/docs/guides/images-vision
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from devtools.emulator.excerpts import excerpts_at, read_excerpts
from devtools.emulator.media import image_size

THUMBNAIL_MAX = 64 * 1024  # a data URL up to this many characters rides on the timeline as a thumbnail
EXCERPT_MAX = 800  # characters of the top excerpt the offline answer repeats


@dataclass(frozen=True)
class ImagePart:
    message: int  # index in `messages`
    part: int  # index in that message's `content`
    url: str
    data: bytes | None  # the decoded bytes of a data URL; None for an http(s) URL


def text_of(content) -> str:
    """A message's words: the string itself, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def image_parts(messages: list[dict]) -> list[ImagePart]:
    found = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = str((part.get("image_url") or {}).get("url", ""))
                found.append(ImagePart(i, j, url, data_url_bytes(url)))
    return found


def data_url_bytes(url: str) -> bytes | None:
    """The bytes of a `data:<type>;base64,<…>` URL; None for anything else or bad base64."""
    head, _, encoded = url.partition(",")
    if not head.startswith("data:") or not head.endswith(";base64"):
        return None
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None


def describe_image(image: ImagePart) -> str:
    """e.g. "640×480 PNG, 12 KB", what a person would say about a picture they were handed."""
    if image.data is None:
        return "by URL, not downloaded offline"
    size = image_size(image.data)
    kilobytes = f"{max(1, round(len(image.data) / 1024))} KB"
    return f"{size[0]}\u00d7{size[1]} {size[2]}, {kilobytes}" if size else f"not an image, {kilobytes}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def offline_reply(messages: list[dict]) -> str:
    """What the offline stand-in says: proof that it got the turn, the images and the history - or,
    given the knowledge base's excerpts, the top excerpt whole, as a model answering from it would
    (and the images it got: a photo's question may find excerpts too)."""
    last = text_of(messages[-1].get("content", "")) if messages else ""
    said = last.rsplit(" : ", 1)[-1].strip()  # the politeness prefix ends with " : "
    images = image_parts(messages)
    described = f"{_plural(len(images), 'image')} ({'; '.join(map(describe_image, images))})" if images else ""
    if top := top_excerpt(messages):
        title, text = top
        seen = f"; I can see {described}" if images else ""
        return (f"[offline stand-in] From \u201c{title}\u201d: {text}\n\n(You asked \u201c{said}\u201d{seen}; "
                "set OPENAI_API_KEY for a real model.)")
    earlier = sum(1 for m in messages[:-1] if m.get("role") in ("user", "assistant"))
    seen = f"{described} and " if images else ""
    system = next((text_of(m.get("content", "")) for m in messages if m.get("role") == "system"), "")
    # The start of the system prompt: with several Pages, which Page's instructions this turn got.
    told = f" My instructions begin \u201c{system.split(':')[0].split('.')[0][:60].strip()}\u201d." if system else ""
    return (f"[offline stand-in] You said \u201c{said}\u201d. I can see {seen}{_plural(earlier, 'earlier message')} "
            f"of this conversation.{told} Set OPENAI_API_KEY to talk to a real model.")


def top_excerpt(messages: list[dict]) -> tuple[str, str] | None:
    """The title and text (up to EXCERPT_MAX characters) of excerpt [1] in the knowledge base's system
    message, if the request carries one."""
    at = excerpts_at(messages)
    found = read_excerpts(text_of(messages[at].get("content", "")))[1] if at is not None else []
    if not found:
        return None
    text = found[0].text
    if len(text) > EXCERPT_MAX:
        text = text[:EXCERPT_MAX].rsplit(" ", 1)[0] + " \u2026"
    return found[0].title, text


def shown_messages(messages) -> object:
    """The messages as the timeline keeps them: text as sent; an image part keeps its data URL
    only when small (the sandbox's thumbnail) and always says what it is."""
    if not isinstance(messages, list) or not image_parts(messages):
        return messages
    described = {(p.message, p.part): p for p in image_parts(messages)}
    shown = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            content = [_shown_part(described[(i, j)]) if (i, j) in described else part
                       for j, part in enumerate(content)]
        shown.append({**message, "content": content})
    return shown


def _shown_part(image: ImagePart) -> dict:
    url = image.url if len(image.url) <= THUMBNAIL_MAX or image.data is None else None
    return {"type": "image_url", "image_url": {"url": url}, "about": describe_image(image)}
