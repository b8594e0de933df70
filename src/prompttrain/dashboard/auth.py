"""Who may see the dashboard, decided per request from memory (no database round trip).

Accepted, in this order:

1. open development mode (`DASHBOARD_OPEN=true`, what `prompttrain up` uses) when no key and no trusted header is
   configured: everyone, announced at start-up;
2. `X-Dashboard-Key: <DASHBOARD_API_KEY>` (scripts, the JSON API); a wrong key is refused (401), never ignored;
3. the login cookie: set by the login form after a correct key, signed with a secret derived from the key (so every
   replica accepts it and rotating the key logs everyone out), httpOnly, SameSite=Lax, expiring;
4. `DASHBOARD_TRUSTED_HEADER` (e.g. oauth2-proxy's `X-Auth-Request-Email`) when configured, limited to
   `DASHBOARD_ALLOWED_DOMAINS` when that is set (403 for other domains). Only enable it when every path to the
   dashboard goes through the auth proxy, which must strip the header from client requests.

Without a key or a trusted header the dashboard refuses to start unless open mode is on. Keys are compared in
constant time (as the reference does with its login form, §6.2).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from prompttrain.dashboard.errors import ForbiddenError, NotAuthenticatedError
from prompttrain.settings import Settings, SettingsError

SESSION_COOKIE = "prompttrain_session"
KEY_HEADER = "x-dashboard-key"
SESSION_SALT = "prompttrain-dashboard-session"


@dataclass(frozen=True)
class Viewer:
    identity: str
    method: str  # open | key | cookie | header


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


class DashboardAuth:
    def __init__(
        self,
        *,
        api_key: str | None,
        trusted_header: str | None,
        allowed_domains: tuple[str, ...] = (),
        open_mode: bool = False,
        session_seconds: int = 7 * 24 * 3600,
    ) -> None:
        self.trusted_header = trusted_header.lower() if trusted_header else None
        self.allowed_domains = allowed_domains
        self.open_mode = open_mode and api_key is None and trusted_header is None
        self.session_seconds = session_seconds
        self._key_digest = _digest(api_key) if api_key else None
        self._sessions = (
            URLSafeTimedSerializer(
                hmac.new(self._key_digest, b"prompttrain dashboard session v1", hashlib.sha256).hexdigest(),
                salt=SESSION_SALT,
            )
            if self._key_digest
            else None
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> DashboardAuth:
        if not (settings.dashboard_api_key or settings.dashboard_trusted_header or settings.dashboard_open):
            raise SettingsError(
                "the dashboard needs DASHBOARD_API_KEY or DASHBOARD_TRUSTED_HEADER; "
                "set DASHBOARD_OPEN=true to run it without authentication (development only)"
            )
        return cls(
            api_key=settings.dashboard_api_key,
            trusted_header=settings.dashboard_trusted_header,
            allowed_domains=settings.dashboard_domains,
            open_mode=settings.dashboard_open,
            session_seconds=int(settings.dashboard_session_hours * 3600),
        )

    @property
    def has_key(self) -> bool:
        return self._key_digest is not None

    def describe(self) -> str:
        if self.open_mode:
            return "open development mode: no authentication"
        methods = []
        if self.has_key:
            methods.append("DASHBOARD_API_KEY (X-Dashboard-Key header or login form)")
        if self.trusted_header:
            domains = ", ".join(self.allowed_domains) or "any domain"
            methods.append(f"trusted header {self.trusted_header} ({domains})")
        return "authentication: " + " or ".join(methods)

    def key_matches(self, presented: str) -> bool:
        """Constant time whatever the lengths: both sides are compared as SHA-256 digests."""
        if self._key_digest is None:
            return False
        return hmac.compare_digest(_digest(presented), self._key_digest)

    def session_cookie(self) -> str:
        assert self._sessions is not None
        return str(self._sessions.dumps({"v": 1}))

    def session_valid(self, cookie: str) -> bool:
        if self._sessions is None:
            return False
        try:
            self._sessions.loads(cookie, max_age=self.session_seconds)
        except BadSignature:  # also SignatureExpired
            return False
        return True

    def identify(self, request: Request) -> Viewer | None:
        """The viewer, None when the request carries no credential; raises for a wrong one."""
        if self.open_mode:
            return Viewer("anonymous", "open")
        presented = request.headers.get(KEY_HEADER)
        if presented is not None and self.has_key:
            if not self.key_matches(presented):
                raise NotAuthenticatedError("invalid dashboard key (X-Dashboard-Key)")
            return Viewer("api-key", "key")
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie and self.session_valid(cookie):
            return Viewer("api-key", "cookie")
        if self.trusted_header:
            identity = request.headers.get(self.trusted_header, "").strip()
            if identity:
                if self.allowed_domains and identity.rpartition("@")[2].lower() not in self.allowed_domains:
                    raise ForbiddenError(f"{identity} is not in an allowed domain")
                return Viewer(identity, "header")
        return None


def current_viewer(request: Request) -> Viewer:
    auth: DashboardAuth = request.app.state.dashboard.auth
    viewer = auth.identify(request)
    if viewer is None:
        raise NotAuthenticatedError("authentication required: send X-Dashboard-Key or log in")
    return viewer


ViewerDep = Annotated[Viewer, Depends(current_viewer)]
