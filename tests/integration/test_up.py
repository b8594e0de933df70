"""`prompttrain up` (what `make run` starts): proxy and dashboard in one process, SQLite under ./data."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from tests.helpers import REPO, FakeUpstream, Service, free_port, wait_until


def test_up_serves_proxy_and_dashboard_with_embedded_sqlite(upstream: FakeUpstream, tmp_path: Path) -> None:
    shutil.copytree(REPO / "credentials", tmp_path / "credentials")
    proxy_port, dashboard_port = free_port(), free_port()
    service = Service(
        "up",
        ["up", "--host", "127.0.0.1", "--port", str(proxy_port), "--dashboard-port", str(dashboard_port)],
        {"UPSTREAM_URL": upstream.url},
        proxy_port,
        tmp_path,
    )
    try:
        service.wait_ready()
        response = httpx.post(
            f"{service.url}/v1/messages",
            json={"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-api-key": "sk-ant-own-login"},
        )
        assert response.status_code == 200
        assert upstream.received()[0]["headers"]["x-api-key"] == "sk-ant-own-login"
        dashboard = f"http://127.0.0.1:{dashboard_port}"

        def listed() -> bool:
            rows = httpx.get(f"{dashboard}/api/requests").json()["requests"]
            return len(rows) == 1 and rows[0]["train_id"] == "default" and rows[0]["account_id"] == "passthrough"

        wait_until(listed)
        assert (tmp_path / "data" / "prompttrain.db").exists()
        assert "dashboard on http://localhost:" in service.log()
    finally:
        assert service.stop() == 0
