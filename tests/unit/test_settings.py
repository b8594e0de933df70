"""Configuration: defaults, URL normalisation, and start-up failures that name the variable."""

from __future__ import annotations

import os
import subprocess

import pytest

from prompttrain.settings import STRICT_WHEN_EMPTY, Settings, SettingsError, load_settings, normalise_database_url
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


SETTING_NAMES = sorted(name.upper() for name in Settings.model_fields)


def defaults(monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    return load_settings()


@pytest.mark.parametrize("name", [name for name in SETTING_NAMES if name not in STRICT_WHEN_EMPTY])
def test_an_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    unset = defaults(monkeypatch)
    monkeypatch.setenv(name, "")
    assert load_settings() == unset


def test_an_empty_database_url_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults(monkeypatch)
    monkeypatch.setenv("DATABASE_URL", "")
    with pytest.raises(SettingsError, match="DATABASE_URL: set but empty"):
        load_settings()


def test_empty_variables_next_to_set_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    unset = defaults(monkeypatch)
    for name in ("TELEMETRY_ENDPOINT", "SLACK_WEBHOOK_URL", "SLACK_CHANNEL", "PORT", "STORAGE_ENABLED"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("DASHBOARD_PORT", "4001")
    settings = load_settings()
    assert settings.telemetry_endpoint is None and settings.slack_webhook_url is None and settings.slack_channel is None
    assert settings.port == unset.port == 3000 and settings.storage_enabled is True
    assert settings.dashboard_port == 4001
    # Blank is not empty: a value of spaces is still a value, and still checked.
    monkeypatch.setenv("TELEMETRY_ENDPOINT", " ")
    with pytest.raises(SettingsError, match="TELEMETRY_ENDPOINT"):
        load_settings()


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
