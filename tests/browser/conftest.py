"""Playwright with Debian's chromium (never a downloaded browser), headless, against live services on 127.0.0.1.

Under CI=true a missing chromium or Playwright fails the run instead of skipping it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.browser.support import DASHBOARD_KEY, SCREENSHOTS, migrate_database, start_dashboard
from tests.helpers import IN_CI, Service

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason + " — .ci/run must install it")
    pytest.skip(reason)


@dataclass
class Watched:
    """A page plus everything it reported that a test may want to assert never happened."""

    page: Any
    dialogs: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        ignore = SCREENSHOTS.parent / ".gitignore"  # the folder ignores itself: artifacts never enter git
        if not ignore.exists():
            ignore.write_text("*\n")
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


@pytest.fixture
def watched(browser: Any) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(10_000)
    watched = Watched(page)

    def on_dialog(dialog: Any) -> None:
        watched.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("console", lambda message: watched.console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: watched.errors.append(str(error)))
    yield watched
    context.close()


@dataclass
class Stack:
    database_url: str
    proxy: Service
    dashboard: Service
    credentials_dir: Path


@pytest.fixture
def stack(postgres_url: str, start_proxy: Any, credentials_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    """Proxy and dashboard (with a key) on one PostgreSQL database; trains `default`, `alpha` and `beta`."""
    from tests.helpers import write_json

    for train in ("alpha", "beta"):
        write_json(credentials_dir / "trains" / f"{train}.json", {"auth": "passthrough"})
    proxy = start_proxy(postgres_url)
    migrate_database(postgres_url)
    dashboard = start_dashboard(tmp_path, postgres_url, credentials_dir)
    yield Stack(postgres_url, proxy, dashboard, credentials_dir)
    dashboard.stop()


@pytest.fixture
def browser(stack: Stack) -> Iterator[Any]:
    """Per test, and only after `stack`: Playwright's sync API keeps an event loop running in this thread while it
    is active, and the database fixtures use asyncio.run(), which refuses to run inside one."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright's Python package is not installed")
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        _missing(f"chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def log_in(watched: Watched, dashboard: Service, path: str = "/requests") -> None:
    page = watched.page
    page.goto(dashboard.url + path)
    page.fill("input[name=key]", DASHBOARD_KEY)
    page.click(".login button[type=submit]")
    page.wait_for_url(dashboard.url + path)
