"""Refreshed OAuth tokens, persisted encrypted, with one refresh at a time per account across replicas.

PostgreSQL: the refresh runs inside a transaction holding `SELECT ... FOR UPDATE` on the account's row, so a
second replica waits, then sees the fresh token and does not call the token endpoint again. SQLite (one process
by design) relies on the caller's in-process lock.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from prompttrain.credentials import OAuthTokens
from prompttrain.storage.tables import oauth_tokens

log = logging.getLogger(__name__)

KEY_FILE_NAME = "credentials-encryption.key"


class TokenCipher:
    """Fernet (AES-128-CBC + HMAC-SHA256) keyed from CREDENTIALS_ENCRYPTION_KEY, any passphrase accepted."""

    def __init__(self, secret: str) -> None:
        key = base64.urlsafe_b64encode(hashlib.sha256(secret.encode("utf-8")).digest())
        self._fernet = Fernet(key)

    def encrypt(self, value: str) -> str:
        return self._fernet.encrypt(value.encode("utf-8")).decode("ascii")

    def decrypt(self, value: str) -> str:
        return self._fernet.decrypt(value.encode("ascii")).decode("utf-8")


def load_or_create_key(configured: str | None, data_dir: Path) -> str:
    """The configured key, else a key kept in `<data_dir>/credentials-encryption.key` (created 0600 once).

    Several replicas sharing PostgreSQL must share the key: set CREDENTIALS_ENCRYPTION_KEY for them.
    """
    if configured:
        return configured
    path = data_dir / KEY_FILE_NAME
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key().decode("ascii")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key + "\n")
    log.warning("generated a credentials encryption key in %s; set CREDENTIALS_ENCRYPTION_KEY to share it", path)
    return key


def later(a: OAuthTokens | None, b: OAuthTokens | None) -> OAuthTokens | None:
    """The token that lives longer: a refreshed one beats the file, a new login in the file beats the DB."""
    if a is None:
        return b
    if b is None:
        return a
    return a if a.expires_at_ms >= b.expires_at_ms else b


class OAuthTokenStore:
    def __init__(self, engine: AsyncEngine, cipher: TokenCipher) -> None:
        self.engine = engine
        self.cipher = cipher

    async def load(self, account_id: str) -> OAuthTokens | None:
        async with self.engine.connect() as connection:
            return await self._read(connection, account_id, lock=False)

    async def refresh_once(
        self,
        account_id: str,
        seed: OAuthTokens,
        needs_refresh: Callable[[OAuthTokens], bool],
        refresh: Callable[[OAuthTokens], Awaitable[OAuthTokens]],
    ) -> OAuthTokens:
        """Under the account's row lock: take the newest known token, refresh it only if still needed, save it."""
        async with self.engine.begin() as connection:
            await self._ensure_row(connection, account_id, seed)
            stored = await self._read(connection, account_id, lock=True)
            current = later(stored, seed) or seed
            if not needs_refresh(current):
                return current
            fresh = await refresh(current)
            await self._write(connection, account_id, fresh)
            return fresh

    async def _ensure_row(self, connection: AsyncConnection, account_id: str, seed: OAuthTokens) -> None:
        insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
        statement = insert(oauth_tokens).values(**self._values(account_id, seed)).on_conflict_do_nothing()
        await connection.execute(statement)

    async def _read(self, connection: AsyncConnection, account_id: str, *, lock: bool) -> OAuthTokens | None:
        query = sa.select(oauth_tokens).where(oauth_tokens.c.account_id == account_id)
        if lock and connection.dialect.name == "postgresql":
            query = query.with_for_update()
        row = (await connection.execute(query)).mappings().first()
        if row is None:
            return None
        try:
            return OAuthTokens(
                access_token=self.cipher.decrypt(row["access_token"]),
                refresh_token=self.cipher.decrypt(row["refresh_token"]),
                expires_at_ms=int(row["expires_at_ms"]),
                scopes=tuple(scope for scope in str(row["scopes"]).split(" ") if scope),
                is_max=bool(row["is_max"]),
            )
        except InvalidToken:
            log.error(
                "cannot decrypt the stored OAuth token of account %s: CREDENTIALS_ENCRYPTION_KEY differs from the"
                " key that wrote it; using the credential file instead",
                account_id,
            )
            return None

    async def _write(self, connection: AsyncConnection, account_id: str, tokens: OAuthTokens) -> None:
        values = self._values(account_id, tokens)
        del values["account_id"]
        await connection.execute(
            sa.update(oauth_tokens).where(oauth_tokens.c.account_id == account_id).values(**values)
        )

    def _values(self, account_id: str, tokens: OAuthTokens) -> dict[str, object]:
        return {
            "account_id": account_id,
            "access_token": self.cipher.encrypt(tokens.access_token),
            "refresh_token": self.cipher.encrypt(tokens.refresh_token),
            "expires_at_ms": tokens.expires_at_ms,
            "scopes": " ".join(tokens.scopes),
            "is_max": tokens.is_max,
            "refreshed_at": datetime.now(UTC),
        }
