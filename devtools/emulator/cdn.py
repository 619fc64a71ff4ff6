"""Meta's CDN for what users send: attachment URLs that serve real bytes, then expire.

Shaped like the scontent/lookaside URLs in Meta's webhooks (a signed query, an
`oe` expiry), served by the Graph emulator's own port under /cdn/. Like Meta's
CDN it needs no token: a bot that sends its Page token there leaks it, so each
fetch records whether one came along. Tests script what the network does to a
download (a delay, a slow trickle, redirects, a lying Content-Type) and expire
every URL handed out, as Meta's expire after a few days.
"""
from __future__ import annotations

import hashlib
import itertools
import mimetypes
import secrets
import threading
import time
from dataclasses import dataclass

from werkzeug.wrappers import Request, Response

from devtools.emulator.media import image_size
from devtools.emulator.timeline import Timeline

PREFIX = "/cdn/v/t59/"
CHUNK = 16 * 1024  # the trickle's step when `chunk_delay` is set
VALIDITY_S = 3 * 24 * 3600  # the `oe` Meta writes: expiry a few days ahead, as hex epoch seconds
# File name endings for the types users send (mimetypes lacks some, e.g. audio/wav, on some systems).
EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif", "image/webp": ".webp",
              "audio/mp4": ".mp4", "audio/wav": ".wav", "audio/mpeg": ".mp3", "audio/ogg": ".ogg",
              "video/mp4": ".mp4", "application/pdf": ".pdf"}


@dataclass
class Attachment:
    data: bytes
    content_type: str
    name: str
    signature: str
    psid: str | None = None  # whose message carried it: lets the sandbox file a model call under its user
    delay: float = 0.0
    redirects: int = 0
    chunk_delay: float = 0.0
    expired: bool = False


@dataclass(frozen=True)
class AttachmentFetch:
    method: str
    path: str  # without the query
    status: int
    had_token: bool  # an Authorization header or access_token: the Page token must never go here
    at: float


class AttachmentStore:
    """The attachments handed out so far, and every fetch of them."""

    def __init__(self, base_url: str, timeline: Timeline | None = None):
        self.base_url = base_url
        self.timeline = timeline or Timeline(enabled=False)  # each download, for the sandbox's panel
        self.fetches: list[AttachmentFetch] = []
        self._attachments: dict[str, Attachment] = {}
        self._by_digest: dict[str, str] = {}  # sha256 of the bytes -> id
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, data: bytes, content_type: str, *, name: str = "file", psid: str | None = None,
            delay: float = 0.0, redirects: int = 0, chunk_delay: float = 0.0) -> str:
        """Serve `data` as `content_type` (a test may lie with it); return its signed URL."""
        with self._lock:
            ident = f"{next(self._ids)}{secrets.randbelow(10**9):09d}"
            if "." not in name:
                name = f"{name}-{ident}{_extension(content_type)}"
            attachment = Attachment(data, content_type, name, secrets.token_hex(16), psid, delay, redirects,
                                    chunk_delay)
            self._attachments[ident] = attachment
            self._by_digest[hashlib.sha256(data).hexdigest()] = ident
        return self._url(ident, attachment)

    def expire(self) -> None:
        """Every URL handed out so far answers 403 from now on; new ones still work."""
        with self._lock:
            for attachment in self._attachments.values():
                attachment.expired = True

    def psid_of(self, data: bytes) -> str | None:
        """Whose attachment these exact bytes are (a model request carries them as a data URL)."""
        with self._lock:
            ident = self._by_digest.get(hashlib.sha256(data).hexdigest())
            return self._attachments[ident].psid if ident else None

    def sent_by(self, url: str, psid: str) -> dict | None:
        """Note that `psid` sent the attachment at `url`; return the Graph API's view of it (the
        message's `attachments` field), or None for a URL not served here."""
        if not url.startswith(self.base_url + PREFIX):
            return None
        ident = url.removeprefix(self.base_url + PREFIX).split("/", 1)[0]
        with self._lock:
            attachment = self._attachments.get(ident)
            if attachment is None:
                return None
            attachment.psid = attachment.psid or psid
        node = {"id": ident, "mime_type": attachment.content_type, "name": attachment.name,
                "size": len(attachment.data)}
        size = image_size(attachment.data)
        if size and attachment.content_type.startswith("image/"):
            width, height, _ = size
            node["image_data"] = {"width": width, "height": height, "max_width": width, "max_height": height,
                                  "url": url, "preview_url": url, "image_type": 1, "render_as_sticker": False}
        else:
            node["file_url"] = url
        return node

    def _url(self, ident: str, attachment: Attachment, hop: int = 0) -> str:
        query = f"_nc_cat=1&_nc_sig={attachment.signature}&oe={int(time.time()) + VALIDITY_S:X}"
        return f"{self.base_url}{PREFIX}{ident}/{attachment.name}?{query}" + (f"&_nc_hop={hop}" if hop else "")

    # -- serving ------------------------------------------------------------------------------------
    def serve(self, request: Request) -> Response:
        started = time.monotonic()
        attachment, response = self._answer(request)
        had_token = "Authorization" in request.headers or "access_token" in request.args
        with self._lock:
            self.fetches.append(AttachmentFetch(request.method, request.path, response.status_code, had_token,
                                                time.monotonic()))
        self.timeline.add("download", attachment.psid if attachment else None, method=request.method,
                          path=request.path, status=response.status_code, had_token=had_token,
                          size=len(attachment.data) if attachment and response.status_code == 200 else None,
                          content_type=attachment.content_type if attachment else None,
                          ms=round((time.monotonic() - started) * 1000))  # to the headers: a trickle goes on
        return response

    def _answer(self, request: Request) -> tuple[Attachment | None, Response]:
        ident = request.path.removeprefix(PREFIX).split("/", 1)[0]
        with self._lock:
            attachment = self._attachments.get(ident)
        if request.method not in ("GET", "HEAD"):
            return attachment, Response("Method not allowed", 405, mimetype="text/plain")
        if attachment is None:
            return None, Response("Not Found", 404, mimetype="text/plain")
        if request.args.get("_nc_sig") != attachment.signature:
            return attachment, Response("Bad URL hash", 403, mimetype="text/plain")
        if attachment.expired:
            return attachment, Response("URL signature expired", 403, mimetype="text/plain")
        if attachment.delay:
            time.sleep(attachment.delay)
        hop = request.args.get("_nc_hop", 0, type=int)
        if hop < attachment.redirects:  # as lookaside.fbsbx.com sends a download on to scontent
            return attachment, Response("", 302, headers={"Location": self._url(ident, attachment, hop + 1)})
        return attachment, self._bytes(request, attachment)

    @staticmethod
    def _bytes(request: Request, attachment: Attachment) -> Response:
        headers = {"Content-Length": str(len(attachment.data)), "Cache-Control": "max-age=1209600"}
        if request.method == "HEAD":
            body: object = []
        elif attachment.chunk_delay:
            body = _trickle(attachment.data, attachment.chunk_delay)
        else:
            body = [attachment.data]
        return Response(body, 200, content_type=attachment.content_type, headers=headers, direct_passthrough=True)


def _extension(content_type: str) -> str:
    bare = content_type.split(";")[0].strip().lower()
    return EXTENSIONS.get(bare) or mimetypes.guess_extension(bare) or ""


def _trickle(data: bytes, pause: float):
    """The body in CHUNK pieces with a pause before each: a slow network, for a total-time limit."""
    for start in range(0, len(data), CHUNK):
        time.sleep(pause)
        yield data[start:start + CHUNK]
