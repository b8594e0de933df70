"""The proxy's side of the operator's credential Secrets: parsing, and the snapshot many Secrets make."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta, Status
from lightkube.resources.core_v1 import Secret

from prompttrain.credential_sources import (
    CredentialSourceError,
    DirectorySource,
    KubernetesSecretSource,
    SecretSnapshots,
    credential_secret_data,
    open_credential_source,
    parse_credential_secret,
)
from prompttrain.credentials import (
    ApiKeyAccount,
    AuthMode,
    CredentialDirectory,
    CredentialError,
    client_key_matches,
    digest_client_key,
    train_document,
)
from prompttrain.settings import load_settings
from tests.helpers import write_json


def data(train_id: str, *, key: str = "pt_key", accounts: dict[str, str] | None = None) -> dict[str, str]:
    accounts = accounts if accounts is not None else {"team-api": "sk-ant-api03-abc"}
    document = train_document(AuthMode.CLIENT_KEYS, [digest_client_key(key)], list(accounts))
    return credential_secret_data(
        train_id, document, {name: {"type": "api_key", "api_key": value} for name, value in accounts.items()}
    )


def test_a_credential_secret_parses_into_a_train_and_its_accounts() -> None:
    train, accounts = parse_credential_secret("acme-credentials", data("acme:eu"))
    assert train.train_id == "acme:eu" and train.auth is AuthMode.CLIENT_KEYS
    assert client_key_matches("pt_key", train.client_key_digests)
    assert accounts == {"team-api": ApiKeyAccount("team-api", "sk-ant-api03-abc")}


@pytest.mark.parametrize(
    ("broken", "complaint"),
    [
        ({"train-id": base64.b64encode(b"a/b").decode()}, "not a valid identifier"),
        ({"train.json": "not base64!"}, "'train.json' is not base64"),
        ({"train.json": base64.b64encode(b"{").decode()}, "'train.json' is not JSON"),
        ({"accounts.json": base64.b64encode(b"[]").decode()}, "must be a JSON object"),
        (
            {"accounts.json": base64.b64encode(orjson.dumps({"x": {"type": "api_key"}})).decode()},
            "account x: type api_key needs a non-empty 'api_key'",
        ),
    ],
)
def test_a_broken_secret_is_named_without_its_contents(broken: dict[str, str], complaint: str) -> None:
    with pytest.raises(CredentialError) as raised:
        parse_credential_secret("acme-credentials", {**data("acme"), **broken})
    assert "Secret acme-credentials" in str(raised.value) and complaint in str(raised.value)
    assert "sk-ant" not in str(raised.value)


def test_snapshots_follow_upserts_deletions_and_relists(caplog: pytest.LogCaptureFixture) -> None:
    secrets = SecretSnapshots()
    secrets.replace_all({"a-credentials": data("a"), "b-credentials": data("b")})
    snapshot, changed = secrets.take()
    assert changed and sorted(snapshot.trains) == ["a", "b"]
    assert secrets.take()[1] is False

    # A broken update keeps the last good version (and says so, by name only).
    with caplog.at_level(logging.ERROR):
        secrets.upsert("a-credentials", {**data("a"), "train.json": "!"})
    assert "a-credentials" in caplog.text and "keeping its last good version" in caplog.text
    assert "a" in secrets.take()[0].trains

    # A relist drops what is gone.
    secrets.replace_all({"b-credentials": data("b")})
    snapshot, changed = secrets.take()
    assert changed and sorted(snapshot.trains) == ["b"]
    secrets.remove("b-credentials")
    assert secrets.take()[0].trains == {}


def test_a_shared_account_takes_the_latest_copy_and_a_train_id_belongs_to_one_secret() -> None:
    secrets = SecretSnapshots()
    secrets.upsert("x-credentials", data("x", accounts={"shared": "sk-old"}))
    secrets.upsert("y-credentials", data("y", accounts={"shared": "sk-old"}))
    secrets.upsert("x-credentials", data("x", accounts={"shared": "sk-new"}))  # propagating a change
    assert secrets.snapshot().accounts["shared"] == ApiKeyAccount("shared", "sk-new")

    secrets.upsert("z-credentials", data("x", key="pt_other"))
    train = secrets.snapshot().trains["x"]
    assert client_key_matches("pt_key", train.client_key_digests)  # x-credentials sorts first


def test_the_setting_picks_the_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CREDENTIALS_DIR", str(tmp_path))
    assert isinstance(open_credential_source(load_settings()), DirectorySource)
    monkeypatch.setenv("CREDENTIALS_SOURCE", "kubernetes")
    monkeypatch.setenv("CREDENTIALS_NAMESPACE", "team")
    source = open_credential_source(load_settings())
    assert isinstance(source, KubernetesSecretSource)
    assert source.describe() == "Secrets labelled prompttrain.io/credentials=train in namespace team"


async def test_the_directory_source_scans_the_credential_directory(tmp_path: Path) -> None:
    write_json(tmp_path / "trains" / "default.json", {"auth": "passthrough"})
    source = DirectorySource(CredentialDirectory(tmp_path), 0.01)
    await source.start()
    snapshot, changed = await source.scan()
    assert changed and list(snapshot.trains) == ["default"]
    await source.wait_for_change()
    assert (await source.scan())[1] is False
    await source.close()


class FakeListing:
    def __init__(self, secrets: list[Secret], version: str) -> None:
        self.secrets, self.resourceVersion = secrets, version

    def __aiter__(self) -> AsyncIterator[Secret]:
        async def items() -> AsyncIterator[Secret]:
            for item in self.secrets:
                yield item

        return items()


class FakeApi:
    """Stands in for lightkube's AsyncClient: scripted lists, and watches that deliver events or fail."""

    def __init__(self) -> None:
        self.lists: list[FakeListing] = []
        self.watches: list[list[tuple[str, Secret] | Exception]] = []
        self.watched_from: list[str | None] = []

    def list(self, *_: Any, **__: Any) -> FakeListing:
        return self.lists.pop(0)

    def watch(self, *_: Any, resource_version: str | None = None, **__: Any) -> AsyncIterator[tuple[str, Secret]]:
        self.watched_from.append(resource_version)
        script = self.watches.pop(0) if self.watches else []

        async def events() -> AsyncIterator[tuple[str, Secret]]:
            for item in script:
                if isinstance(item, Exception):
                    raise item
                yield item
            await asyncio.Event().wait()  # a quiet, open stream

        return events()

    async def close(self) -> None:
        return None


def k8s_secret(name: str, version: str, train_id: str) -> Secret:
    return Secret(metadata=ObjectMeta(name=name, resourceVersion=version), data=data(train_id))


async def test_the_watch_resumes_from_the_last_version_and_lists_again_after_410() -> None:
    api = FakeApi()
    api.lists = [
        FakeListing([k8s_secret("a-credentials", "10", "a")], "10"),
        FakeListing([k8s_secret("b-credentials", "30", "b")], "30"),  # after the 410: a is gone, b is new
    ]
    api.watches = [
        [("MODIFIED", k8s_secret("a-credentials", "12", "a2")), ConnectionError("reset")],
        [ApiError(status=Status(code=410, message="too old"))],
    ]
    source = KubernetesSecretSource("team", "prompttrain.io/credentials=train")
    source._client = cast(Any, api)
    version = await source._list()
    assert version == "10" and list((await source.scan())[0].trains) == ["a"]
    watcher = asyncio.create_task(source._watch(version))
    try:
        await asyncio.wait_for(source.wait_for_change(), 5)
        assert list((await source.scan())[0].trains) == ["a2"]

        async def relisted() -> None:
            while list((await source.scan())[0].trains) != ["b"]:
                await source.wait_for_change()

        await asyncio.wait_for(relisted(), 10)
        while len(api.watched_from) < 3:
            await asyncio.sleep(0.01)
        # Resumed from the last version delivered after the reset; from the new list's version after the 410.
        assert api.watched_from == ["10", "12", "30"]
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_no_kubernetes_configuration_fails_the_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(CredentialSourceError, match="no Kubernetes configuration"):
        await KubernetesSecretSource(None, "prompttrain.io/credentials=train").start()
