"""The dashboard's app factory: lifespan-owned state (engine, live feed), middleware, error handling and routers.

Routes: pages (`pages.py`, `login.py`), the JSON API (`api.py`), `GET /sse` (`stream.py`), `/health`,
`/metrics`, `/static/*` and the OpenAPI document at `/openapi.json`. Everything except `/health`, `/metrics`,
`/static`, `/openapi.json` and the login form needs a viewer (auth.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompttrain import __version__
from prompttrain.dashboard import api, login, pages, stream
from prompttrain.dashboard.auth import DashboardAuth
from prompttrain.dashboard.directory import ConfiguredDirectory
from prompttrain.dashboard.errors import (
    BadRequestError,
    DashboardError,
    NotAuthenticatedError,
    NotFoundError,
    UnavailableError,
    error_body,
)
from prompttrain.dashboard.live import LiveHub, run_feed
from prompttrain.dashboard.rendering import render
from prompttrain.dashboard.security import SecurityMiddleware, csrf_protect
from prompttrain.dashboard.state import DashboardState
from prompttrain.dashboard.templating import create_environment
from prompttrain.settings import Settings
from prompttrain.storage.engine import create_engine, database_is_ready

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
API_PREFIXES = ("/api/", "/sse", "/metrics", "/health", "/partials/", "/openapi.json")


def create_app(settings: Settings) -> FastAPI:
    """Raises SettingsError when no authentication is configured and open mode is off."""
    auth = DashboardAuth.from_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.database_url, pool_size=5)
        if engine.dialect.name == "postgresql":
            sa.event.listen(engine.sync_engine, "connect", _without_jit)
        hub = LiveHub()
        app.state.dashboard = DashboardState(
            settings=settings,
            engine=engine,
            auth=auth,
            hub=hub,
            templates=create_environment(),
            directory=ConfiguredDirectory(settings.credentials_dir),
        )
        app.state.draining = False
        feed = asyncio.create_task(
            run_feed(engine, settings.database_url, hub, settings.dashboard_poll_seconds), name="dashboard-live-feed"
        )
        log.info("dashboard %s", auth.describe())
        try:
            yield
        finally:
            app.state.draining = True
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed
            await engine.dispose()

    app = FastAPI(
        title="Agent Prompt Train dashboard",
        version=__version__,
        description="Requests, conversations, tokens, cost and subscription windows recorded by the proxy. "
        "Authenticate with the `X-Dashboard-Key` header. Errors use Anthropic's shape: "
        '`{"type": "error", "error": {"type": ..., "message": ...}}`.',
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load scripts from CDNs: the document itself is enough
        redoc_url=None,
        dependencies=[Depends(csrf_protect)],
    )
    app.add_middleware(SecurityMiddleware, secure_cookies=settings.dashboard_secure_cookies)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(api.router)
    app.include_router(stream.router)
    app.include_router(login.router)
    app.include_router(pages.router)
    install_error_handlers(app)

    @app.get("/health", tags=["service"], summary="Liveness and database reachability")
    async def health(request: Request) -> JSONResponse:
        state: DashboardState = request.app.state.dashboard
        ok = await database_is_ready(state.engine)
        return JSONResponse(
            {
                "status": "healthy" if ok else "degraded",
                "service": "prompttrain-dashboard",
                "version": __version__,
                "database": "connected" if ok else "down",
                "live": state.hub.state,
                "live_clients": state.hub.subscribers,
            },
            status_code=200 if ok else 503,
        )

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def _without_jit(dbapi_connection: Any, _record: Any) -> None:
    # The dashboard's aggregates scan ~10^5 rows: PostgreSQL's JIT compiles them for 30-40 ms and wins nothing back.
    cursor = dbapi_connection.cursor()
    cursor.execute("SET jit = off")
    cursor.close()


def wants_page(request: Request) -> bool:
    return request.method in ("GET", "HEAD", "POST") and not request.url.path.startswith(API_PREFIXES)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DashboardError)
    async def dashboard_error(request: Request, error: DashboardError) -> Response:
        state: DashboardState | None = getattr(request.app.state, "dashboard", None)
        if (
            isinstance(error, NotAuthenticatedError)
            and wants_page(request)
            and request.method != "POST"
            and state is not None
            and state.auth.has_key
        ):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        if wants_page(request) and state is not None:
            return render(request, "error.html", {"error": error}, status_code=error.status)
        headers = {"www-authenticate": 'DashboardKey realm="prompttrain"'} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        problems = []
        for item in error.errors():
            location = [str(part) for part in item.get("loc", ()) if part not in ("query", "path", "body")]
            problems.append(f"{'.'.join(location) or 'request'}: {item.get('msg', 'invalid')}")
        return await dashboard_error(request, BadRequestError("; ".join(problems) or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 404:
            return await dashboard_error(request, NotFoundError(f"no such page: {request.url.path[:200]}"))
        return JSONResponse(error_body("invalid_request_error", str(error.detail)), status_code=error.status_code)

    @app.exception_handler(sa.exc.DBAPIError)
    async def database_error(request: Request, error: sa.exc.DBAPIError) -> Response:
        log.warning("database error: %s", type(error.orig).__name__)
        return await dashboard_error(request, UnavailableError("the database is unavailable; try again shortly"))

    @app.exception_handler(OSError)
    async def connection_error(request: Request, error: OSError) -> Response:
        log.warning("database connection failed: %s", type(error).__name__)
        return await dashboard_error(request, UnavailableError("the database is unavailable; try again shortly"))
