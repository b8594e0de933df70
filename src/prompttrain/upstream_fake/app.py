"""HTTP layer of the fake upstream: Starlette routes for Anthropic's endpoints and the ``/_fake`` control API.

This module owns *when and how* bytes reach the client: delays, per-event flushing of SSE, and the
connection drops scripts ask for.  What the bytes are is decided by ``replies.py``; what is remembered by
``state.py``.  Handlers are plain Starlette routes using orjson with no pydantic models, because the
benchmark measures a proxy in front of this app and the fake's own per-request cost must stay small.

Dropping connections: Starlette/ASGI offers no way to close a connection without answering, and an
exception raised before ``http.response.start`` makes uvicorn answer ``500 Internal Server Error``
(checked in uvicorn's ``RequestResponseCycle.run_asgi``), which is not a connection failure.  Uvicorn's
``send`` callable is a bound method of its per-request cycle object, which holds the asyncio transport
(true for its httptools and h11 protocols), so :class:`_FakeUpstreamApp` stores that raw ``send`` in the
scope before Starlette's middleware wraps it, and a drop closes the transport itself.  A client then sees
``Server disconnected without sending a response`` (before_response) or an incomplete chunked body
(mid_stream), both raised by httpx as ``httpx.RemoteProtocolError``.  Under a server without that
attribute the drop falls back to raising, i.e. whatever that server does with a failing app.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from prompttrain.upstream_fake.replies import (
    DROP_MID_STREAM_AFTER_EVENTS,
    ReplyScriptError,
    build_content,
    build_message,
    build_sse_events,
    compute_usage,
    default_error_message,
    default_error_type,
    default_stop_reason,
    error_body,
    rate_limit_headers,
    stream_error_event,
)
from prompttrain.upstream_fake.state import FakeUpstreamState

__all__ = ["FakeUpstreamServer", "create_app", "run"]

_Endpoint = Callable[[Request], Awaitable[Response]]

_RAW_SEND_KEY: Final = "prompttrain.fake_upstream.raw_send"
_JSON: Final = "application/json"
_SSE_CONTENT_TYPE: Final = "text/event-stream; charset=utf-8"
_ALL_METHODS: Final = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# Long enough for any server to notice the closed socket; only bounds the wait if it never does.
_DISCONNECT_WAIT_SECONDS: Final = 5.0

_MODELS: Final = [
    {
        "type": "model",
        "id": "claude-haiku-4-5-20251001",
        "display_name": "Claude Haiku 4.5",
        "created_at": "2025-10-01T00:00:00Z",
    },
    {
        "type": "model",
        "id": "claude-sonnet-4-5-20250929",
        "display_name": "Claude Sonnet 4.5",
        "created_at": "2025-09-29T00:00:00Z",
    },
    {
        "type": "model",
        "id": "claude-opus-4-1-20250805",
        "display_name": "Claude Opus 4.1",
        "created_at": "2025-08-05T00:00:00Z",
    },
]


# --------------------------------------------------------------------------------------------------------
# Connection dropping
# --------------------------------------------------------------------------------------------------------


class _FakeUpstreamApp(Starlette):
    """Starlette that remembers the server's own ``send`` in the scope (see the module docstring)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[_RAW_SEND_KEY] = send
        await super().__call__(scope, receive, send)


def _server_transport(scope: Scope) -> Any:
    cycle = getattr(scope.get(_RAW_SEND_KEY), "__self__", None)
    transport = getattr(cycle, "transport", None)
    # Duck-typed: uvloop's transports are not asyncio.BaseTransport subclasses.
    return transport if callable(getattr(transport, "close", None)) else None


async def _drop_connection(scope: Scope, receive: Receive) -> None:
    """Close the client's TCP connection without (completing) an HTTP response."""
    transport = _server_transport(scope)
    if transport is None:
        raise RuntimeError("fake upstream: cannot reach the server transport to drop the connection")
    # close() rather than abort(): already-written SSE events are flushed first, so a mid-stream drop
    # really delivers the events before it.
    transport.close()
    # Wait until the server has noticed the disconnect; returning earlier would make uvicorn treat the
    # app as having returned without a response and log an error (or try to send a 500).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_DISCONNECT_WAIT_SECONDS):
            while (await receive())["type"] != "http.disconnect":
                pass


# --------------------------------------------------------------------------------------------------------
# Response helpers
# --------------------------------------------------------------------------------------------------------


def _response_headers(
    state: FakeUpstreamState, request_id: str, script_headers: Mapping[str, str | None] | None = None
) -> dict[str, str]:
    headers = rate_limit_headers(time.time())
    headers["request-id"] = request_id
    for overrides in (state.default_headers(), script_headers or {}):
        for name, value in overrides.items():
            if value is None:
                headers.pop(name, None)
            else:
                headers[name] = value
    return headers


def _json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, headers=headers, media_type=_JSON)


def _error_response(
    state: FakeUpstreamState,
    request_id: str,
    status: int,
    error_type: str,
    message: str,
    script_headers: Mapping[str, str | None] | None = None,
) -> Response:
    return _json_response(
        error_body(error_type, message, request_id),
        status,
        _response_headers(state, request_id, script_headers),
    )


def _record(state: FakeUpstreamState, request: Request, body: Any) -> None:
    scope = request.scope
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
    query_string = scope.get("query_string", b"").decode("latin-1")
    query = dict(urllib.parse.parse_qsl(query_string, keep_blank_values=True)) if query_string else {}
    state.record_request(scope["method"], scope["path"], query, headers, body)


def _parse_json(raw: bytes) -> tuple[bool, Any]:
    try:
        return True, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False, None


def _messages_request_problem(body: Any) -> str | None:
    """Anthropic-style validation message for a /v1/messages (or count_tokens) body, or None if fine."""
    if not isinstance(body, dict):
        return "Request body must be a JSON object"
    if "model" not in body:
        return "model: Field required"
    if not isinstance(body["model"], str):
        return "model: Input should be a valid string"
    if "messages" not in body:
        return "messages: Field required"
    if not isinstance(body["messages"], list):
        return "messages: Input should be a valid list"
    return None


class _ScriptedReply(Response):
    """The answer to one /v1/messages request, playing its reply script over the raw ASGI channel.

    A ``Response`` subclass so that it can be returned from a plain Starlette route, but it writes the
    messages itself: each SSE event is its own ``http.response.body`` message, which uvicorn writes to the
    socket immediately, so per-event delays are visible to clients.
    """

    def __init__(
        self,
        *,
        state: FakeUpstreamState,
        script: dict[str, Any] | None,
        body: dict[str, Any],
        request_bytes: int,
        stream: bool,
        request_id: str,
    ) -> None:
        # Response.__init__ is skipped on purpose (like StreamingResponse): headers are computed per play.
        self.status_code = 200
        self.background = None
        self.raw_headers = []
        self._state = state
        self._script = script or {}
        self._body = body
        self._request_bytes = request_bytes
        self._stream = stream
        self._request_id = request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        script = self._script
        delay = script.get("delay_ms", 0) / 1000
        drop = script.get("drop")
        error = script.get("error")
        if drop == "before_response":
            if delay:
                await asyncio.sleep(delay)
            await _drop_connection(scope, receive)
            return
        if error is not None:
            if delay:
                await asyncio.sleep(delay)
            await self._error(error)(scope, receive, send)
            return

        state = self._state
        content = build_content(script.get("content"), state.next_tool_use_id)
        message = build_message(
            message_id=str(script.get("message_id") or state.new_message_id()),
            model=self._body["model"],
            content=content,
            stop_reason=script.get("stop_reason") or default_stop_reason(content),
            usage=compute_usage(script.get("usage"), self._request_bytes, content),
        )
        headers = _response_headers(state, self._request_id, script.get("headers"))
        if self._stream:
            await self._play_stream(scope, receive, send, message, headers, delay)
        else:
            await self._play_json(scope, receive, send, message, headers, delay)

    def _error(self, error: Mapping[str, Any]) -> Response:
        status: int = error["status"]
        script_headers: dict[str, str | None] = {}
        retry_after = error.get("retry_after")
        if retry_after is not None:
            script_headers["retry-after"] = str(retry_after)
        script_headers.update(self._script.get("headers") or {})
        return _error_response(
            self._state,
            self._request_id,
            status,
            error.get("type") or default_error_type(status),
            error.get("message") or default_error_message(status),
            script_headers,
        )

    async def _play_json(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        message: dict[str, Any],
        headers: dict[str, str],
        delay: float,
    ) -> None:
        if delay:
            await asyncio.sleep(delay)
        payload = orjson.dumps(message)
        if self._script.get("drop") != "mid_stream":
            await Response(payload, headers=headers, media_type=_JSON)(scope, receive, send)
            return
        # A non-streaming "mid_stream" drop: announce the full length, send half, hang up.
        headers = {**headers, "content-type": _JSON, "content-length": str(len(payload))}
        await send({"type": "http.response.start", "status": 200, "headers": _raw(headers)})
        await send({"type": "http.response.body", "body": payload[: len(payload) // 2], "more_body": True})
        await _drop_connection(scope, receive)

    async def _play_stream(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        message: dict[str, Any],
        headers: dict[str, str],
        delay: float,
    ) -> None:
        events = build_sse_events(message)
        stop_after = len(events)
        error_after = self._script.get("stream_error_after_events")
        if error_after is not None:
            stop_after = min(error_after, len(events))
        drop = self._script.get("drop") == "mid_stream"
        if drop:
            stop_after = min(DROP_MID_STREAM_AFTER_EVENTS, len(events) - 1)

        headers = {"content-type": _SSE_CONTENT_TYPE, "cache-control": "no-cache", **headers}
        await send({"type": "http.response.start", "status": 200, "headers": _raw(headers)})
        # Watch for the client going away, as Anthropic's servers stop generating when the caller hangs up.
        gone = asyncio.create_task(_client_gone(receive))
        sent = 0
        try:
            for index in range(stop_after):
                if index and delay:
                    await asyncio.wait({gone}, timeout=delay)
                if gone.done():
                    break
                await send({"type": "http.response.body", "body": events[index], "more_body": True})
                sent += 1
        finally:
            gone.cancel()
        self._state.record_stream(self._request_id, sent, len(events), client_gone=sent < stop_after)
        if sent < stop_after:
            return
        if drop:
            await _drop_connection(scope, receive)
            return
        if error_after is not None:
            if delay:
                await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": stream_error_event(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _client_gone(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _raw(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


# --------------------------------------------------------------------------------------------------------
# App
# --------------------------------------------------------------------------------------------------------


def create_app(state: FakeUpstreamState | None = None) -> Starlette:
    """Build the fake upstream ASGI app around ``state`` (a fresh one if omitted; see ``app.state.fake``)."""
    fake = state if state is not None else FakeUpstreamState()

    async def messages(request: Request) -> Response:
        raw = await request.body()
        request_id = fake.new_request_id()
        ok, body = _parse_json(raw)
        _record(fake, request, body)
        if not ok:
            return _error_response(fake, request_id, 400, "invalid_request_error", "Invalid JSON in request body")
        problem = _messages_request_problem(body)
        if problem is not None:
            return _error_response(fake, request_id, 400, "invalid_request_error", problem)
        stream = body.get("stream") is True
        return _ScriptedReply(
            state=fake,
            script=fake.take_reply(body, stream),
            body=body,
            request_bytes=len(raw),
            stream=stream,
            request_id=request_id,
        )

    async def count_tokens(request: Request) -> Response:
        raw = await request.body()
        request_id = fake.new_request_id()
        ok, body = _parse_json(raw)
        _record(fake, request, body)
        problem = _messages_request_problem(body) if ok else "Invalid JSON in request body"
        if problem is not None:
            return _error_response(fake, request_id, 400, "invalid_request_error", problem)
        return _json_response({"input_tokens": max(1, len(raw) // 4)}, headers=_response_headers(fake, request_id))

    async def list_models(request: Request) -> Response:
        _record(fake, request, None)
        payload = {
            "data": _MODELS,
            "has_more": False,
            "first_id": _MODELS[0]["id"],
            "last_id": _MODELS[-1]["id"],
        }
        return _json_response(payload, headers=_response_headers(fake, fake.new_request_id()))

    async def get_model(request: Request) -> Response:
        _record(fake, request, None)
        request_id = fake.new_request_id()
        model_id = request.path_params["model_id"]
        for model in _MODELS:
            if model["id"] == model_id:
                return _json_response(model, headers=_response_headers(fake, request_id))
        return _error_response(fake, request_id, 404, "not_found_error", f"model: {model_id}")

    async def oauth_token(request: Request) -> Response:
        raw = await request.body()
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            # Standard OAuth clients send forms; Claude Code sends JSON. Accept both.
            body: Any = dict(urllib.parse.parse_qsl(raw.decode("latin-1")))
        else:
            body = _parse_json(raw)[1]
        _record(fake, request, body)
        delay = fake.oauth_arrived(body)
        if delay:
            await asyncio.sleep(delay)
        status, payload = fake.oauth_answer(body)
        return _json_response(payload, status, {"request-id": fake.new_request_id()})

    async def not_found(request: Request) -> Response:
        raw = await request.body()
        _record(fake, request, _parse_json(raw)[1] if raw else None)
        return _error_response(fake, fake.new_request_id(), 404, "not_found_error", "Not found")

    # ---- control API -----------------------------------------------------------------------------------

    async def control_replies(request: Request) -> Response:
        if request.method == "GET":
            return _json_response({"replies": fake.pending_replies()})
        ok, payload = _parse_json(await request.body())
        replies = payload.get("replies") if ok and isinstance(payload, dict) else None
        if not isinstance(replies, list):
            return _json_response({"error": 'body must be {"replies": [...]}'}, 400)
        try:
            queued = fake.add_replies(replies)
        except ReplyScriptError as exc:
            return _json_response({"error": str(exc)}, 400)
        return _json_response({"queued": queued, "pending": len(fake.pending_replies())})

    async def control_reset(request: Request) -> Response:
        fake.reset()
        return _json_response({"ok": True})

    async def control_streams(request: Request) -> Response:
        return _json_response({"streams": fake.streams()})

    async def control_received(request: Request) -> Response:
        return _json_response({"requests": fake.received_requests(request.query_params.get("path"))})

    async def control_oauth(request: Request) -> Response:
        if request.method == "POST":
            ok, payload = _parse_json(await request.body())
            try:
                fake.configure_oauth_from_json(payload if ok else None)
            except ReplyScriptError as exc:
                return _json_response({"error": str(exc)}, 400)
        return _json_response(fake.oauth_snapshot())

    async def control_headers(request: Request) -> Response:
        if request.method == "POST":
            ok, payload = _parse_json(await request.body())
            headers = payload.get("headers") if ok and isinstance(payload, dict) else None
            if not isinstance(headers, dict):
                return _json_response({"error": 'body must be {"headers": {...}}'}, 400)
            try:
                fake.set_default_headers(headers)
            except ReplyScriptError as exc:
                return _json_response({"error": str(exc)}, 400)
        return _json_response({"headers": fake.default_headers()})

    routes: list[tuple[str, _Endpoint, list[str]]] = [
        ("/v1/messages", messages, ["POST"]),
        ("/v1/messages/count_tokens", count_tokens, ["POST"]),
        ("/v1/models", list_models, ["GET"]),
        ("/v1/models/{model_id}", get_model, ["GET"]),
        ("/v1/oauth/token", oauth_token, ["POST"]),
        # Matched last: wrong methods on the routes above land here too, answering Anthropic's 404.
        ("/v1/{rest:path}", not_found, _ALL_METHODS),
        ("/_fake/replies", control_replies, ["GET", "POST"]),
        ("/_fake/reset", control_reset, ["POST"]),
        ("/_fake/received", control_received, ["GET"]),
        ("/_fake/streams", control_streams, ["GET"]),
        ("/_fake/oauth", control_oauth, ["GET", "POST"]),
        ("/_fake/headers", control_headers, ["GET", "POST"]),
    ]
    app = _FakeUpstreamApp(routes=[Route(path, endpoint, methods=methods) for path, endpoint, methods in routes])
    app.state.fake = fake
    return app


# --------------------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------------------


def _uvicorn_config(app: Starlette, **kwargs: Any) -> Any:
    import uvicorn

    # Access logging costs more per request than the fake itself; the benchmark must not measure it.
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", **kwargs)


def run(host: str, port: int, state: FakeUpstreamState | None = None) -> None:
    """Serve the fake upstream with uvicorn until interrupted (what ``prompttrain fake-upstream`` calls)."""
    import uvicorn

    uvicorn.Server(_uvicorn_config(create_app(state), host=host, port=port)).run()


class FakeUpstreamServer:
    """The fake upstream served by a real uvicorn in a background thread, on a free port.

    For tests and demos::

        with FakeUpstreamServer() as upstream:
            upstream.state.add_reply({"content": [{"type": "text", "text": "hi"}]})
            client = anthropic.Anthropic(base_url=upstream.base_url, api_key="x")
    """

    def __init__(self, state: FakeUpstreamState | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = state if state is not None else FakeUpstreamState()
        self.host = host
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> FakeUpstreamServer:
        import uvicorn

        # Binding here (port 0 = any free port) and handing uvicorn the socket avoids the race of
        # picking a free port and binding it later.  proto must be IPPROTO_TCP: asyncio only sets
        # TCP_NODELAY on sockets that say so, and without it Nagle + delayed ACK add ~40 ms per request.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._socket = sock
        server = uvicorn.Server(_uvicorn_config(create_app(self.state), timeout_graceful_shutdown=2))
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-upstream", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fake upstream server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> FakeUpstreamServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
