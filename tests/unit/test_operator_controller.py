"""When the operator reconciles a Train: watch events, referenced Secrets, deadlines, failures, deletion."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from prompttrain.operator.controller import TrainController


def train(name: str, generation: int = 1, secret: str = "anthropic", **extra: Any) -> dict[str, Any]:  # noqa: S107 - test data
    return {
        "metadata": {"namespace": "team", "name": name, "uid": f"uid-{name}", "generation": generation, **extra},
        "spec": {"accounts": [{"name": "a", "apiKeySecretRef": {"name": secret}}]},
    }


def secret(name: str, namespace: str = "team") -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name}}


class Recorder:
    """A reconcile function that records calls and answers with a scripted delay (or raises)."""

    def __init__(self, delay: float = 3600.0) -> None:
        self.calls: list[tuple[str, int, list[str]]] = []
        self.delay = delay
        self.fail_next = 0
        self.block: asyncio.Event | None = None

    async def __call__(self, body: Mapping[str, Any], others: list[Mapping[str, Any]]) -> float:
        metadata = body["metadata"]
        self.calls.append((metadata["name"], metadata["generation"], [o["metadata"]["name"] for o in others]))
        if self.block is not None:
            await self.block.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("API server said no")
        return self.delay

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


async def settle(seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_train_is_reconciled_on_sight_and_again_only_when_its_essence_changes() -> None:
    recorder = Recorder()
    controller = TrainController(recorder, resync_seconds=3600)
    try:
        controller.observe_train(None, train("acme"))
        await until(lambda: len(recorder.calls) == 1)

        # The operator's own status update: no new reconciliation.
        controller.observe_train("MODIFIED", {**train("acme"), "status": {"accounts": 1}})
        await settle()
        assert len(recorder.calls) == 1

        controller.observe_train("MODIFIED", train("acme", generation=2))
        await until(lambda: len(recorder.calls) == 2)
        rotate = {"annotations": {"prompttrain.io/rotate-client-keys": "now"}}
        controller.observe_train("MODIFIED", train("acme", generation=2, **rotate))
        await until(lambda: len(recorder.calls) == 3)
        assert [generation for _, generation, _ in recorder.calls] == [1, 2, 2]
    finally:
        await controller.close()


async def test_secrets_wake_the_trains_that_reference_or_own_them() -> None:
    recorder = Recorder()
    controller = TrainController(recorder, resync_seconds=3600)
    try:
        controller.observe_train(None, train("acme", secret="acme-key"))
        controller.observe_train(None, train("other", secret="other-key"))
        await until(lambda: len(recorder.calls) == 2)
        assert sorted(others[0] for _, _, others in recorder.calls) == ["acme", "other"]  # they see each other

        controller.observe_secret("MODIFIED", secret("acme-key"))
        await until(lambda: len(recorder.calls) == 3)
        assert recorder.calls[-1][0] == "acme"

        controller.observe_secret("MODIFIED", secret("unrelated"))
        controller.observe_secret("MODIFIED", secret("acme-key", namespace="elsewhere"))
        await settle()
        assert len(recorder.calls) == 3

        controller.observe_secret("DELETED", secret("other-credentials"))  # someone deleted it: write it again
        await until(lambda: len(recorder.calls) == 4)
        assert recorder.calls[-1][0] == "other"
        controller.observe_secret("MODIFIED", secret("acme-client-keys"))  # edited: check it
        await until(lambda: len(recorder.calls) == 5)
        assert recorder.calls[-1][0] == "acme"
    finally:
        await controller.close()


async def test_the_deadline_returned_by_a_reconciliation_brings_the_next_one() -> None:
    recorder = Recorder(delay=0.2)
    controller = TrainController(recorder, resync_seconds=3600)
    try:
        started = time.monotonic()
        controller.observe_train(None, train("acme"))
        await until(lambda: len(recorder.calls) == 3)
        assert time.monotonic() - started >= 0.4
    finally:
        await controller.close()


async def test_the_resync_interval_caps_the_wait_and_failures_are_retried() -> None:
    recorder = Recorder(delay=3600)
    recorder.fail_next = 1
    controller = TrainController(recorder, resync_seconds=0.3)
    try:
        controller.observe_train(None, train("acme"))
        await until(lambda: len(recorder.calls) == 3, timeout=5)  # failed, retried after backoff, resynced
    finally:
        await controller.close()


async def test_a_poke_during_a_reconciliation_is_not_lost() -> None:
    recorder = Recorder()
    recorder.block = asyncio.Event()
    controller = TrainController(recorder, resync_seconds=3600)
    try:
        controller.observe_train(None, train("acme"))
        await until(lambda: len(recorder.calls) == 1)
        controller.observe_train("MODIFIED", train("acme", generation=2))  # arrives mid-reconciliation
        await settle()
        assert len(recorder.calls) == 1  # one at a time
        recorder.block.set()
        await until(lambda: len(recorder.calls) == 2)
        assert recorder.calls[-1][1] == 2
    finally:
        await controller.close()


async def test_a_deleted_train_is_forgotten_and_blocked_trains_get_another_chance() -> None:
    recorder = Recorder()
    controller = TrainController(recorder, resync_seconds=3600)
    try:
        controller.observe_train(None, train("old"))
        blocked = {**train("young"), "status": {"conditions": [{"type": "Ready", "status": "False"}]}}
        controller.observe_train(None, blocked)
        await until(lambda: len(recorder.calls) == 2)

        controller.observe_train("DELETED", train("old"))
        await until(lambda: len(recorder.calls) == 3)
        assert recorder.calls[-1][0] == "young" and recorder.calls[-1][2] == []
        assert list(controller.keys()) == [("team", "young")]

        being_deleted = train("young", deletionTimestamp="2026-01-01T00:00:00Z")
        controller.observe_train("MODIFIED", being_deleted)
        controller.observe_secret("MODIFIED", secret("anthropic"))
        await settle()
        assert len(recorder.calls) == 3
    finally:
        await controller.close()
