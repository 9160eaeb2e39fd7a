"""The server's in-memory view of everything counted: sufficient statistics only.

State changes only through :class:`Delta` objects, the unit a store makes durable and
deduplicates. Counts add; gauges keep the last value; timers are histogram counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from cm_models.confusion import Cells, ConfusionMatrix
from cm_models.custom_metrics import CustomMetric, MetricType, family_name

# Seldon's timer buckets: 50 log-spaced bounds from 1 ms to 30 s (values arrive in ms).
TIMER_BUCKETS = tuple(float(b) for b in np.geomspace(0.001, 30.0, 50))
# Label delay: from seconds to the longest time a prediction is kept (days).
DELAY_BUCKETS = (
    1.0,
    10.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
    12 * 3600.0,
    86400.0,
    2 * 86400.0,
    4 * 86400.0,
    7 * 86400.0,
    14 * 86400.0,
    30 * 86400.0,
)

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
CounterKey = tuple[str, str]


@dataclass(frozen=True)
class Delta:
    """What one event (or one rejection) adds.

    ``counters`` are (name, label, increment); ``delays`` are (label delay in seconds, rows):
    the rows of one label share their prediction's time, so a batch is one pair, not a row each.
    """

    cells: Cells | None = None
    metrics: tuple[CustomMetric, ...] = ()
    counters: tuple[tuple[str, str, int], ...] = ()
    delays: tuple[tuple[float, int], ...] = ()

    def __add__(self, other: Delta) -> Delta:
        if self.cells is None or other.cells is None:
            cells = self.cells if other.cells is None else other.cells
        else:
            cells = Cells.concat([self.cells, other.cells])
        return Delta(
            cells=cells,
            metrics=self.metrics + other.metrics,
            counters=self.counters + other.counters,
            delays=self.delays + other.delays,
        )


def bucket_index(bounds: tuple[float, ...], value: float) -> int:
    """Index of the first bucket whose upper bound holds ``value`` (len(bounds) = only +Inf)."""
    return int(np.searchsorted(bounds, value))


@dataclass
class Histogram:
    """Cumulative bucket counts, as Prometheus exposes them."""

    bounds: tuple[float, ...] = TIMER_BUCKETS
    buckets: np.ndarray = field(init=False)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.buckets = np.zeros(len(self.bounds), np.int64)

    def add(self, index: int, count: int, total: float) -> None:
        self.buckets[index:] += count
        self.count += count
        self.total += total

    def observe(self, value: float) -> None:
        self.add(bucket_index(self.bounds, value), 1, value)


class CustomMetricsState:
    """Seldon semantics: COUNTER adds, GAUGE overwrites, TIMER (ms) feeds a seconds histogram."""

    def __init__(self) -> None:
        self.types: dict[str, MetricType] = {}
        self.counters: dict[SeriesKey, float] = {}
        self.gauges: dict[SeriesKey, float] = {}
        self.timers: dict[SeriesKey, Histogram] = {}

    def apply(self, metric: CustomMetric) -> None:
        """Metrics arrive admitted by the store's :class:`MetricCatalog`: types never clash."""
        series = (family_name(metric), metric.tags)
        self.types[series[0]] = metric.type
        if metric.type == "COUNTER":
            self.counters[series] = self.counters.get(series, 0.0) + metric.value
        elif metric.type == "GAUGE":
            self.gauges[series] = metric.value
        else:
            self.timers.setdefault(series, Histogram()).observe(metric.seconds)


class MetricsState:
    """Everything ``/v1/metrics`` shows for one model, rebuilt from deltas after a restart."""

    def __init__(self, classes: list[int] | tuple[int, ...] = ()) -> None:
        self.confusion = ConfusionMatrix(classes)
        self.custom = CustomMetricsState()
        self.counters: Counter[CounterKey] = Counter()
        self.label_delay = Histogram(DELAY_BUCKETS)
        self.version = 0  # bumped on every change, so readers can cache what they derive

    def apply(self, delta: Delta) -> None:
        self.version += 1
        if delta.cells is not None:
            self.confusion.add(delta.cells)
        for metric in delta.metrics:
            self.custom.apply(metric)
        for name, label, increment in delta.counters:
            self.counters[(name, label)] += increment
        for seconds, rows in delta.delays:
            self.label_delay.add(bucket_index(DELAY_BUCKETS, seconds), rows, seconds * rows)

    def count(self, name: str, label: str = "") -> int:
        return self.counters.get((name, label), 0)

    def labelled(self, name: str) -> dict[str, int]:
        """Values of a counter by label, e.g. rejections by reason."""
        return {label: value for (key, label), value in self.counters.items() if key == name}
