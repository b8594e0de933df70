"""Mutable state of one fake upstream: scripted replies, received requests, OAuth token-endpoint state.

This module owns everything the fake *remembers* between requests.  The same operations are reachable
in-process (tests embedding the app call the methods directly) and over the control API (``/_fake/*``,
see ``app.py``), which is a thin JSON layer over these methods.

The app runs on one event loop, but tests commonly drive the state from another thread while uvicorn
serves in a background thread, so every mutation takes a lock.  The lock is never held across an
``await``; it only guards short dictionary/list operations.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prompttrain.upstream_fake.replies import (
    ReplyScriptError,
    reply_matches,
    validate_headers,
    validate_reply,
)

__all__ = ["FakeUpstreamState", "OAuthSettings"]

_DEFAULT_EXPIRES_IN = 3600


@dataclass(slots=True)
class OAuthSettings:
    """Behaviour of ``POST /v1/oauth/token``; see :meth:`FakeUpstreamState.configure_oauth`."""

    expires_in: int = _DEFAULT_EXPIRES_IN
    delay_seconds: float = 0.0
    fail: bool = False
    strict_refresh_tokens: bool = False
    accepted_refresh_tokens: set[str] = field(default_factory=set)


class FakeUpstreamState:
    """Everything one fake upstream remembers.  Safe to use from several threads.

    ``max_received`` bounds the request record (oldest entries are dropped) so that a long benchmark
    against the fake does not grow its memory without limit; ``None`` keeps everything.
    """

    def __init__(self, *, max_received: int | None = 10_000) -> None:
        self._lock = threading.Lock()
        self._max_received = max_received
        self._replies: list[dict[str, Any]] = []
        self._received: deque[dict[str, Any]] = deque(maxlen=max_received)
        self._tool_ids = itertools.count(1)
        self._default_headers: dict[str, str | None] = {}
        self._oauth = OAuthSettings()
        self._oauth_calls = 0
        self._oauth_requests: list[Any] = []
        self._tokens_issued = 0
        self._last_issued_refresh_token: str | None = None

    def reset(self) -> None:
        """Forget replies, received requests, header overrides, token-endpoint counters and settings."""
        with self._lock:
            self._replies = []
            self._received = deque(maxlen=self._max_received)
            self._tool_ids = itertools.count(1)
            self._default_headers = {}
            self._oauth = OAuthSettings()
            self._oauth_calls = 0
            self._oauth_requests = []
            self._tokens_issued = 0
            self._last_issued_refresh_token = None
            self._streams: list[dict[str, Any]] = []

    def record_stream(self, request_id: str, events_sent: int, events_total: int, client_gone: bool) -> None:
        """How an SSE reply ended: every event sent, or the client went away (`client_gone`) after some."""
        with self._lock:
            self._streams.append(
                {
                    "request_id": request_id,
                    "events_sent": events_sent,
                    "events_total": events_total,
                    "client_gone": client_gone,
                }
            )

    def streams(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(item) for item in self._streams]

    # ---------------------------------------------------------------------------------------------------
    # Scripted replies
    # ---------------------------------------------------------------------------------------------------

    def add_replies(self, replies: Iterable[object]) -> int:
        """Append reply scripts to the queue; all are validated first, so a bad one queues nothing.

        Raises :class:`~prompttrain.upstream_fake.replies.ReplyScriptError` on a malformed script.
        Returns how many were queued.
        """
        validated = []
        for index, reply in enumerate(replies):
            try:
                validated.append(validate_reply(reply))
            except ReplyScriptError as exc:
                raise ReplyScriptError(f"replies[{index}]: {exc}") from None
        with self._lock:
            self._replies.extend(validated)
        return len(validated)

    def add_reply(self, reply: Mapping[str, Any]) -> None:
        """Append one reply script (see :meth:`add_replies`)."""
        self.add_replies([reply])

    def pending_replies(self) -> list[dict[str, Any]]:
        """Copies of the queued scripts, with their remaining ``repeat`` counts."""
        with self._lock:
            return [dict(reply) for reply in self._replies]

    def take_reply(self, body: Mapping[str, Any], stream: bool) -> dict[str, Any] | None:
        """Consume one use of the first queued script matching this request; ``None`` = default reply."""
        with self._lock:
            for index, reply in enumerate(self._replies):
                if not reply_matches(reply, body, stream):
                    continue
                repeat = reply["repeat"]
                if repeat == 1:
                    del self._replies[index]
                elif repeat > 1:
                    reply["repeat"] = repeat - 1
                # Hand out a copy: the queued one may be decremented again while this one is served.
                return dict(reply)
        return None

    def next_tool_use_id(self) -> str:
        with self._lock:
            return f"toolu_fake_{next(self._tool_ids)}"

    @staticmethod
    def new_message_id() -> str:
        # Random rather than counted: a proxy may store ids across resets and fake restarts.
        return "msg_fake_" + os.urandom(12).hex()

    @staticmethod
    def new_request_id() -> str:
        return "req_fake_" + os.urandom(12).hex()

    # ---------------------------------------------------------------------------------------------------
    # Default response headers
    # ---------------------------------------------------------------------------------------------------

    def set_default_headers(self, headers: Mapping[str, object]) -> None:
        """Override headers on every ``/v1/*`` response (a value of ``None`` omits the header).

        Replaces previous overrides.  Per-reply ``headers`` in a script still take precedence; this is
        for e.g. "utilization is 0.97 from now on" without queueing a catch-all reply.
        """
        validated = validate_headers(headers)
        with self._lock:
            self._default_headers = validated

    def default_headers(self) -> dict[str, str | None]:
        with self._lock:
            return dict(self._default_headers)

    # ---------------------------------------------------------------------------------------------------
    # Request record
    # ---------------------------------------------------------------------------------------------------

    def record_request(self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: Any) -> None:
        entry = {
            "method": method,
            "path": path,
            "query": query,
            "headers": headers,
            "body": body,
            "received_at": time.time(),
        }
        with self._lock:
            self._received.append(entry)

    def received_requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """Every ``/v1/*`` request received, oldest first; ``path`` filters on the exact path."""
        with self._lock:
            entries = list(self._received)
        # Copies, so that a test mutating what it got back cannot rewrite the record.
        return [dict(entry) for entry in entries if path is None or entry["path"] == path]

    # ---------------------------------------------------------------------------------------------------
    # OAuth token endpoint
    # ---------------------------------------------------------------------------------------------------

    def configure_oauth(
        self,
        *,
        expires_in: int | None = None,
        delay_seconds: float | None = None,
        fail: bool | None = None,
        strict_refresh_tokens: bool | None = None,
        accepted_refresh_tokens: Iterable[str] | None = None,
    ) -> None:
        """Change the token endpoint's behaviour; arguments left as ``None`` keep their current value.

        ``accepted_refresh_tokens`` seeds the refresh tokens that strict mode accepts besides the last one
        issued (e.g. the token written into a test's credentials file).  Like real rotating refresh
        tokens, a seeded token is consumed by its first successful use.
        """
        with self._lock:
            if expires_in is not None:
                self._oauth.expires_in = expires_in
            if delay_seconds is not None:
                self._oauth.delay_seconds = delay_seconds
            if fail is not None:
                self._oauth.fail = fail
            if strict_refresh_tokens is not None:
                self._oauth.strict_refresh_tokens = strict_refresh_tokens
            if accepted_refresh_tokens is not None:
                self._oauth.accepted_refresh_tokens = set(accepted_refresh_tokens)

    def configure_oauth_from_json(self, payload: object) -> None:
        """Validate a ``POST /_fake/oauth`` body and apply it; raises ``ReplyScriptError`` when malformed."""
        if not isinstance(payload, Mapping):
            raise ReplyScriptError("oauth settings: must be an object")
        known = {"expires_in", "delay_seconds", "fail", "strict_refresh_tokens", "accepted_refresh_tokens"}
        unknown = set(payload) - known
        if unknown:
            raise ReplyScriptError(f"oauth settings: unknown field(s) {sorted(unknown)}")
        expires_in = payload.get("expires_in")
        if expires_in is not None and (not isinstance(expires_in, int) or isinstance(expires_in, bool)):
            raise ReplyScriptError("expires_in: must be an integer")
        delay = payload.get("delay_seconds")
        if delay is not None and (not isinstance(delay, int | float) or isinstance(delay, bool) or delay < 0):
            raise ReplyScriptError("delay_seconds: must be a non-negative number")
        for key in ("fail", "strict_refresh_tokens"):
            if key in payload and payload[key] is not None and not isinstance(payload[key], bool):
                raise ReplyScriptError(f"{key}: must be a boolean")
        accepted = payload.get("accepted_refresh_tokens")
        if accepted is not None and (
            not isinstance(accepted, list) or not all(isinstance(token, str) for token in accepted)
        ):
            raise ReplyScriptError("accepted_refresh_tokens: must be a list of strings")
        self.configure_oauth(
            expires_in=expires_in,
            delay_seconds=None if delay is None else float(delay),
            fail=payload.get("fail"),
            strict_refresh_tokens=payload.get("strict_refresh_tokens"),
            accepted_refresh_tokens=accepted,
        )

    def oauth_settings(self) -> OAuthSettings:
        with self._lock:
            return OAuthSettings(
                expires_in=self._oauth.expires_in,
                delay_seconds=self._oauth.delay_seconds,
                fail=self._oauth.fail,
                strict_refresh_tokens=self._oauth.strict_refresh_tokens,
                accepted_refresh_tokens=set(self._oauth.accepted_refresh_tokens),
            )

    @property
    def oauth_calls(self) -> int:
        with self._lock:
            return self._oauth_calls

    def oauth_requests(self) -> list[Any]:
        """The bodies of every token-endpoint call, in arrival order."""
        with self._lock:
            return list(self._oauth_requests)

    def oauth_snapshot(self) -> dict[str, Any]:
        """``GET /_fake/oauth`` payload."""
        with self._lock:
            return {"calls": self._oauth_calls, "requests": list(self._oauth_requests)}

    def oauth_arrived(self, body: Any) -> float:
        """Count and record a token-endpoint call at arrival; returns the delay to wait before answering.

        Counting happens on arrival (not after the delay) so that a test can see two overlapping calls
        even while both are still waiting.
        """
        with self._lock:
            self._oauth_calls += 1
            self._oauth_requests.append(body)
            return self._oauth.delay_seconds

    def oauth_answer(self, body: Any) -> tuple[int, dict[str, Any]]:
        """Decide the token endpoint's answer (status, JSON body), after the configured delay.

        The decision is taken after the delay on purpose: two uncoalesced concurrent refreshes with the
        same token then see the rotation done by the first one, so strict mode rejects the second.
        """
        with self._lock:
            settings = self._oauth
            if settings.fail:
                return 400, {"error": "invalid_grant", "error_description": "Refresh token is invalid"}
            if not isinstance(body, Mapping):
                return 400, {"error": "invalid_request", "error_description": "Body must be a JSON object"}
            if body.get("grant_type") != "refresh_token":
                return 400, {"error": "unsupported_grant_type", "error_description": "Use refresh_token"}
            refresh_token = body.get("refresh_token")
            if not isinstance(refresh_token, str) or not refresh_token:
                return 400, {"error": "invalid_request", "error_description": "refresh_token is required"}
            if settings.strict_refresh_tokens:
                if refresh_token in settings.accepted_refresh_tokens:
                    settings.accepted_refresh_tokens.discard(refresh_token)
                elif refresh_token != self._last_issued_refresh_token:
                    return 400, {"error": "invalid_grant", "error_description": "Refresh token is stale"}
            self._tokens_issued += 1
            number = self._tokens_issued
            self._last_issued_refresh_token = f"fake-refresh-{number}"
            return 200, {
                "access_token": f"fake-access-{number}",
                "refresh_token": self._last_issued_refresh_token,
                "expires_in": settings.expires_in,
                "token_type": "Bearer",
                "scope": "user:inference user:profile",
            }
