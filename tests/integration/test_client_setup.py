"""`GET /client-setup/*` on a real proxy, and the served setup script run against a scratch HOME."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import IN_CI, REPO, Service, free_port

CLIENT_SETUP = REPO / "client-setup"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One proxy for the module: serving files needs no upstream, credentials or storage."""
    directory = tmp_path_factory.mktemp("client-setup-proxy")
    port = free_port()
    environment = {"STORAGE_ENABLED": "false", "CREDENTIALS_DIR": str(directory / "credentials")}
    service = Service("proxy", ["proxy", "--host", "127.0.0.1", "--port", str(port)], environment, port, directory)
    yield service.wait_ready()
    service.stop()


def test_serves_every_client_setup_file_with_its_content_type(proxy: Service) -> None:
    expected = {"settings.json": "application/json", "setup.sh": "text/x-shellscript", "README.md": "text/markdown"}
    for name, content_type in expected.items():
        response = httpx.get(f"{proxy.url}/client-setup/{name}")
        assert response.status_code == 200, (name, response.text)
        assert response.headers["content-type"].split(";")[0] == content_type
        assert response.content == (CLIENT_SETUP / name).read_bytes()


def test_settings_point_claude_code_at_the_proxy_with_a_train_header(proxy: Service) -> None:
    env = httpx.get(f"{proxy.url}/client-setup/settings.json").json()["env"]
    assert env["ANTHROPIC_BASE_URL"].startswith("http")
    assert env["ANTHROPIC_CUSTOM_HEADERS"].startswith("train-id: ")


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/client-setup/..%2Fpyproject.toml", 400),
        ("/client-setup/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", 400),
        ("/client-setup/sub/settings.json", 400),
        ("/client-setup/%2E%2E", 400),
        ("/client-setup/missing.json", 404),
        ("/client-setup/.gitkeep", 404),
    ],
)
def test_refuses_paths_and_reports_missing_files(proxy: Service, path: str, status: int) -> None:
    response = httpx.get(proxy.url + path)
    assert response.status_code == status, response.text
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == ("invalid_request_error" if status == 400 else "not_found_error")


def _run_setup(script: str, home: Path, *args: str, interpreter: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    if interpreter is not None:
        # Offer only one JSON tool on PATH: node or python3.
        tools = home / "bin"
        tools.mkdir(exist_ok=True)
        # python3 is this interpreter itself (a pyenv shim on PATH would need bash).
        found = sys.executable if interpreter == "python3" else shutil.which(interpreter)
        assert found is not None
        (tools / interpreter).symlink_to(found)
        for name in ("sh", "grep", "mktemp", "printf", "sed", "pwd", "dirname", "cat"):
            located = shutil.which(name)
            if located is not None and not (tools / name).exists():
                (tools / name).symlink_to(located)
        env["PATH"] = str(tools)
    return subprocess.run(
        ["sh", "-s", "--", *args], input=script, capture_output=True, text=True, env=env, timeout=30, check=False
    )


@pytest.mark.parametrize("interpreter", ["node", "python3"])
def test_served_setup_script_merges_into_claude_settings(proxy: Service, tmp_path: Path, interpreter: str) -> None:
    if interpreter == "node" and shutil.which("node") is None:
        if IN_CI:
            pytest.fail("node is missing: .ci/run installs it")
        pytest.skip("node is not installed")
    script = httpx.get(f"{proxy.url}/client-setup/setup.sh").text
    settings = tmp_path / ".claude" / "settings.json"
    settings.parent.mkdir()
    settings.write_text(json.dumps({"model": "opus", "env": {"KEEP": "1"}}))

    result = _run_setup(script, tmp_path, "--url", proxy.url + "/", "--train", "acme", interpreter=interpreter)
    assert result.returncode == 0, result.stderr
    written = json.loads(settings.read_text())
    assert written == {
        "model": "opus",
        "env": {"KEEP": "1", "ANTHROPIC_BASE_URL": proxy.url, "ANTHROPIC_CUSTOM_HEADERS": "train-id: acme"},
    }
    assert settings.stat().st_mode & 0o077 == 0

    keyed = _run_setup(script, tmp_path, "--url", proxy.url, "--train", "acme", "--key", "pt-key", "--dry-run")
    assert json.loads(keyed.stdout)["env"]["ANTHROPIC_AUTH_TOKEN"] == "pt-key"
    assert "ANTHROPIC_AUTH_TOKEN" not in json.loads(settings.read_text())["env"]


def test_setup_script_refuses_bad_input_and_foreign_files(proxy: Service, tmp_path: Path) -> None:
    script = httpx.get(f"{proxy.url}/client-setup/setup.sh").text
    missing_url = _run_setup(script, tmp_path, "--train", "acme")
    assert missing_url.returncode == 2
    assert "--url" in missing_url.stderr
    bad_train = _run_setup(script, tmp_path, "--url", proxy.url, "--train", "no spaces")
    assert bad_train.returncode == 2
    settings = tmp_path / ".claude" / "settings.json"
    settings.parent.mkdir()
    settings.write_text("{not json")
    broken = _run_setup(script, tmp_path, "--url", proxy.url, "--train", "acme")
    assert broken.returncode != 0
    assert settings.read_text() == "{not json"
