"""Test support for tests/k8s: kubectl, reading Trains, Secrets and events, ServiceAccount kubeconfigs."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from lightkube import Client
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Secret, ServiceAccount

from prompttrain.operator.reconciler import TrainResource
from tests.helpers import REPO, wait_until

CRD = REPO / "operator" / "crd.yaml"
EXAMPLES = REPO / "operator" / "examples" / "train.yaml"
RBAC = REPO / "operator" / "rbac"


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def apply(namespace: str, *manifests: Mapping[str, Any], check: bool = True) -> subprocess.CompletedProcess[str]:
    """`kubectl apply` of manifests, as a user would apply a file."""
    text = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(manifests)})
    return kubectl("apply", "-n", namespace, "-f", "-", stdin=text, check=check)


def train(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "prompttrain.io/v1alpha1", "kind": "Train", "metadata": {"name": name}, "spec": spec}


def secret(name: str, **values: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque", "stringData": values}


def get_train(client: Client, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return dict(client.get(TrainResource, name, namespace=namespace))
    except ApiError as error:
        if error.status.code == 404:
            return None
        raise


def ready(client: Client, namespace: str, name: str) -> tuple[str, str, str] | None:
    """The Train's Ready condition as (status, reason, message), once the operator has seen this generation."""
    body = get_train(client, namespace, name)
    if body is None:
        return None
    status = body.get("status") or {}
    if status.get("observedGeneration") != body["metadata"].get("generation"):
        return None
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition["status"], condition.get("reason", ""), condition.get("message", "")
    return None


def wait_ready(
    client: Client, namespace: str, name: str, status: str = "True", reason: str | None = None, timeout: float = 20.0
) -> str:
    """Wait for the Ready condition to have `status` (and `reason`, if given); returns its reason."""
    found: list[tuple[str, str, str] | None] = [None]

    def reached() -> bool:
        found[0] = ready(client, namespace, name)
        return found[0] is not None and found[0][0] == status and reason in (None, found[0][1])

    try:
        wait_until(reached, timeout=timeout, interval=0.1)
    except AssertionError:
        raise AssertionError(f"Train {namespace}/{name}: Ready is {found[0]}, not {status} {reason}") from None
    condition = found[0]
    assert condition is not None
    return condition[1]


def secret_data(client: Client, namespace: str, name: str) -> dict[str, bytes] | None:
    try:
        found = client.get(Secret, name, namespace=namespace)
    except ApiError as error:
        if error.status.code == 404:
            return None
        raise
    return {key: base64.b64decode(value) for key, value in (found.data or {}).items()}


def wait_secret(client: Client, namespace: str, name: str, timeout: float = 20.0) -> dict[str, bytes]:
    found: list[dict[str, bytes] | None] = [None]

    def exists() -> bool:
        found[0] = secret_data(client, namespace, name)
        return found[0] is not None

    wait_until(exists, timeout=timeout, interval=0.1)
    data = found[0]
    assert data is not None
    return data


def events(namespace: str) -> list[dict[str, Any]]:
    listed = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json").stdout)
    return list(listed.get("items") or [])


def train_events(namespace: str, name: str) -> list[tuple[str, str, str]]:
    return [
        (item.get("type", ""), item.get("reason", ""), item.get("message", ""))
        for item in events(namespace)
        if item.get("involvedObject", {}).get("kind") == "Train" and item["involvedObject"].get("name") == name
    ]


def service_account_kubeconfig(client: Client, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as a ServiceAccount (its token Secret, as Kubernetes 1.20 creates it),
    against the cluster of the current kubeconfig: what a pod with that ServiceAccount would be allowed to do."""
    token_secret: list[str] = []

    def has_token() -> bool:
        found = client.get(ServiceAccount, account, namespace=namespace)
        token_secret[:] = [ref.name for ref in found.secrets or [] if ref.name]
        return bool(token_secret)

    wait_until(has_token, timeout=30, interval=0.2)
    data = wait_secret(client, namespace, token_secret[0])
    source = yaml.safe_load(Path(os.environ.get("KUBECONFIG", Path.home() / ".kube" / "config")).read_text())
    context = next(item for item in source["contexts"] if item["name"] == source["current-context"])["context"]
    cluster = next(item for item in source["clusters"] if item["name"] == context["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": account, "user": {"token": data["token"].decode()}}],
        "contexts": [
            {"name": account, "context": {"cluster": cluster["name"], "user": account, "namespace": namespace}}
        ],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def eventually_gone(client: Client, namespace: str, names: list[str], timeout: float) -> float:
    """Wait until none of the Secrets exists; returns how long it took."""
    started = time.monotonic()
    wait_until(lambda: all(secret_data(client, namespace, name) is None for name in names), timeout, 0.25)
    return time.monotonic() - started
