"""Trains, client keys, accounts and OAuth refresh, through real proxy processes and the fake upstream."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx

from prompttrain.credentials import digest_client_key
from tests.conftest import ProxyFactory
from tests.helpers import FakeUpstream, query, wait_until, write_json

BODY: dict[str, Any] = {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
HOUR_MS = 3_600_000


def api_key_account(directory: Path, name: str, key: str) -> None:
    write_json(directory / "accounts" / f"{name}.credentials.json", {"type": "api_key", "api_key": key})


def oauth_account(directory: Path, name: str, *, expires_in_ms: int, access: str = "old-access") -> None:
    write_json(
        directory / "accounts" / f"{name}.credentials.json",
        {
            "type": "oauth",
            "oauth": {
                "accessToken": access,
                "refreshToken": f"refresh-{name}",
                "expiresAt": int(time.time() * 1000) + expires_in_ms,
                "scopes": ["user:inference", "user:profile"],
                "isMax": True,
            },
        },
    )


def train(directory: Path, train_id: str, keys: list[str], accounts: list[str], **extra: Any) -> None:
    write_json(
        directory / "trains" / f"{train_id}.json",
        {
            "auth": "client-keys",
            "client_key_sha256": [digest_client_key(key).hex() for key in keys],
            "accounts": accounts,
            **extra,
        },
    )


def post(proxy_url: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{proxy_url}/v1/messages", json=BODY, headers=headers, timeout=30)


def test_client_key_train_uses_the_account_key_and_strips_our_headers(
    start_proxy: ProxyFactory, upstream: FakeUpstream, credentials_dir: Path, sqlite_url: str
) -> None:
    api_key_account(credentials_dir, "acme-api", "sk-ant-api-acme")
    train(credentials_dir, "acme", ["pt_acme_key"], ["acme-api"])
    proxy = start_proxy(sqlite_url)

    response = post(
        proxy.url,
        **{"train-id": "acme", "authorization": "Bearer pt_acme_key", "anthropic-beta": "tools-2024", "x-app": "cli"},
    )

    assert response.status_code == 200
    sent = upstream.received()[0]["headers"]
    assert sent["x-api-key"] == "sk-ant-api-acme"
    assert "authorization" not in sent and "train-id" not in sent and "x-train-account" not in sent
    assert sent["anthropic-beta"] == "tools-2024" and sent["x-app"] == "cli"
    wait_until(lambda: bool(query(sqlite_url, "SELECT 1 FROM api_requests")))
    row = query(sqlite_url, "SELECT train_id, account_id, request_headers FROM api_requests")
    assert (row[0]["train_id"], row[0]["account_id"]) == ("acme", "acme-api")
    assert "pt_acme_key" not in str(row) and "sk-ant-api-acme" not in str(row)


def test_explicit_account_default_account_and_rendezvous(
    start_proxy: ProxyFactory, upstream: FakeUpstream, credentials_dir: Path
) -> None:
    for name in ("alpha", "beta", "gamma"):
        api_key_account(credentials_dir, name, f"sk-{name}")
    train(credentials_dir, "pool", ["pt_pool"], ["alpha", "beta", "gamma"])
    train(credentials_dir, "pinned", ["pt_pinned"], ["alpha", "beta"], default_account="beta")
    proxy = start_proxy()

    post(proxy.url, **{"train-id": "pool", "x-api-key": "pt_pool", "x-train-account": "gamma"})
    for _ in range(3):
        post(proxy.url, **{"train-id": "pool", "x-api-key": "pt_pool"})
    post(proxy.url, **{"train-id": "pinned", "x-api-key": "pt_pinned"})

    keys = [item["headers"]["x-api-key"] for item in upstream.received()]
    assert keys[0] == "sk-gamma"
    from prompttrain.proxy.accounts import rendezvous_order

    expected = "sk-" + rendezvous_order("pool", ("alpha", "beta", "gamma"))[0]
    assert keys[1:4] == [expected] * 3
    assert keys[4] == "sk-beta"


def test_an_account_that_answered_429_cools_down(
    start_proxy: ProxyFactory, upstream: FakeUpstream, credentials_dir: Path
) -> None:
    from prompttrain.proxy.accounts import rendezvous_order

    for name in ("alpha", "beta"):
        api_key_account(credentials_dir, name, f"sk-{name}")
    train(credentials_dir, "pool", ["pt_pool"], ["alpha", "beta"])
    first, second = rendezvous_order("pool", ("alpha", "beta"))
    proxy = start_proxy()
    upstream.script({"error": {"status": 429, "type": "rate_limit_error", "message": "limit", "retry_after": 30}})
    assert post(proxy.url, **{"train-id": "pool", "x-api-key": "pt_pool"}).status_code == 429
    assert post(proxy.url, **{"train-id": "pool", "x-api-key": "pt_pool"}).status_code == 200
    keys = [item["headers"]["x-api-key"] for item in upstream.received()]
    assert keys == [f"sk-{first}", f"sk-{second}"]


def test_credential_files_take_effect_without_a_restart(
    start_proxy: ProxyFactory, upstream: FakeUpstream, credentials_dir: Path
) -> None:
    proxy = start_proxy()
    headers = {"train-id": "late", "x-api-key": "pt_one"}
    assert post(proxy.url, **headers).status_code == 401

    api_key_account(credentials_dir, "late-account", "sk-late")
    train(credentials_dir, "late", ["pt_one"], ["late-account"])
    wait_until(lambda: post(proxy.url, **headers).status_code == 200)

    train(credentials_dir, "late", ["pt_two"], ["late-account"])  # key rotated
    wait_until(lambda: post(proxy.url, **headers).status_code == 401)
    assert post(proxy.url, **{"train-id": "late", "x-api-key": "pt_two"}).status_code == 200

    api_key_account(credentials_dir, "late-account", "sk-late-rotated")
    wait_until(
        lambda: (
            post(proxy.url, **{"train-id": "late", "x-api-key": "pt_two"}).status_code == 200
            and upstream.received()[-1]["headers"]["x-api-key"] == "sk-late-rotated"
        )
    )

    (credentials_dir / "trains" / "late.json").unlink()
    wait_until(lambda: post(proxy.url, **{"train-id": "late", "x-api-key": "pt_two"}).status_code == 401)


def test_files_outside_the_directory_and_bad_names_are_ignored(
    start_proxy: ProxyFactory, upstream: FakeUpstream, credentials_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.json"
    write_json(outside, {"auth": "passthrough"})
    (credentials_dir / "trains" / "escape.json").symlink_to(outside)
    write_json(credentials_dir / "trains" / "bad name!.json", {"auth": "passthrough"})
    proxy = start_proxy()
    assert post(proxy.url, **{"train-id": "escape", "x-api-key": "k"}).status_code == 401
    assert post(proxy.url, **{"train-id": "bad name!", "x-api-key": "k"}).status_code == 401
    assert "points outside the credentials directory" in proxy.log()


def test_oauth_token_is_refreshed_before_expiry_and_persisted(
    start_proxy: ProxyFactory, upstream: FakeUpstream, credentials_dir: Path, database_url: str
) -> None:
    oauth_account(credentials_dir, "max-plan", expires_in_ms=60_000)  # inside the 5-minute margin
    train(credentials_dir, "team", ["pt_team"], ["max-plan"])
    upstream.oauth(expires_in=3600)
    proxy = start_proxy(database_url)

    response = post(proxy.url, **{"train-id": "team", "x-api-key": "pt_team", "anthropic-beta": "fine-grained-tool"})

    assert response.status_code == 200
    assert upstream.oauth_calls() == 1
    sent = upstream.received()[-1]["headers"]
    assert sent["authorization"].startswith("Bearer fake-access-")
    assert sent["anthropic-beta"] == "oauth-2025-04-20,fine-grained-tool"
    assert "x-api-key" not in sent
    stored = query(database_url, "SELECT * FROM oauth_tokens")
    assert len(stored) == 1 and stored[0]["account_id"] == "max-plan"
    assert "fake-access" not in str(stored) and "refresh-max-plan" not in str(stored)  # encrypted at rest

    proxy.stop()
    restarted = start_proxy(database_url)
    assert post(restarted.url, **{"train-id": "team", "x-api-key": "pt_team"}).status_code == 200
    assert upstream.oauth_calls() == 1  # the persisted token was reused
    assert upstream.received()[-1]["headers"]["authorization"] == sent["authorization"]


def test_failed_refresh_of_an_expired_token_gets_401(
    start_proxy: ProxyFactory, upstream: FakeUpstream, credentials_dir: Path
) -> None:
    oauth_account(credentials_dir, "expired", expires_in_ms=-1000)
    train(credentials_dir, "team", ["pt_team"], ["expired"])
    upstream.oauth(fail=True)
    proxy = start_proxy()
    response = post(proxy.url, **{"train-id": "team", "x-api-key": "pt_team"})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert "refresh-expired" not in proxy.log() and "old-access" not in proxy.log()


def test_two_replicas_refresh_an_account_exactly_once(
    start_proxy: ProxyFactory, upstream: FakeUpstream, credentials_dir: Path, postgres_url: str
) -> None:
    oauth_account(credentials_dir, "shared", expires_in_ms=-1000)
    train(credentials_dir, "team", ["pt_team"], ["shared"])
    upstream.oauth(
        expires_in=3600, delay_seconds=1.0, strict_refresh_tokens=True, accepted_refresh_tokens=["refresh-shared"]
    )
    replicas = [start_proxy(postgres_url), start_proxy(postgres_url)]

    def call(index: int) -> int:
        return post(replicas[index % 2].url, **{"train-id": "team", "x-api-key": "pt_team"}).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=40) as pool:
        statuses = list(pool.map(call, range(80)))

    assert statuses == [200] * 80
    assert upstream.oauth_calls() == 1
    tokens = {item["headers"]["authorization"] for item in upstream.received() if item["path"] == "/v1/messages"}
    assert len(tokens) == 1
