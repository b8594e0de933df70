"""The Train operator: `prompttrain operator` (the same as `kopf run -m prompttrain.operator`) turns Train custom
resources into the credential Secrets the proxy reads, and reports their status.

    spec.py        the Train resource: API names, labels, annotations, the spec as data
    builders.py    pure: account documents, the two Secrets, client-key rotation, status, conflicts between Trains
    reconciler.py  one reconciliation of one Train against the API server
    controller.py  which Train to reconcile when: watch events, deadlines, resync, backoff
    handlers.py    the kopf handlers (importing this package registers them)

See operator/README.md at the repository root for the resource, rotation, RBAC and how the proxy reads the result.
"""

from __future__ import annotations

from collections.abc import Sequence

from prompttrain.operator import handlers as handlers


def run(
    namespaces: Sequence[str], clusterwide: bool, liveness_endpoint: str | None = None, metrics_port: int = 0
) -> None:
    """Run the operator until SIGINT/SIGTERM, in `namespaces` or in every namespace; `/metrics` on `metrics_port`."""
    import kopf

    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)

    kopf.run(
        standalone=True,
        clusterwide=clusterwide,
        namespaces=list(namespaces),
        liveness_endpoint=liveness_endpoint,
    )
