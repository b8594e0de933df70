"""Header rules: hop-by-hop, recorded allowlists, beta merging, accept-encoding."""

from __future__ import annotations

from prompttrain.proxy.headers import (
    connection_tokens,
    merge_betas,
    narrow_accept_encoding,
    recorded_path,
    recorded_request_headers,
    recorded_response_headers,
)


def test_merge_betas_dedupes_and_keeps_order() -> None:
    assert merge_betas("oauth-2025-04-20", "a, b", "b,oauth-2025-04-20 , c") == "oauth-2025-04-20,a,b,c"
    assert merge_betas(None, "") == ""


def test_connection_header_names_are_hop_by_hop() -> None:
    assert connection_tokens([("connection", "keep-alive, X-Custom"), ("x", "y")]) == {"keep-alive", "x-custom"}


def test_accept_encoding_is_narrowed_to_decodable_codings() -> None:
    assert narrow_accept_encoding("gzip, deflate, br, zstd") == "gzip, deflate"
    assert narrow_accept_encoding("br") == "identity"


def test_recorded_headers_never_include_credentials() -> None:
    request = recorded_request_headers(
        [
            ("authorization", "Bearer secret"),
            ("x-api-key", "sk-secret"),
            ("cookie", "c"),
            ("user-agent", "claude-cli/2"),
            ("x-stainless-lang", "js"),
            ("anthropic-beta", "x"),
        ]
    )
    assert request == {"user-agent": "claude-cli/2", "x-stainless-lang": "js", "anthropic-beta": "x"}
    response = recorded_response_headers(
        [("set-cookie", "s"), ("request-id", "req_1"), ("anthropic-ratelimit-unified-status", "allowed")]
    )
    assert response == {"request-id": "req_1", "anthropic-ratelimit-unified-status": "allowed"}


def test_recorded_paths_redact_credential_looking_parameters() -> None:
    assert recorded_path("/v1/messages", "beta=true") == "/v1/messages?beta=true"
    assert recorded_path("/v1/models", "") == "/v1/models"
    assert (
        recorded_path("/v1/x", "api_key=sk-1&limit=5&access_token=t")
        == "/v1/x?api_key=[redacted]&limit=5&access_token=[redacted]"
    )
