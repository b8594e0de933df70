"""All configuration, read once from the environment and passed into the app factories.

Variable names follow the seed architecture where it has one (`PORT`, `HOST`, `CREDENTIALS_DIR`, `DATABASE_URL`,
`STORAGE_ENABLED`, `SLACK_WEBHOOK_URL`, `SLACK_CHANNEL`, `DASHBOARD_API_KEY`, `TELEMETRY_ENDPOINT`). A wrong value
fails at start-up with a message naming the variable (`SettingsError`). An empty variable (`TELEMETRY_ENDPOINT=`, as
an orchestrator or an `.env` file may pass one) counts as unset: the default applies. No setting gives the empty
string a meaning of its own: where "empty" is documented (`DASHBOARD_ALLOWED_DOMAINS`) it is the default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import AnyHttpUrl, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z0-9._:-]+$")
DEFAULT_OAUTH_TOKEN_URL = "https://console.anthropic.com/v1/oauth/token"  # noqa: S105 - a URL, not a secret
DEFAULT_OAUTH_CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"


class SettingsError(Exception):
    """A configuration value is missing or malformed; the message names the variable."""


class Settings(BaseSettings):
    """Every setting of every component. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", env_ignore_empty=True)

    host: str = "0.0.0.0"  # noqa: S104 - a server in a container listens on every interface
    port: int = Field(default=3000, ge=1, le=65535)
    dashboard_port: int = Field(default=3001, ge=1, le=65535)

    upstream_url: AnyHttpUrl = AnyHttpUrl("https://api.anthropic.com")
    oauth_token_url: AnyHttpUrl = AnyHttpUrl(DEFAULT_OAUTH_TOKEN_URL)
    oauth_client_id: str = DEFAULT_OAUTH_CLIENT_ID
    # Refresh an OAuth access token this many seconds before it expires.
    oauth_refresh_margin_seconds: float = Field(default=300.0, ge=0)
    upstream_connect_timeout_seconds: float = Field(default=10.0, gt=0)
    # Longest silence tolerated between two upstream bytes (Claude Code turns can think for minutes).
    upstream_read_timeout_seconds: float = Field(default=600.0, gt=0)
    max_request_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)

    credentials_dir: Path = Path("credentials")
    credentials_reload_seconds: float = Field(default=1.0, gt=0)
    credentials_encryption_key: str | None = None
    default_train_id: str = "default"
    # Where trains and accounts come from (credential_sources.py): "directory" reads CREDENTIALS_DIR; "kubernetes"
    # watches the Train operator's Secrets labelled CREDENTIALS_LABEL_SELECTOR in CREDENTIALS_NAMESPACE (default:
    # the pod's own namespace, else the kubeconfig context's).
    credentials_source: Literal["directory", "kubernetes"] = "directory"
    credentials_namespace: str | None = None
    credentials_label_selector: str = "prompttrain.io/credentials=train"
    # Train operator: reconcile every Train this often even when nothing changed (repairs drift, re-checks
    # conflicts); changes to Trains and referenced Secrets and rotation deadlines take effect at once regardless.
    operator_resync_seconds: float = Field(default=300.0, gt=0)

    database_url: str = "sqlite+aiosqlite:///./data/prompttrain.db"
    storage_enabled: bool = True
    # "auto": migrate at start-up on SQLite only (PostgreSQL deployments run `prompttrain migrate` once).
    migrate_on_start: str = "auto"
    writer_batch_size: int = Field(default=200, ge=1)
    writer_flush_seconds: float = Field(default=0.05, gt=0)
    # Metadata records held in memory before the writer spools them to disk (the database is not keeping up).
    writer_queue_size: int = Field(default=10_000, ge=1)
    # Bodies held in memory for the database; past this, new bodies are shed (their usage records are kept).
    writer_payload_memory_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # On shutdown, how long to keep writing what is queued (then metadata goes to the spool).
    writer_shutdown_seconds: float = Field(default=30.0, ge=0)
    # The recording process's CPU priority (nice, 0-19): the request path comes first; recording catches up.
    writer_nice: int = Field(default=19, ge=0, le=19)
    # Recording processes; each Claude Code session's exchanges go to one of them.
    writer_processes: int = Field(default=2, ge=1, le=16)
    spool_max_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)
    store_payloads: bool = True
    # On SIGTERM, how long in-flight requests (long Claude Code streams) may run before they are cut.
    shutdown_grace_seconds: float = Field(default=600.0, ge=0)
    # Whether /health/ready fails while the database is unreachable. The proxy keeps serving either way (records
    # go to the spool); several replicas behind a Service should set false, or an outage takes them all out.
    readiness_requires_database: bool = True
    # On SIGTERM, how long to keep serving while reporting not-ready, so load balancers stop sending first.
    shutdown_delay_seconds: float = Field(default=0.0, ge=0)
    data_dir: Path = Path("data")

    # Slack (notifications/): the global webhook, used for trains without a `slack` block of their own.
    slack_webhook_url: AnyHttpUrl | None = None
    slack_channel: str | None = None
    slack_username: str = "Agent Prompt Train"
    slack_icon_emoji: str = ":robot_face:"
    # Per webhook; past it notifications are dropped and counted (Slack allows about one message a second).
    slack_max_per_minute: float = Field(default=30.0, gt=0)
    slack_timeout_seconds: float = Field(default=5.0, gt=0)
    slack_queue_size: int = Field(default=200, ge=1)
    # Metrics: "family" (opus, sonnet, haiku, ...) or "model" (exact claude-* ids, capped) for the `model` label.
    metrics_model_label: str = "family"
    # A JSON file whose `models`/`families`/`default` entries replace or extend the shipped pricing table.
    pricing_file: Path | None = None
    dashboard_api_key: str | None = None
    # Dashboard access (dashboard/auth.py): the key above, and/or an identity header set by an ingress auth proxy
    # (oauth2-proxy: X-Auth-Request-Email) limited to DASHBOARD_ALLOWED_DOMAINS (comma-separated; empty: any).
    # Without either the dashboard refuses to start unless DASHBOARD_OPEN=true (development only).
    dashboard_trusted_header: str | None = None
    dashboard_allowed_domains: str = ""
    dashboard_open: bool = False
    dashboard_session_hours: float = Field(default=168.0, gt=0)
    # Mark the login cookie Secure even when the dashboard sees plain HTTP (TLS ends at the ingress).
    dashboard_secure_cookies: bool = False
    # Live updates: SSE heartbeat interval, and how often SQLite is polled (PostgreSQL uses LISTEN/NOTIFY).
    dashboard_heartbeat_seconds: float = Field(default=15.0, gt=0)
    dashboard_poll_seconds: float = Field(default=1.0, gt=0)
    telemetry_endpoint: AnyHttpUrl | None = None

    log_level: str = "info"

    @field_validator("default_train_id")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not IDENTIFIER_PATTERN.match(value):
            raise ValueError(f"must match {IDENTIFIER_PATTERN.pattern}")
        return value

    @field_validator("dashboard_api_key", "dashboard_trusted_header")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return normalise_database_url(value)

    @field_validator("migrate_on_start")
    @classmethod
    def _migrate_on_start(cls, value: str) -> str:
        lowered = value.lower()
        if lowered not in {"auto", "true", "false"}:
            raise ValueError("must be auto, true or false")
        return lowered

    @field_validator("metrics_model_label")
    @classmethod
    def _metrics_model_label(cls, value: str) -> str:
        lowered = value.strip().lower()
        if lowered not in {"family", "model"}:
            raise ValueError("must be family or model")
        return lowered

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        lowered = value.lower()
        if lowered not in {"critical", "error", "warning", "info", "debug"}:
            raise ValueError("must be one of critical, error, warning, info, debug")
        return lowered

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def should_migrate_on_start(self) -> bool:
        if self.migrate_on_start == "auto":
            return self.is_sqlite
        return self.migrate_on_start == "true"

    @property
    def upstream_base(self) -> str:
        return str(self.upstream_url).rstrip("/")

    @property
    def dashboard_domains(self) -> tuple[str, ...]:
        """DASHBOARD_ALLOWED_DOMAINS as lower-case domains without a leading '@'."""
        parts = (part.strip().lower().lstrip("@") for part in self.dashboard_allowed_domains.split(","))
        return tuple(part for part in parts if part)


def normalise_database_url(value: str) -> str:
    """Accept the URLs people paste (`postgres://`, `postgresql://`, `sqlite:///`) and pick the async driver."""
    if value.startswith("postgres://"):
        value = "postgresql://" + value.removeprefix("postgres://")
    if value.startswith("postgresql://"):
        return "postgresql+asyncpg://" + value.removeprefix("postgresql://")
    if value.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + value.removeprefix("sqlite:///")
    if value.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
        return value
    raise ValueError("must be a postgresql:// or sqlite:/// URL")


# Empty values count as unset, except where the default would quietly do something else than the user meant: an
# empty DATABASE_URL (a templating slip) must not send a deployment's records to a local SQLite file.
STRICT_WHEN_EMPTY = ("DATABASE_URL",)


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (plus explicit overrides from CLI flags); raise SettingsError naming the variable."""
    for name in STRICT_WHEN_EMPTY:
        if os.environ.get(name) == "" and not overrides.get(name.lower()):
            raise SettingsError(f"invalid configuration: {name}: set but empty (unset it to use the default)")
    try:
        return Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as error:
        problems = []
        for item in error.errors():
            name = ".".join(str(part) for part in item["loc"]).upper() or "settings"
            problems.append(f"{name}: {item['msg']}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
