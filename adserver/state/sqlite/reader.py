"""Bucket reads in SQLite: SQL sums a span's buckets, Python folds only the summed rows.

A span's rows are summed by ``GROUP BY`` inside SQLite (vectors by the ``vector_sum`` aggregate),
so what reaches Python is bounded by the caps (classes squared, segments, models), never by how
many buckets or events a span holds, and it streams from the cursor into each statistic's
``load``. A ``moments`` statistic cannot be summed: its rows are listed and folded by its
``load`` (Chan's update), at most a row per bucket of the span for each of its keys. The
queries name every column and filter on ``time_bucket IN (...)``, so they do not depend on the
tables' primary-key order.

Durable mode reads on its own thread with its own read-only connection (WAL: readers never wait
for the writer, nor the writer for them), each read in one transaction so that every statistic
of it comes from the same commit. Memory mode reads on the store's connection, on the IOLoop
where its commits run too, in slices of :data:`ROWS_PER_SLICE` summed rows with the loop turning
between them (a window over 1,000 classes is ~10^6 rows: one go would hold events up for a
second). SQLite sums a statement's rows in its sorter before the first one is returned, so a
commit between slices cannot change a statement's rows; it may land between two statements of
one read (in memory mode a read is as of its slices, not of one commit).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from adserver.state.reads import (
    IN_CHUNK,
    BucketSQL,
    Query,
    Read,
    WindowKey,
    read_range,
    read_windows,
)
from adserver.state.sqlite.functions import VECTOR_SUM, register
from adserver.state.view import MetricsState
from cm_models.statistics import Statistic

T = TypeVar("T")

#: Summed rows folded between two turns of the IOLoop (memory mode).
ROWS_PER_SLICE = 4096
#: Buckets one statement sums in memory mode: SQLite sums them before its first row, on the
#: IOLoop (at 100 models x 2 segments x 100 cells a bucket, 500 held it for ~100 ms; each
#: statement's rows are folded in Python, so fewer buckets cost more statements' rows).
INLINE_BUCKETS = 8
#: The same for a statistic with vectors: ``vector_sum`` calls Python for every row (~2-4 us
#: beside ~10 ns for ``SUM``), so in memory mode the loop turns after each bucket.
INLINE_VECTOR_BUCKETS = 1


#: Bucket reads in SQLite's SQL (a vector is our bytes; ``vector_sum`` returns them too).
SQL = BucketSQL(VECTOR_SUM)


class SQLiteBucketReader:
    """:class:`~adserver.state.reads.BucketReader` over the statistic tables.

    ``models`` are the models' all-time views by name (their classes and declared statistics
    shape every state read; rows of another model are skipped).
    """

    def __init__(
        self,
        models: Mapping[str, MetricsState],
        *,
        path: Path | None = None,
        connection: sqlite3.Connection | None = None,
    ) -> None:
        if (path is None) == (connection is None):
            raise ValueError("a reader reads a state file (path) or a connection, not both")
        self.models = models
        self.path = path
        self._connection = connection
        self._thread: ThreadPoolExecutor | None = None
        self._chunk = IN_CHUNK if connection is None else INLINE_BUCKETS
        self._vector_chunk = IN_CHUNK if connection is None else INLINE_VECTOR_BUCKETS

    @classmethod
    def durable(cls, models: Mapping[str, MetricsState], path: Path) -> SQLiteBucketReader:
        return cls(models, path=path)

    @classmethod
    def inline(
        cls, models: Mapping[str, MetricsState], connection: sqlite3.Connection
    ) -> SQLiteBucketReader:
        return cls(models, connection=connection)

    async def read_range(
        self, model: str, segment: str | None, spans: Sequence[Sequence[int]]
    ) -> list[MetricsState]:
        view = self.models[model]
        return await self._run(lambda: read_range(SQL, view, model, segment, spans, self._chunk_of))

    async def read_windows(
        self, spans: Sequence[Sequence[int]]
    ) -> list[dict[WindowKey, MetricsState]]:
        return await self._run(lambda: read_windows(SQL, self.models, spans, self._chunk_of))

    async def close(self) -> None:
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
            self._thread.shutdown(wait=True)
            self._thread = None

    async def _run(self, read: Callable[[], Read[T]]) -> T:
        if self.path is None:
            connection = self._connection
            assert connection is not None
            reading = read()
            try:
                request = next(reading)
                while True:
                    if request is None:
                        await asyncio.sleep(0)  # events commit between slices
                    request = reading.send(answer(connection, request))
            except StopIteration as done:
                return done.value
        if self._thread is None:  # made at the first read: a server nobody asks never has one
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bucket-reader")
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, self._in_snapshot, read
        )

    def _in_snapshot(self, read: Callable[[], Read[T]]) -> T:
        """On the reader thread: one read transaction, so every statistic read agrees."""
        if self._connection is None:
            assert self.path is not None
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._connection = register(sqlite3.connect(uri, uri=True, isolation_level=None))
        connection = self._connection
        connection.execute("BEGIN")
        try:
            reading = read()
            request = next(reading)
            while True:
                request = reading.send(answer(connection, request))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        finally:
            connection.execute("COMMIT")

    def _chunk_of(self, statistic: Statistic[Any, Any]) -> int:
        """Buckets one statement of this statistic sums."""
        return self._vector_chunk if statistic.width else self._chunk

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def answer(connection: sqlite3.Connection, request: Query | None) -> Iterator[list[Any]] | None:
    """A read's query run (its rows in slices, as it folds them), or nothing to a turn."""
    return None if request is None else slices(connection.execute(request.sql, request.parameters))


def slices(cursor: sqlite3.Cursor) -> Iterator[list[Any]]:
    """A statement's rows, :data:`ROWS_PER_SLICE` at a time."""
    while rows := cursor.fetchmany(ROWS_PER_SLICE):
        yield rows
