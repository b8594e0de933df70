"""The running operator's memory: the latest version of every Train, and one reconcile loop per Train.

kopf delivers every watch event (handlers.py); this module decides which Trains to reconcile and when:

- a Train is reconciled when it appears, when its generation or rotation annotation changes (its own status
  updates do not count), and when a Secret it references or one of its own Secrets changes (its own writes come
  back as events too: the reconciliation they cause finds nothing to do, and an edit by someone else is undone);
- each Train's loop runs one reconciliation at a time, and again when asked during one (no lost wake-up);
- after a reconciliation the loop sleeps until the deadline it returned (the next key rotation or the end of an
  overlap window) or the resync interval, whichever comes first; a failure is retried with backoff;
- a Train that goes away, or is being deleted, has its loop stopped: its Secrets carry owner references and are
  garbage-collected by Kubernetes, so Trains need no finalizer and can be deleted while the operator is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from prompttrain.operator.builders import client_key_secret_name, credential_secret_name
from prompttrain.operator.spec import ANNOTATION_ROTATE, NotReadyError, parse_spec

log = logging.getLogger(__name__)

TrainKey = tuple[str, str]  # (namespace, name)
# (the Train, the other Trains of its namespace) -> seconds until it should run again
Reconcile = Callable[[Mapping[str, Any], list[Mapping[str, Any]]], Awaitable[float]]
MAX_BACKOFF_SECONDS = 60.0
MIN_DELAY_SECONDS = 0.1


def train_key(body: Mapping[str, Any]) -> TrainKey:
    metadata = body.get("metadata") or {}
    return str(metadata.get("namespace")), str(metadata.get("name"))


def essence(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What, when it changes, calls for a reconciliation: not the status the operator writes itself."""
    metadata = body.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    return metadata.get("uid"), metadata.get("generation"), annotations.get(ANNOTATION_ROTATE)


def referenced_secrets(body: Mapping[str, Any]) -> set[str]:
    metadata = body.get("metadata") or {}
    try:
        return parse_spec(str(metadata.get("name")), body.get("spec") or {}).referenced_secrets()
    except NotReadyError:
        return set()


def is_ready(body: Mapping[str, Any]) -> bool:
    conditions = (body.get("status") or {}).get("conditions") or []
    return any(item.get("type") == "Ready" and item.get("status") == "True" for item in conditions)


class TrainController:
    def __init__(self, reconcile: Reconcile, resync_seconds: float) -> None:
        self.reconcile = reconcile
        self.resync_seconds = resync_seconds
        self.trains: dict[TrainKey, dict[str, Any]] = {}
        self._wake: dict[TrainKey, asyncio.Event] = {}
        self._loops: dict[TrainKey, asyncio.Task[None]] = {}

    def observe_train(self, kind: str | None, body: Mapping[str, Any]) -> None:
        """A watch event of a Train (kind None: seen in the initial listing)."""
        key = train_key(body)
        if kind == "DELETED" or (body.get("metadata") or {}).get("deletionTimestamp"):
            if self.trains.pop(key, None) is not None:
                self._stop(key)
                self._wake_blocked(key[0])  # a conflict it caused may be over
            return
        previous = self.trains.get(key)
        self.trains[key] = copy.deepcopy(dict(body))
        if previous is None or essence(previous) != essence(body):
            self.poke(key)
            if previous is not None and previous.get("spec") != body.get("spec"):
                self._wake_blocked(key[0])

    def observe_secret(self, kind: str | None, body: Mapping[str, Any]) -> None:
        """A watch event of a Secret: wake the Trains that read it or own it."""
        metadata = body.get("metadata") or {}
        namespace, name = str(metadata.get("namespace")), str(metadata.get("name"))
        for key in self.trains_using(namespace, name):
            self.poke(key)
        for key in list(self.trains):
            if key[0] == namespace and name in (credential_secret_name(key[1]), client_key_secret_name(key[1])):
                self.poke(key)

    def trains_using(self, namespace: str, secret: str) -> list[TrainKey]:
        return [key for key, body in self.trains.items() if key[0] == namespace and secret in referenced_secrets(body)]

    def poke(self, key: TrainKey) -> None:
        if key not in self.trains:
            return
        wake = self._wake.setdefault(key, asyncio.Event())
        wake.set()
        if key not in self._loops:
            self._loops[key] = asyncio.create_task(self._loop(key, wake), name=f"train-{key[0]}-{key[1]}")

    def _wake_blocked(self, namespace: str) -> None:
        for key, body in list(self.trains.items()):
            if key[0] == namespace and not is_ready(body):
                self.poke(key)

    def _others(self, key: TrainKey) -> list[Mapping[str, Any]]:
        return [body for other, body in self.trains.items() if other[0] == key[0] and other != key]

    async def _loop(self, key: TrainKey, wake: asyncio.Event) -> None:
        failures = 0
        while True:
            await wake.wait()
            wake.clear()
            body = self.trains.get(key)
            if body is None:
                return
            try:
                delay = await self.reconcile(body, self._others(key))
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - one Train's failure must not stop the others; retried
                failures += 1
                delay = min(0.5 * 2**failures, MAX_BACKOFF_SECONDS)
                log.warning(
                    "reconciling Train %s/%s failed (%s: %s); retrying in %.1fs",
                    *key,
                    type(error).__name__,
                    error,
                    delay,
                )
            with contextlib.suppress(TimeoutError):
                # The floor keeps a deadline that is already due from turning into a busy loop.
                async with asyncio.timeout(max(MIN_DELAY_SECONDS, min(delay, self.resync_seconds))):
                    await wake.wait()
            wake.set()

    def _stop(self, key: TrainKey) -> None:
        self._wake.pop(key, None)
        task = self._loops.pop(key, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._loops.values())
        for key in list(self._loops):
            self._stop(key)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def keys(self) -> Iterable[TrainKey]:
        return self.trains.keys()
