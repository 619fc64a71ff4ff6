"""X-Forwarded-* believed only from the proxies the Page owner names (FORWARDED_ALLOW_IPS).

Behind a tunnel (cloudflared, ngrok) or nginx on this host, the client address and
scheme arrive in X-Forwarded-*; from anyone else those headers are a lie anybody can
tell, so they are ignored and the peer's own address is used.
"""
from __future__ import annotations

import ipaddress
from typing import Callable, Iterable

from werkzeug.middleware.proxy_fix import ProxyFix


class TrustedPeers:
    def __init__(self, allowed: Iterable[str]):
        allowed = tuple(allowed)
        self.everyone = "*" in allowed
        self.networks = tuple(ipaddress.ip_network(a, strict=False) for a in allowed if a != "*")

    def __contains__(self, address: str | None) -> bool:
        if self.everyone:
            return True
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:  # a unix socket peer, or none
            return False
        return any(ip in network for network in self.networks)


def last_hop(header: str) -> str | None:
    """The address the trusted proxy itself saw: the last entry it appended."""
    hops = [hop.strip() for hop in header.split(",") if hop.strip()]
    return hops[-1] if hops else None


class TrustedProxyFix:
    """werkzeug's ProxyFix (one proxy hop), applied only when the peer is trusted."""

    def __init__(self, app: Callable, peers: TrustedPeers):
        self.plain = app
        self.fixed = ProxyFix(app, x_for=1, x_proto=1, x_host=1)
        self.peers = peers

    def __call__(self, environ: dict, start_response: Callable):
        app = self.fixed if environ.get("REMOTE_ADDR") in self.peers else self.plain
        return app(environ, start_response)


def forwarded_scope(scope: dict, peers: TrustedPeers) -> dict:
    """The ASGI twin of TrustedProxyFix: client, scheme and host from a trusted proxy."""
    client = scope.get("client")
    if not client or client[0] not in peers:
        return scope
    headers = {name: value.decode("latin-1") for name, value in scope["headers"]
               if name in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")}
    if not headers:
        return scope
    scope = dict(scope)
    if address := last_hop(headers.get(b"x-forwarded-for", "")):
        scope["client"] = (address, 0)
    if proto := last_hop(headers.get(b"x-forwarded-proto", "")):
        if proto in ("http", "https"):
            scope["scheme"] = proto
    if host := last_hop(headers.get(b"x-forwarded-host", "")):
        scope["headers"] = [(n, v) for n, v in scope["headers"] if n != b"host"] + [(b"host", host.encode("latin-1"))]
    return scope
