"""Fetching an attachment's bytes from Meta's CDN, bounded in size, time, type and redirects.

The link is signed and expires (Meta's CDN answers 403 then): it is never logged, and no
token goes with it - a session of its own, apart from the Graph client's.
"""
from __future__ import annotations

import ipaddress
import math
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urljoin, urlsplit

import requests
import requests.adapters
import urllib3
import urllib3.poolmanager

# Why a fetch failed: a metric label, a log word and the choice of the user's reply.
EXPIRED, TOO_LARGE, TOO_SLOW, WRONG_TYPE, UNREACHABLE = "expired", "too_large", "too_slow", "wrong_type", "unreachable"
NOT_PUBLIC = "not_public"  # a link to this host's own network (loopback, private, link-local...)
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


Allows = Callable[[str, int], bool]  # (address, port) -> may an attachment be fetched from there


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # an IPv6-only host's way to IPv4 addresses (RFC 6052)
LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # a network's own translators (RFC 8215)
TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # IPv4-translated addresses (RFC 2765)


def public(address: str, port: int) -> bool:
    """An address of the internet, not of this host's own networks: Meta's CDN is one. An IPv6
    address carrying an IPv4 one (mapped, translated, NAT64, 6to4, the old compatible form) is
    judged by that one: NAT64 reaches a private IPv4 network from an IPv6-only host. Teredo and a
    network's own NAT64 prefix are refused outright."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local or ip.teredo or ip in LOCAL_NAT64:  # tunnels and translators no CDN is behind
            return False
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and (ip in NAT64 or ip in TRANSLATED or int(ip) < 2 ** 32):
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            ip = inner
    return ip.is_global and not ip.is_multicast


def anywhere(address: str, port: int) -> bool:
    """For a Graph API on this host's own network (the emulator, the sandbox, the tests): its
    attachments are served from there too."""
    return True


class _NotPublic(Exception):
    """A connection reached an address `allows` refuses (not an OSError: urllib3 would retry it)."""


def _checked(connection: type, allows: Allows) -> type:
    """`connection` (urllib3's HTTP or HTTPS connection class) refusing a peer `allows` refuses,
    right after the TCP connect - before TLS, before the request."""
    class Checked(connection):
        def _new_conn(self):
            sock = super()._new_conn()
            address, port = sock.getpeername()[:2]
            if not allows(address, port):
                sock.close()
                raise _NotPublic("it leads to this host's own network")
            return sock
    return Checked


class _CheckedAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, allows: Allows, **kwargs):
        self.allows = allows
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        if self.allows is not anywhere:
            self.poolmanager.pool_classes_by_scheme = {
                scheme: type(f"Checked{pool.__name__}", (pool,), {"ConnectionCls": _checked(pool.ConnectionCls,
                                                                                             self.allows)})
                for scheme, pool in urllib3.poolmanager.pool_classes_by_scheme.items()}


# Names of a host's own network: a container's or a cluster's service ("graph-emulator"), mDNS...
LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".lan", ".home.arpa")


def allowed_for(graph_url: str) -> Allows:
    """Where attachments may come from, by where the Graph API is: public addresses only, unless
    the Graph API itself is on this host's own network - an address of it, or a name of it (one
    without a dot, or under LOCAL_SUFFIXES) - then the emulator's CDN is too."""
    host = (urlsplit(graph_url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(LOCAL_SUFFIXES) or (host and "." not in host and ":" not in host):
        return anywhere
    try:
        return public if public(host, 0) else anywhere
    except ValueError:  # a name, as graph.facebook.com
        return public


class Downloader:
    """One pooled session for every attachment fetch of this process.

    Attachment links come in signed webhooks, from Meta's CDN; still, bytes fetched go on to the
    model and its answer to the user: a link (or a redirect) to this host's own network - a
    metadata service, an admin page - is refused (`allows`): by the address each connection
    reached, as soon as it is made and before a byte is sent (so a name that resolves once to the
    internet and once to this host is no way round it)."""

    def __init__(self, *, timeout: float = 10.0, max_redirects: int = 3, pool_size: int = 16,
                 clock: Callable[[], float] = time.monotonic, allows: Allows = public):
        self.timeout = timeout  # the whole fetch, not each read: a trickle is cut too
        self.clock = clock
        self.allows = allows
        self.max_redirects = max_redirects  # followed here, each hop checked
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or .netrc credentials picked up from the host
        # The bytes as sent: a gzip body's Content-Length would reserve a fraction of its memory.
        self.session.headers["Accept-Encoding"] = "identity"
        adapter = _CheckedAdapter(allows, pool_connections=4, pool_maxsize=pool_size)
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
            for _ in range(self.max_redirects + 1):
                self._check_link(url)
                with self.session.get(url, stream=True, allow_redirects=False,
                                      timeout=(CONNECT_TIMEOUT, max(0.1, ends - self.clock()))) as response:
                    if not response.is_redirect:
                        return self._read(response, accept, max_bytes, ends, deadline, on_size)
                    url = urljoin(url, response.headers["Location"])
            raise MediaError(UNREACHABLE, "too many redirects")
        except _NotPublic as exc:
            raise MediaError(NOT_PUBLIC, str(exc)) from None
        except requests.Timeout:
            raise MediaError(TOO_SLOW, "no answer in time") from None
        except requests.RequestException as exc:
            raise MediaError(UNREACHABLE, type(exc).__name__) from None

    def _check_link(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MediaError(UNREACHABLE, "not an http(s) link")
        if parts.username is not None or parts.password is not None:  # credentials for someone's host
            raise MediaError(NOT_PUBLIC, "a link with a user name")

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
