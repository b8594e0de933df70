"""End to end in a cluster: the operator and the proxy, each with only its own RBAC (operator/rbac/), the proxy
reading credentials from the operator's Secrets (CREDENTIALS_SOURCE=kubernetes) and the fake upstream behind it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lightkube import Client

from tests.conftest import ProxyFactory
from tests.helpers import FakeUpstream, Service, free_port, wait_until
from tests.k8s.kube import (
    RBAC,
    apply,
    kubectl,
    secret,
    service_account_kubeconfig,
    train,
    wait_ready,
    wait_secret,
)

BODY: dict[str, Any] = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def rbac(namespace: str) -> str:
    kubectl("apply", "-n", namespace, "-f", str(RBAC / "operator.yaml"), "-f", str(RBAC / "proxy.yaml"))
    return namespace


def can(namespace: str, account: str, verb: str, resource: str, where: str | None = None) -> bool:
    """`kubectl auth can-i`, impersonating the ServiceAccount; `resource/subresource` checks a subresource."""
    resource, _, subresource = resource.partition("/")
    extra = [f"--subresource={subresource}"] if subresource else []
    result = kubectl(
        "auth",
        "can-i",
        verb,
        resource,
        *extra,
        "-n",
        where or namespace,
        f"--as=system:serviceaccount:{namespace}:{account}",
        check=False,
    )
    return result.stdout.strip() == "yes"


def test_the_roles_grant_only_what_each_component_needs(rbac: str) -> None:
    proxy, operator = "prompttrain-proxy", "prompttrain-operator"
    assert all(can(rbac, proxy, verb, "secrets") for verb in ("get", "list", "watch"))
    assert not any(can(rbac, proxy, verb, "secrets") for verb in ("create", "update", "delete"))
    assert not can(rbac, proxy, "list", "secrets", where="default")
    assert not can(rbac, proxy, "list", "trains.prompttrain.io")

    assert all(can(rbac, operator, verb, "trains.prompttrain.io") for verb in ("get", "list", "watch"))
    assert can(rbac, operator, "patch", "trains.prompttrain.io/status")
    assert not can(rbac, operator, "update", "trains.prompttrain.io")  # nothing but status is written to a Train
    assert all(can(rbac, operator, verb, "secrets") for verb in ("create", "update", "delete"))
    assert not can(rbac, operator, "list", "secrets", where="default")
    assert not can(rbac, operator, "list", "namespaces") and not can(
        rbac, operator, "list", "customresourcedefinitions"
    )


@pytest.fixture
def operator_process(kube: Client, rbac: str, tmp_path: Path) -> Iterator[Service]:
    """`prompttrain operator` as its own process, authenticated as the operator's ServiceAccount."""
    config = service_account_kubeconfig(kube, rbac, "prompttrain-operator", tmp_path / "operator.kubeconfig")
    port = free_port()
    service = Service(
        "operator",
        ["operator", "--namespace", rbac, "--liveness", f"http://127.0.0.1:{port}/healthz"],
        {"KUBECONFIG": str(config), "LOG_LEVEL": "info"},
        port,
        tmp_path,
    )
    try:
        yield service.wait_ready("/healthz")
    finally:
        service.stop()


def post(proxy: Service, train_id: str, key: str) -> httpx.Response:
    headers = {"train-id": train_id, "authorization": f"Bearer {key}"}
    return httpx.post(f"{proxy.url}/v1/messages", json=BODY, headers=headers, timeout=30)


def status_becomes(proxy: Service, train_id: str, key: str, status: int, timeout: float = 15.0) -> None:
    wait_until(lambda: post(proxy, train_id, key).status_code == status, timeout=timeout, interval=0.1)


def test_a_train_applied_with_kubectl_serves_requests_rotates_and_goes_away_without_a_proxy_restart(
    kube: Client,
    rbac: str,
    operator_process: Service,
    start_proxy: ProxyFactory,
    upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    proxy_config = service_account_kubeconfig(kube, rbac, "prompttrain-proxy", tmp_path / "proxy.kubeconfig")
    proxy = start_proxy(credentials_source="kubernetes", credentials_namespace=rbac, kubeconfig=str(proxy_config))
    api_key = f"sk-ant-api03-e2e-{uuid.uuid4().hex}"

    apply(
        rbac,
        secret("team-anthropic", **{"api-key": api_key}),
        train(
            "acme",
            trainId="acme:eu",
            accounts=[{"name": "team-api", "apiKeySecretRef": {"name": "team-anthropic"}}],
            clientKeys={"generate": 1, "overlap": "5s"},
        ),
    )
    wait_ready(kube, rbac, "acme")
    old = wait_secret(kube, rbac, "acme-client-keys")["client-key-1"].decode()

    status_becomes(proxy, "acme:eu", old, 200)
    sent = upstream.received()[-1]["headers"]
    assert sent["x-api-key"] == api_key and "authorization" not in sent and "train-id" not in sent
    assert post(proxy, "acme:eu", "pt_not_a_key").status_code == 401

    # Rotation: the new key works as soon as the proxy has it, and the old one until the overlap ends.
    kubectl("annotate", "train", "acme", "-n", rbac, "prompttrain.io/rotate-client-keys=1")
    wait_until(lambda: wait_secret(kube, rbac, "acme-client-keys")["client-key-1"].decode() != old, timeout=10)
    new = wait_secret(kube, rbac, "acme-client-keys")["client-key-1"].decode()
    status_becomes(proxy, "acme:eu", new, 200)
    assert post(proxy, "acme:eu", old).status_code == 200
    status_becomes(proxy, "acme:eu", old, 401)
    assert post(proxy, "acme:eu", new).status_code == 200

    # Deleting the Train: its Secrets are garbage-collected and the proxy forgets the train.
    kubectl("delete", "train", "acme", "-n", rbac)
    status_becomes(proxy, "acme:eu", new, 401, timeout=60)

    assert proxy.process.poll() is None and operator_process.process.poll() is None  # nothing restarted
    for log in (proxy.log(), operator_process.log()):
        assert old not in log and new not in log and api_key not in log
    assert "reading credentials from Secrets labelled prompttrain.io/credentials=train" in proxy.log()
