"""The Graph calls of the set-up commands (`python -m bot doctor`, `python -m bot profile`).

The same conventions as messenger/graph.py: the token in the Authorization header, the
`appsecret_proof` of that token beside it, a timeout on every call, and errors that never
carry a URL (so never a token). One exception, Meta's: debug_token takes the token it
inspects as the `input_token` query parameter.
"""
from __future__ import annotations

from typing import Any

import requests

from messenger.graph import GraphAPIError, _to_result, appsecret_proof

TIMEOUT = (3.05, 10.0)  # (connect, read) seconds
# Said when Graph did not answer at all (GraphAPIError.status is None): the network, not Meta.
UNREACHABLE_HELP = "check that this host reaches FB_API_URL (its network, a firewall, HTTPS_PROXY)"


class AdminGraph:
    """Calls made with one token (a Page token, or the app token `APP_ID|APP_SECRET`)."""

    def __init__(self, base_url: str, token: str, app_secret: str, timeout: tuple[float, float] = TIMEOUT):
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self._proof = appsecret_proof(token, app_secret)
        self._timeout = timeout
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {token}"

    def __repr__(self) -> str:
        return f"AdminGraph(base_url={self.base_url!r})"

    def get(self, path: str, **params: str) -> dict:
        return self.request("GET", path, params=params)

    def request(self, method: str, path: str, *, params: dict | None = None, json: Any = None) -> dict:
        params = {**(params or {}), "appsecret_proof": self._proof}
        try:
            response = self._session.request(method, self.base_url + path, params=params, json=json,
                                             timeout=self._timeout)
        except requests.RequestException as exc:
            raise GraphAPIError(f"{method} {path.split('?')[0]} failed: {type(exc).__name__}") from None
        return _to_result(method, path, response)


def app_token(app_id: str, app_secret: str) -> str:
    """Meta's app access token: `APP_ID|APP_SECRET` (never printed)."""
    return f"{app_id}|{app_secret}"
