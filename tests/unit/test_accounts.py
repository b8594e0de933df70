"""Train resolution, client authentication and account choice (all from memory)."""

from __future__ import annotations

import pytest

from prompttrain.credentials import (
    ApiKeyAccount,
    AuthMode,
    CredentialSnapshot,
    Train,
    digest_client_key,
)
from prompttrain.proxy.accounts import (
    PASSTHROUGH_ACCOUNT,
    CooldownTable,
    authorise,
    choose_account,
    presented_key,
    rendezvous_order,
)
from prompttrain.proxy.errors import AuthenticationError, PermissionDeniedError

ACCOUNTS = {name: ApiKeyAccount(name=name, api_key=f"sk-{name}") for name in ("a", "b", "c")}
TEAM = Train("team", AuthMode.CLIENT_KEYS, (digest_client_key("pt_team"),), ("a", "b", "c"))
SNAPSHOT = CredentialSnapshot(
    trains={"team": TEAM, "default": Train("default", AuthMode.PASSTHROUGH)}, accounts=ACCOUNTS
)


def run(**headers: str | None) -> str:
    resolution = authorise(
        SNAPSHOT,
        CooldownTable(),
        train_header=headers.get("train"),
        account_header=headers.get("account"),
        authorization=headers.get("authorization"),
        api_key=headers.get("api_key"),
        default_train="default",
    )
    return resolution.account_id


def test_presented_key_forms() -> None:
    assert presented_key("Bearer abc", None) == "abc"
    assert presented_key("bearer abc ", None) == "abc"
    assert presented_key("Basic abc", None) is None
    assert presented_key("Bearer x", "key") == "key"
    assert presented_key(None, "  ") is None


def test_passthrough_is_the_default_train_and_needs_a_credential() -> None:
    assert run(api_key="sk-own") == PASSTHROUGH_ACCOUNT
    assert run(authorization="Bearer oauth-own") == PASSTHROUGH_ACCOUNT
    with pytest.raises(AuthenticationError):
        run()


def test_client_key_trains() -> None:
    assert run(train="team", authorization="Bearer pt_team") in ACCOUNTS
    for headers in ({"train": "team"}, {"train": "team", "api_key": "pt_wrong"}, {"train": "nobody", "api_key": "k"}):
        with pytest.raises(AuthenticationError):
            run(**headers)
    with pytest.raises(AuthenticationError):
        run(train="../x", api_key="k")


def test_explicit_account_must_be_allowed() -> None:
    assert run(train="team", api_key="pt_team", account="b") == "b"
    with pytest.raises(PermissionDeniedError):
        run(train="team", api_key="pt_team", account="z")
    lonely = Train("lonely", AuthMode.CLIENT_KEYS, (), ("ghost",))
    with pytest.raises(AuthenticationError):
        choose_account(lonely, SNAPSHOT, CooldownTable(), "ghost")


def test_rendezvous_is_deterministic_and_per_train() -> None:
    order = rendezvous_order("team", ("c", "a", "b", "a"))
    assert sorted(order) == ["a", "b", "c"]
    assert order == rendezvous_order("team", ("b", "c", "a"))
    orders = {tuple(rendezvous_order(f"train-{i}", ("a", "b", "c"))) for i in range(50)}
    assert len(orders) > 1  # different trains spread over different accounts


def test_default_account_first_then_cooldowns_skip() -> None:
    pinned = Train("pinned", AuthMode.CLIENT_KEYS, (), ("a", "b", "c"), default_account="c")
    cooldowns = CooldownTable()
    assert choose_account(pinned, SNAPSHOT, cooldowns, None).name == "c"
    cooldowns.start("c", "30")
    second = choose_account(pinned, SNAPSHOT, cooldowns, None).name
    assert second != "c"
    for name in ("a", "b"):
        cooldowns.start(name, "120")
    # All cooling down: the one that recovers first.
    assert choose_account(pinned, SNAPSHOT, cooldowns, None).name == "c"
    # An explicit choice ignores cooldowns.
    assert choose_account(pinned, SNAPSHOT, cooldowns, "a").name == "a"


def test_cooldown_parses_retry_after() -> None:
    table = CooldownTable()
    table.start("x", "not-a-number")
    table.start("y", "5")
    assert table.until("x") > table.until("y")
