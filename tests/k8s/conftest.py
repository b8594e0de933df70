"""Fixtures for the tests against a real Kubernetes API server (the cluster of KUBECONFIG).

Without a reachable cluster (or without kubectl) these tests are skipped, and under CI=true they fail: .ci/run
starts the cluster. The CRD is applied once per session, as early as possible, because the controller-manager's
garbage collector notices a brand-new CRD only at its next discovery resync (up to 30 s).
"""

from __future__ import annotations

import gc
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator

import pytest
from kopf.testing import KopfRunner
from lightkube import Client
from lightkube.core.exceptions import ApiError, ConfigError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace

from tests.helpers import IN_CI
from tests.k8s.kube import CRD, kubectl

HOW_TO_START = 'start one: sudo ../shared/k8s/cluster.sh up && eval "$(../shared/k8s/cluster.sh env)"'


def _cluster_problem() -> str | None:
    if shutil.which("kubectl") is None:
        return "kubectl is not installed (sudo ../shared/k8s/tools.sh)"
    try:
        with Client(timeout=5) as client:
            client.get(Namespace, "default")
    except (ConfigError, OSError, KeyError) as error:
        return f"no kubeconfig ({type(error).__name__}: {error})"
    except Exception as error:  # noqa: BLE001 - any failure means "no cluster"; reported below
        return f"{type(error).__name__}: {error}"
    return None


@pytest.fixture(scope="session")
def kube() -> Iterator[Client]:
    """An admin client for the cluster of KUBECONFIG."""
    problem = _cluster_problem()
    if problem is not None:
        message = f"no Kubernetes API server for tests/k8s (KUBECONFIG={os.environ.get('KUBECONFIG')}): {problem}"
        if IN_CI:
            pytest.fail(message + " — CI must start the cluster (.ci/run)")
        pytest.skip(message + "; " + HOW_TO_START)
    with Client(field_manager="prompttrain-tests") as client:
        yield client


@pytest.fixture(scope="session")
def crd(kube: Client) -> None:
    kubectl("apply", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established", "crd/trains.prompttrain.io", "--timeout=60s")


def create_namespace(client: Client, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    client.create(Namespace(metadata=ObjectMeta(name=name, labels={"app.kubernetes.io/part-of": "prompttrain-tests"})))
    return name


def delete_namespace(client: Client, name: str) -> None:
    try:
        client.delete(Namespace, name)
    except ApiError as error:
        if error.status.code != 404:
            raise


@pytest.fixture
def namespace(kube: Client, crd: None) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (Kubernetes finishes that in the background)."""
    name = create_namespace(kube, "pt-test")
    yield name
    delete_namespace(kube, name)


@pytest.fixture(scope="session")
def operator_namespace(kube: Client, crd: None) -> Iterator[str]:
    """The namespace the in-process operator serves; tests give their Trains distinct names."""
    name = create_namespace(kube, "pt-operator")
    yield name
    delete_namespace(kube, name)


@pytest.fixture(scope="session")
def operator(operator_namespace: str) -> Iterator[KopfRunner]:
    """The real operator, run by kopf's own test runner in a thread: `kopf run -m prompttrain.operator`."""
    args = ["run", "-m", "prompttrain.operator", "--standalone", "--namespace", operator_namespace]
    with KopfRunner(args, timeout=60) as runner:
        yield runner
    # kopf's watch connections, aborted when the runner stops, are closed only when collected: collect them now,
    # as the expected leftovers of a stopped operator, rather than at interpreter exit where they fail the run.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    assert runner.exit_code == 0, runner.output
