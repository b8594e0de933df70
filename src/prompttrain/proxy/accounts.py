"""Which train a request belongs to, whether its client may use it, and which account serves it.

All of it is answered from memory (the credential snapshot and the cooldown table): no database round trip on
the request path. Account choice: `X-Train-Account` if allowed for the train, else the train's default account,
else rendezvous hashing over the train's accounts (as the reference does, §2.4: the first 8 bytes of
sha256("<train>::<account>"), highest first), skipping accounts cooling down after an upstream 429.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

from prompttrain.credentials import (
    Account,
    AuthMode,
    CredentialSnapshot,
    Train,
    client_key_matches,
    is_identifier,
)
from prompttrain.proxy.errors import AuthenticationError, PermissionDeniedError

PASSTHROUGH_ACCOUNT = "passthrough"
DEFAULT_COOLDOWN_SECONDS = 60.0
MAX_COOLDOWN_SECONDS = 3600.0


@dataclass(frozen=True)
class Resolution:
    train: Train
    account: Account | None  # None in passthrough mode: the client's own credential goes upstream

    @property
    def account_id(self) -> str:
        return self.account.name if self.account is not None else PASSTHROUGH_ACCOUNT


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    if api_key:
        return api_key.strip() or None
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def resolve_train(snapshot: CredentialSnapshot, train_header: str | None, default_train: str) -> Train:
    train_id = (train_header or "").strip() or default_train
    if not is_identifier(train_id):
        raise AuthenticationError("invalid train-id header")
    train = snapshot.trains.get(train_id)
    if train is None:
        raise AuthenticationError(f"unknown train '{train_id}'")
    return train


def authorise(
    snapshot: CredentialSnapshot,
    cooldowns: CooldownTable,
    *,
    train_header: str | None,
    account_header: str | None,
    authorization: str | None,
    api_key: str | None,
    default_train: str,
) -> Resolution:
    train = resolve_train(snapshot, train_header, default_train)
    if train.auth is AuthMode.PASSTHROUGH:
        if presented_key(authorization, api_key) is None:
            raise AuthenticationError(
                f"train '{train.train_id}' forwards your own Anthropic credential: send x-api-key or "
                "Authorization: Bearer"
            )
        return Resolution(train=train, account=None)
    key = presented_key(authorization, api_key)
    if key is None:
        raise AuthenticationError(f"train '{train.train_id}' needs a client key (Authorization: Bearer <key>)")
    if not client_key_matches(key, train.client_key_digests):
        raise AuthenticationError(f"invalid client key for train '{train.train_id}'")
    return Resolution(train=train, account=choose_account(train, snapshot, cooldowns, account_header))


def rendezvous_order(train_id: str, accounts: tuple[str, ...]) -> list[str]:
    def score(name: str) -> tuple[int, str]:
        digest = hashlib.sha256(f"{train_id}::{name}".encode()).digest()
        return (-int.from_bytes(digest[:8], "big"), name)

    return sorted(set(accounts), key=score)


def choose_account(
    train: Train, snapshot: CredentialSnapshot, cooldowns: CooldownTable, requested: str | None
) -> Account:
    requested = (requested or "").strip() or None
    if requested is not None:
        if not is_identifier(requested) or requested not in train.accounts:
            raise PermissionDeniedError(f"account '{requested}' is not allowed for train '{train.train_id}'")
        account = snapshot.accounts.get(requested)
        if account is None:
            raise AuthenticationError(f"account '{requested}' has no credentials")
        return account
    candidates = [name for name in rendezvous_order(train.train_id, train.accounts) if name in snapshot.accounts]
    default = train.default_account
    if default is not None and default in candidates:
        candidates.remove(default)
        candidates.insert(0, default)
    if not candidates:
        raise AuthenticationError(f"train '{train.train_id}' has no account with credentials")
    now = time.monotonic()
    for name in candidates:
        if not cooldowns.is_cooling(name, now):
            return snapshot.accounts[name]
    # Every account is cooling down: use the one that recovers first, the upstream answers for itself.
    return snapshot.accounts[min(candidates, key=lambda name: cooldowns.until(name))]


class CooldownTable:
    """Accounts that answered 429, until when (monotonic seconds)."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def start(self, account: str, retry_after: str | None) -> None:
        seconds = DEFAULT_COOLDOWN_SECONDS
        if retry_after:
            with contextlib.suppress(ValueError):
                seconds = min(max(float(retry_after), 1.0), MAX_COOLDOWN_SECONDS)
        self._until[account] = time.monotonic() + seconds

    def is_cooling(self, account: str, now: float) -> bool:
        return self._until.get(account, 0.0) > now

    def until(self, account: str) -> float:
        return self._until.get(account, 0.0)

    def snapshot(self) -> Mapping[str, float]:
        return dict(self._until)
