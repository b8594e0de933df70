"""One reconciliation of one Train: read what it references, write its two Secrets, report its status and events.

Level-triggered and idempotent: it compares what the cluster holds with what the builders want and writes only the
difference, so running it again (after a restart, a missed event, a periodic resync) changes nothing. Writes use
the resourceVersion that was read, so a concurrent change fails with 409 and the next run starts from the new state.

When the Train cannot be served (a missing Secret, a conflict with another Train), its last good credential Secret
stays as it is, so a typo in a Train does not lock its team out; only replaced client keys still expire on time.
Status, events and log lines name Secrets and keys, never their values.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

import orjson
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Secret
from lightkube.types import PatchType

from prompttrain import metrics
from prompttrain.credential_sources import TRAIN_DOCUMENT_KEY
from prompttrain.credentials import (
    AuthMode,
    CredentialError,
    SlackSettings,
    digest_client_key,
    generate_client_key,
    parse_train,
    train_document,
)
from prompttrain.operator.builders import (
    Claim,
    KeyPlan,
    Report,
    TrainRef,
    account_document,
    client_key_secret,
    client_key_secret_name,
    client_keys_summary,
    credential_secret,
    credential_secret_name,
    find_conflict,
    format_time,
    is_owned_by,
    key_state,
    merged_secret,
    next_deadline,
    plan_client_keys,
    retiring_keys,
    seconds_until,
    secret_differs,
    status_patch,
    train_status,
)
from prompttrain.operator.spec import (
    ANNOTATION_RETIRING,
    ANNOTATION_ROTATE,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    NotReadyError,
    SecretKeyRef,
    TrainSpec,
    parse_spec,
)

log = logging.getLogger(__name__)

TrainResource = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)

# (the Train's body, "Normal" | "Warning", reason, message): posts a Kubernetes event about the Train.
EventSink = Callable[[Mapping[str, Any], str, str, str], None]


def as_secret(manifest: Mapping[str, Any]) -> Secret:
    return cast(Secret, Secret.from_dict(dict(manifest)))


def _utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class SecretReader:
    """The Secrets one reconciliation reads, each fetched once."""

    def __init__(self, client: AsyncClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self._found: dict[str, dict[str, Any] | None] = {}

    async def get(self, name: str) -> dict[str, Any] | None:
        if name not in self._found:
            try:
                secret = await self.client.get(Secret, name, namespace=self.namespace)
                self._found[name] = secret.to_dict()
            except ApiError as error:
                if error.status.code != 404:
                    raise
                self._found[name] = None
        return self._found[name]

    async def value(self, ref: SecretKeyRef, purpose: str) -> bytes:
        """The bytes under `ref`; NotReadyError names the Secret and key when either is missing."""
        try:
            secret = await self.get(ref.name)
        except ApiError as error:
            raise NotReadyError(
                "SecretUnreadable", f"{purpose}: Secret {ref.name} cannot be read ({error.status.code})"
            ) from None
        if secret is None:
            raise NotReadyError("SecretNotFound", f"{purpose}: Secret {ref.name} not found")
        encoded = (secret.get("data") or {}).get(ref.key)
        if encoded is None:
            raise NotReadyError("SecretKeyNotFound", f"{purpose}: Secret {ref.name} has no key {ref.key}")
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise NotReadyError("SecretKeyNotFound", f"{purpose}: {ref.describe()} is not valid base64") from None

    async def text(self, ref: SecretKeyRef, purpose: str) -> str:
        try:
            text = (await self.value(ref, purpose)).decode("utf-8").strip()
        except UnicodeDecodeError:
            text = ""
        if not text:
            raise NotReadyError("InvalidSecretValue", f"{purpose}: {ref.describe()} is empty or not UTF-8 text")
        return text


class Reconciler:
    def __init__(
        self,
        client: AsyncClient,
        *,
        resync_seconds: float,
        emit: EventSink,
        clock: Callable[[], datetime] = _utc_now,
        new_key: Callable[[], str] = generate_client_key,
    ) -> None:
        self.client = client
        self.resync_seconds = resync_seconds
        self.emit = emit
        self.clock = clock
        self.new_key = new_key

    async def reconcile(self, body: Mapping[str, Any], others: Iterable[Mapping[str, Any]]) -> float:
        """Bring one Train's Secrets and status up to date; returns the seconds until it should run again."""
        train = TrainRef.from_body(body)
        now = self.clock()
        reader = SecretReader(self.client, train.namespace)
        try:
            spec = parse_spec(train.name, body.get("spec") or {})
        except NotReadyError as problem:
            await self.report(body, Report(False, problem.reason, problem.message), now)
            return self.resync_seconds
        try:
            report, deadline = await self._converge(train, body, spec, others, reader, now)
        except NotReadyError as problem:
            deadline = await self._expire_only(train, reader, now)
            report = Report(False, problem.reason, problem.message, train_id=spec.train_id, accounts=len(spec.accounts))
        await self.report(body, report, now)
        return seconds_until(deadline, now, self.resync_seconds)

    async def _converge(
        self,
        train: TrainRef,
        body: Mapping[str, Any],
        spec: TrainSpec,
        others: Iterable[Mapping[str, Any]],
        reader: SecretReader,
        now: datetime,
    ) -> tuple[Report, datetime | None]:
        mine = Claim.of(body, spec)
        conflict = find_conflict(mine, (claim for other in others if (claim := Claim.of(other)))) if mine else None
        if conflict is not None:
            raise conflict
        credentials_name, keys_name = credential_secret_name(train.name), client_key_secret_name(train.name)
        existing_credentials, existing_keys = await reader.get(credentials_name), await reader.get(keys_name)
        for name, existing in ((credentials_name, existing_credentials), (keys_name, existing_keys)):
            if existing is not None and not is_owned_by(existing, train):
                raise NotReadyError("SecretConflict", f"Secret {name} already exists and does not belong to this Train")

        accounts = {
            account.name: account_document(account, await reader.value(account.ref, f"account {account.name}"))
            for account in spec.accounts
        }
        referenced = [digest_client_key(await reader.text(ref, "client key")) for ref in spec.client_keys.refs]
        slack = None
        if spec.slack is not None:
            slack = SlackSettings(
                webhook_url=await reader.text(spec.slack.webhook, "slack webhook"),
                channel=spec.slack.channel,
                enabled=spec.slack.enabled,
            )

        keys_spec = spec.client_keys
        if spec.auth is AuthMode.PASSTHROUGH:
            # Passthrough clients bring their own Anthropic credential: generated keys are withdrawn.
            keys_spec = replace(keys_spec, generate=0, rotate_after=None)
        annotations = (body.get("metadata") or {}).get("annotations") or {}
        plan = plan_client_keys(
            key_state(existing_keys, existing_credentials),
            keys_spec,
            annotations.get(ANNOTATION_ROTATE),
            now,
            self.new_key,
        )
        digests = list(dict.fromkeys([*plan.state.digests(), *referenced]))
        document = train_document(spec.auth, digests, list(accounts), spec.default_account, slack)
        try:
            parse_train(spec.train_id, document, f"Train {train.name}")  # exactly what the proxy will accept
        except CredentialError as error:
            raise NotReadyError("InvalidSpec", str(error)) from None

        keys_written = await self._write(
            train, keys_name, existing_keys, client_key_secret(train, plan.state) if plan.state.issued else None
        )
        credentials_written = await self._write(
            train,
            credentials_name,
            existing_credentials,
            credential_secret(train, spec.train_id, document, accounts, plan.state.retiring),
        )
        self._key_events(body, plan, keys_name, keys_written is not None, credentials_written is not None)
        if credentials_written is not None:
            reason = "CredentialsCreated" if credentials_written == "created" else "CredentialsUpdated"
            self.emit(
                body, "Normal", reason, f"Secret {credentials_name} {credentials_written} for train {spec.train_id}"
            )

        summary = client_keys_summary(plan, len(referenced), keys_spec) if spec.auth is AuthMode.CLIENT_KEYS else None
        ready, reason = True, "Reconciled"
        message = f"train {spec.train_id} ({spec.auth}): {len(accounts)} account(s)"
        if spec.auth is AuthMode.CLIENT_KEYS:
            message += f", {len(digests)} client key(s) accepted"
        message += f"; credentials in Secret {credentials_name}"
        if spec.auth is AuthMode.CLIENT_KEYS and not digests:
            ready, reason = False, "NoClientKeys"
            message = "auth is client-keys, but spec.clientKeys generates no key and references none"
        report = Report(
            ready,
            reason,
            message,
            train_id=spec.train_id,
            accounts=len(spec.accounts),
            credential_secret=credentials_name,
            client_key_secret=keys_name if plan.state.issued else None,
            client_keys=summary,
        )
        return report, next_deadline(plan.state, keys_spec)

    def _key_events(
        self, body: Mapping[str, Any], plan: KeyPlan, keys_name: str, keys_written: bool, credentials_written: bool
    ) -> None:
        """Events for what the plan did, once written: the keys live in one Secret, their digests in the other."""
        if plan.expired and credentials_written:
            self.emit(
                body,
                "Normal",
                "ClientKeysExpired",
                f"{plan.expired} replaced client key(s) reached the end of their overlap window and no longer work",
            )
        if not keys_written:
            return
        until = format_time(max(key.until for key in plan.state.retiring)) if plan.state.retiring else None
        if plan.generated:
            self.emit(body, "Normal", "ClientKeysGenerated", f"{plan.generated} client key(s) generated in {keys_name}")
        if plan.rotated:
            self.emit(
                body,
                "Normal",
                "ClientKeysRotated",
                f"{plan.rotated} client key(s) rotated in {keys_name}; the replaced keys stay valid until {until}",
            )
        if plan.withdrawn:
            self.emit(
                body,
                "Normal",
                "ClientKeysWithdrawn",
                f"{plan.withdrawn} client key(s) no longer generated; they stay valid until {until}",
            )

    async def _write(
        self, train: TrainRef, name: str, existing: Mapping[str, Any] | None, desired: dict[str, Any] | None
    ) -> str | None:
        """Create, replace or delete one owned Secret; returns what was done, None when it was already right."""
        if desired is None:
            if existing is None:
                return None
            await self.client.delete(Secret, name, namespace=train.namespace)
            log.info("deleted Secret %s/%s", train.namespace, name)
            return "deleted"
        if existing is None:
            await self.client.create(as_secret(desired))
            log.info("created Secret %s/%s", train.namespace, name)
            return "created"
        if not secret_differs(existing, desired):
            return None
        await self.client.replace(as_secret(merged_secret(existing, desired)))
        log.info("updated Secret %s/%s", train.namespace, name)
        return "updated"

    async def _expire_only(self, train: TrainRef, reader: SecretReader, now: datetime) -> datetime | None:
        """While the Train is not Ready: drop replaced keys whose overlap ended from its last good Secret."""
        name = credential_secret_name(train.name)
        existing = await reader.get(name)
        if existing is None or not is_owned_by(existing, train):
            return None
        retiring = retiring_keys(existing)
        expired = {key.sha256 for key in retiring if key.until <= now}
        remaining = [key for key in retiring if key.until > now]
        if expired:
            data = dict(existing.get("data") or {})
            try:
                document = orjson.loads(base64.b64decode(data[TRAIN_DOCUMENT_KEY]))
            except (KeyError, binascii.Error, ValueError):
                return None
            document["client_key_sha256"] = [
                digest for digest in document.get("client_key_sha256") or [] if digest not in expired
            ]
            data[TRAIN_DOCUMENT_KEY] = base64.b64encode(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).decode()
            metadata = dict(existing.get("metadata") or {})
            annotations = dict(metadata.get("annotations") or {})
            listed = [{"sha256": key.sha256, "until": format_time(key.until)} for key in remaining]
            annotations[ANNOTATION_RETIRING] = orjson.dumps(listed).decode()
            if not remaining:
                del annotations[ANNOTATION_RETIRING]
            updated = {**existing, "data": data, "metadata": {**metadata, "annotations": annotations}}
            await self.client.replace(as_secret(updated))
            log.info("expired %d replaced client key(s) in Secret %s/%s", len(expired), train.namespace, name)
        return min((key.until for key in remaining), default=None)

    async def report(self, body: Mapping[str, Any], report: Report, now: datetime) -> None:
        """Patch the status subresource if it changed; post an event when the Ready condition changes."""
        metadata = body.get("metadata") or {}
        previous = body.get("status") or {}
        status = train_status(previous, report, metadata.get("generation"), now)
        patch = status_patch(previous, status)
        if patch is None:
            return
        metrics.OPERATOR_RECONCILIATIONS.labels("true" if report.ready else "false", report.reason).inc()
        await self.client.patch(
            TrainResource.Status,
            str(metadata.get("name")),
            {"status": patch},
            namespace=str(metadata.get("namespace")),
            patch_type=PatchType.MERGE,
        )
        old: Mapping[str, Any] = next(
            (item for item in previous.get("conditions") or [] if item.get("type") == "Ready"), {}
        )
        if (old.get("status"), old.get("reason"), old.get("message")) != (
            "True" if report.ready else "False",
            report.reason,
            report.message,
        ):
            self.emit(body, "Normal" if report.ready else "Warning", report.reason, report.message)
