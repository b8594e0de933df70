"""Pure builders of the Train operator: account documents, the two Secrets, the client-key plan, status, conflicts.

Nothing here talks to the API server: reconciler.py reads the cluster, calls these and writes what they return.
Manifests are plain dicts, as `kubectl get -o json` shows them, so tests compare them directly.

The Secrets of a Train `<name>` (both owned by the Train, so deleting it deletes them):

    <name>-credentials   what the proxy reads, labelled prompttrain.io/credentials=train: the train id, the train
                         document with client key digests, the account documents
                         (credential_sources.credential_secret_data: the same documents as the credential directory)
    <name>-client-keys   for the team: the generated client keys in plaintext, data keys client-key-1 … client-key-N.
                         The proxy never reads it, and no digest is kept in it.

Client keys: `plan_client_keys` decides, from what the Secrets hold now, which keys to keep, generate, rotate and
retire. A replaced key's digest stays in the credential Secret (annotation prompttrain.io/retiring-client-keys) until
its overlap window ends, so clients can switch to the new key without an outage.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from prompttrain.credential_sources import credential_secret_data
from prompttrain.credentials import CredentialError, digest_client_key, generate_client_key, parse_account
from prompttrain.operator.spec import (
    ANNOTATION_ISSUED,
    ANNOTATION_RETIRING,
    ANNOTATION_ROTATION_REQUEST,
    API_VERSION,
    CREDENTIALS_LABEL_VALUE,
    KIND,
    LABEL_CLIENT_KEYS,
    LABEL_CREDENTIALS,
    LABEL_MANAGED_BY,
    LABEL_PART_OF,
    LABEL_TRAIN,
    MANAGER,
    AccountKind,
    AccountSpec,
    ClientKeysSpec,
    NotReadyError,
    SecretKeyRef,
    TrainSpec,
    parse_spec,
)

SLOT_PREFIX = "client-key-"
SLOT = re.compile(r"^client-key-([0-9]+)$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
OPERATOR_ANNOTATIONS = (ANNOTATION_ISSUED, ANNOTATION_ROTATION_REQUEST, ANNOTATION_RETIRING)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def credential_secret_name(train: str) -> str:
    return f"{train}-credentials"


def client_key_secret_name(train: str) -> str:
    return f"{train}-client-keys"


@dataclass(frozen=True)
class TrainRef:
    """The identity of one Train object."""

    namespace: str
    name: str
    uid: str

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> TrainRef:
        metadata = body.get("metadata") or {}
        return cls(
            namespace=str(metadata.get("namespace")), name=str(metadata.get("name")), uid=str(metadata.get("uid"))
        )


# --- accounts -----------------------------------------------------------------------------------------------------


def oauth_block(data: Any) -> Any:
    """The OAuth block of Claude Code's ~/.claude/.credentials.json (`claudeAiOauth`), of an account file
    (`{"type": "oauth", "oauth": ...}`), or the bare block itself."""
    if isinstance(data, dict):
        if isinstance(data.get("claudeAiOauth"), dict):
            return data["claudeAiOauth"]
        if data.get("type") == "oauth" and isinstance(data.get("oauth"), dict):
            return data["oauth"]
    return data


def account_document(account: AccountSpec, value: bytes) -> dict[str, Any]:
    """The account file's document for the value of the account's Secret key; checked with `parse_account`."""
    where = f"account {account.name} ({account.ref.describe()})"
    document: dict[str, Any]
    if account.kind is AccountKind.API_KEY:
        try:
            text = value.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise NotReadyError("InvalidAccountSecret", f"{where} is not UTF-8 text") from None
        document = {"type": "api_key", "api_key": text}
    else:
        try:
            data = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise NotReadyError("InvalidAccountSecret", f"{where} is not JSON") from None
        document = {"type": "oauth", "oauth": oauth_block(data)}
    try:
        parse_account(account.name, document, where)
    except CredentialError as error:
        # The message names the Secret and the field, never a value.
        raise NotReadyError("InvalidAccountSecret", str(error)) from None
    return document


# --- client keys --------------------------------------------------------------------------------------------------


def slot_name(index: int) -> str:
    return f"{SLOT_PREFIX}{index}"


@dataclass(frozen=True)
class IssuedKey:
    slot: str
    key: str = field(repr=False)
    issued_at: datetime

    @property
    def digest(self) -> bytes:
        return digest_client_key(self.key)


@dataclass(frozen=True)
class RetiringKey:
    """A replaced key: its digest is still accepted until `until`."""

    sha256: str
    until: datetime


@dataclass(frozen=True)
class KeyState:
    """The generated keys in use, the replaced keys still accepted, and the last rotation request honoured."""

    issued: tuple[IssuedKey, ...] = ()
    retiring: tuple[RetiringKey, ...] = ()
    request: str | None = None

    def digests(self) -> list[bytes]:
        return [key.digest for key in self.issued] + [bytes.fromhex(key.sha256) for key in self.retiring]


@dataclass(frozen=True)
class KeyPlan:
    state: KeyState
    generated: int = 0  # keys for slots that had none
    rotated: int = 0  # keys replaced (their old key is retiring)
    withdrawn: int = 0  # slots no longer wanted (their key is retiring)
    expired: int = 0  # retiring keys whose overlap window ended: they no longer work


def plan_client_keys(
    current: KeyState,
    spec: ClientKeysSpec,
    request: str | None,
    now: datetime,
    new_key: Callable[[], str] = generate_client_key,
) -> KeyPlan:
    """Keep, generate, rotate and retire generated keys.

    A key is rotated when `rotateAfter` has passed since it was issued, or when `request` (the Train's
    prompttrain.io/rotate-client-keys annotation) differs from the last request honoured. Replaced and withdrawn
    keys stay valid for `overlap`; retiring keys whose window ended are dropped.
    """
    retiring = [key for key in current.retiring if key.until > now]
    expired = len(current.retiring) - len(retiring)
    until = now + spec.overlap
    by_slot = {key.slot: key for key in current.issued}
    wanted = [slot_name(index) for index in range(1, spec.generate + 1)]
    # The first keys of a Train are new anyway: a request present from the start is recorded, not acted on.
    rotate_all = request is not None and request != current.request and bool(current.issued)
    issued: list[IssuedKey] = []
    generated = rotated = withdrawn = 0
    for slot in wanted:
        key = by_slot.get(slot)
        if key is None:
            issued.append(IssuedKey(slot, new_key(), now))
            generated += 1
        elif rotate_all or (spec.rotate_after is not None and now >= key.issued_at + spec.rotate_after):
            retiring.append(RetiringKey(key.digest.hex(), until))
            issued.append(IssuedKey(slot, new_key(), now))
            rotated += 1
        else:
            issued.append(key)
    for slot, key in by_slot.items():
        if slot not in wanted:
            retiring.append(RetiringKey(key.digest.hex(), until))
            withdrawn += 1
    state = KeyState(issued=tuple(issued), retiring=tuple(retiring), request=request)
    return KeyPlan(state, generated=generated, rotated=rotated, withdrawn=withdrawn, expired=expired)


def next_deadline(state: KeyState, spec: ClientKeysSpec) -> datetime | None:
    """When the plan would change next on its own: a key due for rotation, or an overlap window ending."""
    moments = [key.until for key in state.retiring]
    if spec.rotate_after is not None:
        moments.extend(key.issued_at + spec.rotate_after for key in state.issued)
    return min(moments, default=None)


def _decode(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True).decode("utf-8").strip()
    except (binascii.Error, ValueError):
        return None


def _json(value: Any, default: Any) -> Any:
    if not isinstance(value, str):
        return default
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return default


def _metadata(manifest: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (manifest or {}).get("metadata") or {}


def retiring_keys(credential_secret: Mapping[str, Any] | None) -> tuple[RetiringKey, ...]:
    listed = _json((_metadata(credential_secret).get("annotations") or {}).get(ANNOTATION_RETIRING), [])
    found: list[RetiringKey] = []
    for item in listed if isinstance(listed, list) else []:
        if not isinstance(item, dict):
            continue
        digest, until = item.get("sha256"), parse_time(item.get("until"))
        if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) and until is not None:
            found.append(RetiringKey(digest, until))
    return tuple(found)


def key_state(client_key_secret: Mapping[str, Any] | None, credential_secret: Mapping[str, Any] | None) -> KeyState:
    """What the two Secrets hold now. A key whose issue time is unknown counts as old: it is due for rotation."""
    issued: list[IssuedKey] = []
    request: str | None = None
    if client_key_secret is not None:
        annotations = _metadata(client_key_secret).get("annotations") or {}
        times = _json(annotations.get(ANNOTATION_ISSUED), {})
        times = times if isinstance(times, dict) else {}
        data = client_key_secret.get("data") or {}
        slots = sorted((int(match[1]), slot) for slot in data if (match := SLOT.match(slot)))
        for _, slot in slots:
            key = _decode(data[slot])
            if key:
                issued.append(IssuedKey(slot, key, parse_time(times.get(slot)) or EPOCH))
        request = annotations.get(ANNOTATION_ROTATION_REQUEST)
    return KeyState(issued=tuple(issued), retiring=retiring_keys(credential_secret), request=request)


# --- Secrets ------------------------------------------------------------------------------------------------------


def owner_reference(train: TrainRef) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": train.name, "uid": train.uid, "controller": True}


def is_owned_by(manifest: Mapping[str, Any], train: TrainRef) -> bool:
    return any(ref.get("uid") == train.uid for ref in _metadata(manifest).get("ownerReferences") or [])


def base_labels(train: TrainRef) -> dict[str, str]:
    labels = {LABEL_MANAGED_BY: MANAGER, LABEL_PART_OF: "prompttrain"}
    if len(train.name) <= 63 and LABEL_VALUE.match(train.name):
        labels[LABEL_TRAIN] = train.name
    return labels


def _encode(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def credential_secret(
    train: TrainRef,
    train_id: str,
    document: Mapping[str, Any],
    accounts: Mapping[str, Any],
    retiring: Sequence[RetiringKey] = (),
) -> dict[str, Any]:
    annotations: dict[str, str] = {}
    if retiring:
        listed = [{"sha256": key.sha256, "until": format_time(key.until)} for key in retiring]
        annotations[ANNOTATION_RETIRING] = orjson.dumps(listed).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": credential_secret_name(train.name),
            "namespace": train.namespace,
            "labels": {**base_labels(train), LABEL_CREDENTIALS: CREDENTIALS_LABEL_VALUE},
            "annotations": annotations,
            "ownerReferences": [owner_reference(train)],
        },
        "data": credential_secret_data(train_id, document, accounts),
    }


def client_key_secret(train: TrainRef, state: KeyState) -> dict[str, Any]:
    annotations = {
        ANNOTATION_ISSUED: orjson.dumps({key.slot: format_time(key.issued_at) for key in state.issued}).decode()
    }
    if state.request is not None:
        annotations[ANNOTATION_ROTATION_REQUEST] = state.request
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": client_key_secret_name(train.name),
            "namespace": train.namespace,
            "labels": {**base_labels(train), LABEL_CLIENT_KEYS: "generated"},
            "annotations": annotations,
            "ownerReferences": [owner_reference(train)],
        },
        "data": {key.slot: _encode(key.key) for key in state.issued},
    }


def merged_secret(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """`desired`, keeping what others added to the metadata (labels, annotations, owners), for a replace that
    fails with 409 if the Secret changed since it was read (its resourceVersion)."""
    old, new = _metadata(existing), desired["metadata"]
    annotations = {
        key: value for key, value in (old.get("annotations") or {}).items() if key not in OPERATOR_ANNOTATIONS
    }
    desired_owner = new["ownerReferences"][0]
    owners = [ref for ref in old.get("ownerReferences") or [] if ref.get("uid") != desired_owner["uid"]]
    metadata = {
        **new,
        "labels": {**(old.get("labels") or {}), **new["labels"]},
        "annotations": {**annotations, **new["annotations"]},
        "ownerReferences": [*owners, desired_owner],
        "resourceVersion": old.get("resourceVersion"),
    }
    return {**desired, "metadata": metadata}


def secret_differs(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    merged = merged_secret(existing, desired)
    old = _metadata(existing)
    return (
        (existing.get("data") or {}) != merged["data"]
        or existing.get("type", "Opaque") != merged["type"]
        or (old.get("labels") or {}) != merged["metadata"]["labels"]
        or (old.get("annotations") or {}) != merged["metadata"]["annotations"]
        or desired["metadata"]["ownerReferences"][0] not in (old.get("ownerReferences") or [])
    )


# --- conflicts between Trains ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """What a Train claims in its namespace: a train id, and account names bound to Secret keys."""

    train: str
    created: str
    train_id: str
    accounts: Mapping[str, SecretKeyRef]

    @classmethod
    def of(cls, body: Mapping[str, Any], spec: TrainSpec | None = None) -> Claim | None:
        metadata = body.get("metadata") or {}
        name = str(metadata.get("name"))
        if spec is None:
            try:
                spec = parse_spec(name, body.get("spec") or {})
            except NotReadyError:
                return None
        return cls(
            train=name,
            created=str(metadata.get("creationTimestamp") or ""),
            train_id=spec.train_id,
            accounts={account.name: account.ref for account in spec.accounts},
        )


def find_conflict(mine: Claim, others: Iterable[Claim]) -> NotReadyError | None:
    """Train ids and account names are shared by every Train in a namespace: the older Train keeps a train id,
    and an account name, once bound to a Secret key by an older Train, stands for that key alone (so the OAuth
    refresh of one credential is coordinated under one account id). The younger Train is the one not Ready."""
    rule = "an account name stands for one Secret key in a namespace"
    for other in sorted(others, key=lambda claim: (claim.created, claim.train)):
        if (other.created, other.train) >= (mine.created, mine.train):
            continue
        if other.train_id == mine.train_id:
            return NotReadyError("TrainIdConflict", f"train id {mine.train_id} already belongs to Train {other.train}")
        for name, ref in mine.accounts.items():
            theirs = other.accounts.get(name)
            if theirs is not None and theirs != ref:
                return NotReadyError(
                    "AccountConflict", f"account {name} is {theirs.describe()} in Train {other.train} ({rule})"
                )
            for their_name, their_ref in other.accounts.items():
                if their_ref == ref and their_name != name:
                    return NotReadyError(
                        "AccountConflict", f"{ref.describe()} is account {their_name} in Train {other.train} ({rule})"
                    )
    return None


# --- status -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What one reconciliation found; becomes the Train's status. Never holds key material."""

    ready: bool
    reason: str
    message: str
    train_id: str | None = None
    accounts: int | None = None
    credential_secret: str | None = None
    client_key_secret: str | None = None
    client_keys: Mapping[str, Any] | None = None


def client_keys_summary(plan: KeyPlan, referenced: int, spec: ClientKeysSpec) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "generated": len(plan.state.issued),
        "referenced": referenced,
        "retiring": len(plan.state.retiring),
    }
    if spec.rotate_after is not None and plan.state.issued:
        summary["nextRotation"] = format_time(min(key.issued_at for key in plan.state.issued) + spec.rotate_after)
    if plan.state.retiring:
        summary["retiringUntil"] = format_time(max(key.until for key in plan.state.retiring))
    return summary


def ready_condition(
    previous: Sequence[Mapping[str, Any]], report: Report, generation: int | None, now: datetime
) -> dict[str, Any]:
    status = "True" if report.ready else "False"
    old = next((item for item in previous if item.get("type") == "Ready"), None)
    since = old.get("lastTransitionTime") if old is not None and old.get("status") == status else None
    return {
        "type": "Ready",
        "status": status,
        "reason": report.reason,
        "message": report.message,
        "lastTransitionTime": since or format_time(now),
        "observedGeneration": generation,
    }


def train_status(previous: Mapping[str, Any], report: Report, generation: int | None, now: datetime) -> dict[str, Any]:
    conditions = [item for item in previous.get("conditions") or [] if isinstance(item, dict)]
    ready = ready_condition(conditions, report, generation, now)
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": [*(item for item in conditions if item.get("type") != "Ready"), ready],
    }
    optional = {
        "trainId": report.train_id,
        "accounts": report.accounts,
        "credentialSecret": report.credential_secret,
        "clientKeySecret": report.client_key_secret,
        "clientKeys": dict(report.client_keys) if report.client_keys is not None else None,
    }
    status.update({key: value for key, value in optional.items() if value is not None})
    return status


def status_patch(previous: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any] | None:
    """A merge patch from `previous` to `status` (fields that went away are set to null), or None if equal."""
    if dict(previous) == dict(status):
        return None
    return {**{key: None for key in previous if key not in status}, **status}


def seconds_until(moment: datetime | None, now: datetime, ceiling: float) -> float:
    if moment is None:
        return ceiling
    return max(0.0, min(ceiling, (moment - now).total_seconds()))
