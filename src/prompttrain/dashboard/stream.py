"""`GET /sse`: the live event stream of the pages (see live.py for where events come from)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from prompttrain.dashboard.auth import ViewerDep
from prompttrain.dashboard.live import event_stream
from prompttrain.dashboard.state import StateDep

router = APIRouter(tags=["live"])


@router.get(
    "/sse",
    summary="Server-sent events: `requests` ({requests: [{id, train, conversation}], more}), `resync`, `heartbeat`",
    response_class=StreamingResponse,
)
async def sse(request: Request, state: StateDep, _viewer: ViewerDep) -> StreamingResponse:
    def stopping() -> bool:
        return bool(getattr(request.app.state, "draining", False))

    return StreamingResponse(
        event_stream(state.hub, state.settings.dashboard_heartbeat_seconds, stopping),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )
