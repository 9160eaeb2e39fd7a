"""The server's in-memory view of everything counted: sufficient statistics only.

State changes only through :class:`Delta` objects, the unit a store makes durable and
deduplicates. A delta carries items for declared :class:`Statistic` tables (the built-in ones
below, and any a model declares); counts add, gauges keep the last value, timers are histogram
counts. Custom metrics travel as :class:`CustomMetric` until the store's catalog admits them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adserver.catalogue.families import PREDICTED_ROWS, ROWS_ACCEPTED
from adserver.errors import StartupError
from cm_models.confusion import Cells, ConfusionMatrix
from cm_models.custom_metrics import CustomMetric, MetricType, family_name
from cm_models.protocol import FeedbackModel
from cm_models.sections import Section
from cm_models.statistics import ALL_TIME, DEFAULT_SEGMENT, Merge, Row, StateKey, Statistic

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

# The built-in statistics' names (their tables' names too).
CELLS = "cells"
COUNTERS = "counters"
LABEL_DELAY = "label_delay"
CUSTOM: dict[MetricType, str] = {
    "COUNTER": "custom_counters",
    "GAUGE": "custom_gauges",
    "TIMER": "custom_timers",
}
#: Counters that count rows: they go with the rows' segment and prediction time (D2).
ROW_COUNTERS = frozenset((ROWS_ACCEPTED, PREDICTED_ROWS))
#: Statistics that belong to the event, never to its rows' segment or time.
EVENT_STATISTICS = frozenset(CUSTOM.values())
#: Segment names that no dimension value spells (:func:`segment_name`).
MISSING_SEGMENT = "__missing__"
OVERFLOW_SEGMENT = "__overflow__"
MAX_SEGMENT_VALUE = 64  # characters of one dimension value; longer ones are an overflow


class Delta:
    """What one event (or one rejection) adds: items per declared statistic, by name.

    ``counters`` are (name, label, increment); ``delays`` are (label delay in seconds, rows):
    the rows of one label share their prediction's time, so a batch is one pair, not a row each.
    ``updates`` holds the items of other statistics (a model's own). ``metrics`` wait for the
    store's catalog (:meth:`admitted`), which decides which become statistics.
    """

    __slots__ = ("metrics", "parts")

    parts: dict[str, tuple[Any, ...]]
    metrics: tuple[CustomMetric, ...]

    def __init__(
        self,
        cells: Cells | None = None,
        metrics: Sequence[CustomMetric] = (),
        counters: Sequence[tuple[str, str, int]] = (),
        delays: Sequence[tuple[float, int]] = (),
        updates: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        parts: dict[str, tuple[Any, ...]] = {}
        if cells is not None:
            parts[CELLS] = (cells,)
        if counters:
            parts[COUNTERS] = tuple(counters)
        if delays:
            parts[LABEL_DELAY] = tuple(delays)
        for name, items in (updates or {}).items():
            if items:
                parts[name] = tuple(items)
        self.parts = parts
        self.metrics = tuple(metrics)

    @classmethod
    def of(cls, parts: dict[str, tuple[Any, ...]], metrics: tuple[CustomMetric, ...]) -> Delta:
        delta = cls.__new__(cls)
        delta.parts, delta.metrics = parts, metrics
        return delta

    def __add__(self, other: Delta) -> Delta:
        if not (other.parts or other.metrics):
            return self
        if not (self.parts or self.metrics):
            return other
        parts = dict(self.parts)
        for name, items in other.parts.items():
            parts[name] = parts[name] + items if name in parts else items
        return Delta.of(parts, self.metrics + other.metrics)

    def __repr__(self) -> str:
        return f"Delta({self.parts!r}, metrics={self.metrics!r})"

    @property
    def cells(self) -> Iterable[Cells]:
        return self.parts.get(CELLS, ())

    def split(self) -> tuple[Delta, Delta]:
        """(rows, event): what counts under its rows' segment and prediction time (cells, label
        delay, a model's statistics, the row counters), and what counts under the model alone
        (every other counter, the custom metrics)."""
        rows: dict[str, tuple[Any, ...]] = {}
        event: dict[str, tuple[Any, ...]] = {}
        for name, items in self.parts.items():
            if name == COUNTERS:
                counted = tuple(c for c in items if c[0] in ROW_COUNTERS)
                if counted:
                    rows[COUNTERS] = counted
                if len(counted) < len(items):
                    event[COUNTERS] = tuple(c for c in items if c[0] not in ROW_COUNTERS)
            else:
                (event if name in EVENT_STATISTICS else rows)[name] = items
        return Delta.of(rows, ()), Delta.of(event, self.metrics)

    def only(self, names: frozenset[str]) -> Delta:
        """The delta's items of these statistics only."""
        return Delta.of({n: items for n, items in self.parts.items() if n in names}, ())

    @property
    def row_count(self) -> int:
        """Rows this delta counts (scored rows and logged prediction rows)."""
        return sum(n for name, _, n in self.parts.get(COUNTERS, ()) if name in ROW_COUNTERS)

    def admitted(self, kept: Sequence[CustomMetric], refused: int, counter: str) -> Delta:
        """The delta with its ``kept`` metrics as statistics, and ``refused`` counted."""
        parts = dict(self.parts)
        for metric in kept:
            name = CUSTOM[metric.type]
            parts[name] = (*parts.get(name, ()), metric)
        if refused:
            parts[COUNTERS] = (*parts.get(COUNTERS, ()), (counter, "", refused))
        return Delta.of(parts, ())


@dataclass(frozen=True)
class Placement:
    """Where an entry's rows count: the model's segment dimension values in declared order
    (None = not known from this event) and the prediction time (epoch s; None: all-time only)."""

    segment: tuple[str | None, ...] = ()
    time: float | None = None


def merge_segments(
    first: tuple[str | None, ...], second: tuple[str | None, ...]
) -> tuple[str | None, ...]:
    """Per position the first value known (``first``'s before ``second``'s)."""
    if not second:
        return first
    if not first:
        return second
    longer = max(len(first), len(second))
    padded = [(*v, *(None,) * (longer - len(v))) for v in (first, second)]
    return tuple(a if a is not None else b for a, b in zip(*padded))


def segment_name(values: Sequence[str | None]) -> str:
    """A segment's name: its values joined by "/"; "" for a model without dimensions. A value
    unknown or empty is ``__missing__``; one too long or with control characters (a label value
    no one wants, or an attack on the cardinality) makes the whole name ``__overflow__``."""
    names = []
    for value in values:
        if not value:
            names.append(MISSING_SEGMENT)
        elif len(value) > MAX_SEGMENT_VALUE or not value.isprintable():
            return OVERFLOW_SEGMENT
        else:
            names.append(value)
    return "/".join(names)


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


class CellsStatistic(Statistic[Cells, ConfusionMatrix]):
    """Confusion-matrix cells: (truth, prediction) -> rows."""

    def __init__(self) -> None:
        super().__init__(CELLS, [("truth", "int"), ("prediction", "int")], [("count", "int")])

    def empty(self) -> ConfusionMatrix:
        return ConfusionMatrix()

    def rows(self, items: Sequence[Cells]) -> Iterable[Row]:
        return [row for cells in items for row in cells.items()]

    def apply(self, acc: ConfusionMatrix, items: Sequence[Cells]) -> None:
        for cells in items:
            acc.add(cells)

    def load(self, acc: ConfusionMatrix, rows: Iterable[Row]) -> None:
        cells = np.array(list(rows), dtype=np.int64).reshape(-1, 3)
        if len(cells):
            acc.add(Cells(cells[:, 0], cells[:, 1], cells[:, 2]))


class CountersStatistic(Statistic[tuple[str, str, int], Counter[CounterKey]]):
    """The server's own counters: (name, label) -> value."""

    def __init__(self) -> None:
        super().__init__(COUNTERS, [("name", "text"), ("label", "text")], [("value", "int")])

    def empty(self) -> Counter[CounterKey]:
        return Counter()

    def rows(self, items: Sequence[tuple[str, str, int]]) -> Iterable[Row]:
        return items

    def apply(self, acc: Counter[CounterKey], items: Sequence[tuple[str, str, int]]) -> None:
        """Items are rows already: added at once (every event has some)."""
        self.load(acc, items)

    def load(self, acc: Counter[CounterKey], rows: Iterable[Row]) -> None:
        for name, label, value in rows:
            acc[(name, label)] += value


class DelayStatistic(Statistic[tuple[float, int], Histogram]):
    """The label-delay histogram: bucket -> (rows, their delays' sum)."""

    def __init__(self) -> None:
        super().__init__(LABEL_DELAY, [("bucket", "int")], [("count", "int"), ("total", "real")])

    def empty(self) -> Histogram:
        return Histogram(DELAY_BUCKETS)

    def rows(self, items: Sequence[tuple[float, int]]) -> Iterable[Row]:
        return [(bucket_index(DELAY_BUCKETS, s), rows, s * rows) for s, rows in items]

    def load(self, acc: Histogram, rows: Iterable[Row]) -> None:
        for bucket, count, total in rows:
            acc.add(bucket, count, total)


def series(family: str, tags: str) -> SeriesKey:
    return family, tuple(tuple(t) for t in json.loads(tags))


SERIES_KEYS: list[tuple[str, Any]] = [("family", "text"), ("tags", "text")]


class CustomValues(Statistic[CustomMetric, dict[SeriesKey, float]]):
    """Seldon's COUNTER (adds) or GAUGE (overwrites) series: (family, tags) -> value."""

    def __init__(self, kind: MetricType) -> None:
        merge: Merge = "sum" if kind == "COUNTER" else "last"
        super().__init__(CUSTOM[kind], SERIES_KEYS, [("value", "real")], merge)

    def empty(self) -> dict[SeriesKey, float]:
        return {}

    def rows(self, items: Sequence[CustomMetric]) -> Iterable[Row]:
        return [(family_name(m), json.dumps(m.tags), m.value) for m in items]

    def apply(self, acc: dict[SeriesKey, float], items: Sequence[CustomMetric]) -> None:
        add = self.merge == "sum"
        for metric in items:
            key = (family_name(metric), metric.tags)
            acc[key] = acc.get(key, 0.0) + metric.value if add else metric.value

    def load(self, acc: dict[SeriesKey, float], rows: Iterable[Row]) -> None:
        add = self.merge == "sum"
        for family, tags, value in rows:
            key = series(family, tags)
            acc[key] = acc.get(key, 0.0) + value if add else value


class CustomTimers(Statistic[CustomMetric, dict[SeriesKey, Histogram]]):
    """Seldon's TIMER series (milliseconds) as seconds histograms: (family, tags, bucket)."""

    def __init__(self) -> None:
        keys = [*SERIES_KEYS, ("bucket", "int")]
        super().__init__(CUSTOM["TIMER"], keys, [("count", "int"), ("total", "real")])

    def empty(self) -> dict[SeriesKey, Histogram]:
        return {}

    def rows(self, items: Sequence[CustomMetric]) -> Iterable[Row]:
        return [
            (
                family_name(m),
                json.dumps(m.tags),
                bucket_index(TIMER_BUCKETS, m.seconds),
                1,
                m.seconds,
            )
            for m in items
        ]

    def apply(self, acc: dict[SeriesKey, Histogram], items: Sequence[CustomMetric]) -> None:
        for metric in items:
            acc.setdefault((family_name(metric), metric.tags), Histogram()).observe(metric.seconds)

    def load(self, acc: dict[SeriesKey, Histogram], rows: Iterable[Row]) -> None:
        for family, tags, bucket, count, total in rows:
            histogram = acc.setdefault(series(family, tags), Histogram())
            histogram.add(bucket, count, total)


#: Kept for every model, whatever it declares.
BUILTIN_STATISTICS: tuple[Statistic[Any, Any], ...] = (
    CellsStatistic(),
    CountersStatistic(),
    DelayStatistic(),
    CustomValues("COUNTER"),
    CustomValues("GAUGE"),
    CustomTimers(),
)


class CustomMetricsState:
    """Seldon semantics: COUNTER adds, GAUGE overwrites, TIMER (ms) feeds a seconds histogram."""

    def __init__(
        self,
        counters: dict[SeriesKey, float],
        gauges: dict[SeriesKey, float],
        timers: dict[SeriesKey, Histogram],
    ) -> None:
        self.counters = counters
        self.gauges = gauges
        self.timers = timers

    @property
    def types(self) -> dict[str, MetricType]:
        """Each family's type (the store's catalog admits metrics so that types never clash)."""
        kinds: list[tuple[MetricType, Iterable[SeriesKey]]] = [
            ("COUNTER", self.counters),
            ("GAUGE", self.gauges),
            ("TIMER", self.timers),
        ]
        return {family: kind for kind, keys in kinds for family, _ in keys}


class MetricsState:
    """Everything ``/v1/metrics`` shows for one key, rebuilt from deltas after a restart.

    ``statistics`` are a model's own, kept beside the built-in ones (in :attr:`tables`);
    ``sections`` derive the model's own summary keys from them (:meth:`derived`);
    ``classifies`` is False for a model that has sections and no confusion matrix (a
    regressor): readers show it no classification metrics.
    """

    def __init__(
        self,
        classes: Iterable[int] = (),
        statistics: Sequence[Statistic[Any, Any]] = (),
        sections: Sequence[Section] = (),
        *,
        classifies: bool = True,
    ) -> None:
        self.classes = tuple(classes)  # known up front: every key's matrix starts with them
        self.declared = tuple(statistics)
        self.sections = tuple(sections)
        self.classifies = classifies
        every = (*BUILTIN_STATISTICS, *statistics)
        self.statistics = {s.name: s for s in every}
        if len(self.statistics) < len(every):  # their tables and deltas would mix
            names = Counter(s.name for s in every)
            clashes = [name for name, count in names.items() if count > 1]
            builtin = [s.name for s in BUILTIN_STATISTICS]
            raise StartupError(
                f"the model declares statistics named {clashes}, which the server keeps itself "
                f"({', '.join(builtin)}) or the model declares twice: rename them"
            )
        self.version = 0  # bumped on every change, so readers can cache what they derive
        self._empty_tables()

    def _empty_tables(self) -> None:
        self.tables: dict[str, Any] = {name: s.empty() for name, s in self.statistics.items()}
        self.confusion = self.tables[CELLS] = ConfusionMatrix(self.classes)
        self.counters: Counter[CounterKey] = self.tables[COUNTERS]
        self.label_delay: Histogram = self.tables[LABEL_DELAY]
        self.custom = CustomMetricsState(*(self.tables[CUSTOM[kind]] for kind in CUSTOM))

    def reset(self) -> None:
        """Empty again, in place (a reader may hold this state), before a full reload."""
        self.version += 1
        self._empty_tables()

    @classmethod
    def for_model(cls, model: FeedbackModel) -> MetricsState:
        """The empty state of a model: a regressor (sections, no matrix) does not classify."""
        return cls(
            tuple(model.classes),
            model.statistics,
            model.sections,
            classifies=model.has_confusion or not model.sections,
        )

    def like(self) -> MetricsState:
        """An empty state with the same classes and statistics (for another key)."""
        return MetricsState(self.classes, self.declared, self.sections, classifies=self.classifies)

    def apply(self, delta: Delta) -> None:
        self.version += 1
        if delta.metrics:  # not through a store's catalog (tests, tools): all of them count
            delta = delta.admitted(delta.metrics, 0, "")
        for name, items in delta.parts.items():
            self.statistics[name].apply(self.tables[name], items)

    def load(self, name: str, rows: Iterable[Row]) -> None:
        """Stored rows of one statistic, merged in (at start-up, or another replica's)."""
        self.version += 1
        self.statistics[name].load(self.tables[name], rows)

    def count(self, name: str, label: str = "") -> int:
        return self.counters.get((name, label), 0)

    def labelled(self, name: str) -> dict[str, int]:
        """Values of a counter by label, e.g. rejections by reason."""
        return {label: value for (key, label), value in self.counters.items() if key == name}

    def derived(self) -> dict[str, dict[str, Any]]:
        """The model's own summary keys, by section name, derived from this span's tables."""
        return {section.name: section.derive(self.tables) for section in self.sections}


class KeyedState:
    """The all-time views of every model and segment: ``(model, "")`` is a model's totals (the
    sum of its segments, plus what counts per event), ``(model, segment)`` one segment's."""

    def __init__(self, models: Mapping[str, MetricsState], server_model: str) -> None:
        self.prototypes = dict(models)
        self.server_model = server_model
        order = [m for m in models if m != server_model] + [server_model]
        self._models = order if server_model in models else order[:-1]
        # each model's prototype is its totals view (a reader may hold it, as store.state)
        self.views = {StateKey(m): state for m, state in models.items()}
        self._segments: dict[str, dict[str, MetricsState]] = {m: {} for m in models}

    def models(self) -> list[str]:
        """Configured models in configuration order, then the server's own if not one of them."""
        return list(self._models)

    def total(self, model: str) -> MetricsState:
        return self.views[StateKey(model)]

    def segments(self, model: str) -> dict[str, MetricsState]:
        """A model's segments by name (empty for a model without dimensions)."""
        return self._segments[model]

    def at(self, key: StateKey) -> MetricsState:
        view = self.views.get(key)
        if view is None:
            view = self.views[key] = self.prototypes[key.model].like()
            if key.segment != DEFAULT_SEGMENT and key.bucket == ALL_TIME:
                self._segments[key.model][key.segment] = view
        return view

    def reset(self) -> None:
        """Every model's totals emptied in place and its segments dropped: a shared store reloads
        the views whole when it can no longer tell which changes they hold."""
        for model, segments in self._segments.items():
            for segment in segments:
                del self.views[StateKey(model, segment)]
            segments.clear()
        for view in self.views.values():
            view.reset()

    def apply(self, key: StateKey, delta: Delta) -> None:
        """A delta of a segment counts in its model's totals too."""
        self.at(key).apply(delta)
        if key.segment != DEFAULT_SEGMENT:
            self.views[StateKey(key.model)].apply(delta)

    def load(self, key: StateKey, name: str, rows: list[Row]) -> None:
        """Stored rows of one key (a segment's count in its model's totals too)."""
        self.at(key).load(name, rows)
        if key.segment != DEFAULT_SEGMENT:
            self.views[StateKey(key.model)].load(name, rows)
