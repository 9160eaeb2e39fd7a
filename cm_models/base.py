"""The metric-model interface: turn one event's arrays into an additive observation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adserver.catalogue import reasons
from cm_models.confusion import CLASS_ID_MAX, CLASS_ID_MIN, Cells
from cm_models.custom_metrics import CustomMetric
from cm_models.sections import Section
from cm_models.statistics import Statistic


class InvalidFeedback(ValueError):
    """The event's data cannot be scored; the server answers 400 with ``reason``."""

    def __init__(self, message: str, reason: str = reasons.INVALID_DATA) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Observation:
    """What one event adds to the state: confusion-matrix cells, custom metrics, and the items
    of the statistics the model declares (``updates``, by statistic name). ``scored_rows``
    counts the rows of a model without cells (a regressor)."""

    cells: Cells | None = None
    metrics: Sequence[CustomMetric] = field(default_factory=tuple)
    metric_problems: Sequence[str] = field(default_factory=tuple)
    updates: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    scored_rows: int = 0

    @property
    def rows(self) -> int:
        return self.cells.rows if self.cells is not None else self.scored_rows


#: numpy's limit on an array's dimensions.
MAX_DIMENSIONS = 64


def nested_array(values: object, what: str) -> np.ndarray:
    """``np.asarray(values)``, or :class:`InvalidFeedback` saying why numpy refused the nesting."""
    if isinstance(values, np.ndarray):
        return values
    try:
        return np.asarray(values)
    except ValueError as exc:  # ragged nested lists, or more than numpy's 64 dimensions
        if nesting_depth(values) > MAX_DIMENSIONS:
            raise InvalidFeedback(
                f"{what}: lists are nested deeper than {MAX_DIMENSIONS} levels", reasons.TOO_DEEP
            ) from exc
        raise InvalidFeedback(f"{what}: rows have different lengths", reasons.RAGGED_ROWS) from exc


def nesting_depth(values: object) -> int:
    """How deep the first elements nest: bounded by the body, walked only once numpy refused."""
    depth = 0
    while isinstance(values, list) and values:
        values, depth = values[0], depth + 1
    return depth


def numeric_array(values: object, what: str) -> np.ndarray:
    """A finite numeric array of at least one row, or :class:`InvalidFeedback` saying why."""
    array = nested_array(values, what)
    if array.dtype.kind not in "biuf":
        raise InvalidFeedback(f"{what}: values must be numbers", reasons.NON_NUMERIC)
    if array.ndim == 0:
        raise InvalidFeedback(f"{what}: expected a list of rows, got a scalar", reasons.SCALAR)
    if array.size == 0:
        raise InvalidFeedback(f"{what}: no rows", reasons.EMPTY)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidFeedback(f"{what}: NaN or infinite values", reasons.NON_FINITE)
    return array


def first_axis_rows(values: object) -> list[object]:
    """The batch as a list of rows, for data of any shape or kind (the first axis is the batch).

    Each row is a JSON value, as a stored row must be. ``binData`` (bytes) has no rows: a label
    carrying it cannot wait for its prediction, so it is refused (send it with its response).
    """
    if isinstance(values, bytes):
        raise InvalidFeedback(
            "binData cannot be stored by row to join a later prediction; send the response "
            "with the truth",
            reasons.UNJOINABLE_BIN_DATA,
        )
    tolist = getattr(values, "tolist", None)
    listed = tolist() if tolist is not None else values
    return listed if isinstance(listed, list) else [listed]


def one_per_row(array: np.ndarray, what: str, value: str, reason: str) -> np.ndarray:
    """One ``value`` per row: ``[a, b]`` and ``[[a], [b]]`` are two rows; else ``reason``."""
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise InvalidFeedback(
            f"{what}: expected one {value} per row, got shape {list(array.shape)}", reason
        )
    return array


def class_id_column(array: np.ndarray, what: str) -> np.ndarray:
    """One class id per row: ``[a, b]`` and ``[[a], [b]]`` are two rows, ``[[4]]`` is class 4."""
    array = one_per_row(array, what, "class id", reasons.BAD_SHAPE)
    if array.dtype.kind == "f" and not np.array_equal(array, np.floor(array)):
        raise InvalidFeedback(f"{what}: class ids must be integers", reasons.NON_INTEGER_CLASS)
    if array.min() < CLASS_ID_MIN or array.max() > CLASS_ID_MAX:
        raise InvalidFeedback(
            f"{what}: class id out of the 32-bit range", reasons.CLASS_OUT_OF_RANGE
        )
    return array.astype(np.int64)


def matching_rows(truth: np.ndarray, prediction: np.ndarray) -> None:
    if truth.shape[0] != prediction.shape[0]:
        raise InvalidFeedback(
            f"truth has {truth.shape[0]} rows but response has {prediction.shape[0]}",
            reasons.ROW_COUNT_MISMATCH,
        )


class MetricModel(ABC):
    """A model keeps no state of its own: it maps arrays to cells that the server counts.

    Subclasses implement :meth:`labels`. ``classes`` fixes classes known up front (they appear in
    metrics with zero counts before any feedback names them). A subclass must stay pure (no
    state, no I/O): it is called from the decoding and writer threads too.
    """

    # What :class:`cm_models.protocol.FeedbackModel` declares: pure numpy, so any thread.
    seldon_class_label = True  # except for binary models
    has_confusion = True
    numeric_rows = True
    thread_safe = True
    #: Statistics kept beside the confusion matrix; :meth:`observe` fills their ``updates``.
    statistics: tuple[Statistic[Any, Any], ...] = ()
    #: What is derived from them on read (summary keys).
    sections: tuple[Section, ...] = ()

    def __init__(
        self, name: str = "model", classes: Iterable[int] = (), **_options: object
    ) -> None:
        self.name = name
        self.classes = [int(c) for c in classes]

    def rows(self, values: object, what: str) -> np.ndarray:
        """``values`` as an array whose first axis is rows (used to store predictions by row)."""
        return numeric_array(values, what)

    @abstractmethod
    def labels(self, truth: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class id per row of truth and of the prediction, same length."""

    def observe(self, truth: object, response: object, request: object = None) -> Observation:
        scores = numeric_array(response, "response")
        truth_ids, predicted_ids = self.labels(numeric_array(truth, "truth"), scores)
        return Observation(
            cells=Cells.from_labels(truth_ids, predicted_ids),
            updates=self.updates(truth_ids, scores),
        )

    def updates(self, truth_ids: np.ndarray, response: np.ndarray) -> Mapping[str, Sequence[Any]]:
        """Items of the model's own :attr:`statistics` for one event whose :meth:`labels` were
        valid (none by default)."""
        return {}
