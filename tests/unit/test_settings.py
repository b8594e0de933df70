"""Configuration: defaults, URL normalisation, and start-up failures that name the variable."""

from __future__ import annotations

import os
import subprocess

import pytest

from prompttrain.settings import SettingsError, load_settings, normalise_database_url
from tests.helpers import PROMPTTRAIN


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "DATABASE_URL", "UPSTREAM_URL", "CREDENTIALS_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.port == 3000 and settings.dashboard_port == 3001
    assert settings.upstream_base == "https://api.anthropic.com"
    assert str(settings.oauth_token_url) == "https://console.anthropic.com/v1/oauth/token"
    assert settings.is_sqlite and settings.should_migrate_on_start
    assert settings.max_request_body_bytes == 32 * 1024 * 1024


def test_database_urls_are_normalised() -> None:
    assert normalise_database_url("postgres://u:p@h/db") == "postgresql+asyncpg://u:p@h/db"
    assert normalise_database_url("sqlite:///./x.db") == "sqlite+aiosqlite:///./x.db"
    with pytest.raises(ValueError, match="postgresql"):
        normalise_database_url("mysql://h/db")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "eighty"),
        ("UPSTREAM_URL", "not a url"),
        ("DATABASE_URL", "mysql://u:hunter2@h/db"),
        ("STORAGE_ENABLED", "maybe"),
    ],
)
def test_bad_values_fail_naming_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name) as error:
        load_settings()
    assert "hunter2" not in str(error.value)


def test_the_cli_exits_with_the_message(tmp_path: object) -> None:
    result = subprocess.run(
        [PROMPTTRAIN, "proxy", "--port", "3999"],
        env={**os.environ, "UPSTREAM_URL": "::bad::"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "UPSTREAM_URL" in result.stderr
