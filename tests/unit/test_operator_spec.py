"""The Train spec as the operator reads it: defaults, and the rules the CRD schema cannot state."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from prompttrain.credentials import AuthMode
from prompttrain.operator.spec import (
    AccountKind,
    NotReadyError,
    SecretKeyRef,
    parse_duration,
    parse_spec,
)

API_ACCOUNT = {"name": "team-api", "apiKeySecretRef": {"name": "anthropic"}}


def test_a_full_spec_becomes_data_with_the_documented_defaults() -> None:
    spec = parse_spec(
        "acme",
        {
            "accounts": [
                API_ACCOUNT,
                {"name": "max:1", "oauthSecretRef": {"name": "claude-login"}},
            ],
            "defaultAccount": "max:1",
            "clientKeys": {"generate": 2, "rotateAfter": "30d", "secretRefs": [{"name": "ci-key", "key": "key"}]},
            "slack": {"webhookSecretRef": {"name": "slack"}, "channel": "#claude"},
        },
    )

    assert spec.train_id == "acme"  # the Train's name when spec.trainId is absent
    assert spec.auth is AuthMode.CLIENT_KEYS
    assert [(a.name, a.kind, a.ref) for a in spec.accounts] == [
        ("team-api", AccountKind.API_KEY, SecretKeyRef("anthropic", "api-key")),
        ("max:1", AccountKind.OAUTH, SecretKeyRef("claude-login", "credentials.json")),
    ]
    assert spec.default_account == "max:1"
    assert spec.client_keys.generate == 2
    assert spec.client_keys.rotate_after == timedelta(days=30)
    assert spec.client_keys.overlap == timedelta(hours=24)
    assert spec.slack is not None and spec.slack.webhook == SecretKeyRef("slack", "webhook-url")
    assert spec.referenced_secrets() == {"anthropic", "claude-login", "ci-key", "slack"}


def test_passthrough_needs_no_account_and_train_id_overrides_the_name() -> None:
    spec = parse_spec("playground", {"auth": "passthrough", "trainId": "play:ground"})
    assert (spec.train_id, spec.auth, spec.accounts) == ("play:ground", AuthMode.PASSTHROUGH, ())


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ({"accounts": [API_ACCOUNT], "defaultAccount": "other"}, "is not one of spec.accounts"),
        ({"accounts": [{"name": "x"}]}, "exactly one of apiKeySecretRef and oauthSecretRef"),
        (
            {"accounts": [{**API_ACCOUNT, "oauthSecretRef": {"name": "y"}}]},
            "exactly one of apiKeySecretRef and oauthSecretRef",
        ),
        ({"accounts": [{**API_ACCOUNT, "name": "bad name"}]}, "spec.accounts[0].name must match"),
        ({"accounts": [API_ACCOUNT, API_ACCOUNT]}, "names must be unique"),
        ({"auth": "client-keys"}, "needs at least one account"),
        ({"auth": "sometimes", "accounts": [API_ACCOUNT]}, "spec.auth must be client-keys or passthrough"),
        ({"trainId": "a/b", "accounts": [API_ACCOUNT]}, "spec.trainId must match"),
        ({"accounts": [API_ACCOUNT], "clientKeys": {"rotateAfter": "1 month"}}, "rotateAfter must be a duration"),
        ({"accounts": [API_ACCOUNT], "clientKeys": {"generate": 99}}, "generate must be a number from 0 to 16"),
        ({"accounts": [{"name": "x", "apiKeySecretRef": {"name": "Not_A_Name"}}]}, "must be a Secret name"),
    ],
)
def test_invalid_specs_are_reported_as_invalid_spec(spec: dict[str, Any], complaint: str) -> None:
    with pytest.raises(NotReadyError) as raised:
        parse_spec("acme", spec)
    assert raised.value.reason == "InvalidSpec"
    assert complaint in raised.value.message


@pytest.mark.parametrize(
    ("text", "seconds"), [("45s", 45), ("90m", 5400), ("1h30m", 5400), ("720h", 2_592_000), ("30d", 2_592_000)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text, "x") == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["0s", "", "5", "1w", "h", 30])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(NotReadyError):
        parse_duration(text, "spec.clientKeys.overlap")
