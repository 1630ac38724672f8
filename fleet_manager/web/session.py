"""Dashboard sign-in: the API token in an HttpOnly, SameSite=Strict cookie, and a per-session CSRF token.

The cookie holds `<nonce>.<api token>`; every request authenticates the token again (so revoking it signs
the browser out at once). The CSRF token is HMAC-SHA256(key=api token, "edgefleet-csrf:" + nonce): only
pages the server rendered for this sign-in know it, each sign-in gets a new nonce, and the server keeps no
session state. State-changing requests must also come from the dashboard's own origin (`Origin` and
`Sec-Fetch-Site` headers, which browsers set and pages cannot forge), which covers the sign-in form too.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request, Response

from fleet_manager.db import Database
from fleet_manager.models import Role
from fleet_manager.tokens import Principal, authenticate

COOKIE_NAME = "edgefleet_session"
COOKIE_MAX_AGE_S = 12 * 3600
CSRF_FIELD = "csrf_token"
_NONCE_BYTES = 16


@dataclass(frozen=True)
class WebUser:
    """A signed-in dashboard user: the token's principal and this sign-in's CSRF token."""

    principal: Principal
    csrf_token: str

    @property
    def name(self) -> str:
        return self.principal.name

    @property
    def role(self) -> str:
        return self.principal.role.value

    @property
    def actor(self) -> str:
        return self.principal.actor

    def can(self, role: Role) -> bool:
        return self.principal.role.allows(role)

    @property
    def can_operate(self) -> bool:
        return self.can(Role.OPERATOR)


def new_cookie_value(token: str) -> str:
    return f"{secrets.token_urlsafe(_NONCE_BYTES)}.{token}"


def csrf_token_for(nonce: str, token: str) -> str:
    return hmac.new(token.encode(), b"edgefleet-csrf:" + nonce.encode(), hashlib.sha256).hexdigest()


def _split(value: str | None) -> tuple[str, str] | None:
    if not value or len(value) > 400:
        return None
    nonce, sep, token = value.partition(".")
    if not sep or not nonce or not token:
        return None
    return nonce, token


def current_user(request: Request, db: Database) -> WebUser | None:
    """The user the request's session cookie signs in, or None (no cookie, unknown or revoked token)."""
    parts = _split(request.cookies.get(COOKIE_NAME))
    if parts is None:
        return None
    nonce, token = parts
    with db.read() as session:
        principal = authenticate(session, token)
    if principal is None or principal.role is Role.DEVICE:
        return None
    return WebUser(principal, csrf_token_for(nonce, token))


def valid_csrf(user: WebUser, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(user.csrf_token, str(presented))


def same_origin(request: Request, public_url: str | None = None) -> bool:
    """False when the browser says the request came from another site (fetch metadata, then Origin).

    The Origin's host must be the one the request was sent to (its scheme may differ behind a proxy that
    terminates TLS), or `public_url`'s.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser, or an old one: the CSRF token still has to match
    host = urlsplit(origin).netloc
    if not host:
        return False  # "null": a sandboxed frame, a file, a redirect across sites
    return host == request.url.netloc or (public_url is not None and host == urlsplit(public_url).netloc)


def set_session_cookie(request: Request, response: Response, value: str) -> None:
    response.set_cookie(
        COOKIE_NAME,
        value,
        max_age=COOKIE_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
