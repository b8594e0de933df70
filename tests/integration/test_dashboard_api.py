"""The dashboard's JSON API, authentication and CSRF against a real `prompttrain dashboard` on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.browser.support import (
    DASHBOARD_KEY,
    conversation_rows,
    create_database,
    insert,
    migrate_database,
    request_row,
    start_dashboard,
)
from tests.helpers import PROMPTTRAIN, Service, write_json

pytestmark = pytest.mark.postgres

KEY = {"X-Dashboard-Key": DASHBOARD_KEY}
NOW = datetime.now(UTC).replace(microsecond=0)


@dataclass
class Seeded:
    dashboard: Service
    database_url: str
    rows: list[dict[str, object]]
    conversation: uuid.UUID
    http: httpx.Client


def seed_rows(conversation: uuid.UUID) -> list[dict[str, object]]:
    same = NOW - timedelta(minutes=30)
    rows: list[dict[str, object]] = [
        request_row(
            train_id="alpha", account_id="acct-a", timestamp=NOW - timedelta(minutes=50), model="claude-haiku-4-5"
        ),
        request_row(train_id="alpha", account_id="acct-a", timestamp=same, request_id=uuid.UUID(int=1, version=4)),
        request_row(train_id="alpha", account_id="acct-b", timestamp=same, request_id=uuid.UUID(int=2, version=4)),
        request_row(
            train_id="beta",
            account_id="acct-b",
            timestamp=NOW - timedelta(minutes=20),
            status_code=429,
            outcome="upstream_error",
            error_type="rate_limit_error",
            error_message="Number of request tokens has exceeded your per-minute rate limit",
            input_tokens=0,
            output_tokens=0,
            cost_usd=0.0,
        ),
        request_row(
            train_id="beta",
            account_id="acct-b",
            timestamp=NOW - timedelta(minutes=10),
            response_headers={
                "anthropic-ratelimit-unified-status": "allowed",
                "anthropic-ratelimit-unified-5h-utilization": "0.66",
                "anthropic-ratelimit-unified-5h-reset": str(int((NOW + timedelta(hours=1)).timestamp())),
                "anthropic-ratelimit-unified-7d-utilization": "0.25",
                "anthropic-ratelimit-unified-7d-reset": str(int((NOW + timedelta(days=3)).timestamp())),
            },
        ),
        request_row(
            train_id="alpha",
            account_id="acct-a",
            timestamp=NOW - timedelta(minutes=5),
            ratelimit_status="allowed_warning",
            ratelimit_5h_utilization=0.91,
            ratelimit_5h_reset=NOW + timedelta(hours=2),
            ratelimit_7d_utilization=0.4,
            ratelimit_7d_reset=NOW + timedelta(days=2),
        ),
        request_row(train_id="gamma", timestamp=NOW - timedelta(days=3), session_id="session-xyz"),
    ]
    return rows + conversation_rows(conversation, NOW - timedelta(minutes=40))


@pytest.fixture(scope="module")
def seeded(
    postgres_admin_url: str, _postgres_databases: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    """One database and dashboard for the read-only tests of this module (they do not change the data)."""
    postgres_url = create_database(postgres_admin_url, _postgres_databases)
    tmp_path = tmp_path_factory.mktemp("dashboard-api")
    migrate_database(postgres_url)
    conversation = uuid.uuid4()
    rows = seed_rows(conversation)
    body = {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hello <b>x</b>"}]}
    response = {"type": "message", "role": "assistant", "content": [{"type": "text", "text": "hi"}]}
    insert(postgres_url, rows, {rows[0]["request_id"]: (body, response)})  # type: ignore[dict-item]
    credentials = tmp_path / "credentials"
    write_json(credentials / "trains" / "alpha.json", {"auth": "passthrough"})
    write_json(
        credentials / "accounts" / "acct-a.credentials.json",
        {
            "type": "oauth",
            "oauth": {"accessToken": "sk-ant-oat-SECRET", "refreshToken": "r", "expiresAt": 1, "isMax": True},
        },
    )
    write_json(credentials / "accounts" / "acct-c.credentials.json", {"type": "api_key", "api_key": "sk-ant-SECRET"})
    dashboard = start_dashboard(tmp_path, postgres_url, credentials)
    with httpx.Client(base_url=dashboard.url, timeout=10) as http:
        yield Seeded(dashboard, postgres_url, rows, conversation, http)
    dashboard.stop()


ENDPOINTS = [
    "/api/requests",
    f"/api/requests/{uuid.UUID(int=1, version=4)}",
    "/api/storage-stats",
    "/api/overview",
    "/api/conversations",
    "/api/token-usage",
    "/api/trains",
    "/sse",
]
PAGES = ["/", "/requests", "/conversations", "/token-usage", "/trains", f"/requests/{uuid.UUID(int=1, version=4)}"]


def assert_error(response: httpx.Response, status: int, error_type: str, mentions: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type
    assert mentions in body["error"]["message"]


def test_every_endpoint_needs_the_key_and_a_wrong_key_is_refused(seeded: Seeded) -> None:
    http = seeded.http
    for path in ENDPOINTS:
        assert_error(http.get(path), 401, "authentication_error")
        assert_error(http.get(path, headers={"X-Dashboard-Key": "wrong"}), 401, "authentication_error", "invalid")
    for path in ENDPOINTS[:-1]:
        assert http.get(path, headers=KEY).status_code == 200, path
    for path in PAGES:
        refused = http.get(path)
        assert refused.status_code == 303 and refused.headers["location"].startswith("/login?next=")
        assert http.get(path, headers=KEY).status_code == 200, path
    for path in ("/health", "/metrics", "/openapi.json", "/login", "/static/app.js"):
        assert http.get(path).status_code == 200, path


def test_the_dashboard_refuses_to_start_without_authentication(tmp_path: Path, postgres_url: str) -> None:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("DASHBOARD_")}
    environment["DATABASE_URL"] = postgres_url
    finished = subprocess.run(
        [PROMPTTRAIN, "dashboard", "--host", "127.0.0.1", "--port", "1"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 2
    assert "DASHBOARD_API_KEY" in finished.stderr and "DASHBOARD_OPEN=true" in finished.stderr


def test_requests_keyset_pagination_visits_every_row_once_in_order(seeded: Seeded) -> None:
    http = seeded.http
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "3", **({"before": cursor} if cursor else {})}
        page = http.get("/api/requests", params=params, headers=KEY).json()
        seen += [row["request_id"] for row in page["requests"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    expected = sorted(seeded.rows, key=lambda row: (row["timestamp"], str(row["request_id"])), reverse=True)
    assert seen == [str(row["request_id"]) for row in expected]
    second = http.get("/api/requests", params={"limit": "3", "before": _cursor_after(http, 3)}, headers=KEY).json()
    back = http.get("/api/requests", params={"limit": "3", "after": second["prev_cursor"]}, headers=KEY).json()
    assert [row["request_id"] for row in back["requests"]] == seen[:3]


def _cursor_after(http: httpx.Client, count: int) -> str:
    return str(http.get("/api/requests", params={"limit": str(count)}, headers=KEY).json()["next_cursor"])


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"train_id": "beta"}, 2),
        ({"account_id": "acct-a"}, 3),
        ({"model": "claude-haiku-4-5"}, 1),
        ({"status": "error"}, 1),
        ({"status": "429"}, 1),
        ({"status": "4xx"}, 1),
        ({"since": "2h"}, 11),
        ({"until": "1d"}, 1),
        ({"q": "per-minute rate"}, 1),
        ({"q": "SESSION-XYZ"}, 1),
        ({"q": "100%_"}, 0),
        ({"train_id": "alpha", "status": "ok", "since": "1h"}, 4),
    ],
)
def test_request_filters(seeded: Seeded, params: dict[str, str], expected: int) -> None:
    rows = seeded.http.get("/api/requests", params=params, headers=KEY).json()["requests"]
    assert len(rows) == expected, rows


@pytest.mark.parametrize(
    ("path", "mentions"),
    [
        ("/api/requests?limit=0", "limit"),
        ("/api/requests?limit=501", "limit"),
        ("/api/requests?limit=many", "limit"),
        ("/api/requests?since=yesterday", "since"),
        ("/api/requests?since=1h&until=2h", "since"),
        ("/api/requests?until=1999-01-01T00:00:00", "until"),
        ("/api/requests?status=teapot", "status"),
        ("/api/requests?train_id=two%20words", "train_id"),
        ("/api/requests?before=garbage", "before"),
        ("/api/requests?after=%25%25", "after"),
        ("/api/requests?q=" + "x" * 300, "q"),
        ("/api/requests/not-a-uuid", "request_id"),
        ("/api/conversations/123", "conversation_id"),
        ("/api/conversations?limit=-1", "limit"),
        ("/api/conversations?before=abc", "before"),
        ("/api/overview?range=2y", "range"),
        ("/api/storage-stats?since=tomorrow-ish", "since"),
        ("/api/storage-stats?train_id=%3Cscript%3E", "train_id"),
    ],
)
def test_bad_parameters_get_a_clear_400(seeded: Seeded, path: str, mentions: str) -> None:
    assert_error(seeded.http.get(path, headers=KEY), 400, "invalid_request_error", mentions)


def test_bad_parameters_on_pages_are_a_400_page_not_a_500(seeded: Seeded) -> None:
    for path in (
        "/requests?since=bad",
        "/requests/xyz",
        "/conversations/xyz",
        f"/conversations/{seeded.conversation}?view=3d",
    ):
        response = seeded.http.get(path, headers=KEY)
        assert response.status_code == 400 and "text/html" in response.headers["content-type"], path
    missing = seeded.http.get(f"/conversations/{uuid.uuid4()}", headers=KEY)
    assert missing.status_code == 404


def test_request_detail_has_metadata_and_exact_bodies(seeded: Seeded) -> None:
    first = seeded.rows[0]
    detail = seeded.http.get(f"/api/requests/{first['request_id']}", headers=KEY).json()
    assert detail["request"]["train_id"] == "alpha" and detail["payload_stored"] is True
    assert detail["request_body"]["messages"][0]["content"] == "hello <b>x</b>"
    assert detail["response_body"]["content"][0]["text"] == "hi"
    assert_error(seeded.http.get(f"/api/requests/{uuid.uuid4()}", headers=KEY), 404, "not_found_error")


def test_conversations_list_and_detail(seeded: Seeded) -> None:
    listed = seeded.http.get("/api/conversations", headers=KEY).json()["conversations"]
    assert len(listed) == 1
    summary = listed[0]
    assert summary["conversation_id"] == str(seeded.conversation)
    assert (summary["requests"], summary["branches"], summary["subagent_branches"], summary["compactions"]) == (
        5,
        2,
        1,
        0,
    )
    detail = seeded.http.get(f"/api/conversations/{seeded.conversation}", headers=KEY).json()
    branches = {branch["branch_id"]: branch for branch in detail["branches"]}
    assert branches["subtask_1"]["kind"] == "subagent"
    assert branches["subtask_1"]["task_description"] == "Survey the test suite"
    assert branches["subtask_1"]["parent_task_request_id"] == detail["requests"][1]["request_id"]
    assert [request["branch_id"] for request in detail["requests"]] == [
        "main",
        "main",
        "subtask_1",
        "subtask_1",
        "main",
    ]
    assert_error(seeded.http.get(f"/api/conversations/{uuid.uuid4()}", headers=KEY), 404, "not_found_error")


def test_token_usage_windows_from_columns_and_from_headers(seeded: Seeded) -> None:
    usage = seeded.http.get("/api/token-usage", headers=KEY).json()
    accounts = {account["account_id"]: account for account in usage["accounts"]}
    assert {"acct-a", "acct-b", "acct-c", "passthrough"} <= set(accounts)
    a, b = accounts["acct-a"], accounts["acct-b"]
    assert a["status"] == "allowed_warning" and a["five_hour"]["utilization"] == 0.91
    assert a["five_hour"]["resets_at"].startswith((NOW + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M"))
    assert a["five_hour"]["tokens"]["requests"] == 3  # the window ends in 2 h, so it started 3 h ago
    assert b["five_hour"]["utilization"] == 0.66 and b["seven_day"]["utilization"] == 0.25  # headers only
    assert accounts["acct-c"]["five_hour"]["utilization"] is None
    trains = {train["train_id"]: train for train in usage["trains"]}
    assert trains["gamma"]["five_hour"]["requests"] == 0 and trains["gamma"]["seven_day"]["requests"] == 1


def test_storage_stats_overview_and_trains(seeded: Seeded) -> None:
    stats = seeded.http.get("/api/storage-stats", headers=KEY).json()
    assert stats["totals"]["requests"] == len(seeded.rows) and stats["totals"]["errors"] == 1
    assert stats["payloads"] == 1 and stats["table_bytes"]["api_requests"] > 0
    recent = seeded.http.get("/api/storage-stats", params={"since": "1d", "train_id": "alpha"}, headers=KEY).json()
    assert recent["totals"]["requests"] == 4
    overview = seeded.http.get("/api/overview", params={"range": "1h"}, headers=KEY).json()
    assert overview["totals"]["requests"] == 11 and len(overview["series"]) >= 60
    assert {item["name"] for item in overview["by_train"]} == {"alpha", "beta", "default"}
    trains = seeded.http.get("/api/trains", headers=KEY)
    assert "SECRET" not in trains.text
    accounts = {account["name"]: account for account in trains.json()["accounts"]}
    assert accounts == {
        "acct-a": {"name": "acct-a", "kind": "oauth", "plan": "max"},
        "acct-c": {"name": "acct-c", "kind": "api_key", "plan": None},
    }
    page = seeded.http.get("/trains", headers=KEY)
    assert "acct-a" in page.text and "SECRET" not in page.text


def test_openapi_document_lists_the_api(seeded: Seeded) -> None:
    document = seeded.http.get("/openapi.json").json()
    for path in (
        "/api/requests",
        "/api/requests/{request_id}",
        "/api/storage-stats",
        "/api/conversations",
        "/api/conversations/{conversation_id}",
        "/api/token-usage",
        "/health",
        "/metrics",
        "/sse",
    ):
        assert path in document["paths"], path
    assert "RequestSummary" in document["components"]["schemas"]


def test_security_headers_and_csrf(seeded: Seeded) -> None:
    with httpx.Client(base_url=seeded.dashboard.url, timeout=10) as http:
        check_headers_and_csrf(http)


def check_headers_and_csrf(http: httpx.Client) -> None:
    page = http.get("/login")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert page.headers["x-frame-options"] == "DENY"
    assert "prompttrain_csrf=" in page.headers["set-cookie"] and "SameSite=Strict" in page.headers["set-cookie"]
    token = http.cookies["prompttrain_csrf"]
    assert http.post("/login", data={"key": DASHBOARD_KEY}).status_code == 403
    assert http.post("/login", data={"key": DASHBOARD_KEY, "_csrf": "x" * 43}).status_code == 403
    cross = http.post("/login", data={"key": DASHBOARD_KEY, "_csrf": token}, headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403
    assert http.post("/logout").status_code == 403
    wrong = http.post("/login", data={"key": "nope", "_csrf": token})
    assert wrong.status_code == 401 and "That key is not right." in wrong.text
    logged = http.post("/login", data={"key": DASHBOARD_KEY, "_csrf": token, "next": "//evil.example/x"})
    assert logged.status_code == 303 and logged.headers["location"] == "/"
    cookie = logged.headers["set-cookie"]
    assert "prompttrain_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert http.get("/api/requests").status_code == 200  # the cookie alone now
    assert http.post("/logout", data={"_csrf": token}).status_code == 303
    assert http.get("/api/requests").status_code == 401


def test_trusted_identity_header_with_allowed_domains(postgres_url: str, tmp_path: Path) -> None:
    migrate_database(postgres_url)
    dashboard = start_dashboard(
        tmp_path,
        postgres_url,
        dashboard_trusted_header="X-Auth-Request-Email",
        dashboard_allowed_domains="example.com, example.org",
    )
    try:
        ok = httpx.get(f"{dashboard.url}/api/requests", headers={"X-Auth-Request-Email": "alice@example.com"})
        assert ok.status_code == 200
        other = httpx.get(f"{dashboard.url}/api/requests", headers={"X-Auth-Request-Email": "mallory@evil.com"})
        assert_error(other, 403, "permission_error", "mallory@evil.com")
        assert_error(httpx.get(f"{dashboard.url}/api/requests"), 401, "authentication_error")
        page = httpx.get(f"{dashboard.url}/requests")
        assert page.status_code == 401 and "text/html" in page.headers["content-type"]  # no key: no login form
    finally:
        dashboard.stop()
