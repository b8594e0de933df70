"""Credential files: parsing, validation, client-key digests, and the directory scanner."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import orjson
import pytest

from prompttrain.credentials import (
    ApiKeyAccount,
    AuthMode,
    CredentialDirectory,
    CredentialError,
    OAuthAccount,
    client_key_matches,
    digest_client_key,
    generate_client_key,
    parse_account,
    parse_train,
    train_document,
)


def write(path: Path, document: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(document))


def test_api_key_and_oauth_accounts_parse() -> None:
    api = parse_account("a", {"type": "api_key", "api_key": " sk-ant-x "}, "a.json")
    assert api == ApiKeyAccount(name="a", api_key="sk-ant-x")
    oauth = parse_account(
        "b",
        {
            "type": "oauth",
            "oauth": {
                "accessToken": "at",
                "refreshToken": "rt",
                "expiresAt": 1700000000000,
                "scopes": ["user:inference"],
                "isMax": True,
            },
        },
        "b.json",
    )
    assert isinstance(oauth, OAuthAccount)
    assert (oauth.tokens.expires_at_ms, oauth.tokens.scopes, oauth.tokens.is_max) == (
        1700000000000,
        ("user:inference",),
        True,
    )
    assert "secret" not in repr(oauth)


@pytest.mark.parametrize(
    "document",
    [
        {},
        {"type": "api_key"},
        {"type": "api_key", "api_key": ""},
        {"type": "oauth"},
        {"type": "oauth", "oauth": {"accessToken": "a", "refreshToken": "r", "expiresAt": "soon"}},
        {"type": "oauth", "oauth": {"accessToken": "a", "refreshToken": "r", "expiresAt": True}},
        {"type": "bearer", "api_key": "x"},
    ],
)
def test_bad_account_files_are_rejected_without_echoing_secrets(document: dict[str, object]) -> None:
    with pytest.raises(CredentialError) as error:
        parse_account("acct", document, "accounts/acct.credentials.json")
    assert "accounts/acct.credentials.json" in str(error.value)


def test_train_parsing_and_defaults() -> None:
    digest = digest_client_key("pt_key")
    train = parse_train(
        "team", {"client_key_sha256": [digest.hex()], "accounts": ["a", "b"], "default_account": "c"}, "team.json"
    )
    assert train.auth is AuthMode.CLIENT_KEYS
    assert train.accounts == ("c", "a", "b")  # the default account is always allowed
    assert train.client_key_digests == (digest,)
    assert parse_train("open", {"auth": "passthrough"}, "open.json").accounts == ()


@pytest.mark.parametrize(
    "document",
    [
        {"auth": "sometimes"},
        {"auth": "client-keys"},  # no account to use
        {"client_key_sha256": ["abc"], "accounts": ["a"]},
        {"client_key_sha256": ["zz" * 32], "accounts": ["a"]},
        {"accounts": ["../escape"]},
        {"accounts": ["a"], "default_account": "b/c"},
        {"auth": "passthrough", "slack": {"channel": "#x"}},
    ],
)
def test_bad_train_files_are_rejected(document: dict[str, object]) -> None:
    with pytest.raises(CredentialError):
        parse_train("team", document, "team.json")


def test_client_keys_are_compared_by_digest() -> None:
    key = generate_client_key()
    assert key.startswith("pt_") and len(key) > 40
    digests = [hashlib.sha256(b"other").digest(), digest_client_key(key)]
    assert client_key_matches(key, digests)
    assert client_key_matches(f"  {key} ", digests)
    assert not client_key_matches(key + "x", digests)
    assert not client_key_matches(key, [])


def test_train_document_round_trips() -> None:
    digest = digest_client_key("pt_a")
    document = train_document(AuthMode.CLIENT_KEYS, [digest], ["acct"], "acct")
    parsed = parse_train("t", document, "t.json")
    assert parsed.client_key_digests == (digest,) and parsed.default_account == "acct"


def test_directory_scan_picks_up_changes_and_keeps_the_last_good_version(tmp_path: Path) -> None:
    directory = CredentialDirectory(tmp_path)
    snapshot, changed = directory.scan()
    assert (snapshot.trains, snapshot.accounts, changed) == ({}, {}, False)

    write(tmp_path / "accounts" / "acct.credentials.json", {"type": "api_key", "api_key": "sk-1"})
    write(tmp_path / "trains" / "team.json", {"accounts": ["acct"], "client_key_sha256": []})
    snapshot, changed = directory.scan()
    assert changed and set(snapshot.trains) == {"team"} and set(snapshot.accounts) == {"acct"}

    snapshot, changed = directory.scan()
    assert not changed

    broken = tmp_path / "accounts" / "acct.credentials.json"
    broken.write_bytes(b'{"type": "api_key", "api_')  # a half-written file
    snapshot, _ = directory.scan()
    account = snapshot.accounts["acct"]
    assert isinstance(account, ApiKeyAccount) and account.api_key == "sk-1"

    write(broken, {"type": "api_key", "api_key": "sk-2"})
    snapshot, changed = directory.scan()
    account = snapshot.accounts["acct"]
    assert changed and isinstance(account, ApiKeyAccount) and account.api_key == "sk-2"

    (tmp_path / "trains" / "team.json").unlink()
    snapshot, changed = directory.scan()
    assert changed and snapshot.trains == {}


def test_directory_scan_ignores_bad_names_hidden_files_and_escapes(tmp_path: Path) -> None:
    outside = tmp_path / "outside" / "secret.json"
    write(outside, {"auth": "passthrough"})
    root = tmp_path / "credentials"
    write(root / "trains" / "ok.json", {"auth": "passthrough"})
    write(root / "trains" / "bad name.json", {"auth": "passthrough"})
    write(root / "trains" / ".hidden.json", {"auth": "passthrough"})
    os.symlink(outside, root / "trains" / "escape.json")
    # Kubernetes mounts Secrets as symlinks into a ..data directory inside the mount: those are followed.
    write(root / "trains" / "..data" / "k8s.json", {"auth": "passthrough"})
    os.symlink(root / "trains" / "..data" / "k8s.json", root / "trains" / "k8s.json")
    snapshot, _ = CredentialDirectory(root).scan()
    assert set(snapshot.trains) == {"ok", "k8s"}
