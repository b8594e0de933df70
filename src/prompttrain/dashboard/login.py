"""The login form (sets the signed session cookie after a correct DASHBOARD_API_KEY) and logout."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from prompttrain.dashboard.auth import SESSION_COOKIE
from prompttrain.dashboard.rendering import render
from prompttrain.dashboard.state import StateDep

router = APIRouter(include_in_schema=False)
FAILED_LOGIN_DELAY = 0.3  # slows guessing down; keys are long enough that this is not the defence


def safe_next(target: str | None) -> str:
    """Only a path on this site: never `//host` or `/\\host`, which browsers treat as another origin."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")) or "\n" in target:
        return "/"
    return target


@router.get("/login")
async def login_form(request: Request, state: StateDep, next: str | None = None) -> Response:
    target = safe_next(next)
    cookie = request.cookies.get(SESSION_COOKIE)
    if state.auth.open_mode or (cookie and state.auth.session_valid(cookie)):
        return RedirectResponse(target, status_code=303)
    return render(request, "login.html", {"next": target, "error": None, "auth": state.auth.describe()})


@router.post("/login")
async def login(request: Request, state: StateDep) -> Response:
    form = await request.form()
    key, target = form.get("key"), form.get("next")
    target = safe_next(target if isinstance(target, str) else None)
    if not isinstance(key, str) or not state.auth.key_matches(key):
        await asyncio.sleep(FAILED_LOGIN_DELAY)
        context = {"next": target, "error": "That key is not right.", "auth": state.auth.describe()}
        return render(request, "login.html", context, status_code=401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        state.auth.session_cookie(),
        max_age=state.auth.session_seconds,
        path="/",
        httponly=True,
        samesite="lax",
        secure=state.settings.dashboard_secure_cookies or request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
