"""The dashboard's app factory. For now: health and the latest recorded requests as JSON and as a plain page."""

from __future__ import annotations

import contextlib
import html
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse

from prompttrain import __version__
from prompttrain.settings import Settings
from prompttrain.storage.engine import create_engine, database_is_ready
from prompttrain.storage.tables import api_requests

LIST_COLUMNS = (
    api_requests.c.request_id,
    api_requests.c.timestamp,
    api_requests.c.train_id,
    api_requests.c.account_id,
    api_requests.c.model,
    api_requests.c.stream,
    api_requests.c.status_code,
    api_requests.c.outcome,
    api_requests.c.duration_ms,
    api_requests.c.input_tokens,
    api_requests.c.output_tokens,
    api_requests.c.cache_read_input_tokens,
    api_requests.c.cache_creation_input_tokens,
)


def create_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.database_url, pool_size=5)
        app.state.engine = engine
        try:
            yield
        finally:
            await engine.dispose()

    app = FastAPI(title="Agent Prompt Train dashboard", version=__version__, lifespan=lifespan)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        ok = await database_is_ready(request.app.state.engine)
        return JSONResponse(
            {"status": "healthy" if ok else "degraded", "database": "connected" if ok else "down"},
            status_code=200 if ok else 503,
        )

    @app.get("/api/requests")
    async def list_requests(request: Request, limit: int = Query(50, ge=1, le=500)) -> dict[str, Any]:
        return {"requests": await latest_requests(request, limit)}

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> str:
        rows = await latest_requests(request, 50)
        cells = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(row[key]))}</td>" for key in row) + "</tr>" for row in rows
        )
        head = "".join(f"<th>{html.escape(column.name)}</th>" for column in LIST_COLUMNS)
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>Agent Prompt Train</title></head><body>"
            "<h1>Agent Prompt Train</h1><p>Latest recorded requests.</p>"
            f"<table border='1' cellpadding='4'><tr>{head}</tr>{cells}</table></body></html>"
        )

    return app


async def latest_requests(request: Request, limit: int) -> list[dict[str, Any]]:
    query = sa.select(*LIST_COLUMNS).order_by(api_requests.c.timestamp.desc()).limit(limit)
    async with request.app.state.engine.connect() as connection:
        rows = (await connection.execute(query)).mappings().all()
    return [
        {
            key: (value.astimezone(UTC).isoformat() if isinstance(value, datetime) else value)
            for key, value in row.items()
        }
        | {"request_id": str(row["request_id"])}
        for row in rows
    ]
