"""`prompttrain`: one command line for every component.

prompttrain proxy          the proxy on PORT (3000)
prompttrain dashboard      the dashboard on DASHBOARD_PORT (3001)
prompttrain up             proxy + dashboard in one process (what `make run` starts)
prompttrain migrate        wait for the database, lock, upgrade the schema to the newest revision
prompttrain fake-upstream  a stand-in for Anthropic's Messages API (tests, demos, benchmarks)
prompttrain client-key     create a client key for a train (prints it once; stores only its digest)
prompttrain operator       the Train operator (kopf): Train resources become the proxy's credential Secrets
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from prompttrain.credentials import (
    TRAIN_SUFFIX,
    AuthMode,
    digest_client_key,
    generate_client_key,
    is_identifier,
)
from prompttrain.settings import Settings, SettingsError, load_settings

log = logging.getLogger("prompttrain")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request URL at INFO; the proxy logs what matters itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # the Kubernetes client (lightkube) uses httpx2
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


class _Server(uvicorn.Server):
    """A uvicorn server whose signals are handled by `serve_all`, so several servers share one loop."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        return

    def capture_signals(self) -> Any:  # uvicorn >= 0.29
        import contextlib

        return contextlib.nullcontext()


def server_config(app: Any, host: str, port: int, settings: Settings, *, relay: bool = False) -> uvicorn.Config:
    """A uvicorn configuration; `relay` servers send only the upstream's own Date and Server headers."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=75,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        server_header=not relay,
        date_header=not relay,
        # The proxy does not use the client's address; X-Forwarded-* parsing would only cost time per request.
        proxy_headers=not relay,
    )


async def serve_all(configs: Sequence[uvicorn.Config], drain_delay: float = 0.0) -> None:
    """Serve several apps on one loop. SIGTERM/SIGINT: report not-ready at once (`app.state.draining`), wait
    `drain_delay` seconds for load balancers to notice, then stop accepting and let in-flight requests finish
    (uvicorn's graceful shutdown, bounded by SHUTDOWN_GRACE_SECONDS). A second signal exits immediately."""
    servers = [_Server(config) for config in configs]
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    async def drain_then_stop() -> None:
        for config in configs:
            state = getattr(config.app, "state", None)
            if state is not None:
                state.draining = True
        if drain_delay:
            log.info("draining: not ready, stopping in %.0fs", drain_delay)
            await asyncio.sleep(drain_delay)
        for server in servers:
            server.should_exit = True

    def on_signal() -> None:
        if stopping:
            for server in servers:
                server.force_exit = True
            return
        stopping.append(loop.create_task(drain_then_stop()))

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    await asyncio.gather(*(server.serve() for server in servers))
    if any(not server.started for server in servers):
        raise SystemExit(1)


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (measurably less CPU per proxied request), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def run_proxy(settings: Settings) -> None:
    from prompttrain.proxy.app import create_app

    config = server_config(create_app(settings), settings.host, settings.port, settings, relay=True)
    run_event_loop(serve_all([config], settings.shutdown_delay_seconds))


def run_dashboard(settings: Settings) -> None:
    from prompttrain.dashboard.app import create_app

    config = server_config(create_app(settings), settings.host, settings.dashboard_port, settings)
    run_event_loop(serve_all([config]))


def run_up(settings: Settings) -> None:
    from prompttrain.dashboard.app import create_app as create_dashboard
    from prompttrain.proxy.app import create_app as create_proxy
    from prompttrain.storage.migrate import migrate

    # The all-in-one development command: without a dashboard key or trusted header, the dashboard runs in open
    # development mode (DASHBOARD_OPEN), and says so.
    secured = bool(settings.dashboard_api_key or settings.dashboard_trusted_header)
    if not secured:
        settings = settings.model_copy(update={"dashboard_open": True})
    dashboard_app = create_dashboard(settings)

    async def main() -> None:
        await migrate(settings.database_url)
        access = "login with DASHBOARD_API_KEY" if settings.dashboard_api_key else "trusted header"
        print(
            f"Agent Prompt Train: proxy on http://localhost:{settings.port}, dashboard on "
            f"http://localhost:{settings.dashboard_port} "
            + (f"({access})" if secured else "(open development mode: no dashboard authentication)")
            + f"\nPoint Claude Code at it: ANTHROPIC_BASE_URL=http://localhost:{settings.port} claude",
            file=sys.stderr,
            flush=True,
        )
        await serve_all(
            [
                server_config(create_proxy(settings), settings.host, settings.port, settings, relay=True),
                server_config(dashboard_app, settings.host, settings.dashboard_port, settings),
            ],
            settings.shutdown_delay_seconds,
        )

    run_event_loop(main())


def run_migrate(settings: Settings, wait_seconds: float) -> None:
    from prompttrain.storage.migrate import migrate

    asyncio.run(migrate(settings.database_url, wait_seconds=wait_seconds))


def run_fake_upstream(host: str, port: int) -> None:
    from prompttrain.upstream_fake.app import run

    run(host, port)


def create_client_key(settings: Settings, train_id: str) -> None:
    if not is_identifier(train_id):
        raise SettingsError(f"--train: '{train_id}' is not a valid identifier")
    path = settings.credentials_dir / "trains" / f"{train_id}{TRAIN_SUFFIX}"
    document: dict[str, Any] = orjson.loads(path.read_bytes()) if path.exists() else {}
    if document.get("auth", str(AuthMode.CLIENT_KEYS)) != AuthMode.CLIENT_KEYS:
        raise SettingsError(f"train '{train_id}' uses auth '{document.get('auth')}', not client-keys")
    key = generate_client_key()
    document["auth"] = str(AuthMode.CLIENT_KEYS)
    document["client_key_sha256"] = [*document.get("client_key_sha256", []), digest_client_key(key).hex()]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    os.replace(temporary, path)
    print(key)
    print(f"stored its SHA-256 digest in {path}; the key is not stored anywhere else", file=sys.stderr)


DURATION = re.compile(r"^(?P<amount>\d+)(?P<unit>[smhdw])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    match = DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration like 30d, 12h or 90m")
    return timedelta(seconds=int(match["amount"]) * UNIT_SECONDS[match["unit"]])


def run_retention(settings: Settings, older_than: timedelta, payloads_older_than: timedelta | None) -> None:
    from prompttrain.storage.engine import create_engine
    from prompttrain.storage.partitions import apply_retention

    payload_age = payloads_older_than if payloads_older_than is not None else older_than
    if payload_age > older_than:
        raise SettingsError("--payloads-older-than: payloads cannot be kept longer than their metadata")
    if payload_age < timedelta(days=1):
        raise SettingsError("--payloads-older-than: at least 1d (content blobs are refreshed once a day)")
    now = datetime.now(UTC)

    async def main() -> None:
        engine = create_engine(settings.database_url, pool_size=1)
        try:
            report = await apply_retention(engine, now - older_than, now - payload_age)
        finally:
            await engine.dispose()
        print(
            f"dropped {len(report.dropped_partitions)} partitions, deleted {report.deleted_requests} requests, "
            f"{report.deleted_payloads} payloads and {report.deleted_blobs} content blobs",
            file=sys.stderr,
        )

    asyncio.run(main())


def run_relink(settings: Settings, since: datetime | None, batch_size: int) -> None:
    from prompttrain.storage.engine import create_engine
    from prompttrain.storage.relink import ProgressBar, relink

    async def main() -> None:
        engine = create_engine(settings.database_url, pool_size=1)
        bar: ProgressBar | None = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            bar = bar or ProgressBar(total)
            bar.update(done)

        try:
            report = await relink(engine, since, batch_size=batch_size, progress=progress)
        finally:
            await engine.dispose()
            if bar is not None:
                bar.close()
        print(
            f"relinked {report.relinked} of {report.examined} requests"
            f" ({report.skipped} kept their links: no stored body to recompute from)",
            file=sys.stderr,
        )

    asyncio.run(main())


def parse_since(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a date like 2026-11-01 or 2026-11-01T12:00") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def run_operator(namespaces: list[str], all_namespaces: bool, liveness: str | None, metrics_port: int = 0) -> None:
    """The Train operator in the given namespaces; in a pod with neither flag, in the pod's own namespace."""
    if namespaces and all_namespaces:
        raise SettingsError("--namespace and --all-namespaces exclude each other")
    if not namespaces and not all_namespaces:
        try:
            namespaces = [IN_CLUSTER_NAMESPACE.read_text().strip()]
        except OSError:
            raise SettingsError("outside a cluster, name the namespaces: --namespace NS or --all-namespaces") from None
    from prompttrain.operator import run

    run(namespaces, all_namespaces, liveness, metrics_port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prompttrain", description="Agent Prompt Train")
    commands = parser.add_subparsers(dest="command", required=True)
    proxy = commands.add_parser("proxy", help="run the proxy")
    proxy.add_argument("--host")
    proxy.add_argument("--port", type=int)
    dashboard = commands.add_parser("dashboard", help="run the dashboard")
    dashboard.add_argument("--host")
    dashboard.add_argument("--port", type=int)
    up = commands.add_parser("up", help="run proxy and dashboard together (SQLite by default)")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument("--dashboard-port", type=int)
    migrate = commands.add_parser("migrate", help="upgrade the database schema")
    migrate.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the database")
    fake = commands.add_parser("fake-upstream", help="run the stand-in for Anthropic's API")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=9100)
    key = commands.add_parser("client-key", help="create a client key for a train")
    key.add_argument("--train", required=True)
    retention = commands.add_parser("retention", help="drop request data older than a cutoff")
    retention.add_argument("--older-than", type=parse_duration, required=True, help="e.g. 30d: all request data")
    retention.add_argument(
        "--payloads-older-than", type=parse_duration, help="e.g. 7d: only bodies (default: --older-than)"
    )
    relink = commands.add_parser("relink", help="recompute conversation linking for stored requests")
    relink.add_argument("--since", type=parse_since, help="only requests from this date (UTC) on")
    relink.add_argument("--batch-size", type=int, default=500)
    operator_command = commands.add_parser("operator", help="run the Train operator (kopf)")
    operator_command.add_argument(
        "-n", "--namespace", action="append", default=[], help="serve Trains in this namespace (repeatable)"
    )
    operator_command.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace")
    operator_command.add_argument("--liveness", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    operator_command.add_argument(
        "--metrics-port", type=int, default=9090, help="serve Prometheus /metrics on this port (0: off)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "fake-upstream":
            configure_logging("warning")
            run_fake_upstream(arguments.host, arguments.port)
            return
        overrides: dict[str, Any] = {}
        if arguments.command in ("proxy", "up"):
            overrides = {"host": arguments.host, "port": arguments.port}
        if arguments.command == "up":
            overrides["dashboard_port"] = arguments.dashboard_port
        if arguments.command == "dashboard":
            overrides = {"host": arguments.host, "dashboard_port": arguments.port}
        settings = load_settings(**overrides)
        configure_logging(settings.log_level)
        if arguments.command == "proxy":
            run_proxy(settings)
        elif arguments.command == "dashboard":
            run_dashboard(settings)
        elif arguments.command == "up":
            run_up(settings)
        elif arguments.command == "migrate":
            run_migrate(settings, arguments.wait)
        elif arguments.command == "client-key":
            create_client_key(settings, arguments.train)
        elif arguments.command == "relink":
            run_relink(settings, arguments.since, arguments.batch_size)
        elif arguments.command == "retention":
            run_retention(settings, arguments.older_than, arguments.payloads_older_than)
        elif arguments.command == "operator":
            run_operator(arguments.namespace, arguments.all_namespaces, arguments.liveness, arguments.metrics_port)
    except SettingsError as error:
        print(f"prompttrain: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main(sys.argv[1:])
