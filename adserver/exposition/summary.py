"""The JSON view of models' states (``/v1/metrics?format=json``, ``/v1/models/<name>/metrics``
and reply event data)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from adserver.catalogue.families import EVENTS_ACCEPTED, PREDICTED_ROWS, ROWS_ACCEPTED
from adserver.state.view import MetricsState
from cm_models.confusion import embedded
from cm_models.formulas import PER_CLASS, classification_report


def over_classes(state: MetricsState, classes: list[int]) -> tuple[list[int], np.ndarray]:
    """A state's matrix over ``classes`` (a superset of its own: a segment's over its model's,
    so every segment's matrix has the model's shape and order)."""
    own, matrix = state.confusion.classes, state.confusion.matrix()
    if own == classes:
        return classes, matrix
    return classes, embedded(matrix, own, classes)


def model_summary(state: MetricsState) -> dict[str, Any]:
    """Metrics of the model with its matrix, as ``/v1/metrics?format=json`` shows them."""
    return with_confusion_matrix(derived_summary(state), state.confusion.matrix().tolist())


def with_confusion_matrix(summary: dict[str, Any], matrix: Any) -> dict[str, Any]:
    """The summary with the matrix after ``classes`` (the documented key order); a summary
    without classes (a regressor's) has no matrix."""
    if "classes" not in summary:
        return summary
    classes, *rest = summary.items()
    return dict([classes, ("confusion_matrix", matrix), *rest])


def derived_summary(state: MetricsState, classes: list[int] | None = None) -> dict[str, Any]:
    """The summary of a state, over ``classes`` if given (see :func:`over_classes`), with each
    of the model's sections under its name; a regressor's has no classification keys."""
    counts = {
        "rows": state.count(ROWS_ACCEPTED),
        "events": state.count(EVENTS_ACCEPTED),
        **coverage(state.count(ROWS_ACCEPTED), state.count(PREDICTED_ROWS)),
    }
    if not state.classifies:
        return {**counts, **state.derived()}
    classes, matrix = over_classes(state, state.confusion.classes if classes is None else classes)
    report = classification_report(matrix)
    columns = zip(*(getattr(report, name).tolist() for name in PER_CLASS))
    per_class = {
        str(label): dict(zip(PER_CLASS, values)) for label, values in zip(classes, columns)
    }
    return {
        "classes": classes,
        "accuracy": report.accuracy,
        "per_class": per_class,
        **report.averages,
        **counts,
        **state.derived(),
    }


def coverage(rows: int, predictions: int) -> dict[str, Any]:
    """Logged prediction rows, and the share of the known predictions labelled."""
    return {"predictions": predictions, "label_coverage": label_coverage(rows, predictions)}


def label_coverage(rows: int, predictions: int) -> float | None:
    """Rows over max(predictions, rows), as ``feedback_label_coverage`` (feedback that carries
    its response is a prediction no logger logged); None while nothing is known, so an empty
    span is not mistaken for an unlabelled one."""
    known = max(rows, predictions)
    return rows / known if known else None


def models_document(models: Mapping[str, dict[str, Any]]) -> bytes:
    """``{"models": {name: summary}}``: matrices are serialised by orjson straight from numpy."""
    return orjson.dumps({"models": models}, option=orjson.OPT_SERIALIZE_NUMPY)


class SummaryCache:
    """The summary of each state version, derived and encoded once, whoever asks.

    Events committed in one group share a state, hence one summary; every reply of that state
    shares one encoded body (80 kB at 1,000 classes) instead of holding its own copy.
    """

    def __init__(self, state: MetricsState) -> None:
        self.state = state
        self._version = -1
        self._summary: dict[str, Any] = {}
        self._body = b""

    def summary(self) -> dict[str, Any]:
        """The current summary without the matrix (shared: do not modify it)."""
        self._refresh()
        return self._summary

    def body(self) -> bytes:
        """The current summary as JSON: the data of reply events."""
        self._refresh()
        return self._body

    def document(self, segments: Mapping[str, MetricsState] | None = None) -> dict[str, Any]:
        """A model's entry of the JSON document: its summary with the matrix (a numpy array)
        and, for a model with segment dimensions, each segment's (without ``segments``)."""
        summary = with_confusion_matrix(self.summary(), self.state.confusion.matrix())
        if segments is None:
            return summary
        classes = self.state.confusion.classes
        each = {
            name: with_confusion_matrix(
                derived_summary(state, classes), over_classes(state, classes)[1]
            )
            for name, state in segments.items()
        }
        return {**summary, "segments": each}

    def _refresh(self) -> None:
        if self._version != self.state.version:
            self._summary = derived_summary(self.state)
            self._body = orjson.dumps(self._summary)
            self._version = self.state.version
