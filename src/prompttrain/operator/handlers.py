"""The kopf handlers of the Train operator: thin, they only feed watch events to the controller.

Only event-watching handlers are used (no create/update/delete handlers, daemons or timers), so kopf writes
nothing onto Trains: no finalizers, no progress annotations. The controller reconciles level-triggered and
keeps its own deadlines for key rotation (controller.py); Kubernetes' garbage collector deletes a Train's Secrets
through their owner references.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import kopf
from lightkube import AsyncClient

from prompttrain.operator.controller import TrainController
from prompttrain.operator.reconciler import Reconciler
from prompttrain.operator.spec import GROUP, MANAGER, PLURAL, VERSION
from prompttrain.settings import load_settings

log = logging.getLogger(__name__)

MEMO_KEY = "prompttrain"


@dataclass
class Runtime:
    client: AsyncClient
    controller: TrainController


def runtime(memo: kopf.Memo) -> Runtime:
    found = memo.get(MEMO_KEY)
    if not isinstance(found, Runtime):
        raise kopf.PermanentError("the operator has not started")
    return found


def post_event(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    """A Kubernetes event about a Train (kopf posts it in the background and retries)."""
    kopf.event(kopf.Body(cast(kopf.RawBody, dict(body))), type=kind, reason=reason, message=message)


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    app_settings = load_settings()
    # One replica (Deployment strategy Recreate): no peering objects, so no cluster-wide RBAC for them.
    settings.peering.standalone = True
    # Serve the Train CRD found at start-up, in the namespaces given on the command line: this needs no
    # permission to list CRDs or namespaces cluster-wide.
    settings.scanning.disabled = True
    # kopf turns its own per-object log lines into events; ours are posted explicitly, so keep only warnings.
    settings.posting.level = logging.WARNING
    # kopf logs every handled event of every Secret in the namespace at INFO: keep its warnings and errors.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # Every liveness probe (`--liveness`) would log two lines.
    logging.getLogger("kopf.activities.probe").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    client = AsyncClient(field_manager=MANAGER)
    reconciler = Reconciler(client, resync_seconds=app_settings.operator_resync_seconds, emit=post_event)
    memo[MEMO_KEY] = Runtime(client, TrainController(reconciler.reconcile, app_settings.operator_resync_seconds))
    log.info("Train operator started (resync every %.0fs)", app_settings.operator_resync_seconds)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    found = memo.get(MEMO_KEY)
    if isinstance(found, Runtime):
        await found.controller.close()
        await found.client.close()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def train_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    runtime(memo).controller.observe_train(event["type"], event["object"])


@kopf.on.event("", "v1", "secrets")
async def secret_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    runtime(memo).controller.observe_secret(event["type"], event["object"])


@kopf.on.probe(id="trains")
def trains_known(memo: kopf.Memo, **_: Any) -> int:
    """For the liveness endpoint (`--liveness`): how many Trains the operator is following."""
    return len(runtime(memo).controller.trains)
