"""The two images (Dockerfile.proxy, Dockerfile.dashboard) and the lock file they install.

Images are built once per test session (`build_images`, also used by test_chart_install.py) FROM the base image of
PROMPTTRAIN_TEST_BASE_IMAGE (default `local/python:3.11-bookworm`, made by ../shared/k8s/base-image.sh; with kind,
`python:3.11-slim-bookworm` works too). Without docker or the base image these tests skip; under CI=true they fail.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from dataclasses import dataclass

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import IN_CI, REPO, free_port, wait_until

BASE_IMAGE = os.environ.get("PROMPTTRAIN_TEST_BASE_IMAGE", "local/python:3.11-bookworm")
TAG = "k8s-test"
UID = "10001"
LOCK = REPO / "requirements.lock"


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:4])} ... failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def _docker_problem() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    if docker("version", "--format", "{{.Server.Version}}", check=False, timeout=20).returncode != 0:
        return "the docker daemon is not running"
    if docker("image", "inspect", BASE_IMAGE, check=False, timeout=20).returncode != 0:
        return f"the base image {BASE_IMAGE} is missing (sudo ../shared/k8s/base-image.sh)"
    return None


def require_docker() -> None:
    problem = _docker_problem()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"{problem} — CI must provide it (.ci/run)")
        pytest.skip(problem)


@dataclass(frozen=True)
class Images:
    proxy: str
    dashboard: str
    postgresql: str
    build_seconds: float


@functools.cache
def _build() -> Images:
    started = time.monotonic()
    built = {}
    for name, dockerfile, context in (
        ("proxy", "Dockerfile.proxy", "."),
        ("dashboard", "Dockerfile.dashboard", "."),
        ("postgresql", "manifests/dev/postgresql/Dockerfile", "manifests/dev/postgresql"),
    ):
        tag = f"prompttrain-{name}:{TAG}"
        subprocess.run(
            [
                "docker",
                "build",
                "--quiet",
                "--build-arg",
                f"BASE_IMAGE={BASE_IMAGE}",
                "-f",
                dockerfile,
                "-t",
                tag,
                context,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
            check=True,
        )
        built[name] = tag
    return Images(built["proxy"], built["dashboard"], built["postgresql"], time.monotonic() - started)


def build_images() -> Images:
    """proxy, dashboard (and the dev PostgreSQL) images from this tree: built once per session, then reused."""
    require_docker()
    try:
        return _build()
    except subprocess.CalledProcessError as error:
        raise AssertionError(f"docker build failed:\n{error.stdout[-2000:]}\n{error.stderr[-4000:]}") from None


@pytest.fixture(scope="module")
def images() -> Images:
    return build_images()


# --- the lock file ----------------------------------------------------------------------------------------------


def _locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) from requirements.lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    for line in LOCK.read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)", line)
        if pin:
            current = canonicalize_name(pin.group(1))
            pins[current] = (pin.group(2), [])
        digest = re.search(r"--hash=sha256:([0-9a-f]{64})", line)
        if digest and current is not None:
            pins[current][1].append(digest.group(1))
        if not line.startswith(" ") and not pin:
            current = None
    return pins


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = _locked()
    problems = []
    for text in declared:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement.name} is not in requirements.lock")
            continue
        version, hashes = pins[name]
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name}=={version} does not satisfy {requirement.specifier}")
        if not hashes:
            problems.append(f"{requirement.name} has no --hash")
        for extra in requirement.extras:
            if requirement.name == "uvicorn" and extra == "standard":
                missing = [dep for dep in ("httptools", "uvloop", "watchfiles", "websockets") if dep not in pins]
                problems.extend(f"uvicorn[standard] needs {dep}" for dep in missing)
    assert not problems, "requirements.lock is out of date (see its header to regenerate):\n" + "\n".join(problems)
    every_pin_hashed = [name for name, (_, hashes) in pins.items() if not hashes]
    assert not every_pin_hashed


def test_dockerfiles_install_the_lock_from_a_swappable_base() -> None:
    for name in ("Dockerfile.proxy", "Dockerfile.dashboard"):
        text = (REPO / name).read_text()
        assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim", text, re.M), name
        assert text.count("FROM ${BASE_IMAGE}") == 2, f"{name}: a build and a runtime stage"
        assert "--require-hashes" in text and "requirements.lock" in text, name
        assert re.search(r"^USER 10001:10001$", text, re.M), name
    rules = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*", ".dockerignore is an allow-list: everything is excluded first"
    assert "!src/" in rules and "!requirements.lock" in rules


# --- the images -------------------------------------------------------------------------------------------------


def test_images_run_as_non_root_with_a_read_only_root(images: Images) -> None:
    for image in (images.proxy, images.dashboard):
        config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
        assert config["User"] == f"{UID}:{UID}", image
        assert config["Entrypoint"] == ["prompttrain"], image
        for command in (["--help"], ["migrate", "--help"], ["operator", "--help"]):
            result = docker(
                "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt",
                "no-new-privileges", image, *command,
            )  # fmt: skip
            assert "usage: prompttrain" in result.stdout, (image, command, result.stderr)
        identity = docker("run", "--rm", "--read-only", "--entrypoint", "id", image, "-u").stdout.strip()
        assert identity == UID
    assert json.loads(docker("image", "inspect", images.proxy).stdout)[0]["Config"]["Cmd"] == ["proxy"]
    assert json.loads(docker("image", "inspect", images.dashboard).stdout)[0]["Config"]["Cmd"] == ["dashboard"]


def test_images_hold_the_app_and_nothing_to_build_with(images: Images) -> None:
    script = (
        "test ! -e /opt/venv/bin/pip && ! python3 -c 'import pip' 2>/dev/null && ! command -v gcc"
        ' && test -z "$(ls -A /app)" && test -f /opt/venv/share/prompttrain/client-setup/setup.sh'
        " && python3 -c 'import prompttrain.dashboard.app, prompttrain.operator, prompttrain.proxy.app'"
        " && echo clean"
    )
    for image in (images.proxy, images.dashboard):
        result = docker("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--entrypoint", "sh", image, "-c", script)
        assert result.stdout.strip() == "clean", (image, result.stderr)
    proxy_layers = json.loads(docker("image", "inspect", images.proxy).stdout)[0]["RootFS"]["Layers"]
    dashboard_layers = json.loads(docker("image", "inspect", images.dashboard).stdout)[0]["RootFS"]["Layers"]
    base_layers = json.loads(docker("image", "inspect", BASE_IMAGE).stdout)[0]["RootFS"]["Layers"]
    shared = next(
        (index for index, (a, b) in enumerate(zip(proxy_layers, dashboard_layers, strict=False)) if a != b),
        min(len(proxy_layers), len(dashboard_layers)),
    )
    # Base, the user, the venv: stored once for both images.
    assert shared >= len(base_layers) + 2, (shared, len(base_layers))


def _serve(image: str, entrypoint_script: str, env: dict[str, str], container_port: int) -> tuple[str, str]:
    port = free_port()
    flags = [f"--env={key}={value}" for key, value in env.items()]
    name = docker(
        "run", "--detach", "--read-only", "--tmpfs", "/tmp", "--tmpfs", f"/data:uid={UID},gid={UID}",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--publish", f"127.0.0.1:{port}:{container_port}",
        *flags,
        "--entrypoint", "sh", image, "-c", entrypoint_script,
    ).stdout.strip()  # fmt: skip
    return name, f"http://127.0.0.1:{port}"


def _wait_http(name: str, url: str) -> None:
    def answered() -> bool:
        state = json.loads(docker("inspect", name).stdout)[0]["State"]
        if not state["Running"]:
            raise AssertionError(f"container exited ({state['ExitCode']}):\n{docker('logs', name).stderr[-3000:]}")
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answered, timeout=60, interval=0.25)


def test_proxy_and_dashboard_serve_from_a_read_only_root(images: Images) -> None:
    """Read-only root, only /tmp and /data writable (as in the chart): SQLite and the spool live in /data."""
    database = "sqlite:////data/prompttrain.db"
    proxy, proxy_url = _serve(
        images.proxy,
        "exec prompttrain proxy",
        {"DATABASE_URL": database, "MIGRATE_ON_START": "true", "CREDENTIALS_DIR": "/tmp/credentials"},
        3000,
    )
    dashboard, dashboard_url = _serve(
        images.dashboard,
        "prompttrain migrate && exec prompttrain dashboard",
        {"DATABASE_URL": database, "DASHBOARD_API_KEY": "image-test-key"},
        3001,
    )
    try:
        _wait_http(proxy, proxy_url + "/health/live")
        assert httpx.get(proxy_url + "/health/ready").json()["ready"] is True
        setup = httpx.get(proxy_url + "/client-setup/settings.json")
        assert setup.status_code == 200
        assert "ANTHROPIC_BASE_URL" in setup.json()["env"]
        _wait_http(dashboard, dashboard_url + "/health")
        assert httpx.get(dashboard_url + "/health").json()["database"] == "connected"
        assert httpx.get(dashboard_url + "/api/requests").status_code == 401
        listed = httpx.get(dashboard_url + "/api/requests", headers={"X-Dashboard-Key": "image-test-key"})
        assert listed.status_code == 200
        assert listed.json()["requests"] == []
    finally:
        for name in (proxy, dashboard):
            docker("rm", "--force", name, check=False)
