"""Render a template into an HTML response with what every page needs (CSRF token, navigation, mode)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse

from prompttrain import __version__
from prompttrain.dashboard.security import csrf_token

NAVIGATION = (
    ("/", "Overview"),
    ("/requests", "Requests"),
    ("/conversations", "Conversations"),
    ("/token-usage", "Token usage"),
    ("/trains", "Trains & accounts"),
)


def render(request: Request, template: str, context: dict[str, Any], *, status_code: int = 200) -> HTMLResponse:
    state = request.app.state.dashboard
    page = state.templates.get_template(template).render(
        request_path=request.url.path,
        params=dict(request.query_params),
        csrf_token=csrf_token(request),
        navigation=NAVIGATION,
        open_mode=state.auth.open_mode,
        has_key=state.auth.has_key,
        version=__version__,
        **context,
    )
    return HTMLResponse(page, status_code=status_code, headers={"cache-control": "no-store"})
