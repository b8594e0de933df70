"""What the dashboard holds for its lifetime (created by the app factory's lifespan), and the `Annotated`
dependencies routes use to reach it: `StateDep`, `ConnectionDep`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Depends, Request
from jinja2 import Environment
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from prompttrain.dashboard.auth import DashboardAuth
from prompttrain.dashboard.directory import ConfiguredDirectory
from prompttrain.dashboard.live import LiveHub
from prompttrain.settings import Settings
from prompttrain.storage.dashboard_queries import FilterChoices, filter_choices

CHOICES_SECONDS = 30.0
CHOICES_WINDOW = timedelta(days=30)


@dataclass
class DashboardState:
    settings: Settings
    engine: AsyncEngine
    auth: DashboardAuth
    hub: LiveHub
    templates: Environment
    directory: ConfiguredDirectory
    _choices: tuple[float, FilterChoices] | None = field(default=None, repr=False)

    async def choices(self) -> FilterChoices:
        """Trains, accounts and models for the filter suggestions, recomputed at most every 30 s."""
        now = time.monotonic()
        if self._choices is None or now - self._choices[0] > CHOICES_SECONDS:
            async with self.engine.connect() as connection:
                found = await filter_choices(connection, datetime.now(UTC) - CHOICES_WINDOW)
            self._choices = (now, found)
        return self._choices[1]


def get_state(request: Request) -> DashboardState:
    state: DashboardState = request.app.state.dashboard
    return state


StateDep = Annotated[DashboardState, Depends(get_state)]


async def get_connection(state: StateDep) -> AsyncIterator[AsyncConnection]:
    async with state.engine.connect() as connection:
        yield connection


ConnectionDep = Annotated[AsyncConnection, Depends(get_connection)]
