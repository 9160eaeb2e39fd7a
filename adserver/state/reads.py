"""Reads of time buckets: a range of prediction time is the sum of its buckets' stored rows.

Buckets are never held in memory (only all-time views are): a range, a step or a sliding window
is read on demand as the stored rows of the buckets that tile it (``TimeBuckets.cover``), summed
by the store and folded into a :class:`MetricsState` per span, the same class every summary and
gauge is derived from. A bucket holds only what counts per row (a delta's row part): the
confusion cells, the row counters, the label delay and the model's own additive statistics.

Every backend's reader runs the same reads (:func:`read_range`, :func:`read_windows`): each is
a generator that yields the statements it needs (in the backend's SQL, :class:`BucketSQL`) and
folds the rows it is sent, so only running a statement differs (a thread, or the IOLoop).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

from adserver.state.view import CELLS, COUNTERS, LABEL_DELAY, MetricsState
from cm_models.statistics import DEFAULT_SEGMENT, ColumnType, Row, Statistic

#: The built-in statistics a bucket holds (with a model's own that add, :func:`bucket_statistics`).
ROW_STATISTICS = (CELLS, COUNTERS, LABEL_DELAY)
#: Bucket ids per ``IN (...)`` list: well under SQLite's 32766 host parameters, and a statement
#: short enough to prepare in microseconds. A span of more buckets is read in several.
IN_CHUNK = 500

WindowKey = tuple[str, str]  # (model, segment); segment "" = the model's totals
T = TypeVar("T")


class BucketReader(Protocol):
    """What the exposition reads of buckets; a backend answers off the IOLoop where it can."""

    async def read_range(
        self, model: str, segment: str | None, spans: Sequence[Sequence[int]]
    ) -> list[MetricsState]:
        """One state per span (the sum of its buckets); segment None = the model's totals."""

    async def read_windows(
        self, spans: Sequence[Sequence[int]]
    ) -> list[dict[WindowKey, MetricsState]]:
        """Per span, every (model, segment) with rows, plus (model, "") totals."""

    async def close(self) -> None:
        """Release the reader's connection and thread, if it has any."""


def empty_like(view: MetricsState) -> MetricsState:
    """An empty state with a model's classes as they are now (so every span of one read has the
    same matrix axes as the model's all-time view) and its declared statistics."""
    return MetricsState(
        tuple(view.confusion.classes), view.declared, view.sections, classifies=view.classifies
    )


def bucket_statistics(view: MetricsState) -> list[Statistic[Any, Any]]:
    """The statistics a bucket of this model holds: the row part's (gauges, merged by ``last``,
    and the per-event counters live only in all-time rows)."""
    own = [s for s in view.declared if s.mergeable]
    return [*(view.statistics[name] for name in ROW_STATISTICS), *own]


def chunks(buckets: Sequence[int], size: int = IN_CHUNK) -> Iterator[Sequence[int]]:
    for start in range(0, len(buckets), size):
        yield buckets[start : start + size]


class WindowFold:
    """One span's states by (model, segment): each segment's rows also add to its model's totals
    (a model without dimensions has only segment "", its totals)."""

    def __init__(self, models: Mapping[str, MetricsState]) -> None:
        self.models = models
        self.states: dict[WindowKey, MetricsState] = {}

    def add(self, statistic: str, model: str, segment: str, rows: Iterable[Row]) -> None:
        """Summed rows of one (model, segment); a model not configured (any more) is skipped."""
        view = self.models.get(model)
        if view is None or statistic not in view.statistics:
            return
        keys = [(model, DEFAULT_SEGMENT)]
        if segment != DEFAULT_SEGMENT:
            keys.append((model, segment))
            rows = list(rows)  # read twice; one (model, segment)'s summed rows, bounded by caps
        for key in keys:
            state = self.states.get(key)
            if state is None:
                state = self.states[key] = empty_like(view)
            state.load(statistic, rows)


@dataclass(frozen=True)
class BucketSQL:
    """The statements of bucket reads in one backend's SQL: its aggregate of vectors, its
    placeholder, and how an integer sum keeps its type (PostgreSQL's ``SUM(bigint)`` is
    ``numeric``)."""

    vector_sum: str
    placeholder: str = "?"
    int_sum: str = "SUM({})"

    def spanned(self, statistic: Statistic[Any, Any], grouped_by: Sequence[str], where: str) -> str:
        """The statement reading a statistic's rows over buckets, ordered by ``grouped_by`` and
        its keys: :meth:`summed`, or :meth:`listed` for moments."""
        if statistic.merge == "moments":
            return self.listed(statistic, grouped_by, where)
        return self.summed(statistic, grouped_by, where)

    def summed(self, statistic: Statistic[Any, Any], grouped_by: Sequence[str], where: str) -> str:
        """The statement summing a statistic's values over buckets, by ``grouped_by`` and its
        keys."""
        keys = [*grouped_by, *(name for name, _ in statistic.keys)]
        values = ", ".join(self.sum_of(name, kind) for name, kind in statistic.values)
        table = statistic.name
        if not keys:  # one sum; no row at all (rather than NULLs) where nothing matched
            return f"SELECT {values} FROM {table} WHERE {where} HAVING COUNT(*) > 0"
        group = ", ".join(keys)
        return (
            f"SELECT {group}, {values} FROM {table} WHERE {where} GROUP BY {group} ORDER BY {group}"
        )

    def listed(self, statistic: Statistic[Any, Any], grouped_by: Sequence[str], where: str) -> str:
        """The statement listing a statistic's rows over buckets, by ``grouped_by`` and its keys
        (then in the table's order, so a fold is the same at every read)."""
        keys = [*grouped_by, *(name for name, _ in statistic.keys)]
        order = ", ".join(dict.fromkeys([*keys, "time_bucket", "model", "segment"]))
        columns = ", ".join([*keys, *(name for name, _ in statistic.values)])
        return f"SELECT {columns} FROM {statistic.name} WHERE {where} ORDER BY {order}"

    def sum_of(self, column: str, kind: ColumnType) -> str:
        if kind == "vector":
            return f"{self.vector_sum}({column})"
        return self.int_sum.format(column) if kind == "int" else f"SUM({column})"

    def in_list(self, buckets: Sequence[int]) -> str:
        return f"time_bucket IN ({', '.join([self.placeholder] * len(buckets))})"


class Query(NamedTuple):
    """A statement a read asks its backend to run (its vectors come back as our bytes)."""

    sql: str
    parameters: tuple[Any, ...]


#: A read: yields a :class:`Query` and is sent its rows (in slices), or yields None between two
#: slices it folded (the backend may turn the IOLoop); returns what was read.
Read = Generator[Query | None, Iterable[Sequence[Row]] | None, T]
ChunkOf = Callable[[Statistic[Any, Any]], int]


def read_range(
    sql: BucketSQL,
    view: MetricsState,
    model: str,
    segment: str | None,
    spans: Sequence[Sequence[int]],
    chunk_of: ChunkOf,
) -> Read[list[MetricsState]]:
    """One state per span of a model's (or one segment's) buckets."""
    mark = sql.placeholder
    where, fixed = f"model = {mark}", [model]
    if segment is not None:
        where, fixed = f"model = {mark} AND segment = {mark}", [model, segment]
    states = []
    for span in spans:
        state = empty_like(view)
        for statistic in bucket_statistics(view):
            for part in chunks(span, chunk_of(statistic)):
                statement = sql.spanned(statistic, (), f"{where} AND {sql.in_list(part)}")
                found = yield Query(statement, (*fixed, *part))
                assert found is not None
                for rows in found:
                    state.load(statistic.name, rows)
                    yield None
        states.append(state)
    return states


def read_windows(
    sql: BucketSQL,
    models: Mapping[str, MetricsState],
    spans: Sequence[Sequence[int]],
    chunk_of: ChunkOf,
) -> Read[list[dict[WindowKey, MetricsState]]]:
    """Per span, every (model, segment) with rows and each model's totals."""
    statistics: dict[str, Statistic[Any, Any]] = {}
    for view in models.values():  # a table per name, whichever models declare it
        for statistic in bucket_statistics(view):
            statistics.setdefault(statistic.name, statistic)
    found = []
    for span in spans:
        fold = WindowFold(models)
        for statistic in statistics.values():
            for part in chunks(span, chunk_of(statistic)):
                statement = sql.spanned(statistic, ("model", "segment"), sql.in_list(part))
                answer = yield Query(statement, tuple(part))
                assert answer is not None
                for rows in answer:
                    for (model, segment), group in itertools.groupby(rows, key=key_of):
                        fold.add(statistic.name, model, segment, (row[2:] for row in group))
                    yield None
        found.append(fold.states)
    return found


def key_of(row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(row[:2])
