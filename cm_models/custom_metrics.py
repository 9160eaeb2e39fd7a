"""Seldon's custom-metric contract: ``{key, type: COUNTER|GAUGE|TIMER, value, tags}``.

Unlike Seldon's ``validate_metrics``, each dict is judged alone: one bad item is dropped and
counted, the rest (and the confusion-matrix update) still count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from adserver.catalogue.families import (
    CUSTOM_KINDS,
    LE,
    SELDON_LABELS,
    TAKEN_SUFFIXES,
    TOTAL,
    MetricType,
)

METRIC_TYPES: tuple[MetricType, ...] = tuple(CUSTOM_KINDS)

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

#: Labels the server puts on every custom series, over the tags (Seldon's default labels of
#: adserver/exposition/seldon_labels.py, and ``method``): a tag of one of these names would be
#: overwritten, and series differing only in it would be exposed twice with one label set.
SERVER_LABELS = frozenset(SELDON_LABELS)
#: A histogram's own label: its buckets' bounds.
BUCKET_LABEL = LE


@dataclass(frozen=True)
class CustomMetric:
    """One validated metric update. ``tags`` is sorted so equal series compare equal."""

    key: str
    type: MetricType
    value: float
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def seconds(self) -> float:
        """A TIMER's value: Seldon sends milliseconds, Prometheus histograms are in seconds."""
        return self.value / 1000.0


def parse_metric(item: object) -> CustomMetric:
    """Validate one metric dict; :class:`ValueError` says what is wrong with it."""
    if not isinstance(item, dict):
        raise ValueError("a metric must be an object")
    key, kind, value = item.get("key"), item.get("type"), item.get("value")
    if not isinstance(key, str) or not _NAME.match(key) or key.startswith("__"):
        raise ValueError(f"metric key {key!r} is not a valid Prometheus name")
    if kind not in METRIC_TYPES:
        raise ValueError(f"metric {key}: type must be one of {', '.join(METRIC_TYPES)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"metric {key}: value must be a finite number")
    if kind == "COUNTER" and value < 0:
        raise ValueError(f"metric {key}: a counter cannot decrease")
    if kind == "TIMER" and value < 0:  # a histogram's sum must not fall (OpenMetrics)
        raise ValueError(f"metric {key}: a duration cannot be negative")
    tags = item.get("tags") or {}
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and _LABEL.match(k) and not k.startswith("__") for k in tags
    ):
        raise ValueError(f"metric {key}: tags must map label names to values")
    taken = SERVER_LABELS | ({BUCKET_LABEL} if kind == "TIMER" else set())
    if clashes := sorted(taken.intersection(tags)):
        raise ValueError(f"metric {key}: tags {clashes} are labels the server sets")
    return CustomMetric(
        key, kind, float(value), tuple(sorted((k, str(v)) for k, v in tags.items()))
    )


def parse_metrics(items: Iterable[object]) -> tuple[list[CustomMetric], list[str]]:
    """The valid metrics and one message per rejected item."""
    accepted: list[CustomMetric] = []
    problems: list[str] = []
    for item in items:
        try:
            accepted.append(parse_metric(item))
        except ValueError as exc:
            problems.append(str(exc))
    return accepted, problems


def family_name(metric: CustomMetric) -> str:
    """Prometheus appends ``_total`` to counters: counter ``x`` and ``x_total`` are one family."""
    return metric.key.removesuffix(TOTAL) if metric.type == "COUNTER" else metric.key


#: The sample names each type's family takes, after its name.
SAMPLE_SUFFIXES: dict[MetricType, tuple[str, ...]] = {
    kind: TAKEN_SUFFIXES[CUSTOM_KINDS[kind]] for kind in METRIC_TYPES
}


SeriesKey = tuple[str, tuple[tuple[str, str], ...]]  # (family, sorted tags)


class MetricCatalog:
    """Which custom families and series exist, with which type: the gate every metric passes.

    A family keeps the type it was first seen with, and no two families may expose the same
    sample name (``x_count`` of a timer ``x`` against a counter ``x_count``), or the exposition
    would be invalid and Prometheus would drop the whole scrape. Names starting with
    ``reserved_prefixes`` belong to the server. At most ``max_series`` series (family and tags)
    exist: a metric that would start another is refused, so a scrape stays bounded however many
    tag values senders invent (series loaded at start-up count, even past a lowered cap).
    """

    def __init__(
        self, reserved_prefixes: tuple[str, ...] = (), max_series: int | None = None
    ) -> None:
        self.reserved_prefixes = reserved_prefixes
        self.max_series = max_series
        self.types: dict[str, MetricType] = {}
        self.series: set[SeriesKey] = set()
        self._owners: dict[str, str] = {}
        # Families (str) and series (tuple) in registration order, for rollback.
        self._journal: list[str | SeriesKey] = []

    def load(self, types: Mapping[str, MetricType], series: Iterable[SeriesKey]) -> None:
        """What a committed state already holds (at start-up)."""
        for family, kind in types.items():
            self.register(family, kind)
        self.series.update(series)

    def refresh(self, types: Mapping[str, MetricType], series: Iterable[SeriesKey]) -> None:
        """What a shared store holds now (other replicas admit too): families not known yet are
        registered (journalled: a rollback forgets them, and they are read again), series added."""
        for family, kind in types.items():
            if family not in self.types:
                self.register(family, kind)
        self.series.update(series)

    def mark(self) -> int:
        """A point to :meth:`rollback` to (a transaction or savepoint begins)."""
        return len(self._journal)

    def rollback(self, mark: int) -> None:
        """Forget families and series registered since ``mark``: their transaction failed."""
        while len(self._journal) > mark:
            entry = self._journal.pop()
            if isinstance(entry, tuple):
                self.series.discard(entry)
                continue
            for suffix in ("", *SAMPLE_SUFFIXES[self.types.pop(entry)]):
                self._owners.pop(entry + suffix, None)

    def admit(self, metrics: Sequence[CustomMetric]) -> tuple[list[CustomMetric], int]:
        """The metrics that may be recorded (registering new families) and how many may not."""
        kept = [m for m in metrics if self._admissible(m)]
        return kept, len(metrics) - len(kept)

    def register(self, family: str, kind: MetricType) -> None:
        """The family name (its ``# TYPE`` line) and all its sample names become taken."""
        self.types[family] = kind
        self._journal.append(family)
        for suffix in ("", *SAMPLE_SUFFIXES[kind]):
            self._owners[family + suffix] = family

    def _admissible(self, metric: CustomMetric) -> bool:
        family = family_name(metric)
        if family.startswith(self.reserved_prefixes):
            return False
        if metric.type == "COUNTER" and family.endswith(TOTAL):
            return False  # `x_total_total`: exposed as family `x`, sample `x_total`, a clash
        known = self.types.get(family)
        if known is not None and known != metric.type:
            return False
        if known is None:
            names = [family + suffix for suffix in SAMPLE_SUFFIXES[metric.type]]
            if any(name in self._owners for name in [family, *names]):
                return False
        series = (family, metric.tags)
        if series not in self.series:
            if self.max_series is not None and len(self.series) >= self.max_series:
                return False
            self.series.add(series)
            self._journal.append(series)
        if known is None:
            self.register(family, metric.type)
        return True
