"""Prometheus exposition: a Collector that derives every family from state at scrape time.

Raw counts (confusion cells, one-vs-rest counters) are exported as counters, so ``sum by``
across replicas is exact; derived ratios are gauges for one replica's convenience.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from adserver.constants import (
    EVENTS_ACCEPTED,
    EVENTS_DUPLICATE,
    EVENTS_REJECTED,
    METRIC_PREFIX,
    METRICS_REJECTED,
    ROWS_ACCEPTED,
    SELDON_METRIC_PREFIX,
)
from adserver.join import EVICTED, JOINED, LABELS, LATE, LOGGER_EVENTS, PREDICTED_ROWS
from adserver.state import Histogram, MetricsState
from cm_models.formulas import ClassCounts, classification_report

SELDON_COUNTS = {
    "true_positive": ("tp", "rows predicted as the class whose truth is the class"),
    "false_positive": ("fp", "rows predicted as the class whose truth is another class"),
    "false_negative": ("fn", "rows whose truth is the class predicted as another class"),
    "true_negative": ("tn", "rows neither true nor predicted as the class (one-vs-rest)"),
}
PER_CLASS_GAUGES = {
    "precision": "precision per class (0 when nothing was predicted as the class)",
    "recall": "recall per class (0 when the class never was the truth)",
    "f1": "F1 score per class",
    "specificity": "specificity (true negative rate) per class",
    "support": "rows whose truth is the class",
}
SERVER_COUNTERS = {
    EVENTS_ACCEPTED: ("events counted", ()),
    ROWS_ACCEPTED: ("rows counted (every row of a batch)", ()),
    EVENTS_REJECTED: ("events refused with a 4xx, by reason", ("reason",)),
    EVENTS_DUPLICATE: ("redelivered events ignored (same CloudEvent source and id)", ()),
    METRICS_REJECTED: ("custom metric dicts refused individually", ()),
    LABELS: (
        "label rows joined to logged predictions, by outcome: joined, late (joined when the "
        "prediction came), parked, duplicate, expired, failed",
        ("outcome",),
    ),
    PREDICTED_ROWS: ("prediction rows received from payload loggers", ()),
    LOGGER_EVENTS: ("payload-logger events by kind (request, response, ignored_*)", ("kind",)),
    EVICTED: ("logged predictions and parked labels dropped, by reason", ("reason",)),
}


class FeedbackCollector:
    """Reads :class:`MetricsState` (and reply statistics) on every scrape; holds no copies."""

    def __init__(
        self,
        model_name: str,
        state: MetricsState,
        *,
        has_confusion: bool,
        seldon_class_label: bool,
        seldon_labels: Mapping[str, str],
        reply_stats: Callable[[], Mapping[str, int]] | None = None,
        connection_stats: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.model_name = model_name
        self.state = state
        self.has_confusion = has_confusion
        self.seldon_class_label = seldon_class_label
        self.seldon_labels = dict(seldon_labels)
        self.reply_stats = reply_stats
        self.connection_stats = connection_stats

    def collect(self) -> Iterator[Metric]:
        yield from self.server_counters()
        yield from self.join_families()
        if self.has_confusion:
            yield from self.confusion_families()
        yield from self.custom_families()
        if self.reply_stats is not None:
            yield from self.reply_families(self.reply_stats())
        if self.connection_stats is not None:
            yield from connection_families(self.model_name, self.connection_stats())

    def server_counters(self) -> Iterator[Metric]:
        for name, (help_text, label_names) in SERVER_COUNTERS.items():
            family = CounterMetricFamily(
                METRIC_PREFIX + name, help_text, labels=("model", *label_names)
            )
            if label_names:
                for label, value in sorted(self.state.labelled(name).items()):
                    family.add_metric((self.model_name, label), value)
            else:
                family.add_metric((self.model_name,), self.state.count(name))
            yield family

    def join_families(self) -> Iterator[Metric]:
        """Trust signals of the late-label join: how much is labelled, and how late."""
        labelled = self.state.count(LABELS, JOINED) + self.state.count(LABELS, LATE)
        predicted = self.state.count(PREDICTED_ROWS)
        coverage = GaugeMetricFamily(
            METRIC_PREFIX + "label_coverage",
            "labelled rows / rows predicted by payload loggers (0 before any prediction)",
            labels=("model",),
        )
        coverage.add_metric((self.model_name,), labelled / predicted if predicted else 0.0)
        yield coverage
        yield histogram_family(
            METRIC_PREFIX + "label_delay_seconds",
            "seconds from a prediction (its ce-time) to the arrival of its label",
            {"model": self.model_name},
            [({}, self.state.label_delay)],
        )

    def confusion_families(self) -> Iterator[Metric]:
        classes = [str(c) for c in self.state.confusion.classes]
        matrix = self.state.confusion.matrix()
        model = (self.model_name,)
        cells = CounterMetricFamily(
            METRIC_PREFIX + "confusion_matrix",
            "rows by (truth, prediction) class: the raw confusion-matrix cells",
            labels=("model", "truth", "prediction"),
        )
        for row, col in zip(*np.nonzero(matrix)):
            cells.add_metric((*model, classes[row], classes[col]), int(matrix[row, col]))
        yield cells
        yield from self.seldon_families(ClassCounts.from_matrix(matrix), classes)
        report = classification_report(matrix)
        accuracy = GaugeMetricFamily(
            METRIC_PREFIX + "accuracy", "share of rows predicted correctly", labels=("model",)
        )
        accuracy.add_metric(model, report.accuracy)
        yield accuracy
        for name, help_text in PER_CLASS_GAUGES.items():
            family = GaugeMetricFamily(METRIC_PREFIX + name, help_text, labels=("model", "class"))
            for label, value in zip(classes, getattr(report, name).tolist()):
                family.add_metric((*model, label), value)
            yield family
        for name in ("precision", "recall", "f1"):
            family = GaugeMetricFamily(
                f"{METRIC_PREFIX}{name}_average",
                f"{name} averaged over classes (macro, micro or support-weighted)",
                labels=("model", "average"),
            )
            for kind, values in report.averages.items():
                family.add_metric((*model, kind), values[name])
            yield family

    def seldon_families(self, counts: ClassCounts, classes: list[str]) -> Iterator[Metric]:
        """Seldon's counter names and labels, with real one-vs-rest true negatives."""
        label_names = list(self.seldon_labels)
        base = list(self.seldon_labels.values())
        for name, (attribute, help_text) in SELDON_COUNTS.items():
            values = getattr(counts, attribute).tolist()
            if self.seldon_class_label:
                family = CounterMetricFamily(
                    SELDON_METRIC_PREFIX + name, help_text, labels=["class", *label_names]
                )
                for label, value in zip(classes, values):
                    family.add_metric([f"CLASS_{label}", *base], value)
            else:
                family = CounterMetricFamily(
                    SELDON_METRIC_PREFIX + name,
                    f"{help_text}; class 1 is positive",
                    labels=label_names,
                )
                positive = dict(zip(classes, values)).get("1", 0)
                family.add_metric(base, positive)
            yield family

    def custom_families(self) -> Iterator[Metric]:
        custom = self.state.custom
        for key, kind in sorted(custom.types.items()):
            help_text = f"custom {kind.lower()} {key} sent in feedback metrics"
            if kind == "COUNTER":
                family: Metric = CounterMetricFamily(key, help_text, labels=None)
                series = custom.counters
            elif kind == "GAUGE":
                family = GaugeMetricFamily(key, help_text, labels=None)
                series = custom.gauges
            else:
                yield self.timer_family(key, help_text)
                continue
            for (series_key, tags), value in series.items():
                if series_key == key:
                    family.add_sample(
                        family.name + ("_total" if kind == "COUNTER" else ""),
                        self.custom_labels(tags),
                        value,
                    )
            yield family

    def timer_family(self, key: str, help_text: str) -> Metric:
        timers = [
            (self.custom_labels(tags), histogram)
            for (series_key, tags), histogram in self.state.custom.timers.items()
            if series_key == key
        ]
        return histogram_family(key, help_text + " (seconds)", {}, timers)

    def custom_labels(self, tags: tuple[tuple[str, str], ...]) -> dict[str, str]:
        """Seldon's merge order: user tags, then ``method`` and default labels override them.

        ``seldon_labels`` already holds ``method`` (the configured event type).
        """
        return {**dict(tags), **self.seldon_labels}

    def reply_families(self, stats: Mapping[str, int]) -> Iterator[Metric]:
        for name, help_text in (
            ("sent", "reply events delivered to the reply URL"),
            ("failed", "reply events given up after all retries"),
            ("dropped", "reply events dropped because the reply queue was full"),
            ("retries", "reply delivery attempts that were retried"),
        ):
            family = CounterMetricFamily(
                f"{METRIC_PREFIX}reply_{name}", help_text, labels=("model",)
            )
            family.add_metric((self.model_name,), stats[name])
            yield family
        depth = GaugeMetricFamily(
            METRIC_PREFIX + "reply_queue_depth",
            "reply events waiting to be sent",
            labels=("model",),
        )
        depth.add_metric((self.model_name,), stats["queued"])
        yield depth


def histogram_family(
    name: str,
    help_text: str,
    common: Mapping[str, str],
    series: list[tuple[Mapping[str, str], Histogram]],
) -> Metric:
    family = HistogramMetricFamily(name, help_text, labels=None)
    for own, histogram in series:
        labels = {**common, **own}
        bounds = [repr(b) for b in histogram.bounds] + ["+Inf"]
        for bound, count in zip(bounds, [*histogram.buckets.tolist(), histogram.count]):
            family.add_sample(name + "_bucket", {**labels, "le": bound}, count)
        family.add_sample(name + "_count", labels, histogram.count)
        family.add_sample(name + "_sum", labels, histogram.total)
    return family


def build_registry(collector: FeedbackCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def connection_families(model_name: str, stats: Mapping[str, int]) -> Iterator[Metric]:
    """The HTTP listener's connections (this process's, since it started)."""
    open_now = GaugeMetricFamily(
        METRIC_PREFIX + "http_connections", "HTTP connections open", labels=("model",)
    )
    open_now.add_metric((model_name,), stats["open"])
    yield open_now
    for name, key, help_text in (
        ("http_connections_refused", "refused", "connections over --max_connections, given 503"),
        (
            "http_accept_errors",
            "accept_errors",
            "failed accepts (e.g. out of file descriptors), each pausing accepting up to 1 s",
        ),
    ):
        family = CounterMetricFamily(METRIC_PREFIX + name, help_text, labels=("model",))
        family.add_metric((model_name,), stats[key])
        yield family
