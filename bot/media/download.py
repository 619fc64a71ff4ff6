"""Fetching an attachment's bytes from Meta's CDN, bounded in size, time, type and redirects.

The link is signed and expires (Meta's CDN answers 403 then): it is never logged, and no
token goes with it - a session of its own, apart from the Graph client's.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import requests
import requests.adapters
import urllib3

# Why a fetch failed: a metric label, a log word and the choice of the user's reply.
EXPIRED, TOO_LARGE, TOO_SLOW, WRONG_TYPE, UNREACHABLE = "expired", "too_large", "too_slow", "wrong_type", "unreachable"
CHUNK = 64 * 1024
CONNECT_TIMEOUT = 3.05


class MediaError(Exception):
    """An attachment that could not be fetched; `reason` is one of the words above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason

    @property
    def retryable(self) -> bool:
        return self.reason == UNREACHABLE


@dataclass(frozen=True)
class Fetched:
    data: bytes | bytearray  # not copied into bytes: an 8 MB photo is held once, not twice
    content_type: str


class Downloader:
    """One pooled session for every attachment fetch of this process."""

    def __init__(self, *, timeout: float = 10.0, max_redirects: int = 3, pool_size: int = 16,
                 clock: Callable[[], float] = time.monotonic):
        self.timeout = timeout  # the whole fetch, not each read: a trickle is cut too
        self.clock = clock
        self.session = requests.Session()
        self.session.max_redirects = max_redirects
        self.session.trust_env = False  # no proxy or .netrc credentials picked up from the host
        # The bytes as sent: a gzip body's Content-Length would reserve a fraction of its memory.
        self.session.headers["Accept-Encoding"] = "identity"
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)

    def fetch(self, url: str, accept: Callable[[str], bool], max_bytes: int,
              deadline: float | None = None, on_size: Callable[[int], object] = lambda size: None) -> Fetched:
        """The bytes at `url`, if its type is accepted and it is at most `max_bytes`.

        `on_size` hears the size before the body is read (the Content-Length, else
        `max_bytes`): the caller reserves memory for it. Raises MediaError.
        """
        deadline = math.inf if deadline is None else deadline
        ends = min(self.clock() + self.timeout, deadline)
        try:
            with self.session.get(url, stream=True, timeout=(CONNECT_TIMEOUT, max(0.1, ends - self.clock()))) as response:
                return self._read(response, accept, max_bytes, ends, deadline, on_size)
        except requests.TooManyRedirects:
            raise MediaError(UNREACHABLE, "too many redirects") from None
        except requests.Timeout:
            raise MediaError(TOO_SLOW, "no answer in time") from None
        except requests.RequestException as exc:
            raise MediaError(UNREACHABLE, type(exc).__name__) from None

    def _read(self, response: requests.Response, accept: Callable[[str], bool], max_bytes: int, ends: float,
              deadline: float, on_size: Callable[[int], object]) -> Fetched:
        if response.status_code in (401, 403, 404, 410):
            raise MediaError(EXPIRED, f"status {response.status_code}")
        if response.status_code != 200:
            raise MediaError(UNREACHABLE, f"status {response.status_code}")
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not accept(content_type):
            raise MediaError(WRONG_TYPE, content_type[:60] or "none")
        length = _content_length(response)
        if length is not None and length > max_bytes:
            raise MediaError(TOO_LARGE, f"{length} bytes")
        waited = self.clock()
        on_size(length if length is not None else max_bytes)
        ends = min(ends + self.clock() - waited, deadline)  # the wait for memory is not the CDN's slowness
        body = bytearray()
        # read1: whatever has arrived, so the clock is looked at after every read - a body
        # trickled a byte a second would hold iter_content's 64 KB read for 18 hours.
        while chunk := read_some(response):
            body += chunk
            if len(body) > max_bytes:
                raise MediaError(TOO_LARGE, f"over {max_bytes} bytes")
            if self.clock() > ends:
                raise MediaError(TOO_SLOW, f"{len(body)} bytes in time")
        return Fetched(body, content_type)


def read_some(response: requests.Response) -> bytes:
    """Up to CHUNK bytes of the body as they come (b"": the end), urllib3's errors as requests'."""
    try:
        return response.raw.read1(CHUNK, decode_content=True)
    except urllib3.exceptions.ReadTimeoutError:
        raise requests.Timeout() from None
    except urllib3.exceptions.HTTPError as exc:
        raise requests.ConnectionError(type(exc).__name__) from None


def _content_length(response: requests.Response) -> int | None:
    try:
        length = int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return length if length >= 0 else None
