"""The operator's pure builders: account documents, client-key rotation, the Secrets, status, conflicts."""

from __future__ import annotations

import base64
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from prompttrain.credential_sources import parse_credential_secret
from prompttrain.credentials import (
    ApiKeyAccount,
    AuthMode,
    OAuthAccount,
    client_key_matches,
    digest_client_key,
    train_document,
)
from prompttrain.operator.builders import (
    Claim,
    KeyState,
    Report,
    RetiringKey,
    TrainRef,
    account_document,
    client_key_secret,
    client_keys_summary,
    credential_secret,
    find_conflict,
    key_state,
    merged_secret,
    next_deadline,
    plan_client_keys,
    secret_differs,
    status_patch,
    train_status,
)
from prompttrain.operator.spec import (
    ANNOTATION_RETIRING,
    AccountKind,
    AccountSpec,
    ClientKeysSpec,
    NotReadyError,
    SecretKeyRef,
)

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
TRAIN = TrainRef(namespace="team", name="acme", uid="uid-acme")
API = AccountSpec("team-api", AccountKind.API_KEY, SecretKeyRef("anthropic", "api-key"))
OAUTH = AccountSpec("team-max", AccountKind.OAUTH, SecretKeyRef("claude-login", "credentials.json"))
OAUTH_BLOCK = {
    "accessToken": "sk-ant-oat01-secret-access",
    "refreshToken": "sk-ant-ort01-secret-refresh",
    "expiresAt": 1_900_000_000_000,
    "scopes": ["user:inference"],
    "subscriptionType": "max",
}


def keys() -> Any:
    counter = itertools.count(1)
    return lambda: f"pt_key_{next(counter)}"


def decoded(secret: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(secret["data"][key])


# --- accounts -------------------------------------------------------------------------------------------------------


def test_an_api_key_account_is_the_trimmed_key() -> None:
    assert account_document(API, b"  sk-ant-api03-abc\n") == {"type": "api_key", "api_key": "sk-ant-api03-abc"}


@pytest.mark.parametrize(
    "stored",
    [
        {"claudeAiOauth": OAUTH_BLOCK},  # Claude Code's ~/.claude/.credentials.json as it is
        {"type": "oauth", "oauth": OAUTH_BLOCK},  # an account file of the credential directory
        OAUTH_BLOCK,  # the bare block
    ],
)
def test_an_oauth_account_accepts_claude_codes_credentials_file(stored: dict[str, Any]) -> None:
    assert account_document(OAUTH, orjson.dumps(stored)) == {"type": "oauth", "oauth": OAUTH_BLOCK}


def test_a_broken_account_secret_is_named_without_its_value() -> None:
    broken = {"claudeAiOauth": {**OAUTH_BLOCK, "refreshToken": ""}}
    with pytest.raises(NotReadyError) as raised:
        account_document(OAUTH, orjson.dumps(broken))
    assert raised.value.reason == "InvalidAccountSecret"
    assert "Secret claude-login key credentials.json" in raised.value.message
    assert "refreshToken" in raised.value.message and "sk-ant" not in raised.value.message
    with pytest.raises(NotReadyError, match="is not JSON"):
        account_document(OAUTH, b"sk-ant-oat01-not-json")


# --- client keys ----------------------------------------------------------------------------------------------------


def test_first_keys_are_generated_and_a_request_present_from_the_start_is_only_recorded() -> None:
    plan = plan_client_keys(KeyState(), ClientKeysSpec(generate=2), "r1", NOW, keys())
    assert [(k.slot, k.key, k.issued_at) for k in plan.state.issued] == [
        ("client-key-1", "pt_key_1", NOW),
        ("client-key-2", "pt_key_2", NOW),
    ]
    assert (plan.generated, plan.rotated, plan.state.retiring, plan.state.request) == (2, 0, (), "r1")


def test_rotate_after_replaces_a_key_and_the_old_one_retires_after_the_overlap() -> None:
    spec = ClientKeysSpec(generate=1, rotate_after=timedelta(days=30), overlap=timedelta(hours=24))
    first = plan_client_keys(KeyState(), spec, None, NOW, keys()).state
    assert next_deadline(first, spec) == NOW + timedelta(days=30)

    early = plan_client_keys(first, spec, None, NOW + timedelta(days=29), keys())
    assert early.state == first and early.rotated == 0

    due = NOW + timedelta(days=30)
    rotated = plan_client_keys(first, spec, None, due, iter(["pt_new"]).__next__)
    assert rotated.rotated == 1 and rotated.state.issued[0].key == "pt_new"
    assert rotated.state.retiring == (RetiringKey(digest_client_key("pt_key_1").hex(), due + timedelta(hours=24)),)
    # Both keys are accepted during the overlap...
    assert client_key_matches("pt_key_1", rotated.state.digests())
    assert client_key_matches("pt_new", rotated.state.digests())
    assert next_deadline(rotated.state, spec) == due + timedelta(hours=24)

    # ...and only the new one after it.
    later = plan_client_keys(rotated.state, spec, None, due + timedelta(hours=24), keys())
    assert later.expired == 1 and later.state.retiring == ()
    assert not client_key_matches("pt_key_1", later.state.digests())
    assert client_key_matches("pt_new", later.state.digests())


def test_a_new_rotation_request_rotates_every_key_once() -> None:
    spec = ClientKeysSpec(generate=2, overlap=timedelta(minutes=5))
    first = plan_client_keys(KeyState(), spec, None, NOW, keys()).state
    asked = plan_client_keys(first, spec, "2026-01-01", NOW, iter(["a", "b"]).__next__)
    assert asked.rotated == 2 and [k.key for k in asked.state.issued] == ["a", "b"]
    assert all(k.until == NOW + timedelta(minutes=5) for k in asked.state.retiring)
    again = plan_client_keys(asked.state, spec, "2026-01-01", NOW, keys())
    assert again.rotated == 0 and again.state == asked.state


def test_fewer_keys_withdraw_the_extra_ones_with_an_overlap() -> None:
    spec = ClientKeysSpec(generate=3, overlap=timedelta(hours=1))
    three = plan_client_keys(KeyState(), spec, None, NOW, keys()).state
    one = plan_client_keys(three, ClientKeysSpec(generate=1, overlap=timedelta(hours=1)), None, NOW, keys())
    assert one.withdrawn == 2 and [k.slot for k in one.state.issued] == ["client-key-1"]
    assert {r.sha256 for r in one.state.retiring} == {digest_client_key(f"pt_key_{i}").hex() for i in (2, 3)}


def test_the_key_state_survives_a_round_trip_through_the_two_secrets() -> None:
    spec = ClientKeysSpec(generate=2, overlap=timedelta(hours=1))
    state = plan_client_keys(KeyState(), spec, None, NOW, keys()).state
    state = plan_client_keys(state, spec, "rotate-1", NOW, keys()).state
    team = client_key_secret(TRAIN, state)
    document = train_document(AuthMode.CLIENT_KEYS, state.digests(), ["team-api"])
    credentials = credential_secret(TRAIN, "acme", document, {}, state.retiring)
    assert key_state(team, credentials) == state


def test_a_key_of_unknown_age_is_due_for_rotation() -> None:
    team = client_key_secret(TRAIN, KeyState())
    team["data"]["client-key-1"] = base64.b64encode(b"pt_old").decode()
    state = key_state(team, None)
    plan = plan_client_keys(state, ClientKeysSpec(generate=1, rotate_after=timedelta(days=1)), None, NOW, keys())
    assert plan.rotated == 1


# --- Secrets --------------------------------------------------------------------------------------------------------


def test_the_credential_secret_is_what_the_proxy_parses_and_holds_no_plaintext_key() -> None:
    state = plan_client_keys(KeyState(), ClientKeysSpec(generate=1), None, NOW, keys()).state
    document = train_document(AuthMode.CLIENT_KEYS, state.digests(), ["team-api"], "team-api")
    accounts = {"team-api": {"type": "api_key", "api_key": "sk-ant-api03-abc"}}
    secret = credential_secret(TRAIN, "acme:1", document, accounts)

    assert secret["metadata"]["name"] == "acme-credentials"
    assert secret["metadata"]["labels"]["prompttrain.io/credentials"] == "train"
    assert secret["metadata"]["labels"]["prompttrain.io/train"] == "acme"
    assert secret["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "prompttrain.io/v1alpha1",
            "kind": "Train",
            "name": "acme",
            "uid": "uid-acme",
            "controller": True,
        }
    ]
    train, parsed = parse_credential_secret("acme-credentials", secret["data"])
    assert (train.train_id, train.accounts, train.default_account) == ("acme:1", ("team-api",), "team-api")
    assert client_key_matches("pt_key_1", train.client_key_digests)
    assert parsed == {"team-api": ApiKeyAccount("team-api", "sk-ant-api03-abc")}
    assert b"pt_key_1" not in orjson.dumps(secret) and b"pt_key_1" not in b"".join(
        decoded(secret, key) for key in secret["data"]
    )


def test_the_client_key_secret_holds_plaintext_keys_and_no_digest() -> None:
    state = plan_client_keys(KeyState(), ClientKeysSpec(generate=2), "r", NOW, keys()).state
    secret = client_key_secret(TRAIN, state)
    assert secret["metadata"]["name"] == "acme-client-keys"
    assert "prompttrain.io/credentials" not in secret["metadata"]["labels"]  # the proxy never selects it
    assert {key: decoded(secret, key) for key in secret["data"]} == {
        "client-key-1": b"pt_key_1",
        "client-key-2": b"pt_key_2",
    }
    assert digest_client_key("pt_key_1").hex() not in orjson.dumps(secret).decode()


def test_an_oauth_account_round_trips_through_the_credential_secret() -> None:
    document = train_document(AuthMode.CLIENT_KEYS, [digest_client_key("k")], ["team-max"])
    account = account_document(OAUTH, orjson.dumps({"claudeAiOauth": OAUTH_BLOCK}))
    _, parsed = parse_credential_secret("x", credential_secret(TRAIN, "acme", document, {"team-max": account})["data"])
    oauth = parsed["team-max"]
    assert isinstance(oauth, OAuthAccount) and oauth.tokens.refresh_token == "sk-ant-ort01-secret-refresh"


def test_replacing_a_secret_keeps_what_others_added_and_detects_real_changes() -> None:
    document = train_document(AuthMode.PASSTHROUGH)
    desired = credential_secret(TRAIN, "acme", document, {}, (RetiringKey("ab" * 32, NOW),))
    existing = orjson.loads(orjson.dumps(desired))
    existing["metadata"]["resourceVersion"] = "42"
    existing["metadata"]["labels"]["team"] = "blue"
    existing["metadata"]["annotations"]["reloader"] = "true"
    assert not secret_differs(existing, desired)

    without_retiring = credential_secret(TRAIN, "acme", document, {})
    merged = merged_secret(existing, without_retiring)
    assert merged["metadata"]["resourceVersion"] == "42"
    assert merged["metadata"]["labels"]["team"] == "blue"
    assert merged["metadata"]["annotations"] == {"reloader": "true"}
    assert secret_differs(existing, without_retiring)
    assert ANNOTATION_RETIRING in existing["metadata"]["annotations"]


# --- conflicts between Trains ---------------------------------------------------------------------------------------


def claim(name: str, created: str, train_id: str, **accounts: tuple[str, str]) -> Claim:
    return Claim(name, created, train_id, {key: SecretKeyRef(*ref) for key, ref in accounts.items()})


def test_the_younger_train_loses_a_train_id_or_account_conflict() -> None:
    older = claim("a", "2026-01-01T00:00:00Z", "acme", shared=("s", "k"))
    same = claim("b", "2026-01-02T00:00:00Z", "other", shared=("s", "k"))
    assert find_conflict(same, [older]) is None  # the same account, the same Secret key: fine

    taken = find_conflict(claim("b", "2026-01-02T00:00:00Z", "acme"), [older])
    assert taken is not None and taken.reason == "TrainIdConflict" and "Train a" in taken.message

    renamed = find_conflict(claim("b", "2026-01-02T00:00:00Z", "b", other=("s", "k")), [older])
    assert renamed is not None and renamed.reason == "AccountConflict"
    assert "Secret s key k is account shared in Train a" in renamed.message

    repointed = find_conflict(claim("b", "2026-01-02T00:00:00Z", "b", shared=("t", "k")), [older])
    assert repointed is not None and "account shared is Secret s key k in Train a" in repointed.message

    # The older Train keeps what it has.
    assert find_conflict(older, [claim("b", "2026-01-02T00:00:00Z", "acme", shared=("t", "k"))]) is None


# --- status ---------------------------------------------------------------------------------------------------------


def test_status_reports_ready_and_keeps_the_transition_time_until_it_flips() -> None:
    spec = ClientKeysSpec(generate=1, rotate_after=timedelta(days=30))
    plan = plan_client_keys(KeyState(), spec, None, NOW, keys())
    report = Report(
        True,
        "Reconciled",
        "ok",
        train_id="acme",
        accounts=1,
        credential_secret="acme-credentials",
        client_key_secret="acme-client-keys",
        client_keys=client_keys_summary(plan, 0, spec),
    )
    status = train_status({}, report, 3, NOW)
    assert status == {
        "observedGeneration": 3,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Reconciled",
                "message": "ok",
                "lastTransitionTime": "2026-01-01T12:00:00Z",
                "observedGeneration": 3,
            }
        ],
        "trainId": "acme",
        "accounts": 1,
        "credentialSecret": "acme-credentials",
        "clientKeySecret": "acme-client-keys",
        "clientKeys": {"generated": 1, "referenced": 0, "retiring": 0, "nextRotation": "2026-01-31T12:00:00Z"},
    }
    text = orjson.dumps(status).decode()
    assert "pt_key_1" not in text and digest_client_key("pt_key_1").hex() not in text

    later = NOW + timedelta(hours=1)
    assert train_status(status, report, 4, later)["conditions"][0]["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    broken = train_status(status, Report(False, "SecretNotFound", "account x: Secret y not found"), 4, later)
    assert broken["conditions"][0]["lastTransitionTime"] == "2026-01-01T13:00:00Z"
    assert broken["conditions"][0]["reason"] == "SecretNotFound"

    patch = status_patch(status, broken)
    assert patch is not None and patch["trainId"] is None and patch["observedGeneration"] == 4
    assert status_patch(status, status) is None
