"""Reads of time buckets: a range of prediction time is the sum of its buckets' stored rows.

Buckets are never held in memory (only all-time views are): a range, a step or a sliding window
is read on demand as the stored rows of the buckets that tile it (``TimeBuckets.cover``), summed
by the store and folded into a :class:`MetricsState` per span, the same class every summary and
gauge is derived from. A bucket holds only what counts per row (a delta's row part): the
confusion cells, the row counters, the label delay and the model's own additive statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from adserver.state.view import CELLS, COUNTERS, LABEL_DELAY, MetricsState
from cm_models.statistics import DEFAULT_SEGMENT, Row, Statistic

#: The built-in statistics a bucket holds (with a model's own that add, :func:`bucket_statistics`).
ROW_STATISTICS = (CELLS, COUNTERS, LABEL_DELAY)
#: Bucket ids per ``IN (...)`` list: well under SQLite's 32766 host parameters, and a statement
#: short enough to prepare in microseconds. A span of more buckets is read in several.
IN_CHUNK = 500

WindowKey = tuple[str, str]  # (model, segment); segment "" = the model's totals


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
