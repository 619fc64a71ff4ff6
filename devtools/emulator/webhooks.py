"""Meta's webhook deliveries: event bodies as Meta writes them, signed, retried on failure."""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable
from urllib.parse import quote

import requests

from devtools.emulator.timeline import Timeline
from messenger.signature import LEGACY_SIGNATURE_HEADER, SIGNATURE_256_HEADER, sign

logger = logging.getLogger(__name__)

# Seconds to wait before each attempt. Meta retries at once, then less and less
# often, and unsubscribes the app after an hour of failures; the sandbox gives
# up after about two minutes.
RETRY_DELAYS = (0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
ACK_TIMEOUT = 5.0  # current docs: answer 200 "within 5 or less seconds"


def now_ms() -> int:
    return round(time.time() * 1000)


def user_event(page_id: str, psid: str, mid: str, *, text: str = "", quick_reply: str | None = None,
               postback: str | None = None, image_url: str | None = None, attachments: list[dict] | None = None,
               reply_to: dict | None = None) -> dict:
    """One `messaging` event for what a user did, in Meta's shape.

    https://developers.facebook.com/docs/messenger-platform/reference/webhook-events/messages"""
    event = {"sender": {"id": psid}, "recipient": {"id": page_id}, "timestamp": now_ms()}
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


def echo_event(page_id: str, psid: str, mid: str, text: str, app_id: str, metadata: str | None = None) -> dict:
    """What Meta sends (message_echoes) for a message the Page sent."""
    message = {"mid": mid, "is_echo": True, "app_id": int(app_id), "text": text}
    if metadata:
        message["metadata"] = metadata
    return {"sender": {"id": page_id}, "recipient": {"id": psid}, "timestamp": now_ms(), "message": message}


def delivery_body(page_id: str, events: Iterable[dict]) -> bytes:
    """The POST body byte for byte as Meta writes it: ASCII only, `/` escaped."""
    data = {"object": "page", "entry": [{"id": page_id, "time": now_ms(), "messaging": list(events)}]}
    return json.dumps(data, ensure_ascii=True, separators=(",", ":")).replace("/", "\\/").encode("ascii")


class WebhookSender:
    """Delivers signed bodies to the bot's callback URL in the background, retrying like Meta."""

    def __init__(self, url: str, app_secret: str, timeline: Timeline, *, echoes: bool = True,
                 retry_delays: tuple[float, ...] = RETRY_DELAYS, timeout: float = ACK_TIMEOUT):
        self.url = url
        self.echoes = echoes  # subscribed to message_echoes
        self._secret = app_secret
        self._timeline = timeline
        self._delays = retry_delays
        self._timeout = timeout
        self._session = requests.Session()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook")

    def verify(self, verify_token: str, challenge: str = "1158201444") -> bool:
        """The dashboard's "Verify and save": GET with hub.* and expect the challenge back."""
        params = {"hub.mode": "subscribe", "hub.verify_token": verify_token, "hub.challenge": challenge}
        try:
            response = self._session.get(self.url, params=params, timeout=self._timeout)
            ok = response.status_code == 200 and response.text == challenge
            status = response.status_code
        except requests.RequestException as exc:
            ok, status = False, type(exc).__name__
        self._timeline.add("verify", None, ok=ok, status=status)
        return ok

    def deliver(self, page_id: str, events: list[dict], psid: str | None = None):
        body = delivery_body(page_id, events)
        return self._pool.submit(self._deliver, body, psid)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _deliver(self, body: bytes, psid: str | None) -> bool:
        headers = {"Content-Type": "application/json",
                   SIGNATURE_256_HEADER: sign(body, self._secret),
                   LEGACY_SIGNATURE_HEADER: sign(body, self._secret, "sha1")}
        shown = json.loads(body)
        for attempt, delay in enumerate(self._delays, start=1):
            time.sleep(delay)
            started = time.monotonic()
            try:
                response = self._session.post(self.url, data=body, headers=headers, timeout=self._timeout)
                status: int | str = response.status_code
            except requests.RequestException as exc:
                status = "timeout" if isinstance(exc, requests.Timeout) else "unreachable"
            ms = round((time.monotonic() - started) * 1000)
            self._timeline.add("webhook", psid, attempt=attempt, status=status, ms=ms, body=shown)
            if status == 200:
                return True
        self._timeline.add("webhook_failed", psid, attempts=len(self._delays))
        logger.warning("webhook delivery failed %d times; Meta would disable the webhook", len(self._delays))
        return False
