"""Metrics by prediction time: range documents and sliding-window gauges, read from buckets.

Both are sums of stored buckets (:mod:`adserver.state.reads`), derived by the same formulas as
the all-time summary. A range is asked for in steps, each tiled by the fewest kept buckets; a
window is the last ``--windows`` of prediction time, re-read at most every
``--window_refresh_seconds`` by the scrape that finds it stale (on the reader's thread when the
store is durable). The all-time counters stay cumulative: Prometheus cannot backdate a sample,
so a late label changes a window's gauges, never a counter's past.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import numpy as np
import orjson
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from adserver.catalogue import families, reasons
from adserver.catalogue.families import (
    CLASS,
    MACRO,
    MODEL,
    PREDICTED_ROWS,
    REGRESSION_SECTION,
    ROWS_ACCEPTED,
    SCORES_SECTION,
    SEGMENT,
    WINDOW,
)
from adserver.catalogue.wire import QUERY_FROM, QUERY_SEGMENT, QUERY_STEP, QUERY_TO
from adserver.errors import BadRequest, NotFound
from adserver.exposition.collector import LazySamples, new, set_samples
from adserver.exposition.summary import derived_summary, label_coverage, with_confusion_matrix
from adserver.state.buckets import NotKept, TimeBuckets, format_duration, parse_duration
from adserver.state.reads import BucketReader, WindowKey
from adserver.state.view import MetricsState
from cm_models.formulas import classification_report
from cm_models.statistics import DEFAULT_SEGMENT

log = logging.getLogger(__name__)

#: Most steps in one range document (a day of minutes).
MAX_STEPS = 1440
#: Most confusion cells in one range document (steps x classes squared): every step has its
#: model's dense matrix, so 1,000 classes allow 2 steps, 100 classes 200 (about 16 MB of
#: matrices and 10 MB of JSON at most).
MAX_RANGE_CELLS = 2_000_000
#: How long the first scrape waits for the first read of the windows (a read of a big state
#: takes seconds: it goes on in the background).
REFRESH_WAIT_SECONDS = 0.5
#: What a range summary keeps of the all-time one (events and micro averages are not per row).
RANGE_KEYS = (
    "classes",
    "accuracy",
    "per_class",
    "macro",
    "weighted",
    "rows",
    "predictions",
    "label_coverage",
)

#: Where each section window gauge (families.WINDOW_SECTIONS) reads its value in the derived
#: sections: the section, then the keys down to the value.
WINDOW_SECTION_VALUES: dict[str, tuple[str, ...]] = {
    "mae": (REGRESSION_SECTION, "mae"),
    "rmse": (REGRESSION_SECTION, "rmse"),
    "r2": (REGRESSION_SECTION, "r2"),
    "log_loss": (SCORES_SECTION, "log_loss"),
    "brier_score": (SCORES_SECTION, "brier_score"),
    "roc_auc": (SCORES_SECTION, "roc_auc", MACRO, "auc"),
    "expected_calibration_error": (SCORES_SECTION, "calibration", "ece"),
}


def section_values(derived: Mapping[str, Any]) -> dict[str, float | None]:
    """The section window gauges of one span, for the sections it has (None: undefined)."""
    values: dict[str, float | None] = {}
    for name, (section, *path) in WINDOW_SECTION_VALUES.items():
        if section not in derived:
            continue
        value = derived[section]
        for key in path:
            value = value[key] if value is not None else None
        values[name] = value
    return values


class ModelViews(Protocol):
    """The all-time views a range is checked against: the models and their segments."""

    def models(self) -> list[str]: ...

    def total(self, model: str) -> MetricsState: ...

    def segments(self, model: str) -> Mapping[str, MetricsState]: ...


def range_summary(state: MetricsState) -> dict[str, Any]:
    """One span's metrics: the all-time summary's per-row keys, predictions, label coverage, the
    model's sections and the label-delay histogram (cumulative counts by upper bound, as
    Prometheus has them)."""
    derived = derived_summary(state)
    kept = (*RANGE_KEYS, *(section.name for section in state.sections))
    summary = {key: derived[key] for key in kept if key in derived}
    delay = state.label_delay
    bounds = [*(repr(b) for b in delay.bounds), "+Inf"]
    summary["label_delay"] = {
        "count": delay.count,
        "sum": delay.total,
        "buckets": dict(zip(bounds, [*delay.buckets.tolist(), delay.count])),
    }
    return with_confusion_matrix(summary, state.confusion.matrix())


def parse_time(name: str, text: str) -> float:
    """RFC 3339 (with its offset) or epoch seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    moment = None
    for spelling in (text, text.replace(" ", "+")):  # a "+" unescaped in a URL arrives as " "
        try:
            moment = datetime.fromisoformat(spelling)
            break
        except ValueError:
            continue
    if moment is None or moment.tzinfo is None:
        raise BadRequest(
            f"{name}={text!r} is neither epoch seconds nor an RFC 3339 time with an offset "
            "(e.g. 2024-05-01T00:00:00Z)",
            reasons.INVALID_RANGE,
        )
    return moment.timestamp()


def parse_step(text: str) -> int:
    """Seconds, or a duration like ``5m`` or ``1h``."""
    try:
        return int(text) if text.strip().isdigit() else parse_duration(text)
    except ValueError:
        raise BadRequest(
            f"step={text!r} is neither whole seconds nor a duration like 5m, 1h or 1d",
            reasons.INVALID_STEP,
        ) from None


@dataclass(frozen=True)
class RangeQuery:
    """A validated range: [start, end) in steps of ``step`` seconds (the last may be shorter)."""

    start: int
    end: int
    step: int
    segment: str | None  # None: the model's totals

    @classmethod
    def parse(
        cls,
        arguments: Mapping[str, str],
        buckets: TimeBuckets,
        segments: Mapping[str, Any],
        now: float,
    ) -> RangeQuery:
        if QUERY_FROM not in arguments or QUERY_TO not in arguments:
            raise BadRequest("a range needs both from and to", reasons.INVALID_RANGE)
        start, end = (parse_time(n, arguments[n]) for n in (QUERY_FROM, QUERY_TO))
        finest = buckets.finest
        if not (0 <= start < end):
            raise BadRequest(
                f"from ({start}) must be before to ({end}), both at or after 1970",
                reasons.INVALID_RANGE,
            )
        latest = now + buckets.levels[-1].seconds
        if end > latest:  # no prediction is made there; and it bounds the buckets of a range
            raise BadRequest(
                f"to ({end}) is more than {format_duration(buckets.levels[-1].seconds)} after "
                f"now ({int(now)})",
                reasons.INVALID_RANGE,
            )
        if start % finest or end % finest:
            raise BadRequest(
                f"from and to must fall on a bucket boundary: multiples of "
                f"{format_duration(finest)} ({finest} epoch seconds)",
                reasons.INVALID_RANGE,
            )
        text = arguments.get(QUERY_STEP, "")
        step = parse_step(text) if text else int(end - start)
        if not buckets.step_granularity(step):
            raise BadRequest(
                f"step {step} s is not a multiple of a granularity "
                f"({', '.join(format_duration(g.seconds) for g in buckets.levels)})",
                reasons.INVALID_STEP,
            )
        steps = -(-int(end - start) // step)
        if steps > MAX_STEPS:
            raise BadRequest(
                f"the range is {steps} steps of {format_duration(step)}, more than {MAX_STEPS}: "
                "ask for a longer step or a shorter range",
                reasons.TOO_MANY_STEPS,
            )
        segment = arguments.get(QUERY_SEGMENT) or None
        if segment is not None and segment not in segments:
            raise BadRequest(
                f"the model has no segment {segment!r}"
                + (f" (it has {', '.join(sorted(segments))})" if segments else ""),
                reasons.UNKNOWN_SEGMENT,
            )
        return cls(int(start), int(end), step, segment)

    def steps(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.step, self.end)) for s in range(self.start, self.end, self.step)]

    def spans(self, buckets: TimeBuckets, now: float) -> list[list[int]]:
        """Each step's buckets, then the whole range's (its own, fewer, buckets)."""
        try:
            return [buckets.cover(s, e, now) for s, e in [*self.steps(), (self.start, self.end)]]
        except NotKept as exc:
            raise BadRequest(f"the range is not kept: {exc}", reasons.RANGE_NOT_KEPT) from None


class RangeDocuments:
    """``GET /v1/models/<name>/metrics?from=&to=[&step=][&segment=]``."""

    def __init__(
        self,
        reader: BucketReader,
        buckets: TimeBuckets,
        views: ModelViews,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.reader = reader
        self.buckets = buckets
        self.views = views
        self.clock = clock

    async def document(self, model: str, arguments: Mapping[str, str]) -> bytes:
        if model not in self.views.models():
            raise NotFound(f"no model named {model!r}", reasons.UNKNOWN_MODEL)
        now = self.clock()
        query = RangeQuery.parse(arguments, self.buckets, self.views.segments(model), now)
        classes = len(self.views.total(model).confusion.classes)
        steps = len(query.steps())
        if steps * classes**2 > MAX_RANGE_CELLS:
            raise BadRequest(
                f"{steps} steps of a matrix of {classes} classes are {steps * classes**2} cells, "
                f"more than {MAX_RANGE_CELLS}: ask for a longer step or a shorter range",
                reasons.TOO_MANY_STEPS,
            )
        states = await self.reader.read_range(model, query.segment, query.spans(self.buckets, now))
        # derived and encoded off the IOLoop: a document may be megabytes
        return await asyncio.to_thread(self.encode, model, query, states)

    @staticmethod
    def encode(model: str, query: RangeQuery, states: list[MetricsState]) -> bytes:
        steps = [
            {QUERY_FROM: s, QUERY_TO: e, **range_summary(state)}
            for (s, e), state in zip(query.steps(), states)
        ]
        document = {
            "model": model,
            QUERY_SEGMENT: query.segment or DEFAULT_SEGMENT,
            QUERY_FROM: query.start,
            QUERY_TO: query.end,
            QUERY_STEP: query.step,
            "steps": steps,
            "total": range_summary(states[-1]),
        }
        return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


def parse_windows(text: str, buckets: TimeBuckets) -> dict[str, int]:
    """``1h,24h,7d``: each window's label (as spelled) and seconds, whole finest buckets."""
    windows: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        seconds = parse_duration(part)
        if seconds % buckets.finest:
            raise ValueError(
                f"window {part} is not a whole number of {format_duration(buckets.finest)} buckets"
            )
        windows[part] = seconds
    return windows


@dataclass(frozen=True)
class WindowSeries:
    """One (model, segment, window)'s derived values; per-class ones only with labelled rows."""

    model: str
    segment: str
    window: str
    rows: int
    predictions: int
    coverage: float | None
    accuracy: float | None
    classes: list[str]
    per_class: dict[str, list[float]]  # by report field: a value per class
    sections: dict[str, float | None]  # by families.WINDOW_SECTIONS name, of its sections


def derive(
    found: Sequence[dict[WindowKey, MetricsState]], windows: Sequence[str], order: Sequence[str]
) -> list[WindowSeries]:
    """Every series, by model (in ``order``), segment (totals first) and window."""
    rank = {model: i for i, model in enumerate(order)}
    keyed = [
        (key, window, state)
        for window, states in zip(windows, found)
        for key, state in states.items()
    ]
    keyed.sort(key=lambda item: (rank.get(item[0][0], len(rank)), item[0], windows.index(item[1])))
    series = []
    for (model, segment), window, state in keyed:
        rows, predictions = state.count(ROWS_ACCEPTED), state.count(PREDICTED_ROWS)
        matrix = state.confusion.matrix()
        labelled = rows > 0 and int(matrix.sum()) > 0
        report = classification_report(matrix) if labelled else None
        series.append(
            WindowSeries(
                model,
                segment,
                window,
                rows,
                predictions,
                label_coverage(rows, predictions),
                report.accuracy if report is not None else None,
                [str(c) for c in state.confusion.classes] if report is not None else [],
                {
                    name: np.asarray(getattr(report, name)).tolist()
                    for name in families.WINDOW_PER_CLASS
                }
                if report is not None
                else {},
                section_values(state.derived()),
            )
        )
    return series


class WindowGauges:
    """A Collector of ``feedback_window_*``: the last read of every window, re-read when a
    scrape finds it older than ``refresh_seconds`` (that scrape waits; concurrent ones share
    the read; the read and the derived metrics never hold the IOLoop). A failed read keeps the
    previous values and is retried by the next scrape."""

    def __init__(
        self,
        reader: BucketReader,
        buckets: TimeBuckets,
        windows: Mapping[str, int],
        order: Callable[[], Sequence[str]],
        refresh_seconds: float,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reader = reader
        self.buckets = buckets
        self.windows = dict(windows)
        self.order = order
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self.monotonic = monotonic
        self.series: list[WindowSeries] = []
        self._read_at = -math.inf
        self._reading: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Re-read the windows if the last read is older than ``refresh_seconds``. Only a scrape
        with no values yet waits for it, and at most :data:`REFRESH_WAIT_SECONDS`; the others
        serve the previous values while it runs (a big state's read takes seconds)."""
        if not self.windows or self.monotonic() - self._read_at < self.refresh_seconds:
            return
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(self._read_done)
        if self._read_at == -math.inf:
            with contextlib.suppress(TimeoutError):  # shielded: a scrape never cancels a read
                await asyncio.wait_for(asyncio.shield(self._reading), REFRESH_WAIT_SECONDS)

    def _read_done(self, _: asyncio.Task[None]) -> None:
        self._reading = None

    async def _read(self) -> None:
        now, started = self.clock(), self.monotonic()
        spans = [self.buckets.window(seconds, now)[1] for seconds in self.windows.values()]
        try:
            found = await self.reader.read_windows(spans)
            names, order = list(self.windows), list(self.order())
            self.series = await asyncio.to_thread(derive, found, names, order)
        except Exception:  # the rest of the scrape still serves; the next one retries
            log.exception("window gauges: reading the buckets failed")
            return
        self._read_at = started

    def collect(self) -> Iterator[Metric]:
        """Families with samples only: no window holds rows, no family (and none at all where
        windows are off)."""
        series = self.series
        if not series:
            return
        for name, declared in families.WINDOW_TOTALS.items():
            family = new(declared)
            set_samples(family, LazySamples(series, self._total_sample(name, declared.sample)))
            yield family
        for name, declared in families.WINDOW_PER_CLASS.items():
            family = new(declared)
            set_samples(family, LazySamples(series, self._class_samples(name, declared.sample)))
            yield family
        for name, declared in families.WINDOW_SECTIONS.items():
            if any(name in item.sections for item in series):
                family = new(declared)
                set_samples(
                    family, LazySamples(series, self._section_sample(name, declared.sample))
                )
                yield family

    @staticmethod
    def _total_sample(name: str, sample: str) -> Callable[[WindowSeries], list[Sample]]:
        def expand(item: WindowSeries) -> list[Sample]:
            value = {
                "accuracy": item.accuracy,
                "rows": item.rows,
                "predictions": item.predictions,
                "label_coverage": item.coverage,
            }[name]
            if value is None:
                return []
            labels = {MODEL: item.model, SEGMENT: item.segment, WINDOW: item.window}
            return [Sample(sample, labels, value)]

        return expand

    @staticmethod
    def _section_sample(name: str, sample: str) -> Callable[[WindowSeries], list[Sample]]:
        def expand(item: WindowSeries) -> list[Sample]:
            value = item.sections.get(name)
            if value is None:
                return []
            return [
                Sample(
                    sample, {MODEL: item.model, SEGMENT: item.segment, WINDOW: item.window}, value
                )
            ]

        return expand

    @staticmethod
    def _class_samples(name: str, sample: str) -> Callable[[WindowSeries], list[Sample]]:
        def expand(item: WindowSeries) -> list[Sample]:
            labels = {MODEL: item.model, SEGMENT: item.segment, WINDOW: item.window}
            values = item.per_class.get(name, [])
            return [
                Sample(sample, {**labels, CLASS: label}, value)
                for label, value in zip(item.classes, values)
            ]

        return expand
