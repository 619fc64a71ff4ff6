"""The Pages of one emulator, their Instagram accounts, and which account each user writes to.

One Graph emulator serves every Page of a deployment (one FB_API_URL), as graph.facebook.com
does: a call is routed by its token, and a token only reaches its own Page's conversations
and its own Page's users, Messenger or Instagram.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from werkzeug.wrappers import Request

from devtools.emulator.errors import expected_appsecret_proof

MESSENGER, INSTAGRAM = "messenger", "instagram"  # the Conversations API's `platform` values


@dataclass(frozen=True)
class Account:
    """One inbox: a Page's Messenger, or the Instagram account linked to a Page."""
    id: str  # the Page id, or the Instagram account id: a webhook's entry.id
    page_id: str  # the Page whose token reads and answers it
    platform: str
    name: str

    @property
    def webhook_object(self) -> str:
        """The delivery's `object`: "page" for Messenger, "instagram" for Instagram."""
        return "instagram" if self.platform == INSTAGRAM else "page"

    def sender(self, user_id: str | None = None, user_name: str = "") -> dict:
        """The Conversations API's `from` for this account (no user) or for one of its users:
        Messenger names people, Instagram gives usernames."""
        ident, name = (user_id, user_name) if user_id else (self.id, self.name)
        return {"id": ident, "username": username(name)} if self.platform == INSTAGRAM else {"id": ident, "name": name}


@dataclass
class Page:
    id: str
    token: str
    proof: str  # the appsecret_proof that goes with the token
    name: str
    instagram_id: str | None = None
    expired: bool = False  # every call with the token answers 190 / 463


def username(name: str) -> str:
    """An Instagram-like handle for a display name: "Chloé D" -> "chloé_d"."""
    return re.sub(r"[^\w.]+", "_", name.strip().lower()).strip("_") or "user"


class Accounts:
    """Pages by id and by token, accounts by id, and each user's account (the first Page's by default)."""

    def __init__(self, app_secret: str):
        self._secret = app_secret
        self.pages: dict[str, Page] = {}  # in the order added: the first is the default
        self.accounts: dict[str, Account] = {}
        self.user_accounts: dict[str, str] = {}  # psid or igsid -> account id
        self._by_token: dict[str, Page] = {}
        self._lock = threading.Lock()

    def add_page(self, page_id: str, token: str, *, name: str = "", instagram_id: str | None = None) -> Page:
        ids = [page_id] + ([instagram_id] if instagram_id else [])
        with self._lock:
            if any(i in self.accounts for i in ids) or token in self._by_token or page_id == instagram_id:
                raise ValueError(f"page {page_id}, its Instagram account or its token is already known")
            page = Page(page_id, token, expected_appsecret_proof(token, self._secret), name or "Page", instagram_id)
            self.pages[page_id] = self._by_token[token] = page
            self.accounts[page_id] = Account(page_id, page_id, MESSENGER, page.name)
            if instagram_id:
                self.accounts[instagram_id] = Account(instagram_id, page_id, INSTAGRAM, page.name)
        return page

    @property
    def app_secret(self) -> str:
        return self._secret

    def by_token(self, token: str) -> Page | None:
        return self._by_token.get(token)

    @property
    def first(self) -> Page:
        return next(iter(self.pages.values()))

    def page_of(self, request: Request) -> Page | None:
        """The Page whose token the call carries (Bearer header, or the access_token parameter)."""
        bearer = request.headers.get("Authorization", "")
        for token in (bearer.removeprefix("Bearer ") if bearer.startswith("Bearer ") else None,
                      request.args.get("access_token")):
            if token and token in self._by_token:
                return self._by_token[token]
        return None

    def account(self, account_id: str | None) -> Account:
        """An account by id; None is the first Page's Messenger."""
        try:
            return self.accounts[account_id or self.first.id]
        except KeyError:
            raise ValueError(f"no Page or Instagram account {account_id!r} in this emulator") from None

    def of_page(self, page: Page, platform: str) -> Account | None:
        ident = page.instagram_id if platform == INSTAGRAM else page.id
        return self.accounts.get(ident) if ident else None

    def assign(self, user_id: str, account_id: str | None) -> Account:
        """The account `user_id` writes to: `account_id`, else the one it already has, else the first
        Page's Messenger. A user belongs to one account (PSIDs and IGSIDs are scoped to it)."""
        with self._lock:
            known = self.user_accounts.get(user_id)
            if account_id and known and known != account_id:
                raise ValueError(f"user {user_id} writes to {known}, not to {account_id}")
            account = self.account(account_id or known)
            self.user_accounts[user_id] = account.id
        return account

    def account_of(self, user_id: str) -> Account:
        """A user's account; a user never seen is taken as one of the first Page's Messenger users
        (so recorded fixtures need no set-up), without being recorded as such."""
        return self.account(self.user_accounts.get(user_id))
