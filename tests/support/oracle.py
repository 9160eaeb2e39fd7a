"""The reference for a stream: which rows belong where, and scikit-learn's summary of them.

:class:`Oracle` replays what was sent (:class:`Sent`, in order) the way issue 13's design says a
server counts it: a row belongs to its model, to its segment (the prediction's dimension values,
a label's where the prediction has none; ``__missing__``, ``__overflow__``, the per-model cap in
order of arrival) and to its PREDICTION time (the logged response's ce-time, the feedback's own
ce-time, or its arrival). :meth:`Oracle.summary` is the D8 JSON shape computed with sklearn
(zero_division=0) over exactly those rows; :func:`first_difference` names the first key where a
server's answer differs.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from adserver.state.view import DELAY_BUCKETS
from tests.support.streams import Item, ModelSpec, Request, Stream

MISSING = "__missing__"
OVERFLOW = "__overflow__"
MAX_VALUE = 64
ZERO = {"zero_division": 0}


@dataclass(frozen=True)
class Sent:
    """A request as the sender saw it: the answer's status, and the wall clock around it."""

    request: Request
    status: int
    before: float
    after: float


@dataclass(frozen=True)
class Between:
    """An expected number known only within bounds (e.g. a sum of label delays)."""

    low: float
    high: float


@dataclass(frozen=True)
class Counted:
    """Rows of one event part: where and when they count (``start``..``end``: an arrival time
    known only between the clock readings around the request; equal for an event's ce-time)."""

    model: str
    segment: str
    start: float
    end: float
    truth: tuple[int, ...] = ()
    predicted: tuple[int, ...] = ()
    predictions: int = 0  # logged predicted rows
    delay: Between | None = None  # per row, for joined labels

    def inside(self, start: float, end: float) -> bool:
        return start <= self.start and self.end < end

    def straddles(self, start: float, end: float) -> bool:
        """Whether an end of [start, end) may fall inside the span of an arrival time."""
        return any(self.start < edge <= self.end for edge in (start, end))


def value_name(value: str | None) -> str:
    if value is None or value == "":
        return MISSING
    if len(value) > MAX_VALUE or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return OVERFLOW
    return value


def segment_name(model: ModelSpec, *sides: Mapping[str, str | None]) -> str:
    """The values joined by "/", per dimension the first side that knows it; one value too long
    (or with control characters) makes the whole name ``__overflow__``."""
    if not model.segment_by:
        return ""
    values = []
    for dimension in model.segment_by:
        known = [side[dimension] for side in sides if side.get(dimension) is not None]
        values.append(value_name(known[0] if known else None))
    return OVERFLOW if OVERFLOW in values else "/".join(values)


class Oracle:
    """What a server shows after ``sent``: every row's model, segment and prediction time."""

    def __init__(self, stream: Stream, sent: Iterable[Sent]) -> None:
        self.models = {model.name: model for model in stream.models}
        self.counted: list[Counted] = []
        self.events: Counter[str] = Counter()
        self._admitted: dict[str, list[str]] = defaultdict(list)
        self._logged: set[int] = set()
        self._parked: dict[int, Sent] = {}
        items = {item.index: item for item in stream.items}
        for one in sent:
            if one.status == 200 and one.request.item is not None:
                self._replay(items[one.request.item], one)

    def _segment(self, model: ModelSpec, name: str) -> str:
        """The per-model cap: names admitted in order of arrival; later ones overflow."""
        admitted = self._admitted[model.name]
        cap = model.max_segments if model.max_segments is not None else 100
        if name in admitted or name in ("", OVERFLOW):
            return name
        if len(admitted) < cap:
            admitted.append(name)
            return name
        return OVERFLOW

    def _replay(self, item: Item, sent: Sent) -> None:
        role, model = sent.request.role, item.model
        if role == "feedback":
            self.events[model.name] += 1
            start, end = (
                (item.time, item.time) if item.time is not None else (sent.before, sent.after)
            )
            segment = self._segment(model, segment_name(model, item.prediction_values))
            self.counted.append(
                Counted(model.name, segment, start, end, item.truth, item.predicted)
            )
        elif role == "response":
            assert item.time is not None
            self._logged.add(item.index)
            segment = self._segment(model, segment_name(model, item.prediction_values))
            self.counted.append(
                Counted(model.name, segment, item.time, item.time, predictions=len(item.truth))
            )
            if item.index in self._parked:
                self._join(item, self._parked.pop(item.index))
        elif role == "label":
            self.events[model.name] += 1
            if item.index in self._logged:
                self._join(item, sent)
            else:
                self._parked[item.index] = sent

    def _join(self, item: Item, label: Sent) -> None:
        assert item.time is not None
        model = item.model
        name = segment_name(model, item.prediction_values, item.label_values)
        delay = Between(max(0.0, label.before - item.time), max(0.0, label.after - item.time))
        self.counted.append(
            Counted(
                model.name,
                self._segment(model, name),
                item.time,
                item.time,
                item.truth,
                item.predicted,
                delay=delay,
            )
        )

    # ---- reading --------------------------------------------------------------------------

    def select(
        self,
        model: str,
        segment: str | None = None,
        start: float = -math.inf,
        end: float = math.inf,
    ) -> list[Counted]:
        """The row parts of a model (one segment, or its totals) predicted in [start, end)."""
        return [
            c
            for c in self.counted
            if c.model == model
            and (segment is None or c.segment == segment)
            and c.inside(start, end)
        ]

    def ambiguous(self, model: str, start: float, end: float) -> bool:
        """Whether a row counted at its arrival may fall on either side of the range's ends."""
        return any(c.model == model and c.straddles(start, end) for c in self.counted)

    def segments(self, model: str) -> set[str]:
        """The segments with rows or predictions (none for a model without dimensions)."""
        if not self.models[model].segment_by:
            return set()
        return {c.segment for c in self.counted if c.model == model}

    def classes(self, model: str) -> list[int]:
        """The model's classes in the server's order: configured or seen, sorted."""
        spec = self.models[model]
        seen = {label for c in self.select(model) for label in (*c.truth, *c.predicted)}
        configured = spec.classes or ((0, 1) if spec.kind == "binary" else ())
        return sorted(seen | set(configured))

    def summary(
        self,
        model: str,
        segment: str | None = None,
        start: float = -math.inf,
        end: float = math.inf,
        classes: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """The range summary (D8) of exactly the rows selected, by scikit-learn."""
        parts = self.select(model, segment, start, end)
        labels = list(classes if classes is not None else self.classes(model))
        return sklearn_summary(parts, labels)

    def totals(self, model: str, classes: Sequence[int] | None = None) -> dict[str, Any]:
        """The all-time summary of ``/v1/metrics?format=json`` (with ``events``, ``segments``)."""
        labels = list(classes if classes is not None else self.classes(model))

        def all_time(segment: str | None) -> dict[str, Any]:
            found = self.summary(model, segment, classes=labels)
            del found["label_delay"]  # only range summaries show it
            return found

        document = {**all_time(None), "events": self.events[model]}
        if self.models[model].segment_by:
            document["segments"] = {name: all_time(name) for name in sorted(self.segments(model))}
        return document


def one_matrix(truth: list[int], predicted: list[int], labels: list[int]) -> list[list[int]]:
    """sklearn's matrix over ``labels``; a range may show one class only, which sklearn warns
    of although the labels are given (its shape is right by construction)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        return confusion_matrix(truth, predicted, labels=labels).tolist()


def sklearn_summary(parts: Sequence[Counted], labels: list[int]) -> dict[str, Any]:
    truth = [t for c in parts for t in c.truth]
    predicted = [p for c in parts for p in c.predicted]
    rows = len(truth)
    predictions = sum(c.predictions for c in parts)
    known = max(predictions, rows)
    delays = [(c.delay, len(c.truth)) for c in parts if c.delay is not None]
    summary: dict[str, Any] = {
        "classes": labels,
        "confusion_matrix": (
            one_matrix(truth, predicted, labels) if rows else [[0] * len(labels) for _ in labels]
        ),
        "accuracy": float(accuracy_score(truth, predicted)) if rows else 0.0,
    }
    if rows:
        precision, recall, f1, support = precision_recall_fscore_support(
            truth, predicted, labels=labels, average=None, **ZERO
        )
    else:
        precision = recall = f1 = support = np.zeros(len(labels))
    summary["per_class"] = {
        str(label): {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    for average in ("macro", "weighted"):
        if rows:
            p, r, f, _ = precision_recall_fscore_support(
                truth, predicted, labels=labels, average=average, **ZERO
            )
        else:
            p = r = f = 0.0
        summary[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    summary["rows"] = rows
    summary["predictions"] = predictions
    summary["label_coverage"] = rows / known if known else None
    count = sum(n for _, n in delays)
    summary["label_delay"] = {
        "count": count,
        "sum": Between(sum(d.low * n for d, n in delays), sum(d.high * n for d, n in delays)),
        "buckets": {**delay_buckets(delays), "+Inf": count},
    }
    return summary


def delay_buckets(delays: Sequence[tuple[Between, int]]) -> dict[str, Between]:
    """Cumulative rows by upper bound (Prometheus' ``le``): at least those surely below it, at
    most those that may be (a delay is known within the clock readings around its label)."""
    return {
        repr(bound): Between(
            sum(n for d, n in delays if d.high + SLACK <= bound),
            sum(n for d, n in delays if d.low - SLACK <= bound),
        )
        for bound in DELAY_BUCKETS
    }


# ---- comparing ------------------------------------------------------------------------------

TOLERANCE = 1e-9
SLACK = 0.05  # seconds of clock skew allowed around a Between (float sums, rounding)


def first_difference(expected: Any, actual: Any, path: str = "$") -> str | None:
    """The first place ``actual`` differs from ``expected`` (only keys ``expected`` names are
    compared; floats within 1e-9), readably; None when they agree."""
    if isinstance(expected, Between):
        if not isinstance(actual, int | float) or not (
            expected.low - SLACK <= actual <= expected.high + SLACK
        ):
            return f"{path}: expected between {expected.low} and {expected.high}, got {actual!r}"
        return None
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            return f"{path}: expected an object, got {actual!r}"
        for key, value in expected.items():
            if key not in actual:
                return f"{path}: key {key!r} is missing (has {sorted(actual)})"
            found = first_difference(value, actual[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(expected, list | tuple):
        if not isinstance(actual, list | tuple) or len(actual) != len(expected):
            return f"{path}: expected {list(expected)!r}, got {actual!r}"
        for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
            found = first_difference(want, got, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(expected, float):
        if not isinstance(actual, int | float) or not math.isclose(
            expected, actual, rel_tol=TOLERANCE, abs_tol=TOLERANCE
        ):
            return f"{path}: expected {expected!r}, got {actual!r}"
        return None
    if expected != actual or (type(expected) is bool and type(actual) is not bool):
        return f"{path}: expected {expected!r}, got {actual!r}"
    return None


def assert_matches(expected: Any, actual: Any, context: str = "") -> None:
    found = first_difference(expected, actual)
    assert found is None, f"{context}: {found}" if context else found
