"""The committer's handling of a shared store's concurrency aborts, and the views' full reset."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adserver.errors import Unavailable
from adserver.state.committer import MAX_ATTEMPTS, CommitPolicy
from adserver.state.sqlite.store import SQLiteDialect, SQLiteStore
from adserver.state.view import MetricsState
from cm_models.statistics import StateKey
from tests.support.stores import BUCKETS
from tests.test_store_sqlite import event


class Deadlock(Exception):
    sqlstate = "40P01"


class AbortingDialect(SQLiteDialect):
    """SQLite whose first ``aborts`` commits fail as a deadlocked shared database's would."""

    retryable = (Deadlock,)
    aborts = 0

    def commit(self) -> None:
        if self.aborts:
            self.aborts -= 1
            raise Deadlock("deadlock detected")
        super().commit()


def open_store(tmp_path: Path, aborts: int) -> SQLiteStore:
    dialect = AbortingDialect.open(str(tmp_path), "m")
    dialect.aborts = aborts
    policy = CommitPolicy(retention=3600.0, max_ids=1000)
    return SQLiteStore({"m": MetricsState()}, dialect, "m", policy, buckets=BUCKETS)


def test_an_aborted_transaction_is_run_again_and_counts_once(tmp_path: Path) -> None:
    async def scenario() -> SQLiteStore:
        store = open_store(tmp_path, aborts=2)
        assert await store.commit([event("a", [1, 2], [1, 1])]) == [True]
        assert await store.commit([event("a", [1, 2], [1, 1])]) == [False]
        await store.close()
        return store

    store = asyncio.run(scenario())
    assert store.state.count("rows_accepted") == 2
    assert store.stats.retries == {"deadlock": 2}
    assert store.stats.transactions == 2
    reopened = open_store(tmp_path, aborts=0)
    assert reopened.state.count("rows_accepted") == 2  # what was aborted left nothing behind
    assert reopened.seen_count == 1


def test_an_abort_that_keeps_coming_is_a_503_and_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> SQLiteStore:
        store = open_store(tmp_path, aborts=MAX_ATTEMPTS)
        with pytest.raises(Unavailable):
            await store.commit([event("a", [1], [1])])
        assert await store.commit([event("a", [1], [1])]) == [True]  # the sender's retry
        await store.close()
        return store

    store = asyncio.run(scenario())
    assert store.state.count("rows_accepted") == 1
    assert store.stats.retries == {"deadlock": MAX_ATTEMPTS - 1}


def test_views_reset_in_place_and_reload_to_the_same_state(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = open_store(tmp_path, aborts=0)
        await store.commit([event("a", [1, 2], [1, 1])])
        views = store.views
        totals = views.total("m")
        views.at(StateKey("m", "canary"))
        version = totals.version
        views.reset()
        assert views.total("m") is totals  # a reader holding the totals sees the reload
        assert totals.count("rows_accepted") == 0 and totals.version > version
        assert views.segments("m") == {}
        store._load_views()
        assert totals.count("rows_accepted") == 2
        assert totals.confusion.matrix().sum() == 2
        await store.close()

    asyncio.run(scenario())
