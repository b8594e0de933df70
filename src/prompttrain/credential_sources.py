"""Where the proxy's trains and accounts come from: the credential directory, or the Train operator's Secrets.

`CREDENTIALS_SOURCE` picks one; both parse the same documents with `credentials.parse_train` and
`credentials.parse_account` and hand the proxy the same `CredentialSnapshot`, so there is one format:

    directory   `CREDENTIALS_DIR`, re-scanned every `CREDENTIALS_RELOAD_SECONDS` (credentials.CredentialDirectory)
    kubernetes  the Secrets matching `CREDENTIALS_LABEL_SELECTOR` in `CREDENTIALS_NAMESPACE`, read through the API:
                listed once, then watched from the list's resourceVersion (a dropped watch resumes from the last
                version seen; a 410 Gone lists again). A change reaches the proxy as soon as the API reports it.

The credential Secret, written by the operator (one per Train; `credential_secret_data` builds its data):

    metadata.labels     prompttrain.io/credentials: train
    data["train-id"]      the train id
    data["train.json"]    the train document, as in trains/<train-id>.json (`credentials.train_document`)
    data["accounts.json"] {"<account>": <account document>, ...}: each value is what accounts/<account>.credentials.json
                          holds. One JSON object rather than one data key per account, because account ids may
                          contain ':' and Secret data keys may not.

An account is identified by its name alone (the OAuth refresh is coordinated per account id across replicas), so
the same account may arrive in several Secrets; the operator guarantees that one name always stands for one source
Secret, and while a change propagates, the copy received last wins. Two Secrets claiming one train id: the Secret
whose name sorts first wins, and the other is reported in the log. A Secret that fails to parse keeps its last good
version, as a file does. Errors and logs name Secrets, never their contents.

Exceptions:

    CredentialSourceError   the source cannot start (the API server is unreachable or refuses the list)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError, ConfigError
from lightkube.operators import exists
from lightkube.resources.core_v1 import Secret

from prompttrain.credentials import (
    Account,
    CredentialDirectory,
    CredentialError,
    CredentialSnapshot,
    Train,
    is_identifier,
    parse_account,
    parse_train,
)
from prompttrain.settings import Settings

log = logging.getLogger(__name__)

TRAIN_ID_KEY = "train-id"
TRAIN_DOCUMENT_KEY = "train.json"
ACCOUNTS_KEY = "accounts.json"
# How long the proxy keeps retrying its first list before it gives up and fails to start.
START_TIMEOUT_SECONDS = 30.0
MAX_BACKOFF_SECONDS = 10.0
# A watch is restarted (from the last version seen) at least this often: a connection that died without a word
# would otherwise leave the proxy waiting forever.
WATCH_RESTART_SECONDS = 300.0


class CredentialSourceError(Exception):
    """The credential source cannot start; the message says why, never what a Secret holds."""


class CredentialSource(Protocol):
    """What the proxy needs from a source of trains and accounts."""

    def describe(self) -> str:
        """Where the credentials come from, for the log."""

    async def start(self) -> None:
        """Make the first snapshot available (or raise CredentialSourceError)."""

    async def scan(self) -> tuple[CredentialSnapshot, bool]:
        """The current snapshot, and whether it changed since the previous call."""

    async def wait_for_change(self) -> None:
        """Return when `scan` may have something new (a poll interval, or a change reported by the API)."""

    async def close(self) -> None: ...


class DirectorySource:
    """`CREDENTIALS_DIR`, polled: files are compared by inode, size and mtime, so a scan is cheap."""

    def __init__(self, directory: CredentialDirectory, interval: float) -> None:
        self.directory = directory
        self.interval = interval

    def describe(self) -> str:
        return str(self.directory.root)

    async def start(self) -> None:
        return None

    async def scan(self) -> tuple[CredentialSnapshot, bool]:
        return await asyncio.to_thread(self.directory.scan)

    async def wait_for_change(self) -> None:
        await asyncio.sleep(self.interval)

    async def close(self) -> None:
        return None


def credential_secret_data(train_id: str, train: Mapping[str, Any], accounts: Mapping[str, Any]) -> dict[str, str]:
    """The `data` of a credential Secret (base64, as the API stores it): what the operator writes."""

    def encode(value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    return {
        TRAIN_ID_KEY: encode(train_id.encode("utf-8")),
        TRAIN_DOCUMENT_KEY: encode(orjson.dumps(train, option=orjson.OPT_SORT_KEYS)),
        ACCOUNTS_KEY: encode(orjson.dumps(accounts, option=orjson.OPT_SORT_KEYS)),
    }


def parse_credential_secret(name: str, data: Mapping[str, str] | None) -> tuple[Train, dict[str, Account]]:
    """The train and accounts of one credential Secret; CredentialError names the Secret and the data key."""
    source = f"Secret {name}"
    data = data or {}

    def decoded(key: str, required: bool) -> bytes | None:
        value = data.get(key)
        if value is None:
            if required:
                raise CredentialError(f"{source}: no '{key}'")
            return None
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise CredentialError(f"{source}: '{key}' is not base64") from None

    def document(key: str, raw: bytes | None) -> Any:
        if raw is None:
            return {}
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise CredentialError(f"{source}: '{key}' is not JSON") from None

    raw_id = decoded(TRAIN_ID_KEY, True) or b""
    train_id = raw_id.decode("utf-8", errors="replace").strip()
    if not is_identifier(train_id):
        raise CredentialError(f"{source}: '{TRAIN_ID_KEY}' is not a valid identifier")
    train = parse_train(train_id, document(TRAIN_DOCUMENT_KEY, decoded(TRAIN_DOCUMENT_KEY, True)), source)
    listed = document(ACCOUNTS_KEY, decoded(ACCOUNTS_KEY, False))
    if not isinstance(listed, dict):
        raise CredentialError(f"{source}: '{ACCOUNTS_KEY}' must be a JSON object")
    accounts: dict[str, Account] = {}
    for account_id, account in listed.items():
        if not is_identifier(account_id):
            raise CredentialError(f"{source}: '{ACCOUNTS_KEY}' names an invalid account identifier")
        accounts[account_id] = parse_account(account_id, account, f"{source} account {account_id}")
    return train, accounts


@dataclass(frozen=True)
class _Entry:
    train: Train
    accounts: Mapping[str, Account]
    received: int  # order of arrival: the latest copy of a shared account wins


class SecretSnapshots:
    """The parsed credential Secrets, by Secret name, and the snapshot they make (pure: no I/O)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._counter = 0
        self._changed = True

    def replace_all(self, secrets: Mapping[str, Mapping[str, str] | None]) -> None:
        """A fresh list: Secrets missing from it were deleted while nobody was watching."""
        for name in set(self._entries) - set(secrets):
            self.remove(name)
        for name, data in sorted(secrets.items()):
            self.upsert(name, data)

    def upsert(self, name: str, data: Mapping[str, str] | None) -> None:
        try:
            train, accounts = parse_credential_secret(name, data)
        except CredentialError as error:
            kept = "; keeping its last good version" if name in self._entries else ""
            log.error("ignoring credential %s%s", error, kept)
            return
        self._counter += 1
        self._entries[name] = _Entry(train, accounts, self._counter)
        self._changed = True
        log.info("loaded train %s from Secret %s", train.train_id, name)

    def remove(self, name: str) -> None:
        if self._entries.pop(name, None) is not None:
            self._changed = True
            log.info("credential Secret %s removed", name)

    def take(self) -> tuple[CredentialSnapshot, bool]:
        changed, self._changed = self._changed, False
        return self.snapshot(), changed

    def snapshot(self) -> CredentialSnapshot:
        trains: dict[str, Train] = {}
        for name in sorted(self._entries):
            train = self._entries[name].train
            if train.train_id in trains:
                log.warning("Secret %s claims train %s, which another Secret already has", name, train.train_id)
                continue
            trains[train.train_id] = train
        accounts: dict[str, Account] = {}
        for entry in sorted(self._entries.values(), key=lambda item: item.received):
            accounts.update(entry.accounts)
        return CredentialSnapshot(trains=trains, accounts=accounts)


class KubernetesSecretSource:
    """The operator's credential Secrets in one namespace, listed and then watched through the Kubernetes API.

    Credentials come from the in-cluster ServiceAccount, else from `KUBECONFIG` (or ~/.kube/config). The proxy
    needs get, list and watch on Secrets in its namespace, nothing else (operator/rbac/proxy.yaml).
    """

    def __init__(self, namespace: str | None, label_selector: str) -> None:
        self.label_selector = label_selector
        self.namespace = namespace
        self.secrets = SecretSnapshots()
        self._client: AsyncClient | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def describe(self) -> str:
        return f"Secrets labelled {self.label_selector} in namespace {self.namespace}"

    async def start(self) -> None:
        try:
            self._client = AsyncClient(field_manager="prompttrain-proxy")
        except (ConfigError, OSError, KeyError) as error:
            raise CredentialSourceError(f"no Kubernetes configuration ({type(error).__name__}: {error})") from None
        if self.namespace is None:
            self.namespace = str(self._client.namespace)
        log.info("reading credentials from %s", self.describe())
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        attempt = 0
        while True:
            try:
                version = await self._list()
                break
            except Exception as error:  # noqa: BLE001 - any failure to list is retried, then reported
                attempt += 1
                if time.monotonic() >= deadline:
                    raise CredentialSourceError(
                        f"cannot list {self.describe()}: {type(error).__name__}: {error}"
                    ) from None
                log.warning("cannot list credential Secrets yet (%s); retrying", type(error).__name__)
                await asyncio.sleep(min(0.5 * 2**attempt, MAX_BACKOFF_SECONDS))
        self._watcher = asyncio.create_task(self._watch(version), name="credential-secret-watch")

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise CredentialSourceError("the Kubernetes credential source was not started")
        return self._client

    async def _list(self) -> str:
        listing = self.client.list(Secret, namespace=self.namespace, labels=self._labels())
        found: dict[str, Mapping[str, str] | None] = {}
        async for secret in listing:
            if secret.metadata is not None and secret.metadata.name:
                found[secret.metadata.name] = secret.data
        self.secrets.replace_all(found)
        self._changed.set()
        return str(listing.resourceVersion)

    def _labels(self) -> dict[str, Any]:
        """`key=value` and bare `key` terms of the selector, as lightkube takes them."""
        labels: dict[str, Any] = {}
        for term in filter(None, (part.strip() for part in self.label_selector.split(","))):
            key, sep, value = term.partition("=")
            labels[key.strip()] = value.strip().lstrip("=") if sep else exists()
        return labels

    async def _watch(self, version: str) -> None:
        """Follow changes from `version` on; a broken stream resumes from the last version it delivered."""
        failures = 0
        while True:
            try:
                async with asyncio.timeout(WATCH_RESTART_SECONDS):
                    async for kind, secret in self.client.watch(
                        Secret, namespace=self.namespace, labels=self._labels(), resource_version=version
                    ):
                        failures = 0
                        if secret.metadata is None or not secret.metadata.name:
                            continue
                        version = secret.metadata.resourceVersion or version
                        if kind == "DELETED":
                            self.secrets.remove(secret.metadata.name)
                        else:
                            self.secrets.upsert(secret.metadata.name, secret.data)
                        self._changed.set()
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                continue
            except ApiError as error:
                if error.status.code == 410:
                    # The version fell out of the API server's window: events were missed, so list again.
                    log.info("credential Secret watch expired; listing again")
                    with contextlib.suppress(Exception):
                        version = await self._list()
                        continue
                failures += 1
                log.warning("credential Secret watch failed (%s %s)", error.status.code, error.status.reason)
            except Exception as error:  # noqa: BLE001 - network trouble: resume after a pause, keep the snapshot
                failures += 1
                log.warning("credential Secret watch interrupted (%s); resuming", type(error).__name__)
            await asyncio.sleep(min(0.5 * 2**failures, MAX_BACKOFF_SECONDS))

    async def scan(self) -> tuple[CredentialSnapshot, bool]:
        return self.secrets.take()

    async def wait_for_change(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._client is not None:
            await self._client.close()


def open_credential_source(settings: Settings) -> CredentialSource:
    """The source that `CREDENTIALS_SOURCE` names (not started yet)."""
    if settings.credentials_source == "kubernetes":
        return KubernetesSecretSource(settings.credentials_namespace, settings.credentials_label_selector)
    return DirectorySource(CredentialDirectory(settings.credentials_dir), settings.credentials_reload_seconds)
