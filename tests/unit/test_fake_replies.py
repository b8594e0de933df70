"""Unit tests of the fake upstream's pure reply builders (``replies.py``) and its state (``state.py``)."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from prompttrain.upstream_fake.replies import (
    DEFAULT_TEXT,
    ReplyScriptError,
    build_content,
    build_message,
    build_sse_events,
    compute_usage,
    default_error_type,
    default_stop_reason,
    encode_sse,
    error_body,
    has_tool_result,
    last_user_text,
    rate_limit_headers,
    reply_matches,
    split_chunks,
    stream_error_event,
    system_text,
    validate_reply,
)
from prompttrain.upstream_fake.state import FakeUpstreamState


def _ids() -> Any:
    counter = itertools.count(1)
    return lambda: f"toolu_fake_{next(counter)}"


def _parse_events(events: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    parsed = []
    for raw in events:
        assert raw.endswith(b"\n\n") and raw.count(b"\n\n") == 1
        event_line, data_line = raw[:-2].split(b"\n")
        assert event_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        data = orjson.loads(data_line[len(b"data: ") :])
        event = event_line[len(b"event: ") :].decode()
        assert data["type"] == event
        parsed.append((event, data))
    return parsed


def _request(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5-20250929", "max_tokens": 100, "messages": list(messages), **extra}


# ------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------


def test_validate_accepts_full_script_and_defaults_repeat() -> None:
    script = {
        "match": {"model_contains": "opus", "has_tool_result": True, "stream": False},
        "content": [
            {"type": "thinking", "thinking": "hmm"},
            {"type": "text", "text": "hi"},
            {"type": "tool_use", "name": "bash", "input": {"cmd": "ls"}, "id": "toolu_x"},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 5, "cache_read_input_tokens": 7},
        "headers": {"X-Custom": 1, "anthropic-ratelimit-unified-status": None},
        "delay_ms": 10,
        "stream_error_after_events": 3,
    }
    out = validate_reply(script)
    assert out["repeat"] == 1
    assert out["headers"] == {"x-custom": "1", "anthropic-ratelimit-unified-status": None}
    assert "repeat" not in script  # the caller's dict is not modified


@pytest.mark.parametrize(
    ("script", "fragment"),
    [
        ({"contnet": []}, "unknown field"),
        ({"content": [{"type": "image"}]}, "content[0].type"),
        ({"content": [{"type": "text"}]}, "content[0].text"),
        ({"content": [{"type": "tool_use", "name": "x", "input": []}]}, "content[0].input"),
        ({"match": {"model": "x"}}, "unknown condition"),
        ({"match": {"stream": "yes"}}, "match.stream"),
        ({"stop_reason": "done"}, "stop_reason"),
        ({"usage": {"input_tokens": -1}}, "usage.input_tokens"),
        ({"delay_ms": True}, "delay_ms"),
        ({"error": {"status": 200}}, "error.status"),
        ({"error": {"status": 429, "retry_after": "soon"}}, "retry_after"),
        ({"drop": "later"}, "drop"),
        ({"drop": "mid_stream", "error": {"status": 500}}, "cannot be combined"),
        ({"repeat": 0}, "repeat"),
        ("not a dict", "must be an object"),
    ],
)
def test_validate_rejects_malformed_scripts(script: Any, fragment: str) -> None:
    with pytest.raises(ReplyScriptError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        validate_reply(script)


# ------------------------------------------------------------------------------------------------------------
# Request inspection and matching
# ------------------------------------------------------------------------------------------------------------


def test_last_user_text_handles_strings_blocks_and_tool_results() -> None:
    assert last_user_text(_request({"role": "user", "content": "plain"})) == "plain"
    body = _request(
        {"role": "user", "content": "older"},
        {"role": "assistant", "content": "reply"},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "file listing"},
                {"type": "tool_result", "tool_use_id": "t2", "content": [{"type": "text", "text": "nested"}]},
                {"type": "text", "text": "and more"},
            ],
        },
    )
    assert last_user_text(body) == "file listing\nnested\nand more"
    assert has_tool_result(body)
    assert not has_tool_result(_request({"role": "user", "content": "plain"}))
    assert last_user_text({"messages": []}) == ""


def test_system_text_accepts_string_and_blocks() -> None:
    assert system_text({"system": "be brief"}) == "be brief"
    assert system_text({"system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}) == "a\nb"
    assert system_text({}) == ""


def test_reply_matches_requires_every_condition() -> None:
    body = _request({"role": "user", "content": "please list files"}, system="You are Claude Code")
    script = validate_reply(
        {
            "match": {
                "model_contains": "sonnet",
                "last_user_text_contains": "list files",
                "system_contains": "Claude Code",
                "has_tool_result": False,
                "stream": True,
            }
        }
    )
    assert reply_matches(script, body, stream=True)
    assert not reply_matches(script, body, stream=False)
    assert not reply_matches(script, {**body, "model": "claude-opus-4-1"}, stream=True)
    assert not reply_matches(script, {**body, "system": "other"}, stream=True)
    assert reply_matches(validate_reply({}), body, stream=False)


# ------------------------------------------------------------------------------------------------------------
# Building messages and events
# ------------------------------------------------------------------------------------------------------------


def test_build_content_defaults_and_fills_ids_and_signatures() -> None:
    assert build_content(None, _ids()) == [{"type": "text", "text": DEFAULT_TEXT}]
    blocks = build_content(
        [
            {"type": "thinking", "thinking": "hmm"},
            {"type": "tool_use", "name": "a", "input": {"x": 1}},
            {"type": "tool_use", "name": "b", "id": "toolu_mine"},
            {"type": "tool_use", "name": "c", "input": {}},
        ],
        _ids(),
    )
    assert blocks[0]["signature"] and blocks[0]["signature"] == build_content(blocks[:1], _ids())[0]["signature"]
    assert [block.get("id") for block in blocks[1:]] == ["toolu_fake_1", "toolu_mine", "toolu_fake_2"]
    assert blocks[2]["input"] == {}
    assert default_stop_reason(blocks) == "tool_use"
    assert default_stop_reason([{"type": "text", "text": "x"}]) == "end_turn"


def test_compute_usage_estimates_and_overrides() -> None:
    content = [{"type": "text", "text": "one two three four"}]
    assert compute_usage(None, 400, content) == {
        "input_tokens": 100,
        "output_tokens": 4,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    assert compute_usage(None, 2, [{"type": "text", "text": ""}])["input_tokens"] == 1
    assert compute_usage(None, 2, [{"type": "text", "text": ""}])["output_tokens"] == 1
    usage = compute_usage({"output_tokens": 9, "cache_read_input_tokens": 50}, 400, content)
    assert usage["output_tokens"] == 9 and usage["cache_read_input_tokens"] == 50 and usage["input_tokens"] == 100


@pytest.mark.parametrize("length", [0, 1, 2, 5, 29, 600, 5000, 100_000])
def test_split_chunks_concatenates_back(length: int) -> None:
    text = "".join(chr(ord("a") + i % 26) if i % 7 else "é" for i in range(length))
    chunks = split_chunks(text)
    assert "".join(chunks) == text
    assert 1 <= len(chunks) <= 64
    if length >= 3:
        assert len(chunks) >= 3


def test_encode_sse_framing() -> None:
    assert encode_sse("ping", {"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'


def test_sse_events_follow_anthropic_sequence() -> None:
    content = build_content(
        [
            {"type": "thinking", "thinking": "let me think about this"},
            {"type": "text", "text": "Here is the answer you wanted."},
            {"type": "tool_use", "name": "bash", "input": {"command": "ls -la", "nested": {"a": [1, 2]}}},
        ],
        _ids(),
    )
    usage = compute_usage({"input_tokens": 10, "cache_creation_input_tokens": 3}, 0, content)
    message = build_message(message_id="msg_x", model="m", content=content, stop_reason="tool_use", usage=usage)
    events = _parse_events(build_sse_events(message))
    kinds = [event for event, _ in events]
    assert kinds[:2] == ["message_start", "ping"]
    assert kinds[-2:] == ["message_delta", "message_stop"]

    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"] == "msg_x"
    assert start["usage"] == {
        "input_tokens": 10,
        "cache_creation_input_tokens": 3,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
    }
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": usage["output_tokens"]},
    }

    deltas: dict[int, list[dict[str, Any]]] = {}
    starts: dict[int, dict[str, Any]] = {}
    for event, data in events:
        if event == "content_block_start":
            starts[data["index"]] = data["content_block"]
        elif event == "content_block_delta":
            deltas.setdefault(data["index"], []).append(data["delta"])
    assert starts[0] == {"type": "thinking", "thinking": "", "signature": ""}
    assert "".join(d["thinking"] for d in deltas[0][:-1]) == "let me think about this"
    assert deltas[0][-1] == {"type": "signature_delta", "signature": content[0]["signature"]}
    assert all(d["type"] == "text_delta" for d in deltas[1]) and len(deltas[1]) >= 3
    assert "".join(d["text"] for d in deltas[1]) == "Here is the answer you wanted."
    assert starts[2] == {"type": "tool_use", "id": "toolu_fake_1", "name": "bash", "input": {}}
    partial = "".join(d["partial_json"] for d in deltas[2])
    assert orjson.loads(partial) == {"command": "ls -la", "nested": {"a": [1, 2]}}
    assert kinds.count("content_block_stop") == 3


def test_errors_and_headers() -> None:
    assert default_error_type(429) == "rate_limit_error"
    assert default_error_type(529) == "overloaded_error"
    assert default_error_type(500) == "api_error"
    assert default_error_type(503) == "api_error"
    assert default_error_type(418) == "invalid_request_error"
    assert error_body("x", "y") == {"type": "error", "error": {"type": "x", "message": "y"}}
    assert error_body("x", "y", "req_1")["request_id"] == "req_1"
    assert _parse_events([stream_error_event()]) == [
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    ]
    headers = rate_limit_headers(1_000_000.5)
    assert headers["anthropic-ratelimit-unified-status"] == "allowed"
    assert headers["anthropic-ratelimit-unified-representative-claim"] == "five_hour"
    assert 0 <= float(headers["anthropic-ratelimit-unified-5h-utilization"]) <= 1
    reset = int(headers["anthropic-ratelimit-unified-5h-reset"])
    assert 1_000_000 < reset <= 1_000_000 + 5 * 3600 and reset % (5 * 3600) == 0
    assert headers["anthropic-ratelimit-unified-reset"] == headers["anthropic-ratelimit-unified-5h-reset"]
    assert int(headers["anthropic-ratelimit-unified-7d-reset"]) > 1_000_000


# ------------------------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------------------------


def test_state_takes_first_matching_reply_and_counts_repeats() -> None:
    state = FakeUpstreamState()
    state.add_replies(
        [
            {"match": {"stream": True}, "content": [{"type": "text", "text": "streamed"}]},
            {"content": [{"type": "text", "text": "twice"}], "repeat": 2},
            {"content": [{"type": "text", "text": "forever"}], "repeat": -1},
        ]
    )
    body = _request({"role": "user", "content": "hi"})
    texts = [(state.take_reply(body, stream=False) or {})["content"][0]["text"] for _ in range(4)]
    assert texts == ["twice", "twice", "forever", "forever"]
    assert (state.take_reply(body, stream=True) or {})["content"][0]["text"] == "streamed"
    assert [r["content"][0]["text"] for r in state.pending_replies()] == ["forever"]
    state.reset()
    assert state.take_reply(body, stream=False) is None


def test_state_add_replies_is_all_or_nothing() -> None:
    state = FakeUpstreamState()
    with pytest.raises(ReplyScriptError, match=r"replies\[1\]"):
        state.add_replies([{}, {"bogus": 1}])
    assert state.pending_replies() == []


def test_state_records_requests_with_bound() -> None:
    state = FakeUpstreamState(max_received=2)
    for index in range(3):
        state.record_request("POST", "/v1/messages", {}, {"x": str(index)}, {"n": index})
    assert [entry["body"]["n"] for entry in state.received_requests()] == [1, 2]
    assert state.received_requests(path="/v1/other") == []
    assert state.next_tool_use_id() == "toolu_fake_1"
    assert state.new_request_id().startswith("req_fake_")


def test_state_oauth_rotation_and_strictness() -> None:
    state = FakeUpstreamState()
    refresh = {"grant_type": "refresh_token", "refresh_token": "anything", "client_id": "c"}
    assert state.oauth_arrived(refresh) == 0.0
    status, body = state.oauth_answer(refresh)
    assert status == 200
    assert body == {
        "access_token": "fake-access-1",
        "refresh_token": "fake-refresh-1",
        "expires_in": 3600,
        "token_type": "Bearer",
        "scope": "user:inference user:profile",
    }

    state.configure_oauth(strict_refresh_tokens=True, accepted_refresh_tokens=["seeded"], expires_in=60)
    assert state.oauth_answer({**refresh, "refresh_token": "unknown"}) == (
        400,
        {"error": "invalid_grant", "error_description": "Refresh token is stale"},
    )
    status, body = state.oauth_answer({**refresh, "refresh_token": "seeded"})
    assert status == 200 and body["refresh_token"] == "fake-refresh-2" and body["expires_in"] == 60
    assert state.oauth_answer({**refresh, "refresh_token": "seeded"})[0] == 400  # consumed
    assert state.oauth_answer({**refresh, "refresh_token": "fake-refresh-1"})[0] == 400  # rotated away
    assert state.oauth_answer({**refresh, "refresh_token": "fake-refresh-2"})[0] == 200

    state.configure_oauth(fail=True)
    assert state.oauth_answer({**refresh, "refresh_token": "fake-refresh-3"})[1]["error"] == "invalid_grant"
    assert state.oauth_answer({"grant_type": "password"})[0] == 400
    assert state.oauth_calls == 1 and state.oauth_snapshot() == {"calls": 1, "requests": [refresh]}

    with pytest.raises(ReplyScriptError):
        state.configure_oauth_from_json({"delay_seconds": "slow"})
    state.configure_oauth_from_json({"delay_seconds": 0.5, "fail": False})
    assert state.oauth_settings().delay_seconds == 0.5
    state.reset()
    assert state.oauth_calls == 0 and state.oauth_settings().delay_seconds == 0.0
