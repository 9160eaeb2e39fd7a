"""Regression model: truth and prediction are one number per row."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from adserver.catalogue import reasons
from cm_models.base import (
    InvalidFeedback,
    MetricModel,
    Observation,
    matching_rows,
    numeric_array,
    one_per_row,
)
from cm_models.regression import error_sums, regression_report
from cm_models.sections import Section
from cm_models.statistics import Moments, Sums, moments_of

#: The statistics' names (tables) and the section's (the summary key).
REGRESSION = "regression"
TRUTH_MOMENTS = "truth_moments"
#: The default upper edges of the absolute-error histogram (``--error_buckets``).
DEFAULT_ERROR_BUCKETS = "0.01,0.05,0.1,0.25,0.5,1,2.5,5,10,25,50,100,250,500,1000"
#: Larger magnitudes are refused: their squares (and sums of them) would overflow float64.
MAX_MAGNITUDE = 1e150


def error_bounds(value: str | Sequence[float]) -> tuple[float, ...]:
    """``--error_buckets`` ("0.1,1,10") or a config's list: strictly increasing, positive,
    finite upper edges, at least one (ValueError saying which rule is broken)."""
    parts: Sequence[Any] = value.split(",") if isinstance(value, str) else value
    try:
        if any(isinstance(part, bool) for part in parts):
            raise TypeError
        bounds = tuple(float(part) for part in parts)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"error buckets must be numbers, got {value!r}") from exc
    if not bounds:
        raise ValueError("error buckets list no bound")
    if not all(math.isfinite(b) and b > 0 for b in bounds):
        raise ValueError(f"error buckets must be positive and finite, got {list(bounds)}")
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"error buckets must increase strictly, got {list(bounds)}")
    return bounds


class RegressionSection(Section):
    """The ``regression`` summary key, derived from the two statistics of one span."""

    name = REGRESSION

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)

    def derive(self, tables: Mapping[str, Any]) -> dict[str, Any]:
        return regression_report(
            tables[REGRESSION].get(()), tables[TRUTH_MOMENTS].get(()), self.bounds
        )


class RegressionMetrics(MetricModel):
    """Numeric truth against numeric predictions: MAE, MSE, RMSE, R2, MAPE, the mean error and
    a histogram of absolute errors, from sums kept per event (no confusion matrix, no classes).

    Each event adds ONE row to each statistic, whatever its number of rows: the cost of a span
    is its buckets (and segments), never its events' rows.
    """

    has_confusion = False
    seldon_class_label = False

    def __init__(
        self,
        name: str = "model",
        classes: Iterable[int] = (),
        error_buckets: str | Sequence[float] = DEFAULT_ERROR_BUCKETS,
        **options: object,
    ) -> None:
        """``options`` of classifiers (threshold, score bins) are accepted and ignored."""
        super().__init__(name, classes, **options)
        if self.classes:
            raise ValueError(f"a regressor has no classes, got {self.classes}")
        self.bounds = np.array(error_bounds(error_buckets))
        self.statistics = (
            Sums(
                REGRESSION,
                keys=(),
                values=(
                    ("rows", "int"),
                    ("error_sum", "real"),
                    ("abs_error_sum", "real"),
                    ("squared_error_sum", "real"),
                    ("ape_sum", "real"),
                    ("abs_error_buckets", "vector"),
                ),
                width=self.bounds.size + 1,
            ),
            Moments(TRUTH_MOMENTS),
        )
        self.sections = (RegressionSection(self.bounds.tolist()),)

    def rows(self, values: object, what: str) -> np.ndarray:
        """One float per row: ``[1.5, 2]`` or one column ``[[1.5], [2]]``."""
        array = one_per_row(
            numeric_array(values, what), what, "number", reasons.NOT_A_REGRESSION_TARGET
        ).astype(np.float64)
        if np.abs(array).max() > MAX_MAGNITUDE:
            raise InvalidFeedback(
                f"{what}: a value's magnitude exceeds {MAX_MAGNITUDE:g}", reasons.VALUE_TOO_LARGE
            )
        return array

    def labels(self, truth: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A regressor's rows have no class: :meth:`observe` scores them."""
        raise TypeError("RegressionMetrics has no class labels")

    def observe(self, truth: object, response: object, request: object = None) -> Observation:
        truth_values = self.rows(truth, "truth")
        predictions = self.rows(response, "response")
        matching_rows(truth_values, predictions)
        return Observation(
            updates={
                REGRESSION: (error_sums(truth_values, predictions, self.bounds),),
                TRUTH_MOMENTS: (moments_of(truth_values),),
            },
            scored_rows=int(truth_values.size),
        )
