"""Trains and accounts as configured in CREDENTIALS_DIR, reduced to what a viewer may see: names, auth mode and
account type. Nothing that is or derives from a secret (keys, tokens, key digests, webhook URLs) leaves here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from prompttrain.credentials import ApiKeyAccount, CredentialDirectory, OAuthAccount


@dataclass(frozen=True)
class ConfiguredTrain:
    train_id: str
    auth: str  # client-keys | passthrough
    accounts: list[str]
    default_account: str | None


@dataclass(frozen=True)
class ConfiguredAccount:
    name: str
    kind: str  # api_key | oauth
    plan: str | None  # for OAuth: max | pro (from the credential's isMax)


@dataclass(frozen=True)
class Configured:
    directory: str
    trains: list[ConfiguredTrain]
    accounts: list[ConfiguredAccount]


class ConfiguredDirectory:
    """Reads the directory in a worker thread, one scan at a time (the scanner caches parsed files)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._scanner = CredentialDirectory(root)
        self._lock = asyncio.Lock()

    async def read(self) -> Configured:
        async with self._lock:
            snapshot, _ = await asyncio.to_thread(self._scanner.scan)
        trains = [
            ConfiguredTrain(train.train_id, str(train.auth), list(train.accounts), train.default_account)
            for train in sorted(snapshot.trains.values(), key=lambda item: item.train_id)
        ]
        accounts = []
        for name in sorted(snapshot.accounts):
            account = snapshot.accounts[name]
            if isinstance(account, OAuthAccount):
                accounts.append(ConfiguredAccount(name, "oauth", "max" if account.tokens.is_max else "pro"))
            elif isinstance(account, ApiKeyAccount):
                accounts.append(ConfiguredAccount(name, "api_key", None))
        return Configured(directory=str(self.root), trains=trains, accounts=accounts)
