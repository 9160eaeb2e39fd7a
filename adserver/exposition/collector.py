"""Prometheus exposition: a Collector that derives every family from state at scrape time.

Raw counts (confusion cells, one-vs-rest counters) are exported as counters, so ``sum by``
across replicas is exact; derived ratios are gauges for one replica's convenience.

A scrape is rendered in slices between events (:mod:`adserver.exposition.encoder`), so the collector
first takes a :class:`StateView` of each model: copies of what events change, cheap and bounded
by the caps (the dense matrix is one array copy, small beside a scrape). Every family is derived
from those views, and families with many samples produce them lazily, a series at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar, cast

import numpy as np
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from adserver.catalogue import families
from adserver.catalogue.families import (
    BUCKET,
    CALIBRATION_STATISTIC,
    CLASS,
    COUNT,
    LE,
    MACRO,
    MODEL,
    POSITIVE_CLASS,
    PREDICTED_ROWS,
    PREDICTION,
    REGRESSION_SECTION,
    ROWS_ACCEPTED,
    SCORES_SECTION,
    SUM,
    TRUTH,
    WEIGHTED,
    Family,
    Kind,
    MetricType,
    seldon_class,
)
from adserver.exposition.encoder import Grid, Grids
from adserver.exposition.summary import label_coverage
from adserver.state.view import CounterKey, Histogram, MetricsState, SeriesKey
from cm_models.formulas import ClassCounts, classification_report
from cm_models.scores import calibration_parts
from cm_models.statistics import Statistic

Item = TypeVar("Item")
Tags = tuple[tuple[str, str], ...]
Series = tuple[Tags, Any]  # a custom series' tags and its value (or histogram)

ValueFamily = CounterMetricFamily | GaugeMetricFamily
VALUE_FAMILIES: dict[Kind, type[ValueFamily]] = {
    "counter": CounterMetricFamily,
    "gauge": GaugeMetricFamily,
}


def new(family: Family) -> ValueFamily:
    """An empty counter or gauge as declared in :mod:`adserver.catalogue.families` (histograms:
    :func:`histogram_family`)."""
    return VALUE_FAMILIES[family.kind](family.name, family.help, labels=family.labels)


@dataclass(frozen=True)
class StateView:
    """What one scrape reads, taken at once: families agree, and later events cannot change it.

    Custom timers are shared, not copied: a series' samples are read together, so each one is
    self-consistent, and it may already include events that came after the view was taken.
    """

    counters: dict[CounterKey, int]
    label_delay: Histogram
    classes: list[str]
    matrix: np.ndarray
    custom_types: dict[str, MetricType]
    custom_values: tuple[dict[SeriesKey, float], dict[SeriesKey, float]]
    custom_timers: dict[SeriesKey, Histogram]
    derived: dict[str, dict[str, Any]]  # the model's sections
    totals: dict[str, dict[str, Any]]  # the section statistics' values, by column

    @classmethod
    def of(cls, state: MetricsState) -> StateView:
        custom = state.custom
        return cls(
            derived=state.derived(),
            totals={
                name: statistic_totals(state.statistics[name], state.tables[name])
                for name in SECTION_STATISTICS
                if name in state.statistics
            },
            counters=dict(state.counters),
            label_delay=histogram_copy(state.label_delay),
            classes=[str(c) for c in state.confusion.classes],
            matrix=state.confusion.matrix().copy(),
            custom_types=dict(custom.types),
            custom_values=(dict(custom.counters), dict(custom.gauges)),
            custom_timers=dict(custom.timers),
        )

    def count(self, name: str, label: str = "") -> int:
        return self.counters.get((name, label), 0)

    def labelled(self, name: str) -> dict[str, int]:
        """Values of a counter by label, e.g. rejections by reason."""
        return {label: value for (key, label), value in self.counters.items() if key == name}

    def custom_series(self) -> dict[str, list[Series]]:
        """Each custom family's (tags, value or histogram), grouped in one pass over all series."""
        grouped: dict[str, list[Series]] = {}
        for series in (*self.custom_values, self.custom_timers):
            for (family, tags), value in series.items():
                grouped.setdefault(family, []).append((tags, value))
        return grouped


#: The keyless statistics of the server's sections whose values are exported as counters.
SECTION_STATISTICS = (REGRESSION_SECTION, SCORES_SECTION, CALIBRATION_STATISTIC)


def statistic_totals(statistic: Statistic[Any, Any], table: Mapping[Any, Any]) -> dict[str, Any]:
    """A keyless statistic's values by column (zeros before its first row); vectors copied."""
    values = table.get(())
    if values is None:
        values = [
            np.zeros(statistic.width) if kind == "vector" else 0 for _, kind in statistic.values
        ]
    return {
        column: np.array(value) if isinstance(value, np.ndarray) else value
        for (column, _), value in zip(statistic.values, values)
    }


def histogram_copy(histogram: Histogram) -> Histogram:
    copied = Histogram(histogram.bounds, total=histogram.total, count=histogram.count)
    copied.buckets = histogram.buckets.copy()
    return copied


class LazySamples(Generic[Item]):
    """A family's samples, made when the encoder reaches them, one series at a time.

    prometheus_client's encoders only iterate ``samples``; building 10,000 series up front would
    be one long step the IOLoop could not interleave events with.
    """

    def __init__(self, series: Iterable[Item], expand: Callable[[Item], Iterable[Sample]]) -> None:
        self.series = series
        self.expand = expand

    def __iter__(self) -> Iterator[Sample]:
        for item in self.series:
            yield from self.expand(item)


@dataclass(frozen=True)
class ModelSource:
    """One model's part of a scrape: its totals view, and how its families are labelled."""

    name: str  # the ``model`` label
    state: MetricsState
    has_confusion: bool
    seldon_class_label: bool
    seldon_labels: Mapping[str, str]  # the Seldon-compatible and custom families' labels

    def custom_labels(self, tags: Tags) -> dict[str, str]:
        """Seldon's merge order: user tags, then ``method`` and default labels override them.

        ``seldon_labels`` already holds ``method`` (the configured event type).
        """
        return {**dict(tags), **self.seldon_labels}


#: A model and the view of it this scrape reads.
Scraped = tuple[ModelSource, StateView]


class FeedbackCollector:
    """Reads every model's :class:`MetricsState` (and reply statistics) once per scrape.

    Each family is yielded once (OpenMetrics forbids repeating its metadata), holding the
    samples of every model in ``sources`` order.
    """

    def __init__(
        self,
        model_name: str,
        sources: Sequence[ModelSource],
        *,
        reply_stats: Callable[[], Mapping[str, int]] | None = None,
        connection_stats: Callable[[], Mapping[str, int]] | None = None,
        auth_stats: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        """``model_name`` labels the server's own families (replies, connections, auth)."""
        self.model_name = model_name
        self.sources = tuple(sources)
        self.reply_stats = reply_stats
        self.connection_stats = connection_stats
        self.auth_stats = auth_stats

    def collect(self) -> Iterator[Metric]:
        scraped = [(source, StateView.of(source.state)) for source in self.sources]
        replies = self.reply_stats() if self.reply_stats is not None else None
        yield from self.server_counters(scraped)
        yield from self.join_families(scraped)
        confused = [(source, view) for source, view in scraped if source.has_confusion]
        if confused:
            yield from self.confusion_families(confused)
        yield from section_families(scraped)
        yield from self.custom_families(scraped)
        if replies is not None:
            yield from self.reply_families(replies)
        if self.connection_stats is not None:
            yield from connection_families(self.model_name, self.connection_stats())
        if self.auth_stats is not None:
            yield auth_family(self.model_name, self.auth_stats())

    def server_counters(self, scraped: list[Scraped]) -> Iterator[Metric]:
        for name, declared in families.COUNTED.items():
            family = new(declared)
            for source, view in scraped:
                if len(declared.labels) > 1:  # the model's, and the state's label
                    for label, value in sorted(view.labelled(name).items()):
                        family.add_metric((source.name, label), value)
                else:
                    family.add_metric((source.name,), view.count(name))
            yield family

    def join_families(self, scraped: list[Scraped]) -> Iterator[Metric]:
        """Trust signals of the late-label join: how much is labelled, and how late."""
        coverage = new(families.LABEL_COVERAGE)
        for source, view in scraped:
            # A scored row is a labelled prediction, however it came: with its response
            # (Seldon's classic flow, where no logger reports predictions) or joined to a
            # logged one.
            share = label_coverage(view.count(ROWS_ACCEPTED), view.count(PREDICTED_ROWS))
            coverage.add_metric((source.name,), share or 0.0)  # a gauge has no null
        yield coverage
        delays = [(source.name, view.label_delay) for source, view in scraped]
        yield histogram_family(families.LABEL_DELAY, delays, lambda name: {MODEL: name})

    def confusion_families(self, confused: list[Scraped]) -> Iterator[Metric]:
        declared = families.CONFUSION_MATRIX
        cells = new(declared)
        grids = [  # the encoder renders each in bulk
            Grid(
                declared.sample,
                {MODEL: source.name},
                TRUTH,
                view.classes,
                PREDICTION,
                view.classes,
                view.matrix,
            )
            for source, view in confused
        ]
        set_samples(cells, Grids(grids))
        yield cells
        yield from self.seldon_families(
            [
                (source, view.classes, ClassCounts.from_matrix(view.matrix))
                for source, view in confused
            ]
        )
        reports = [
            (source.name, view.classes, classification_report(view.matrix))
            for source, view in confused
        ]
        accuracy = new(families.ACCURACY)
        for model, _, report in reports:
            accuracy.add_metric((model,), report.accuracy)
        yield accuracy
        for name, declared in families.PER_CLASS.items():
            family = new(declared)
            per_class = [
                ((model, label), value)
                for model, classes, report in reports
                for label, value in zip(classes, getattr(report, name).tolist())
            ]
            samples = value_samples(
                declared.sample, lambda key: {MODEL: key[0], CLASS: key[1]}, per_class
            )
            set_samples(family, samples)
            yield family
        for name, declared in families.AVERAGES.items():
            family = new(declared)
            for model, _, report in reports:
                for kind, values in report.averages.items():
                    family.add_metric((model, kind), values[name])
            yield family

    def seldon_families(
        self, counts: list[tuple[ModelSource, list[str], ClassCounts]]
    ) -> Iterator[Metric]:
        """Seldon's counter names and labels, with real one-vs-rest true negatives.

        Each model's samples carry its Seldon labels; a binary model's (Seldon's
        ``BinaryMetrics``) only its positive class, without the ``class`` label. The family
        is declared with ``class`` unless every model is binary.
        """
        class_labelled = any(source.seldon_class_label for source, _, _ in counts)
        for attribute, declared in families.SELDON_COUNTS.items():
            if not class_labelled:
                declared = families.positive_class(declared)
            family = new(declared)
            set_samples(
                family,
                LazySamples(counts, partial(seldon_samples, declared.sample, attribute)),
            )
            yield family

    def custom_families(self, scraped: list[Scraped]) -> Iterator[Metric]:
        """One family per key, its series found by one grouping pass (linear in series).

        The custom-metric catalog is the store's, shared by every model, so a key has one
        type whichever models use it.
        """
        grouped = [(source, view.custom_series()) for source, view in scraped]
        types: dict[str, MetricType] = {}
        for _, view in scraped:
            for key, kind in view.custom_types.items():
                types.setdefault(key, kind)
        for key, kind in sorted(types.items()):
            declared = families.custom(key, kind)
            series = [
                ((source, tags), value)
                for source, by_key in grouped
                for tags, value in by_key.get(key, [])
            ]
            if declared.kind == "histogram":
                yield histogram_family(declared, series, custom_labels)
                continue
            family = new(declared)
            set_samples(family, value_samples(declared.sample, custom_labels, series))
            yield family

    def reply_families(self, stats: Mapping[str, int]) -> Iterator[Metric]:
        return model_families(self.model_name, stats, families.REPLIES)


def seldon_samples(
    name: str, attribute: str, item: tuple[ModelSource, list[str], ClassCounts]
) -> Iterator[Sample]:
    """One model's samples of a Seldon counter (``attribute`` of its one-vs-rest counts)."""
    source, classes, counts = item
    values = getattr(counts, attribute).tolist()
    if not source.seldon_class_label:
        positive = dict(zip(classes, values)).get(POSITIVE_CLASS, 0)
        yield Sample(name, dict(source.seldon_labels), positive)
        return
    for label, value in zip(classes, values):
        yield Sample(name, {CLASS: seldon_class(label), **source.seldon_labels}, value)


def custom_labels(key: tuple[ModelSource, Tags]) -> dict[str, str]:
    source, tags = key
    return source.custom_labels(tags)


def set_samples(family: Metric, samples: Iterable[Sample]) -> None:
    """prometheus_client's encoders (and ours) only iterate a family's samples, so a lazy or bulk
    sequence may stand for its list."""
    family.samples = cast(list[Sample], samples)


def value_samples(
    name: str, labels_of: Callable[[Item], dict[str, str]], series: list[tuple[Item, Any]]
) -> LazySamples[tuple[Item, Any]]:
    """One sample per (key, value), its labels made from the key when the encoder reaches it."""

    def expand(item: tuple[Item, Any]) -> tuple[Sample]:
        return (Sample(name, labels_of(item[0]), item[1]),)

    return LazySamples(series, expand)


def histogram_family(
    declared: Family,
    series: list[tuple[Item, Histogram]],
    labels_of: Callable[[Item], dict[str, str]],
) -> Metric:
    """A histogram family whose series (labels from ``labels_of``) are expanded lazily."""
    name = declared.name

    def expand(item: tuple[Item, Histogram]) -> list[Sample]:
        key, histogram = item
        bounds = [repr(b) for b in histogram.bounds] + ["+Inf"]
        counts = [*histogram.buckets.tolist(), histogram.count]
        buckets = dict(zip(bounds, counts))
        return bucket_samples(name, labels_of(key), buckets, histogram.count, histogram.total)

    family = HistogramMetricFamily(declared.name, declared.help, labels=declared.labels)
    set_samples(family, LazySamples(series, expand))
    return family


def bucket_samples(
    name: str, labels: dict[str, str], buckets: Mapping[str, float], count: int, total: float
) -> list[Sample]:
    """One histogram series: cumulative ``buckets`` by ``le`` (``+Inf`` last), count and sum."""
    samples = [Sample(name + BUCKET, {**labels, LE: le}, value) for le, value in buckets.items()]
    samples.append(Sample(name + COUNT, labels, count))
    samples.append(Sample(name + SUM, labels, total))
    return samples


#: A model's name and the view of it this scrape reads.
Named = tuple[str, StateView]
#: A series' labels after ``model``, and its value (None: no sample).
Values = Iterable[tuple[tuple[str, ...], Any]]


def section_families(scraped: list[Scraped]) -> Iterator[Metric]:
    """The families of the server's sections, each only if some model has the section."""
    for section, derive in (
        (REGRESSION_SECTION, regression_families),
        (SCORES_SECTION, score_families),
    ):
        having = [(source.name, view) for source, view in scraped if section in view.derived]
        if having:
            yield from derive(having)


def model_values(
    declared: Family, models: list[Named], values: Callable[[StateView], Values]
) -> Metric:
    """A counter or gauge with each model's ``values`` (a value of None has no sample)."""
    family = new(declared)
    for model, view in models:
        for labels, value in values(view):
            if value is not None:
                family.add_metric((model, *labels), value)
    return family


def single(value: Any) -> Values:
    return (((), value),)


def regression_families(models: list[Named]) -> Iterator[Metric]:
    """Gauges of the ``regression`` section; counters and the signed error sum of its
    statistic; the histogram of |error| (the section's cumulative buckets)."""
    for key, declared in families.REGRESSION_GAUGES.items():
        yield model_values(declared, models, partial(section_value, REGRESSION_SECTION, (key,)))
    for column, declared in families.REGRESSION_COUNTERS.items():
        yield model_values(declared, models, partial(total_value, REGRESSION_SECTION, column))
    yield model_values(
        families.REGRESSION_ERROR_SUM,
        models,
        partial(total_value, REGRESSION_SECTION, "error_sum"),
    )
    declared = families.REGRESSION_ABS_ERROR
    family = HistogramMetricFamily(declared.name, declared.help, labels=declared.labels)
    samples = []
    for model, view in models:
        errors = view.derived[REGRESSION_SECTION]["abs_error"]
        samples += bucket_samples(
            declared.name, {MODEL: model}, errors["buckets"], errors["count"], errors["sum"]
        )
    set_samples(family, samples)
    yield family


def score_families(models: list[Named]) -> Iterator[Metric]:
    """Gauges of the ``scores`` section (log loss, Brier, ROC AUC with its bound, calibration)
    and counters of the ``scores`` and ``calibration`` statistics."""
    for key, declared in families.SCORE_GAUGES.items():
        yield model_values(declared, models, partial(section_value, SCORES_SECTION, (key,)))
    yield model_values(
        families.EXPECTED_CALIBRATION_ERROR,
        models,
        partial(section_value, SCORES_SECTION, ("calibration", "ece")),
    )
    for key, declared in (("auc", families.ROC_AUC), ("error_bound", families.ROC_AUC_ERROR_BOUND)):
        yield model_values(declared, models, partial(class_aucs, key))
    for key, declared in (
        ("auc", families.ROC_AUC_AVERAGE),
        ("error_bound", families.ROC_AUC_AVERAGE_ERROR_BOUND),
    ):
        yield model_values(declared, models, partial(average_aucs, key))
    for key, declared in families.CALIBRATION_GAUGES.items():
        yield model_values(declared, models, partial(calibration_bins, key))
    for column, declared in families.SCORE_COUNTERS.items():
        yield model_values(declared, models, partial(total_value, SCORES_SECTION, column))
    for column, declared in families.CALIBRATION_COUNTERS.items():
        yield model_values(declared, models, partial(calibration_counts, column))


def section_value(section: str, path: tuple[str, ...], view: StateView) -> Values:
    """The value at ``path`` in a derived section (None where an enclosing dict is None)."""
    value: Any = view.derived[section]
    for key in path:
        value = value[key] if value is not None else None
    return single(value)


def total_value(statistic: str, column: str, view: StateView) -> Values:
    """A column of a section statistic (no sample where the model does not declare it)."""
    return single(view.totals.get(statistic, {}).get(column))


def class_aucs(key: str, view: StateView) -> Values:
    """Each class's ROC AUC (or its error bound), labelled by the class."""
    per_class = view.derived[SCORES_SECTION]["roc_auc"]["per_class"]
    return (((label,), auc[key]) for label, auc in per_class.items())


def average_aucs(key: str, view: StateView) -> Values:
    """The macro and weighted averages of the ROC AUC (or its error bound)."""
    roc_auc = view.derived[SCORES_SECTION]["roc_auc"]
    return (((average,), roc_auc[average][key]) for average in (MACRO, WEIGHTED))


def calibration_bins(key: str, view: StateView) -> Values:
    """A value of each calibration bin, labelled by its upper edge."""
    calibration = view.derived[SCORES_SECTION]["calibration"]
    bins = calibration["bins"] if calibration is not None else []
    return (((bin_label(b["upper"]),), b[key]) for b in bins)


def calibration_counts(part: str, view: StateView) -> Values:
    """A part of the ``calibration`` statistic's vector by bin: uniform bins of [0, 1]."""
    totals = view.totals.get(CALIBRATION_STATISTIC)
    if totals is None:
        return ()
    (vector,) = totals.values()
    values = calibration_parts(vector)[part]
    uppers = np.linspace(0.0, 1.0, len(values) + 1)[1:]
    return (((bin_label(u),), v) for u, v in zip(uppers.tolist(), values.tolist()))


def bin_label(upper: float) -> str:
    """A calibration bin's ``bin`` label: its upper edge."""
    return f"{upper:.4g}"


def build_registry(collector: FeedbackCollector, *others: Collector) -> CollectorRegistry:
    """The server's families, then those of ``others`` (e.g. the window gauges)."""
    registry = CollectorRegistry(auto_describe=False)
    for each in (collector, *others):
        registry.register(each)
    ProcessCollector(registry=registry)
    return registry


def connection_families(model_name: str, stats: Mapping[str, int]) -> Iterator[Metric]:
    """The HTTP listener's connections (this process's, since it started)."""
    return model_families(model_name, stats, families.CONNECTIONS)


def auth_family(model_name: str, refused: Mapping[str, int]) -> Metric:
    """Requests --auth refused, by reason (this process's, since it started)."""
    family = new(families.AUTH_REFUSED)
    for reason, count in refused.items():
        family.add_metric((model_name, reason), count)
    return family


def model_families(
    model_name: str, stats: Mapping[str, int], declared: Mapping[str, Family]
) -> Iterator[Metric]:
    """One value per model, each family's from its key in ``stats``."""
    for key, family in declared.items():
        metric = new(family)
        metric.add_metric((model_name,), stats[key])
        yield metric
