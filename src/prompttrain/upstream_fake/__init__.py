"""A fast, scriptable stand-in for Anthropic's Messages API (and its OAuth token endpoint).

Used by tests, demos and benchmarks, since no machine here can reach Anthropic.  ``create_app`` builds
the ASGI app around a :class:`FakeUpstreamState`, which holds the queue of scripted replies, the record
of received requests and the token endpoint's state; the same operations are exposed over HTTP under
``/_fake/*`` for tests running in another process.  ``replies`` holds the wire-format builders.
"""

from __future__ import annotations

from prompttrain.upstream_fake.app import FakeUpstreamServer, create_app, run
from prompttrain.upstream_fake.replies import ReplyScriptError
from prompttrain.upstream_fake.state import FakeUpstreamState, OAuthSettings

__all__ = [
    "FakeUpstreamServer",
    "FakeUpstreamState",
    "OAuthSettings",
    "ReplyScriptError",
    "create_app",
    "run",
]
