"""The one place that parses credential files, hashes client keys and checks them.

Layout under `CREDENTIALS_DIR`:

    accounts/<account>.credentials.json   {"type": "api_key", "api_key": "..."}
                                          {"type": "oauth", "oauth": {"accessToken", "refreshToken",
                                           "expiresAt" (ms), "scopes", "isMax"}}   (Claude Code's own shape)
    trains/<train-id>.json                {"auth": "client-keys" | "passthrough",
                                           "client_key_sha256": ["<hex digest>", ...],
                                           "accounts": ["<account>", ...], "default_account": "<account>",
                                           "slack": {"webhook_url": "...", "channel": "#x", "enabled": true}}

Identifiers must match `^[A-Za-z0-9._:-]+$`; a file whose name is not a valid identifier, or whose real path
lies outside the directory, is ignored with a warning. Errors never carry key material.

Exceptions:

    CredentialError           a file cannot be used (bad JSON, missing field); the message names the file
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson

from prompttrain.settings import IDENTIFIER_PATTERN

log = logging.getLogger(__name__)

ACCOUNT_SUFFIX = ".credentials.json"
TRAIN_SUFFIX = ".json"
CLIENT_KEY_PREFIX = "pt_"


class CredentialError(Exception):
    """A credential file cannot be used. The message names the file, never its secrets."""


class AuthMode(StrEnum):
    CLIENT_KEYS = "client-keys"
    PASSTHROUGH = "passthrough"


@dataclass(frozen=True)
class OAuthTokens:
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at_ms: int
    scopes: tuple[str, ...] = ()
    is_max: bool = False


@dataclass(frozen=True)
class ApiKeyAccount:
    name: str
    api_key: str = field(repr=False)


@dataclass(frozen=True)
class OAuthAccount:
    name: str
    tokens: OAuthTokens


Account = ApiKeyAccount | OAuthAccount


@dataclass(frozen=True)
class SlackSettings:
    webhook_url: str = field(repr=False)
    channel: str | None = None
    enabled: bool = True


@dataclass(frozen=True)
class Train:
    train_id: str
    auth: AuthMode
    client_key_digests: tuple[bytes, ...] = ()
    accounts: tuple[str, ...] = ()
    default_account: str | None = None
    slack: SlackSettings | None = None


@dataclass(frozen=True)
class CredentialSnapshot:
    """Every train and account known at one moment; replaced whole when a file changes."""

    trains: Mapping[str, Train]
    accounts: Mapping[str, Account]


EMPTY_SNAPSHOT = CredentialSnapshot(trains={}, accounts={})


def is_identifier(value: str) -> bool:
    return bool(IDENTIFIER_PATTERN.match(value))


def digest_client_key(key: str) -> bytes:
    return hashlib.sha256(key.strip().encode("utf-8")).digest()


def generate_client_key() -> str:
    """A new client key: 256 random bits, URL-safe, with a prefix that secret scanners can recognise."""
    return CLIENT_KEY_PREFIX + secrets.token_urlsafe(32)


def client_key_matches(presented: str, digests: Iterable[bytes]) -> bool:
    """Compare the presented key's digest with every stored digest in constant time (no early exit)."""
    candidate = digest_client_key(presented)
    found = False
    for digest in digests:
        found |= hmac.compare_digest(candidate, digest)
    return found


def parse_account(name: str, data: Any, source: str) -> Account:
    if not isinstance(data, dict):
        raise CredentialError(f"{source}: expected a JSON object")
    kind = data.get("type")
    if kind == "api_key":
        key = data.get("api_key")
        if not isinstance(key, str) or not key.strip():
            raise CredentialError(f"{source}: type api_key needs a non-empty 'api_key'")
        return ApiKeyAccount(name=name, api_key=key.strip())
    if kind == "oauth":
        return OAuthAccount(name=name, tokens=parse_oauth_block(data.get("oauth"), source))
    raise CredentialError(f"{source}: 'type' must be 'api_key' or 'oauth'")


def parse_oauth_block(block: Any, source: str) -> OAuthTokens:
    if not isinstance(block, dict):
        raise CredentialError(f"{source}: type oauth needs an 'oauth' object")
    access, refresh, expires = block.get("accessToken"), block.get("refreshToken"), block.get("expiresAt")
    if not isinstance(access, str) or not access:
        raise CredentialError(f"{source}: oauth.accessToken must be a non-empty string")
    if not isinstance(refresh, str) or not refresh:
        raise CredentialError(f"{source}: oauth.refreshToken must be a non-empty string")
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        raise CredentialError(f"{source}: oauth.expiresAt must be a number (epoch milliseconds)")
    scopes = block.get("scopes") or []
    if not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes):
        raise CredentialError(f"{source}: oauth.scopes must be a list of strings")
    return OAuthTokens(
        access_token=access,
        refresh_token=refresh,
        expires_at_ms=int(expires),
        scopes=tuple(scopes),
        is_max=bool(block.get("isMax", False)),
    )


def parse_train(train_id: str, data: Any, source: str) -> Train:
    if not isinstance(data, dict):
        raise CredentialError(f"{source}: expected a JSON object")
    try:
        auth = AuthMode(data.get("auth", AuthMode.CLIENT_KEYS))
    except ValueError:
        raise CredentialError(f"{source}: 'auth' must be 'client-keys' or 'passthrough'") from None
    digests: list[bytes] = []
    for value in data.get("client_key_sha256", []) or []:
        try:
            digest = bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise CredentialError(f"{source}: client_key_sha256 entries must be 64 hex characters")
        digests.append(digest)
    accounts = data.get("accounts", []) or []
    if not isinstance(accounts, list) or not all(isinstance(a, str) and is_identifier(a) for a in accounts):
        raise CredentialError(f"{source}: 'accounts' must be a list of account identifiers")
    default = data.get("default_account")
    if default is not None and (not isinstance(default, str) or not is_identifier(default)):
        raise CredentialError(f"{source}: 'default_account' must be an account identifier")
    if default is not None and default not in accounts:
        accounts = [default, *accounts]
    if auth is AuthMode.CLIENT_KEYS and not accounts:
        raise CredentialError(f"{source}: a client-keys train needs at least one account")
    return Train(
        train_id=train_id,
        auth=auth,
        client_key_digests=tuple(digests),
        accounts=tuple(dict.fromkeys(accounts)),
        default_account=default,
        slack=parse_slack(data.get("slack"), source),
    )


def parse_slack(block: Any, source: str) -> SlackSettings | None:
    if block is None:
        return None
    if not isinstance(block, dict) or not isinstance(block.get("webhook_url"), str):
        raise CredentialError(f"{source}: 'slack' needs a 'webhook_url' string")
    channel = block.get("channel")
    return SlackSettings(
        webhook_url=block["webhook_url"],
        channel=channel if isinstance(channel, str) else None,
        enabled=bool(block.get("enabled", True)),
    )


@dataclass(frozen=True)
class FileFingerprint:
    """What changes when a file is rewritten, replaced (Kubernetes swaps a symlink) or removed."""

    inode: int
    size: int
    mtime_ns: int


def fingerprint(path: Path) -> FileFingerprint | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return FileFingerprint(inode=stat.st_ino, size=stat.st_size, mtime_ns=stat.st_mtime_ns)


class CredentialDirectory:
    """Reads the credential directory, re-parsing only the files whose fingerprint changed.

    A file that fails to parse keeps its last good version (a half-written file must not lock a team out) and is
    tried again on the next scan.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._seen: dict[Path, tuple[FileFingerprint, Account | Train]] = {}

    def scan(self) -> tuple[CredentialSnapshot, bool]:
        """Blocking: run it in a thread. Returns the snapshot and whether anything changed since the last scan."""
        changed = False
        current: dict[Path, tuple[FileFingerprint, Account | Train]] = {}
        for path, name, is_account in self._candidate_files():
            stamp = fingerprint(path)
            if stamp is None:
                continue
            previous = self._seen.get(path)
            if previous is not None and previous[0] == stamp:
                current[path] = previous
                continue
            try:
                data = orjson.loads(path.read_bytes())
                parsed: Account | Train = (
                    parse_account(name, data, str(path)) if is_account else parse_train(name, data, str(path))
                )
            except (OSError, orjson.JSONDecodeError) as error:
                log.error("cannot read credential file %s: %s", path, type(error).__name__)
                if previous is not None:
                    current[path] = (FileFingerprint(-1, -1, -1), previous[1])
                continue
            except CredentialError as error:
                log.error("ignoring credential file: %s", error)
                if previous is not None:
                    current[path] = (FileFingerprint(-1, -1, -1), previous[1])
                continue
            current[path] = (stamp, parsed)
            changed = True
            log.info("loaded %s %s", "account" if is_account else "train", name)
        removed = set(self._seen) - set(current)
        for path in removed:
            log.info("credential file removed: %s", path)
        changed = changed or bool(removed)
        self._seen = current
        return self._snapshot(), changed

    def _snapshot(self) -> CredentialSnapshot:
        trains: dict[str, Train] = {}
        accounts: dict[str, Account] = {}
        for _, item in self._seen.values():
            if isinstance(item, Train):
                trains[item.train_id] = item
            else:
                accounts[item.name] = item
        return CredentialSnapshot(trains=trains, accounts=accounts)

    def _candidate_files(self) -> list[tuple[Path, str, bool]]:
        found: list[tuple[Path, str, bool]] = []
        try:
            base = self.root.resolve()
        except OSError:
            return found
        for folder, suffix, is_account in (
            ("accounts", ACCOUNT_SUFFIX, True),
            ("trains", TRAIN_SUFFIX, False),
        ):
            directory = base / folder
            try:
                entries = sorted(os.listdir(directory))
            except OSError:
                continue
            for entry in entries:
                if entry.startswith(".") or not entry.endswith(suffix):
                    continue
                name = entry.removesuffix(suffix)
                if not is_identifier(name):
                    log.warning("ignoring %s/%s: the name is not a valid identifier", folder, entry)
                    continue
                path = directory / entry
                try:
                    real = path.resolve()
                except OSError:
                    continue
                if not real.is_relative_to(base):
                    log.warning("ignoring %s/%s: it points outside the credentials directory", folder, entry)
                    continue
                found.append((path, name, is_account))
        return found


def train_document(
    auth: AuthMode,
    client_key_digests: Iterable[bytes] = (),
    accounts: Iterable[str] = (),
    default_account: str | None = None,
    slack: SlackSettings | None = None,
) -> dict[str, Any]:
    """The JSON document of a train file (used by the CLI and the operator, so both write the same format)."""
    document: dict[str, Any] = {"auth": str(auth)}
    digests = [digest.hex() for digest in client_key_digests]
    if digests:
        document["client_key_sha256"] = digests
    if accounts:
        document["accounts"] = list(accounts)
    if default_account:
        document["default_account"] = default_account
    if slack is not None:
        document["slack"] = {
            "webhook_url": slack.webhook_url,
            "channel": slack.channel,
            "enabled": slack.enabled,
        }
    return document
