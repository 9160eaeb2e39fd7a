"""Bucket reads in PostgreSQL: the shared reads (``adserver.state.reads``) over the async pool.

A span's rows are summed by ``GROUP BY`` across slots and buckets in the database (vectors by
the keyspace's aggregate, ``schema.VECTOR_SUM``, named by the store), so what reaches Python is
bounded by the caps, never by replicas or history; moments are listed and folded by their
``load``. Each read is one REPEATABLE READ, read-only transaction, so every statistic of it comes
from the same commits. Rows are fetched without blocking the IOLoop and folded on it,
:data:`ROWS_PER_SLICE` at a time with the loop turning between slices.

The pool's connections are the store's: autocommit, the keyspace on their ``search_path`` and
our binary codecs (a ``float8[]`` loads as vector bytes), as ``PostgresOptions`` configures
them; statements ask for binary results.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from adserver.catalogue import reasons
from adserver.errors import Unavailable
from adserver.state.reads import IN_CHUNK, BucketSQL, Read, WindowKey, read_range, read_windows
from adserver.state.view import MetricsState
from cm_models.statistics import Row, Statistic

T = TypeVar("T")

#: Summed rows folded between two turns of the IOLoop.
ROWS_PER_SLICE = 4096


#: Seconds one statement of a bucket read or a full reload may run: they read far more than a
#: poll (whose statements get ``--postgres_connect_timeout_seconds``).
READ_STATEMENT_SECONDS = 30.0


@asynccontextmanager
async def snapshot_read(
    pool: AsyncConnectionPool[Any], wait: float, statement: float = READ_STATEMENT_SECONDS
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled connection (waited for at most ``wait`` seconds) in one REPEATABLE READ,
    read-only transaction: every statement of it sees the same commits, and runs at most
    ``statement`` seconds (the database's ``statement_timeout``)."""
    async with pool.connection(timeout=wait) as connection:
        await connection.execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; "
            f"SET LOCAL statement_timeout = {max(1, round(statement * 1000))}"
        )
        try:
            yield connection
        finally:
            await connection.execute("COMMIT")  # read-only: nothing to keep or to lose


def postgres_sql(vector_sum: str) -> BucketSQL:
    """Bucket reads in PostgreSQL's SQL: ``SUM(bigint)`` is ``numeric``, cast back."""
    return BucketSQL(vector_sum, placeholder="%s", int_sum="SUM({})::bigint")


def sliced(rows: Sequence[Row]) -> Iterator[Sequence[Row]]:
    for start in range(0, len(rows), ROWS_PER_SLICE):
        yield rows[start : start + ROWS_PER_SLICE]


async def run(connection: psycopg.AsyncConnection[Any], reading: Read[T]) -> T:
    """Answer a read's statements on ``connection``, turning the loop between its slices."""
    try:
        request = next(reading)
        while True:
            if request is None:
                await asyncio.sleep(0)
                request = reading.send(None)
                continue
            cursor = await connection.execute(request.sql, request.parameters, binary=True)
            request = reading.send(sliced(await cursor.fetchall()))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


class PostgresBucketReader:
    """:class:`~adserver.state.reads.BucketReader` over the keyspace's statistic tables.

    ``models``: the models' all-time views by name, as for SQLite's reader; ``pool``: the
    store's async pool (closed by the store); ``vector_sum``: the keyspace's aggregate of
    vectors; ``timeout``: ``--postgres_connect_timeout_seconds`` (the wait for a connection).
    """

    def __init__(
        self,
        models: Mapping[str, MetricsState],
        pool: AsyncConnectionPool[Any],
        vector_sum: str,
        timeout: float = 2.0,
    ) -> None:
        self.models = models
        self.pool = pool
        self.sql = postgres_sql(vector_sum)
        self.timeout = timeout

    async def read_range(
        self, model: str, segment: str | None, spans: Sequence[Sequence[int]]
    ) -> list[MetricsState]:
        view = self.models[model]
        with unavailable_on_fault():
            async with snapshot_read(self.pool, self.timeout) as connection:
                return await run(
                    connection, read_range(self.sql, view, model, segment, spans, chunk_of)
                )

    async def read_windows(
        self, spans: Sequence[Sequence[int]]
    ) -> list[dict[WindowKey, MetricsState]]:
        with unavailable_on_fault():
            async with snapshot_read(self.pool, self.timeout) as connection:
                return await run(connection, read_windows(self.sql, self.models, spans, chunk_of))

    async def close(self) -> None:
        """Nothing of its own: the pool is the store's."""


@contextmanager
def unavailable_on_fault() -> Iterator[None]:
    """The database unreachable, or a read over its time limit: a 503 the reader may retry."""
    try:
        yield
    except (psycopg.Error, PoolTimeout, TimeoutError) as exc:
        raise Unavailable("state store unavailable", reasons.STORE_ERROR) from exc


def chunk_of(statistic: Statistic[Any, Any]) -> int:
    """Buckets one statement sums: the database sums them off the IOLoop, whatever the kind."""
    return IN_CHUNK
