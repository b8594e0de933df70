"""The proxy's app factory: lifespan-owned state (HTTP client, credentials, OAuth, writer) and its routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, request_response
from starlette.types import Receive, Scope, Send

from prompttrain import __version__, metrics
from prompttrain.conversation.pricing import load_pricing, use_pricing
from prompttrain.credential_sources import CredentialSource, open_credential_source
from prompttrain.credentials import EMPTY_SNAPSHOT, CredentialSnapshot, OAuthAccount
from prompttrain.notifications.observer import train_slack
from prompttrain.notifications.sender import SlackSender
from prompttrain.proxy import exchange_metrics, token_stats
from prompttrain.proxy.accounts import CooldownTable, Resolution, authorise
from prompttrain.proxy.client_setup import ClientSetupFiles, find_directory
from prompttrain.proxy.errors import (
    InvalidRequestError,
    ProxyError,
    RequestTooLargeError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)
from prompttrain.proxy.forwarding import (
    ClientGoneResponse,
    DisconnectWatch,
    ErrorResponse,
    UpstreamCall,
    UpstreamResponse,
    create_upstream_pool,
    open_upstream,
    outbound_proxy,
)
from prompttrain.proxy.headers import (
    ACCOUNT_HEADER,
    CLIENT_CREDENTIAL_HEADERS,
    NOT_FORWARDED,
    OAUTH_BETA,
    SESSION_HEADER,
    TRAIN_HEADER,
    connection_tokens,
    merge_betas,
    narrow_accept_encoding,
    recorded_path,
    recorded_request_headers,
)
from prompttrain.proxy.oauth import OAuthManager
from prompttrain.proxy.upstream import UpstreamPool
from prompttrain.settings import Settings
from prompttrain.storage.engine import create_engine, database_is_ready
from prompttrain.storage.migrate import migrate
from prompttrain.storage.oauth_tokens import OAuthTokenStore, TokenCipher, load_or_create_key
from prompttrain.storage.recorder import RecordingProcesses, exposition
from prompttrain.storage.records import ExchangeRecord, Outcome, new_request_id

log = logging.getLogger(__name__)

READINESS_CACHE_SECONDS = 1.0


@dataclass
class ProxyState:
    settings: Settings
    client: aiohttp.ClientSession  # for the OAuth token endpoint
    upstream: UpstreamPool  # for forwarded requests
    oauth: OAuthManager
    engine: AsyncEngine | None
    writer: RecordingProcesses | None  # the recording processes' proxy-side ends (None: STORAGE_ENABLED=false)
    credentials: CredentialSource
    snapshot: CredentialSnapshot = EMPTY_SNAPSHOT
    cooldowns: CooldownTable = field(default_factory=CooldownTable)
    accepting: bool = True
    upstream_proxy: str | None = None
    slack: SlackSender | None = None  # sends the notifications the recording processes decide on
    _ready_checked_at: float = -1e9
    _database_ready: bool = False

    async def database_ready(self) -> bool:
        if self.engine is None:
            return True
        now = time.monotonic()
        if now - self._ready_checked_at >= READINESS_CACHE_SECONDS:
            try:
                self._database_ready = await asyncio.wait_for(database_is_ready(self.engine), timeout=2.0)
            except TimeoutError:
                self._database_ready = False
            self._ready_checked_at = now
        return self._database_ready

    async def reload_credentials(self) -> None:
        snapshot, changed = await self.credentials.scan()
        if changed or snapshot is not self.snapshot:
            new_oauth = [
                name
                for name, account in snapshot.accounts.items()
                if isinstance(account, OAuthAccount) and name not in self.snapshot.accounts
            ]
            slack_changed = train_slack(snapshot) != train_slack(self.snapshot)
            self.snapshot = snapshot
            if self.writer is not None and slack_changed:
                self.writer.update_trains(train_slack(snapshot))
            if new_oauth:
                await self.oauth.load_persisted(new_oauth)

    async def watch_credentials(self) -> None:
        while True:
            await self.credentials.wait_for_change()
            try:
                await self.reload_credentials()
            except Exception:
                log.exception("credential reload failed; keeping the previous credentials")


FORWARDED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})


class ProxyApplication:
    """What the server runs: `/v1/*` goes straight to `forward`; everything else to the Starlette app.

    Starlette's middleware stack and router cost about a tenth of the proxy's CPU per forwarded request; the
    forwarding route needs none of it (it answers its own errors, in Anthropic's shape). `state` is the Starlette
    app's, so the server's drain flag and the lifespan's proxy state are one.
    """

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and scope["method"] in FORWARDED_METHODS:
            scope["app"] = self.app
            await forward_asgi(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def forward_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    # Counted as in flight from arrival until the response's last byte (the body is sent after `forward` returns).
    metrics.IN_FLIGHT.inc()
    try:
        try:
            response = await forward(Request(scope, receive, send))
        except Exception:
            log.exception("unexpected error while forwarding %s %s", scope["method"], scope["path"])
            response = Response(
                ProxyError("internal proxy error").body(""), status_code=500, media_type="application/json"
            )
        await response(scope, receive, send)
    finally:
        metrics.IN_FLIGHT.dec()


def create_app(settings: Settings) -> ProxyApplication:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = await start_state(settings)
        app.state.proxy = state
        watcher = asyncio.create_task(state.watch_credentials(), name="credential-watcher")
        try:
            yield
        finally:
            state.accepting = False
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await stop_state(state)

    # Only reached for methods `ProxyApplication` does not forward: Starlette answers 405.
    forwarding = request_response(forward)
    routes = [
        Route("/v1/messages", forwarding, methods=["POST"]),
        Route("/v1/{rest:path}", forwarding, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        Route("/token-stats", token_stats_endpoint, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/api/event_logging/{rest:path}", drop_event_logging, methods=["POST"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/client-setup/{file:path}", ClientSetupFiles(find_directory()), methods=["GET"]),
        Route("/", describe, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.draining = False  # set by the server on SIGTERM: readiness fails while in-flight work finishes
    return ProxyApplication(app)


async def start_state(settings: Settings) -> ProxyState:
    # Metric labels and prices are process-wide: set them first (the recording process sets its own).
    exchange_metrics.configure(settings.metrics_model_label)
    use_pricing(await asyncio.to_thread(load_pricing, settings.pricing_file))
    client = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, connect=settings.upstream_connect_timeout_seconds),
    )
    upstream = create_upstream_pool(settings.upstream_connect_timeout_seconds, settings.upstream_read_timeout_seconds)
    engine: AsyncEngine | None = None
    recorder: RecordingProcesses | None = None
    store: OAuthTokenStore | None = None
    credentials = open_credential_source(settings)  # CREDENTIALS_SOURCE: directory or kubernetes
    slack = SlackSender.from_settings(settings)
    if settings.storage_enabled:
        if settings.should_migrate_on_start:
            await migrate(settings.database_url)
        engine = create_engine(settings.database_url)
        # Parsing, linking, pricing, usage metrics, Slack and telemetry all happen in the recording process.
        recorder = RecordingProcesses(settings, notices=slack)
        await recorder.start()
        key = load_or_create_key(settings.credentials_encryption_key, settings.data_dir)
        store = OAuthTokenStore(engine, TokenCipher(key))
    oauth = OAuthManager(
        client,
        token_url=str(settings.oauth_token_url),
        client_id=settings.oauth_client_id,
        margin_seconds=settings.oauth_refresh_margin_seconds,
        store=store,
    )
    state = ProxyState(
        settings=settings,
        client=client,
        upstream=upstream,
        oauth=oauth,
        engine=engine,
        writer=recorder,
        credentials=credentials,
        upstream_proxy=outbound_proxy(settings.upstream_base),
        slack=slack,
    )
    slack.start()
    await credentials.start()
    await state.reload_credentials()
    log.info(
        "proxy ready: %d trains, %d accounts from %s, upstream %s",
        len(state.snapshot.trains),
        len(state.snapshot.accounts),
        credentials.describe(),
        settings.upstream_base,
    )
    return state


async def stop_state(state: ProxyState) -> None:
    if state.writer is not None:
        await state.writer.stop(state.settings.writer_shutdown_seconds)
    if state.slack is not None:
        # After recording: its last observations may still send notifications.
        await state.slack.stop(state.settings.slack_timeout_seconds)
    await state.credentials.close()
    await state.client.close()
    await state.upstream.close()
    if state.engine is not None:
        await state.engine.dispose()


async def read_body(request: Request, declared: str | None, limit: int) -> bytes:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"request body exceeds the {limit}-byte limit")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise RequestTooLargeError(f"request body exceeds the {limit}-byte limit")
        parts.append(part)
    return b"".join(parts)


def inspect_messages_body(body: bytes, record: ExchangeRecord) -> None:
    """Validate a Messages request the way Anthropic would and note its model and stream flag."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequestError("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    record.parsed_body = payload
    model = payload.get("model")
    if isinstance(model, str):
        record.model = model
    stream = payload.get("stream", False)
    record.stream = stream is True
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("model: field required")
    if not isinstance(payload.get("messages"), list):
        raise InvalidRequestError("messages: field required (a list)")
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream: must be a boolean")


def note_model(body: bytes, record: ExchangeRecord) -> None:
    if not body:
        return
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if isinstance(payload, dict) and isinstance(payload.get("model"), str):
        record.model = payload["model"]


async def upstream_headers(
    state: ProxyState, raw: list[tuple[str, str]], resolution: Resolution
) -> list[tuple[str, str]]:
    dropped = NOT_FORWARDED | connection_tokens(raw)
    account = resolution.account
    if account is not None:
        dropped = dropped | CLIENT_CREDENTIAL_HEADERS | {"anthropic-beta"}
    headers: list[tuple[str, str]] = []
    betas: list[str] = []
    for name, value in raw:
        if name in dropped:
            if name == "anthropic-beta":
                betas.append(value)
            continue
        if name == "accept-encoding":
            value = narrow_accept_encoding(value)
        headers.append((name, value))
    if account is None:
        return headers
    if isinstance(account, OAuthAccount):
        token = await state.oauth.access_token(account)
        headers.append(("authorization", f"Bearer {token}"))
        headers.append(("anthropic-beta", merge_betas(OAUTH_BETA, *betas)))
    else:
        headers.append(("x-api-key", account.api_key))
        if betas:
            headers.append(("anthropic-beta", merge_betas(*betas)))
    return headers


async def forward(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    started = time.perf_counter()
    # Decoded once: Starlette's `Headers.get` scans the whole list on every call.
    raw = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.scope["headers"]]
    headers = {name: value for name, value in reversed(raw)}  # the first of repeated names wins, as in Starlette
    path = request.scope["path"]
    query = request.scope.get("query_string", b"").decode("latin-1")
    record = ExchangeRecord(
        request_id=new_request_id(),
        started_at=datetime.now(UTC),
        started=started,
        method=request.method,
        path=recorded_path(path, query),
        train_id=(headers.get(TRAIN_HEADER) or "").strip() or state.settings.default_train_id,
        request_headers=recorded_request_headers(raw),
        session_id=headers.get(SESSION_HEADER),
    )
    try:
        resolution = authorise(
            state.snapshot,
            state.cooldowns,
            train_header=headers.get(TRAIN_HEADER),
            account_header=headers.get(ACCOUNT_HEADER),
            authorization=headers.get("authorization"),
            api_key=headers.get("x-api-key"),
            default_train=state.settings.default_train_id,
        )
        record.train_id = resolution.train.train_id
        record.account_id = resolution.account_id
        body = await read_body(request, headers.get("content-length"), state.settings.max_request_body_bytes)
        record.request_body = body
        if path == "/v1/messages" and request.method == "POST":
            inspect_messages_body(body, record)
        else:
            note_model(body, record)
        url = state.settings.upstream_base + path + ("?" + query if query else "")
        call = UpstreamCall(
            request.method, url, await upstream_headers(state, raw, resolution), body, state.upstream_proxy
        )
    except ProxyError as error:
        return error_response(error, record, state)
    watch = DisconnectWatch(request.receive)
    try:
        upstream = await open_upstream(state.upstream, call, record)
    except asyncio.CancelledError:
        watch.stop()
        if watch.claim():
            return ClientGoneResponse(record, state.writer)
        raise
    except ProxyError as error:
        watch.stop()
        return error_response(error, record, state)
    if upstream.status == 429 and resolution.account is not None:
        state.cooldowns.start(resolution.account.name, upstream.header("retry-after") or None)
        metrics.ACCOUNT_COOLDOWNS.labels(resolution.account.name).inc()
    return UpstreamResponse(upstream, record, state.writer, watch)


def error_response(error: ProxyError, record: ExchangeRecord, state: ProxyState) -> Response:
    if isinstance(error, UpstreamTimeoutError):
        record.outcome = Outcome.TIMEOUT
    elif isinstance(error, UpstreamUnreachableError):
        record.outcome = Outcome.UNREACHABLE
    if isinstance(error, RequestTooLargeError):
        record.request_body = record.parsed_body = None
    known = record.account_id is not None or record.train_id in state.snapshot.trains
    return ErrorResponse(error, record, state.writer, exchange_metrics.train_label(record.train_id, known))


async def health(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    database = "disabled" if state.engine is None else ("connected" if await state.database_ready() else "down")
    return JSONResponse(
        {
            "status": "healthy" if database != "down" and state.accepting else "degraded",
            "service": "prompttrain-proxy",
            "version": __version__,
            "database": database,
            "trains": len(state.snapshot.trains),
            "accounts": len(state.snapshot.accounts),
            "timestamp": datetime.now(UTC).isoformat(),
        }
    )


async def live(request: Request) -> Response:
    return JSONResponse({"alive": True, "timestamp": datetime.now(UTC).isoformat()})


async def ready(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    accepting = state.accepting and not request.app.state.draining
    database = await state.database_ready()
    # With READINESS_REQUIRES_DATABASE=false (the Helm chart's choice) an unreachable database does not take the
    # proxy out of service: requests keep flowing and their records wait in the spool.
    is_ready = accepting and (database or not state.settings.readiness_requires_database)
    return JSONResponse(
        {
            "ready": is_ready,
            "accepting": accepting,
            "database": database,
            "timestamp": datetime.now(UTC).isoformat(),
        },
        status_code=200 if is_ready else 503,
    )


async def drop_event_logging(request: Request) -> Response:
    # Claude Code posts its own telemetry here; accept and discard it without reading it into memory twice.
    async for _ in request.stream():
        pass
    return JSONResponse({"status": "ok"})


async def token_stats_endpoint(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    return await token_stats.answer(state.engine, state.snapshot, request.query_params.get("train_id"))


async def metrics_endpoint(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    recorded = await state.writer.metric_families() if state.writer is not None else None
    return Response(exposition(recorded), media_type=CONTENT_TYPE_LATEST)


async def describe(request: Request) -> Response:
    return JSONResponse(
        {
            "service": "prompttrain-proxy",
            "version": __version__,
            "endpoints": {
                "messages": "POST /v1/messages",
                "passthrough": "/v1/*",
                "health": "GET /health, /health/live, /health/ready",
                "token_stats": "GET /token-stats[?train_id=]",
                "metrics": "GET /metrics",
            },
        }
    )
