"""OAuth access tokens for subscription accounts: refreshed before expiry, once at a time, persisted.

Per account: an asyncio lock makes concurrent requests in this process wait for one refresh; the store's row
lock (PostgreSQL) does the same across replicas, and a replica that waited finds the token already fresh. The
token endpoint and body follow Claude Code's own refresh (reference §2.3). A failed refresh is remembered for a
few seconds so a broken account does not hammer the endpoint; while the old access token has not expired yet it
is still used.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import orjson

from prompttrain import metrics
from prompttrain.credentials import OAuthAccount, OAuthTokens
from prompttrain.proxy.errors import AuthenticationError
from prompttrain.proxy.forwarding import outbound_proxy
from prompttrain.storage.oauth_tokens import OAuthTokenStore, later

log = logging.getLogger(__name__)

FAILURE_MEMORY_SECONDS = 5.0


class OAuthRefreshError(Exception):
    """The token endpoint refused or could not be reached; the message never contains a token."""

    def __init__(self, message: str, result: str = "rejected") -> None:
        super().__init__(message)
        self.result = result  # the `result` label of prompttrain_oauth_refreshes_total


class OAuthManager:
    def __init__(
        self,
        client: aiohttp.ClientSession,
        *,
        token_url: str,
        client_id: str,
        margin_seconds: float,
        store: OAuthTokenStore | None,
    ) -> None:
        self.client = client
        self.token_url = token_url
        self.client_id = client_id
        self.margin_ms = int(margin_seconds * 1000)
        self.store = store
        self.proxy = outbound_proxy(token_url)
        self._tokens: dict[str, OAuthTokens] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._failed_until: dict[str, float] = {}
        self.refresh_count = 0
        self.refresh_failures = 0

    def needs_refresh(self, tokens: OAuthTokens) -> bool:
        return tokens.expires_at_ms - self.margin_ms <= int(time.time() * 1000)

    async def access_token(self, account: OAuthAccount) -> str:
        tokens = later(self._tokens.get(account.name), account.tokens) or account.tokens
        if not self.needs_refresh(tokens):
            return tokens.access_token
        lock = self._locks.setdefault(account.name, asyncio.Lock())
        async with lock:
            tokens = later(self._tokens.get(account.name), account.tokens) or account.tokens
            if not self.needs_refresh(tokens):
                return tokens.access_token
            if self._failed_until.get(account.name, 0.0) > time.monotonic():
                return self._still_valid_or_fail(account.name, tokens)
            try:
                fresh = await self._refresh_coordinated(account.name, tokens)
            except OAuthRefreshError as error:
                self.refresh_failures += 1
                self._failed_until[account.name] = time.monotonic() + FAILURE_MEMORY_SECONDS
                log.error("OAuth refresh for account %s failed: %s", account.name, error)
                return self._still_valid_or_fail(account.name, tokens)
            self._tokens[account.name] = fresh
            return fresh.access_token

    def _still_valid_or_fail(self, name: str, tokens: OAuthTokens) -> str:
        if tokens.expires_at_ms > int(time.time() * 1000):
            return tokens.access_token
        raise AuthenticationError(f"the OAuth token of account '{name}' expired and could not be refreshed")

    async def _refresh_coordinated(self, name: str, tokens: OAuthTokens) -> OAuthTokens:
        async def refresh(current: OAuthTokens) -> OAuthTokens:
            return await self.refresh(current, account=name)

        if self.store is None:
            return await refresh(tokens)
        try:
            return await self.store.refresh_once(name, tokens, self.needs_refresh, refresh)
        except OAuthRefreshError:
            raise
        except Exception as error:  # noqa: BLE001 - database trouble must not stop a refresh the request needs
            log.warning(
                "OAuth token store unavailable (%s); refreshing account %s locally",
                type(error).__name__,
                name,
            )
            return await refresh(tokens)

    async def refresh(self, tokens: OAuthTokens, account: str = "unknown") -> OAuthTokens:
        """One call to the token endpoint (Claude Code's refresh_token grant), counted by result."""
        try:
            fresh = await self._call_token_endpoint(tokens)
        except OAuthRefreshError as error:
            metrics.OAUTH_REFRESHES.labels(account, error.result).inc()
            raise
        metrics.OAUTH_REFRESHES.labels(account, "success").inc()
        return fresh

    async def _call_token_endpoint(self, tokens: OAuthTokens) -> OAuthTokens:
        self.refresh_count += 1
        try:
            async with self.client.post(
                self.token_url,
                json={
                    "grant_type": "refresh_token",
                    "refresh_token": tokens.refresh_token,
                    "client_id": self.client_id,
                },
                headers={"anthropic-beta": "oauth-2025-04-20", "content-type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=30.0),
                proxy=self.proxy,
            ) as response:
                status = response.status
                text = await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise OAuthRefreshError(f"token endpoint unreachable ({type(error).__name__})", "unreachable") from None
        if status != 200:
            raise OAuthRefreshError(f"token endpoint answered {status}", "rejected")
        try:
            payload = orjson.loads(text)
            access = payload["access_token"]
            expires_in = float(payload.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise OAuthRefreshError("token endpoint answered without access_token", "invalid_response") from None
        scope = payload.get("scope")
        return OAuthTokens(
            access_token=str(access),
            refresh_token=str(payload.get("refresh_token") or tokens.refresh_token),
            expires_at_ms=int(time.time() * 1000 + expires_in * 1000),
            scopes=tuple(scope.split()) if isinstance(scope, str) else tokens.scopes,
            is_max=bool(payload.get("is_max", tokens.is_max)),
        )

    async def load_persisted(self, names: list[str]) -> None:
        """At start-up, take over tokens refreshed by an earlier run or another replica."""
        if self.store is None:
            return
        for name in names:
            try:
                stored = await self.store.load(name)
            except Exception as error:  # noqa: BLE001 - the DB may be down at start; files still work
                log.warning("could not load stored OAuth tokens (%s)", type(error).__name__)
                return
            if stored is not None:
                self._tokens[name] = later(self._tokens.get(name), stored) or stored
