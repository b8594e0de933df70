"""Browser-facing defences: security headers (a Content-Security-Policy without inline scripts or styles), the
CSRF token cookie, and the CSRF check every non-GET endpoint runs (double submit: the token of the cookie must
come back in the `_csrf` form field or the `X-CSRF-Token` header, and a cross-site Origin is refused).
"""

from __future__ import annotations

import hmac
import re
import secrets
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

from fastapi import Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prompttrain.dashboard.auth import KEY_HEADER
from prompttrain.dashboard.errors import ForbiddenError

CSRF_COOKIE = "prompttrain_csrf"
CSRF_FIELD = "_csrf"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_-]{32,64}$")

# Model and user content is escaped by the templates and set with textContent by the scripts; this policy is the
# second line: no inline script or style runs even if something slipped through, images only from here or data:.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
}


class SecurityMiddleware:
    """Adds the security headers to every response and issues the CSRF cookie with the first HTML page."""

    def __init__(self, app: ASGIApp, *, secure_cookies: bool = False) -> None:
        self.app = app
        self.secure_cookies = secure_cookies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _cookie(scope, CSRF_COOKIE)
        issue = token is None or not TOKEN_SHAPE.match(token)
        if issue:
            token = secrets.token_urlsafe(32)
        scope.setdefault("state", {})["csrf_token"] = token
        secure = self.secure_cookies or scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
                if issue and headers.get("content-type", "").startswith("text/html"):
                    attributes = "; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
                    headers.append("set-cookie", f"{CSRF_COOKIE}={token}{attributes}")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _cookie(scope: Scope, name: str) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # noqa: BLE001 - a malformed cookie header is treated as no cookie
                return None
            morsel = jar.get(name)
            if morsel is not None:
                return morsel.value
    return None


def csrf_token(request: Request) -> str:
    return str(request.state.csrf_token)


async def csrf_protect(request: Request) -> None:
    """An app-wide dependency: safe methods pass; anything else needs the CSRF token (or the key header, which a
    cross-site page cannot send)."""
    if request.method in SAFE_METHODS or request.headers.get(KEY_HEADER) is not None:
        return
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise ForbiddenError("cross-site request refused")
    expected = request.cookies.get(CSRF_COOKIE)
    presented = request.headers.get(CSRF_HEADER)
    if presented is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        field = (await request.form()).get(CSRF_FIELD)
        presented = field if isinstance(field, str) else None
    if not expected or not presented or not hmac.compare_digest(expected.encode(), presented.encode()):
        raise ForbiddenError("missing or invalid CSRF token: reload the page and try again")
