"""The poller stops when the store closes, whenever the cancellation lands: even as a round
finishes (Python 3.11's ``wait_for`` then returned the round's result and dropped the
cancellation, and the poller went on forever). No PostgreSQL needed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("psycopg")

from adserver.state.postgres.changes import SharedViews
from adserver.state.postgres.sync import StateSync
from adserver.state.view import KeyedState, MetricsState


class InstantSync(StateSync):
    """A round that finishes at once, telling the test it ran."""

    ran: asyncio.Event

    async def refresh(self) -> None:
        self.ran.set()


def test_close_stops_a_poller_cancelled_as_its_round_finishes() -> None:
    async def scenario() -> None:
        views = KeyedState({"m": MetricsState()}, "m")
        pool: Any = None  # never reached: the round is the test's
        sync = InstantSync(pool, SharedViews(views, MetricsState().statistics), "vector_sum")
        sync.ran = asyncio.Event()
        sync.start()
        task = sync._task
        assert task is not None
        await sync.ran.wait()  # woken in the very turn the round finishes: cancel now
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(5):  # bounded, whatever close does with the cancellation
            await sync.close()
        assert task.done()
        assert loop.time() - started < 1.0  # stopped, not left polling

    asyncio.run(scenario())
