"""The Train custom resource: its API names, the labels and annotations the operator uses, and the spec as data.

The API server validates a Train against the CRD's structural schema (operator/crd.yaml) before the operator sees
it; `parse_spec` checks again what the schema cannot express (Kubernetes 1.20 has no CEL): the default account
must be one of the accounts, and a client-keys train needs an account. It raises `NotReadyError`, the one exception of
the operator's pure code: a reason (CamelCase, as Kubernetes conditions use) and a message for the Ready condition.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any

from prompttrain.credentials import AuthMode, is_identifier

GROUP = "prompttrain.io"
VERSION = "v1alpha1"
PLURAL = "trains"
KIND = "Train"
API_VERSION = f"{GROUP}/{VERSION}"

MANAGER = "prompttrain-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_TRAIN = "prompttrain.io/train"
# The proxy selects on this label (CREDENTIALS_LABEL_SELECTOR); only credential Secrets carry it.
LABEL_CREDENTIALS = "prompttrain.io/credentials"
CREDENTIALS_LABEL_VALUE = "train"
LABEL_CLIENT_KEYS = "prompttrain.io/client-keys"

# On a Train: any new value asks for every generated client key to be rotated now.
ANNOTATION_ROTATE = "prompttrain.io/rotate-client-keys"
# On the client-key Secret: when each key was issued, and the last rotation request honoured.
ANNOTATION_ISSUED = "prompttrain.io/issued-at"
ANNOTATION_ROTATION_REQUEST = "prompttrain.io/rotation-request"
# On the credential Secret: digests of replaced keys that stay valid until their overlap window ends.
ANNOTATION_RETIRING = "prompttrain.io/retiring-client-keys"

DEFAULT_API_KEY_KEY = "api-key"
DEFAULT_OAUTH_KEY = "credentials.json"
DEFAULT_WEBHOOK_KEY = "webhook-url"
DEFAULT_OVERLAP = timedelta(hours=24)
MAX_GENERATED_KEYS = 16

DURATION = re.compile(r"^(?:[0-9]+[smhd])+$")
DURATION_PART = re.compile(r"([0-9]+)([smhd])")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class NotReadyError(Exception):
    """The Train cannot be served as it stands; `reason` and the message go into its Ready condition."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class AccountKind(StrEnum):
    API_KEY = "api-key"
    OAUTH = "oauth"


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str

    def describe(self) -> str:
        return f"Secret {self.name} key {self.key}"


@dataclass(frozen=True)
class AccountSpec:
    name: str
    kind: AccountKind
    ref: SecretKeyRef


@dataclass(frozen=True)
class ClientKeysSpec:
    generate: int = 0
    refs: tuple[SecretKeyRef, ...] = ()
    rotate_after: timedelta | None = None
    overlap: timedelta = DEFAULT_OVERLAP


@dataclass(frozen=True)
class SlackSpec:
    webhook: SecretKeyRef
    channel: str | None = None
    enabled: bool = True


@dataclass(frozen=True)
class TrainSpec:
    train_id: str
    auth: AuthMode
    accounts: tuple[AccountSpec, ...] = ()
    default_account: str | None = None
    client_keys: ClientKeysSpec = ClientKeysSpec()
    slack: SlackSpec | None = None

    def referenced_secrets(self) -> set[str]:
        names = {account.ref.name for account in self.accounts} | {ref.name for ref in self.client_keys.refs}
        if self.slack is not None:
            names.add(self.slack.webhook.name)
        return names


def parse_duration(text: Any, field: str) -> timedelta:
    """`30d`, `720h`, `1h30m`, `45s`: what `spec.clientKeys.rotateAfter` and `overlap` accept."""
    if not isinstance(text, str) or not DURATION.match(text):
        raise NotReadyError("InvalidSpec", f"{field} must be a duration such as 30d, 12h, 1h30m or 45s")
    seconds = sum(int(amount) * UNIT_SECONDS[unit] for amount, unit in DURATION_PART.findall(text))
    if seconds <= 0:
        raise NotReadyError("InvalidSpec", f"{field} must be longer than zero")
    return timedelta(seconds=seconds)


def _secret_ref(block: Any, field: str, default_key: str | None) -> SecretKeyRef:
    if not isinstance(block, Mapping):
        raise NotReadyError("InvalidSpec", f"{field} must name a Secret")
    name, key = block.get("name"), block.get("key", default_key)
    if not isinstance(name, str) or not DNS_SUBDOMAIN.match(name):
        raise NotReadyError("InvalidSpec", f"{field}.name must be a Secret name")
    if not isinstance(key, str) or not SECRET_KEY.match(key):
        raise NotReadyError("InvalidSpec", f"{field}.key must be a Secret data key")
    return SecretKeyRef(name=name, key=key)


def _identifier(value: Any, field: str) -> str:
    if not isinstance(value, str) or not is_identifier(value):
        raise NotReadyError("InvalidSpec", f"{field} must match ^[A-Za-z0-9._:-]+$")
    return value


def _account(block: Any, index: int) -> AccountSpec:
    field = f"spec.accounts[{index}]"
    if not isinstance(block, Mapping):
        raise NotReadyError("InvalidSpec", f"{field} must be an object")
    name = _identifier(block.get("name"), f"{field}.name")
    api_key, oauth = block.get("apiKeySecretRef"), block.get("oauthSecretRef")
    if (api_key is None) == (oauth is None):
        raise NotReadyError("InvalidSpec", f"{field} needs exactly one of apiKeySecretRef and oauthSecretRef")
    if api_key is not None:
        return AccountSpec(
            name, AccountKind.API_KEY, _secret_ref(api_key, f"{field}.apiKeySecretRef", DEFAULT_API_KEY_KEY)
        )
    return AccountSpec(name, AccountKind.OAUTH, _secret_ref(oauth, f"{field}.oauthSecretRef", DEFAULT_OAUTH_KEY))


def _client_keys(block: Any) -> ClientKeysSpec:
    if block is None:
        return ClientKeysSpec()
    if not isinstance(block, Mapping):
        raise NotReadyError("InvalidSpec", "spec.clientKeys must be an object")
    generate = block.get("generate", 0)
    if isinstance(generate, bool) or not isinstance(generate, int) or not 0 <= generate <= MAX_GENERATED_KEYS:
        raise NotReadyError("InvalidSpec", f"spec.clientKeys.generate must be a number from 0 to {MAX_GENERATED_KEYS}")
    refs = block.get("secretRefs") or []
    if not isinstance(refs, list):
        raise NotReadyError("InvalidSpec", "spec.clientKeys.secretRefs must be a list")
    rotate_after = block.get("rotateAfter")
    return ClientKeysSpec(
        generate=generate,
        refs=tuple(_secret_ref(ref, f"spec.clientKeys.secretRefs[{i}]", None) for i, ref in enumerate(refs)),
        rotate_after=None if rotate_after is None else parse_duration(rotate_after, "spec.clientKeys.rotateAfter"),
        overlap=parse_duration(block.get("overlap", "24h"), "spec.clientKeys.overlap"),
    )


def _slack(block: Any) -> SlackSpec | None:
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise NotReadyError("InvalidSpec", "spec.slack must be an object")
    channel = block.get("channel")
    if channel is not None and not isinstance(channel, str):
        raise NotReadyError("InvalidSpec", "spec.slack.channel must be a string")
    return SlackSpec(
        webhook=_secret_ref(block.get("webhookSecretRef"), "spec.slack.webhookSecretRef", DEFAULT_WEBHOOK_KEY),
        channel=channel,
        enabled=bool(block.get("enabled", True)),
    )


def parse_spec(name: str, spec: Mapping[str, Any]) -> TrainSpec:
    """The Train's spec as data; `name` is the Train's name, the train id when `spec.trainId` is not set."""
    train_id = _identifier(spec.get("trainId", name), "spec.trainId" if "trainId" in spec else "metadata.name")
    try:
        auth = AuthMode(spec.get("auth", AuthMode.CLIENT_KEYS))
    except ValueError:
        raise NotReadyError("InvalidSpec", "spec.auth must be client-keys or passthrough") from None
    listed = spec.get("accounts") or []
    if not isinstance(listed, list):
        raise NotReadyError("InvalidSpec", "spec.accounts must be a list")
    accounts = tuple(_account(block, index) for index, block in enumerate(listed))
    names = [account.name for account in accounts]
    if len(set(names)) != len(names):
        raise NotReadyError("InvalidSpec", "spec.accounts names must be unique")
    default = spec.get("defaultAccount")
    if default is not None:
        default = _identifier(default, "spec.defaultAccount")
        if default not in names:
            raise NotReadyError("InvalidSpec", f"spec.defaultAccount '{default}' is not one of spec.accounts")
    if auth is AuthMode.CLIENT_KEYS and not accounts:
        raise NotReadyError("InvalidSpec", "auth client-keys needs at least one account in spec.accounts")
    return TrainSpec(
        train_id=train_id,
        auth=auth,
        accounts=accounts,
        default_account=default,
        client_keys=_client_keys(spec.get("clientKeys")),
        slack=_slack(spec.get("slack")),
    )
