"""Which headers cross the proxy, which are recorded, and how `anthropic-beta` is merged."""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
TRAIN_HEADER = "train-id"
ACCOUNT_HEADER = "x-train-account"
SESSION_HEADER = "x-claude-code-session-id"
CLIENT_CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})
# Never sent upstream: ours, the client's credential (replaced by the account's), and what httpx sets itself.
NOT_FORWARDED = HOP_BY_HOP | {TRAIN_HEADER, ACCOUNT_HEADER, "host", "content-length"}
OAUTH_BETA = "oauth-2025-04-20"
# We must read the response to record usage: only ask for encodings the standard library can decode.
DECODABLE_ENCODINGS = ("gzip", "deflate", "identity")

RECORDED_REQUEST_HEADERS = frozenset(
    {
        "user-agent",
        "content-type",
        "accept",
        "anthropic-version",
        "anthropic-beta",
        "anthropic-dangerous-direct-browser-access",
        "x-app",
        SESSION_HEADER,
        "x-forwarded-for",
        "x-real-ip",
        TRAIN_HEADER,
        ACCOUNT_HEADER,
    }
)
RECORDED_REQUEST_PREFIXES = ("x-stainless-",)
RECORDED_RESPONSE_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "content-encoding",
        "date",
        "request-id",
        "x-request-id",
        "retry-after",
        "x-should-retry",
        "server",
        "cf-ray",
        "via",
        "x-envoy-upstream-service-time",
    }
)
RECORDED_RESPONSE_PREFIXES = ("anthropic-",)


def connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Header names listed in `Connection:` are hop-by-hop too (RFC 9110 §7.6.1)."""
    names: set[str] = set()
    for name, value in headers:
        if name == "connection":
            names.update(token.strip().lower() for token in value.split(",") if token.strip())
    return names


def merge_betas(*values: str | None) -> str:
    seen: dict[str, None] = {}
    for value in values:
        for item in (value or "").split(","):
            item = item.strip()
            if item:
                seen.setdefault(item, None)
    return ",".join(seen)


def narrow_accept_encoding(value: str) -> str:
    accepted = []
    for part in value.split(","):
        coding = part.split(";", 1)[0].strip().lower()
        if coding in DECODABLE_ENCODINGS:
            accepted.append(part.strip())
    return ", ".join(accepted) or "identity"


def recorded_request_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {
        name: value
        for name, value in headers
        if name in RECORDED_REQUEST_HEADERS or name.startswith(RECORDED_REQUEST_PREFIXES)
    }


def recorded_response_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {
        name: value
        for name, value in headers
        if name in RECORDED_RESPONSE_HEADERS or name.startswith(RECORDED_RESPONSE_PREFIXES)
    }


SECRET_QUERY_NAMES = ("key", "token", "secret", "auth", "password", "signature")


def recorded_path(path: str, query: str) -> str:
    """The path and query as recorded: values of parameters that look like credentials are redacted."""
    if not query:
        return path
    parts = []
    for part in query.split("&"):
        name, separator, _ = part.partition("=")
        if separator and any(word in name.lower() for word in SECRET_QUERY_NAMES):
            part = f"{name}=[redacted]"
        parts.append(part)
    return f"{path}?{'&'.join(parts)}"
