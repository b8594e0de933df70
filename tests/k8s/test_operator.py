"""The Train operator against a real API server: CRD validation, Secrets, status, events, rotation, deletion."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from kopf.testing import KopfRunner
from lightkube import Client
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta

from prompttrain.credential_sources import parse_credential_secret
from prompttrain.credentials import ApiKeyAccount, AuthMode, OAuthAccount, client_key_matches, digest_client_key
from prompttrain.operator.reconciler import TrainResource
from tests.helpers import wait_until
from tests.k8s.kube import (
    EXAMPLES,
    apply,
    eventually_gone,
    get_train,
    kubectl,
    ready,
    secret,
    secret_data,
    train,
    train_events,
    wait_ready,
    wait_secret,
)

pytestmark = pytest.mark.usefixtures("operator")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def credentials(kube: Client, namespace: str, name: str) -> tuple[Any, dict[str, Any]]:
    data = wait_secret(kube, namespace, f"{name}-credentials")
    from base64 import b64encode

    return parse_credential_secret(name, {key: b64encode(value).decode() for key, value in data.items()})


# --- the CRD --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ({"accounts": [{"name": "team"}]}, "oneOf"),  # an account without a Secret reference
        ({"auth": "sometimes"}, "spec.auth"),
        ({"trainId": "acme/eu"}, "spec.trainId"),
        ({"accounts": [{"name": "bad name", "apiKeySecretRef": {"name": "k"}}]}, "spec.accounts.name"),
        (
            {"accounts": [{"name": "a", "apiKeySecretRef": {"name": "Not_A_Secret"}}]},
            "spec.accounts.apiKeySecretRef.name",
        ),
        ({"clientKeys": {"rotateAfter": "a month"}}, "spec.clientKeys.rotateAfter"),
        ({"clientKeys": {"generate": 100}}, "spec.clientKeys.generate"),
        ({"slack": {"channel": "#x"}}, "webhookSecretRef"),
    ],
)
def test_the_api_server_rejects_invalid_specs(
    kube: Client, operator_namespace: str, spec: dict[str, Any], complaint: str
) -> None:
    body = TrainResource(metadata=ObjectMeta(name=unique("invalid")), spec=spec)
    with pytest.raises(ApiError) as raised:
        kube.create(body, namespace=operator_namespace)
    assert raised.value.status.code == 422
    assert complaint in str(raised.value.status.message)


def test_kubectl_apply_reports_the_invalid_field(operator_namespace: str) -> None:
    result = apply(operator_namespace, train(unique("invalid"), accounts=[{"name": "team"}]), check=False)
    assert result.returncode != 0
    assert "spec.accounts" in result.stderr and "Invalid value" in result.stderr


# --- apply: Secrets, status, events -----------------------------------------------------------------------------------


def test_the_examples_become_ready_trains_with_their_secrets(kube: Client, operator_namespace: str) -> None:
    started = time.monotonic()
    kubectl("apply", "-n", operator_namespace, "-f", str(EXAMPLES))
    for name in ("acme", "research", "playground"):
        assert wait_ready(kube, operator_namespace, name) == "Reconciled"
    elapsed = time.monotonic() - started
    assert elapsed < 15, f"the examples took {elapsed:.1f}s to become ready"

    table = kubectl("get", "tr", "-n", operator_namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "ACCOUNTS", "AGE"]
    rows = {line.split()[0]: line.split()[1:3] for line in table[1:]}
    assert rows["acme"] == ["True", "1"] and rows["research"] == ["True", "2"] and rows["playground"] == ["True", "0"]

    # acme: an API-key account and two generated keys; the proxy's parser accepts the Secret as it is.
    acme, accounts = credentials(kube, operator_namespace, "acme")
    assert (acme.train_id, acme.auth, acme.accounts, acme.default_account) == (
        "acme",
        AuthMode.CLIENT_KEYS,
        ("team-api",),
        "team-api",
    )
    assert accounts == {"team-api": ApiKeyAccount("team-api", "sk-ant-api03-REPLACE-ME")}
    keys = wait_secret(kube, operator_namespace, "acme-client-keys")
    assert sorted(keys) == ["client-key-1", "client-key-2"]
    for key in keys.values():
        assert key.startswith(b"pt_") and client_key_matches(key.decode(), acme.client_key_digests)

    # research: an OAuth account from Claude Code's credentials file, and the shared API-key account.
    research, accounts = credentials(kube, operator_namespace, "research")
    assert research.train_id == "research-team" and research.accounts == ("research-max", "team-api")
    assert isinstance(accounts["research-max"], OAuthAccount)
    assert accounts["research-max"].tokens.refresh_token == "sk-ant-ort01-REPLACE-ME"

    playground, accounts = credentials(kube, operator_namespace, "playground")
    assert playground.auth is AuthMode.PASSTHROUGH and accounts == {}
    assert secret_data(kube, operator_namespace, "playground-client-keys") is None

    # Owner references make the Train the Secrets' controller; only the credential Secret has the proxy's label.
    body = get_train(kube, operator_namespace, "acme")
    assert body is not None
    for name, proxy_label in (("acme-credentials", "train"), ("acme-client-keys", None)):
        found = json.loads(kubectl("get", "secret", name, "-n", operator_namespace, "-o", "json").stdout)
        owners = found["metadata"]["ownerReferences"]
        assert [(o["kind"], o["name"], o["uid"], o["controller"]) for o in owners] == [
            ("Train", "acme", body["metadata"]["uid"], True)
        ]
        assert found["metadata"]["labels"].get("prompttrain.io/credentials") == proxy_label

    status = body["status"]
    assert status["credentialSecret"] == "acme-credentials" and status["clientKeySecret"] == "acme-client-keys"
    assert status["clientKeys"]["generated"] == 2 and status["observedGeneration"] == body["metadata"]["generation"]

    # Events tell what happened, and neither they nor the status hold any key material.
    wait_until(lambda: len(train_events(operator_namespace, "acme")) >= 3, timeout=10)
    reasons = {reason for _, reason, _ in train_events(operator_namespace, "acme")}
    assert {"ClientKeysGenerated", "CredentialsCreated", "Reconciled"} <= reasons
    visible = json.dumps(status) + json.dumps(train_events(operator_namespace, "acme"))
    for key in keys.values():
        assert key.decode() not in visible and digest_client_key(key.decode()).hex() not in visible
    assert "REPLACE-ME" not in visible


def test_a_missing_secret_is_reported_then_picked_up_when_created(kube: Client, operator_namespace: str) -> None:
    name, account_secret = unique("late"), unique("late-key")
    account = {"name": f"{name}-api", "apiKeySecretRef": {"name": account_secret}}
    apply(operator_namespace, train(name, accounts=[account], clientKeys={"generate": 1}))

    wait_ready(kube, operator_namespace, name, status="False", reason="SecretNotFound")
    message = ready(kube, operator_namespace, name)
    assert message is not None and f"Secret {account_secret} not found" in message[2]
    assert secret_data(kube, operator_namespace, f"{name}-credentials") is None
    wait_until(lambda: ("Warning", "SecretNotFound") in {e[:2] for e in train_events(operator_namespace, name)}, 10)

    # A Secret without the expected key: still not ready, with a reason that says so.
    apply(operator_namespace, secret(account_secret, wrong="sk-ant-api03-x"))
    wait_ready(kube, operator_namespace, name, status="False", reason="SecretKeyNotFound")
    apply(operator_namespace, secret(account_secret, **{"api-key": "sk-ant-api03-late"}))
    assert wait_ready(kube, operator_namespace, name) == "Reconciled"
    _, accounts = credentials(kube, operator_namespace, name)
    assert accounts[f"{name}-api"] == ApiKeyAccount(f"{name}-api", "sk-ant-api03-late")

    # A changed account Secret reaches the credential Secret without touching the Train.
    apply(operator_namespace, secret(account_secret, **{"api-key": "sk-ant-api03-changed"}))
    wait_until(
        lambda: (
            b"sk-ant-api03-changed"
            in (secret_data(kube, operator_namespace, f"{name}-credentials") or {}).get("accounts.json", b"")
        ),
        timeout=15,
    )


def test_an_update_rewrites_the_credential_secret(kube: Client, operator_namespace: str) -> None:
    name = unique("update")
    apply(
        operator_namespace,
        secret(f"{name}-a", **{"api-key": "sk-a"}),
        secret(f"{name}-b", **{"api-key": "sk-b"}),
        train(
            name, accounts=[{"name": f"{name}-a", "apiKeySecretRef": {"name": f"{name}-a"}}], clientKeys={"generate": 1}
        ),
    )
    wait_ready(kube, operator_namespace, name)
    keys_before = wait_secret(kube, operator_namespace, f"{name}-client-keys")

    apply(
        operator_namespace,
        train(
            name,
            trainId=f"{name}:v2",
            accounts=[
                {"name": f"{name}-a", "apiKeySecretRef": {"name": f"{name}-a"}},
                {"name": f"{name}-b", "apiKeySecretRef": {"name": f"{name}-b"}},
            ],
            defaultAccount=f"{name}-b",
            clientKeys={"generate": 1},
        ),
    )

    def updated() -> bool:
        found, _ = credentials(kube, operator_namespace, name)
        return bool(found.train_id == f"{name}:v2")

    wait_until(updated, timeout=15)
    found, accounts = credentials(kube, operator_namespace, name)
    assert found.accounts == (f"{name}-a", f"{name}-b") and found.default_account == f"{name}-b"
    assert sorted(accounts) == [f"{name}-a", f"{name}-b"]
    assert wait_secret(kube, operator_namespace, f"{name}-client-keys") == keys_before  # keys are not touched
    wait_ready(kube, operator_namespace, name)  # and the status follows the new generation
    body = get_train(kube, operator_namespace, name)
    assert body is not None and body["status"]["trainId"] == f"{name}:v2" and body["status"]["accounts"] == 2

    # An edit of an owned Secret by someone else is undone.
    hijack = '{"stringData": {"train-id": "hijacked"}}'
    kubectl("patch", "secret", f"{name}-credentials", "-n", operator_namespace, "--type=merge", "-p", hijack)
    wait_until(updated, timeout=15)

    # A rule the schema cannot express: defaultAccount must be one of the accounts.
    apply(
        operator_namespace,
        train(name, accounts=[{"name": f"{name}-a", "apiKeySecretRef": {"name": f"{name}-a"}}], defaultAccount="nope"),
    )
    wait_ready(kube, operator_namespace, name, status="False", reason="InvalidSpec")
    found, _ = credentials(kube, operator_namespace, name)
    assert found.train_id == f"{name}:v2"  # the last good credentials stay in use


def test_two_trains_cannot_give_one_account_name_two_secrets(kube: Client, operator_namespace: str) -> None:
    older, younger, account = unique("older"), unique("younger"), unique("acct")
    apply(
        operator_namespace, secret(f"{older}-s", **{"api-key": "sk-1"}), secret(f"{younger}-s", **{"api-key": "sk-2"})
    )
    apply(operator_namespace, train(older, accounts=[{"name": account, "apiKeySecretRef": {"name": f"{older}-s"}}]))
    wait_ready(kube, operator_namespace, older, status="False")  # NoClientKeys: no key generated or referenced
    time.sleep(1.1)  # creation timestamps have one-second resolution: make the order unambiguous
    apply(operator_namespace, train(younger, accounts=[{"name": account, "apiKeySecretRef": {"name": f"{younger}-s"}}]))

    wait_ready(kube, operator_namespace, younger, status="False", reason="AccountConflict")
    condition = ready(kube, operator_namespace, younger)
    assert (
        condition is not None and f"account {account} is Secret {older}-s key api-key in Train {older}" in condition[2]
    )
    assert ready(kube, operator_namespace, older) is not None

    kubectl("delete", "train", older, "-n", operator_namespace)
    wait_ready(kube, operator_namespace, younger, status="False", reason="NoClientKeys")


# --- client keys: rotation ------------------------------------------------------------------------------------------


def generated_key(kube: Client, namespace: str, name: str) -> str:
    return wait_secret(kube, namespace, f"{name}-client-keys")["client-key-1"].decode()


def accepted(kube: Client, namespace: str, name: str) -> tuple[bytes, ...]:
    found, _ = credentials(kube, namespace, name)
    return tuple(found.client_key_digests)


def test_a_rotation_request_keeps_the_old_key_valid_for_the_overlap(kube: Client, operator_namespace: str) -> None:
    name = unique("rotate")
    apply(
        operator_namespace,
        secret(f"{name}-s", **{"api-key": "sk-rot"}),
        train(
            name,
            accounts=[{"name": f"{name}-api", "apiKeySecretRef": {"name": f"{name}-s"}}],
            clientKeys={"generate": 1, "overlap": "4s"},
        ),
    )
    wait_ready(kube, operator_namespace, name)
    old = generated_key(kube, operator_namespace, name)

    kubectl("annotate", "train", name, "-n", operator_namespace, "prompttrain.io/rotate-client-keys=first")
    wait_until(lambda: generated_key(kube, operator_namespace, name) != old, timeout=10)
    new = generated_key(kube, operator_namespace, name)
    digests = accepted(kube, operator_namespace, name)
    assert client_key_matches(old, digests) and client_key_matches(new, digests)  # the overlap
    retiring = json.loads(
        kubectl(
            "get",
            "secret",
            f"{name}-credentials",
            "-n",
            operator_namespace,
            "-o",
            "jsonpath={.metadata.annotations.prompttrain\\.io/retiring-client-keys}",
        ).stdout
    )
    assert [item["sha256"] for item in retiring] == [digest_client_key(old).hex()]
    until = datetime.strptime(retiring[0]["until"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)

    wait_until(lambda: not client_key_matches(old, accepted(kube, operator_namespace, name)), timeout=15)
    assert datetime.now(UTC) >= until  # not before its overlap window ended
    assert client_key_matches(new, accepted(kube, operator_namespace, name))
    wait_until(lambda: "ClientKeysExpired" in {e[1] for e in train_events(operator_namespace, name)}, timeout=10)
    assert "ClientKeysRotated" in {e[1] for e in train_events(operator_namespace, name)}


def test_rotate_after_replaces_keys_on_schedule(kube: Client, operator_namespace: str) -> None:
    name = unique("schedule")
    apply(
        operator_namespace,
        secret(f"{name}-s", **{"api-key": "sk-sched"}),
        secret(f"{name}-ci", key="pt_team_managed_key"),
        train(
            name,
            accounts=[{"name": f"{name}-api", "apiKeySecretRef": {"name": f"{name}-s"}}],
            clientKeys={
                "generate": 1,
                "rotateAfter": "3s",
                "overlap": "1h",
                "secretRefs": [{"name": f"{name}-ci", "key": "key"}],
            },
        ),
    )
    wait_ready(kube, operator_namespace, name)
    first = generated_key(kube, operator_namespace, name)
    wait_until(lambda: generated_key(kube, operator_namespace, name) != first, timeout=15)
    second = generated_key(kube, operator_namespace, name)
    digests = accepted(kube, operator_namespace, name)  # read after the key: it has this key (or even a newer one)
    assert client_key_matches(first, digests)  # still inside its one-hour overlap
    assert client_key_matches(second, digests)
    assert client_key_matches("pt_team_managed_key", digests)  # referenced keys are the team's own business
    body = get_train(kube, operator_namespace, name)
    assert body is not None and body["status"]["clientKeys"]["referenced"] == 1


# --- deletion -------------------------------------------------------------------------------------------------------


def test_deleting_a_train_garbage_collects_its_secrets(
    kube: Client, operator_namespace: str, operator: KopfRunner
) -> None:
    name = unique("delete")
    apply(
        operator_namespace,
        secret(f"{name}-s", **{"api-key": "sk-del"}),
        train(
            name,
            accounts=[{"name": f"{name}-api", "apiKeySecretRef": {"name": f"{name}-s"}}],
            clientKeys={"generate": 1},
        ),
    )
    wait_ready(kube, operator_namespace, name)
    owned = [f"{name}-credentials", f"{name}-client-keys"]
    assert all(secret_data(kube, operator_namespace, secret_name) is not None for secret_name in owned)

    kubectl("delete", "train", name, "-n", operator_namespace, "--wait=true")
    # A CRD created moments ago is unknown to the garbage collector until its next 30 s discovery resync.
    eventually_gone(kube, operator_namespace, owned, timeout=60)
    assert secret_data(kube, operator_namespace, f"{name}-s") is not None  # not the Train's: kept


def test_reconciliations_are_counted_in_the_operators_metrics(kube: Client, operator_namespace: str) -> None:
    from prometheus_client import REGISTRY

    def reconciled() -> float:
        return (
            REGISTRY.get_sample_value(
                "prompttrain_operator_reconciliations_total", {"ready": "true", "reason": "Reconciled"}
            )
            or 0.0
        )

    before = reconciled()
    name = unique("metrics")
    apply(operator_namespace, train(name, auth="passthrough"))
    assert wait_ready(kube, operator_namespace, name) == "Reconciled"
    assert reconciled() > before
