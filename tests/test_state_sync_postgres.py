"""The poller and the bucket reader against a real PostgreSQL: change rows of other connections
applied exactly once (one still in progress at a poll, too), a reload equal to the tables,
reads summed across slots, and readiness that follows the database."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

# The dialect and schema are helper pgstore's: until they are merged these tests wait for them.
pytest.importorskip("adserver.state.postgres.dialect")

import psycopg
from psycopg_pool import AsyncConnectionPool

from adserver.state.postgres.changes import SharedViews, encode_changes
from adserver.state.postgres.dialect import PostgresDialect, PostgresOptions
from adserver.state.postgres.reader import PostgresBucketReader
from adserver.state.postgres.schema import VECTOR_SUM, keyspace_name
from adserver.state.postgres.sync import StateSync
from adserver.state.reads import bucket_statistics
from adserver.state.view import Delta, KeyedState, MetricsState
from cm_models.statistics import (
    ALL_TIME,
    Moments,
    StateKey,
    Sums,
    moments_of,
    vector_array,
    vector_bytes,
)

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

MODEL = "m"
WIDTH = 4
HISTOGRAM = Sums(
    "histogram", keys=[("truth", "int")], values=[("rows", "int"), ("v", "vector")], width=WIDTH
)
MOMENTS = Moments("spread", keys=[("truth", "int")])


def prototype() -> MetricsState:
    return MetricsState((0, 1), (HISTOGRAM, MOMENTS))


def views() -> KeyedState:
    return KeyedState({MODEL: prototype()}, MODEL)


def keyspace(options: PostgresOptions) -> PostgresOptions:
    """The model's keyspace and tables, made by the store's own migration."""
    dialect = PostgresDialect.open(options, MODEL)
    dialect.prepare(prototype().statistics.values())
    dialect.close()
    return options


@pytest.fixture
def options(postgres_dsn: str) -> PostgresOptions:
    return keyspace(PostgresOptions(postgres_dsn, keyspace_name(MODEL)))


def open_pool(options: PostgresOptions) -> AsyncConnectionPool[Any]:
    """A readers' pool as the store opens it (the keyspace, our binary codecs)."""
    return AsyncConnectionPool(
        max_size=2, configure=options.configure_async, **options.pool_arguments("test-readers")
    )


def connect(options: PostgresOptions) -> psycopg.Connection[Any]:
    connection = psycopg.connect(options.dsn, **options.connection_kwargs())
    options.configure(connection)
    return connection


def change(value: int, segment: str = "") -> bytes:
    delta = Delta(counters=[("events_accepted", "", value)])
    return encode_changes(prototype().statistics, [(StateKey(MODEL, segment), delta)])


def publish(connection: psycopg.Connection[Any], payload: bytes) -> int:
    row = connection.execute(
        "INSERT INTO changes (writer, payload) VALUES ('other', %s) RETURNING xid::text::bigint",
        (payload,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_poll_applies_each_commit_once(options: PostgresOptions) -> None:
    """Another connection's commits, one of them still in progress at a poll (in its snapshot's
    xip) and committed after; and an own commit applied locally before the poll that sees it."""
    asyncio.run(polls_each_commit_once(options))


async def polls_each_commit_once(options: PostgresOptions) -> None:
    async with open_pool(options) as pool:
        await polled_once(options, pool)


async def polled_once(options: PostgresOptions, pool: AsyncConnectionPool[Any]) -> None:
    state = views()
    shared = SharedViews(state, prototype().statistics)
    sync = StateSync(pool, shared, VECTOR_SUM)
    await sync.poll()  # the base: every change so far (none)
    with connect(options) as other, connect(options) as slow:
        slow.execute("BEGIN")
        late = publish(slow, change(10))
        with other.transaction():  # a later xid, committed: the snapshot lists ``late`` in xip
            publish(other, change(1, "a"))
        assert await sync.poll() == 1
        assert late in shared.base.xip
        assert state.total(MODEL).count("events_accepted") == 1
        slow.execute("COMMIT")
        with other.transaction():
            own = publish(other, change(100))
        shared.local(own, [(StateKey(MODEL), Delta(counters=[("events_accepted", "", 100)]))])
        assert await sync.poll() == 1  # the late one; the own one was applied already
        assert await sync.poll() == 0
    assert state.total(MODEL).count("events_accepted") == 111
    assert state.at(StateKey(MODEL, "a")).count("events_accepted") == 1
    assert shared.extra == {}


def insert_rows(
    options: PostgresOptions, slot: int, bucket: int, rows: dict[str, list[tuple[Any, ...]]]
) -> None:
    """Rows of one slot as a dialect writes them (vectors as float8[])."""
    with connect(options) as connection, connection.transaction():
        for name, found in rows.items():
            statistic = prototype().statistics[name]
            columns = [
                "slot",
                "model",
                "segment",
                "time_bucket",
                *(c for c, _ in (*statistic.keys, *statistic.values)),
            ]
            marks = ", ".join(["%s"] * len(columns))
            for row in found:
                values = [vector_array(v).tolist() if isinstance(v, bytes) else v for v in row[1:]]
                connection.execute(
                    f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({marks})",
                    (slot, MODEL, row[0], bucket, *values),
                )


def slot_rows(seed: int) -> dict[str, list[tuple[Any, ...]]]:
    """A slot's rows of every kind a bucket holds: segment first, then the statistic's row."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[tuple[Any, ...]]] = {"cells": [], "counters": [], "label_delay": []}
    rows[HISTOGRAM.name], rows[MOMENTS.name] = [], []
    for segment in ("", "x"):
        for truth in (0, 1):
            rows["cells"].append((segment, truth, int(rng.integers(2)), int(rng.integers(1, 9))))
            counts = rng.integers(0, 5, WIDTH).astype(float)
            rows[HISTOGRAM.name].append((segment, truth, int(counts.sum()), vector_bytes(counts)))
            spread = moments_of(rng.normal(1e9, 1.0, 5))
            rows[MOMENTS.name].append((segment, truth, *spread))
        rows["counters"].append((segment, "rows_accepted", "", int(rng.integers(1, 50))))
        rows["label_delay"].append((segment, 2, 3, 0.5 * int(rng.integers(1, 9))))
    return rows


def expected(rows: list[dict[str, list[tuple[Any, ...]]]], segment: str | None) -> dict[str, Any]:
    """One state holding every slot's rows, folded by each statistic's own merge."""
    state = prototype()
    for found in rows:
        for name, listed in found.items():
            state.load(name, [row[1:] for row in listed if segment is None or row[0] == segment])
    return comparable(state)


def comparable(state: MetricsState) -> dict[str, Any]:
    out: dict[str, Any] = {
        "cells": state.confusion.matrix().tolist(),
        "counters": dict(state.counters),
        "delay": (state.label_delay.buckets.tolist(), state.label_delay.total),
    }
    histogram = state.tables[HISTOGRAM.name]
    out[HISTOGRAM.name] = {k: (v[0], v[1].tolist()) for k, v in histogram.items()}
    out[MOMENTS.name] = {
        k: (v.n, v.center, round(v.m2, 6)) for k, v in state.tables[MOMENTS.name].items()
    }
    return out


def test_reads_sum_every_slot_and_a_reload_equals_the_tables(options: PostgresOptions) -> None:
    written = [slot_rows(1), slot_rows(2)]
    for slot, rows in enumerate(written):
        insert_rows(options, slot, 7, rows)
        insert_rows(options, slot, 8, rows)
        insert_rows(options, slot, ALL_TIME, rows)
    asyncio.run(reads_and_reload(options, written))


async def reads_and_reload(options: PostgresOptions, written: list[dict[str, list[Any]]]) -> None:
    async with open_pool(options) as pool:
        await read_and_reloaded(pool, written)


async def read_and_reloaded(
    pool: AsyncConnectionPool[Any], written: list[dict[str, list[Any]]]
) -> None:
    reader = PostgresBucketReader({MODEL: prototype()}, pool, VECTOR_SUM)
    assert [s.name for s in bucket_statistics(prototype())][-2:] == [HISTOGRAM.name, MOMENTS.name]
    twice = written * 2  # buckets 7 and 8
    for segment in (None, "x"):
        (both,) = await reader.read_range(MODEL, segment, [[7, 8]])
        assert comparable(both) == expected(twice, segment)
    (one,) = await reader.read_windows([[7]])
    assert comparable(one[(MODEL, "")]) == expected(written, None)
    assert comparable(one[(MODEL, "x")]) == expected(written, "x")

    state = views()
    shared = SharedViews(state, prototype().statistics)
    state.apply(StateKey(MODEL), Delta(counters=[("stale", "", 1)]))  # what a reload forgets
    await StateSync(pool, shared, VECTOR_SUM).reload()
    assert comparable(state.total(MODEL)) == expected(written, None)
    assert comparable(state.at(StateKey(MODEL, "x"))) == expected(written, "x")


async def eventually(condition: Any, within: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < within, "not within the time"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def test_health_follows_the_database(private_postgres: Any) -> None:
    """Unhealthy within 5 s of PostgreSQL stopping (the views keep their state), healthy again
    once it is back."""
    dsn = private_postgres.create_database("sync")
    options = keyspace(PostgresOptions(dsn, keyspace_name(MODEL), connect_timeout_seconds=1))
    asyncio.run(follows_the_database(private_postgres, options))


async def follows_the_database(server: Any, options: PostgresOptions) -> None:
    async with open_pool(options) as pool:
        state = views()
        sync = StateSync(pool, SharedViews(state, prototype().statistics), VECTOR_SUM, timeout=1)
        sync.start()
        try:
            await eventually(lambda: sync.polls > 2 and sync.healthy(), 5)
            with connect(options) as other:
                publish(other, change(5))
            await eventually(lambda: state.total(MODEL).count("events_accepted") == 5, 5)
            server.stop()
            assert await eventually(lambda: not sync.healthy(), 5) < 5
            assert sync.staleness() > 2
            assert state.total(MODEL).count("events_accepted") == 5
            server.start()
            await eventually(sync.healthy, 20)
            assert sync.staleness() < 1
        finally:
            await sync.close()
