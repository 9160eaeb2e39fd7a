"""Regression metrics from sufficient statistics: a batch's sums, and the metrics derived on read.

Everything kept is a sum over rows (so spans merge by addition) except the truth's variance,
which R2 needs and which is kept as (count, shift, mean, M2)
(:func:`cm_models.statistics.moments_of`, merged by Chan's formula): ``sum y^2 - (sum y)^2 / n``
would cancel to noise for y around 1e9.
The conventions are scikit-learn's: ``mean_absolute_error``, ``mean_squared_error``,
``root_mean_squared_error``, ``r2_score`` (None below two rows; constant truth gives 1.0 for a
perfect fit, else 0.0) and ``mean_absolute_percentage_error`` (``|y|`` floored at float64 eps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cm_models.statistics import MomentsRow, Row, vector_array, vector_bytes

#: scikit-learn's floor of ``|truth|`` in the MAPE denominator (zeros in truth stay finite).
APE_EPSILON = float(np.finfo(np.float64).eps)


def error_sums(truth: np.ndarray, prediction: np.ndarray, bounds: np.ndarray) -> Row:
    """One batch's row of the ``regression`` statistic, in a handful of numpy calls.

    ``bounds``: the upper edges of the absolute-error buckets; an error equal to an edge counts
    in that edge's bucket (Prometheus ``le``), one more bucket holds what lies above the last.
    """
    error = prediction - truth
    absolute = np.abs(error)
    percentage = absolute / np.maximum(np.abs(truth), APE_EPSILON)
    buckets = np.bincount(np.searchsorted(bounds, absolute), minlength=bounds.size + 1)
    return (
        int(error.size),
        float(error.sum()),
        float(absolute.sum()),
        float(np.square(error).sum()),
        float(percentage.sum()),
        vector_bytes(buckets),
    )


def _finite(value: float) -> float | None:
    """A sum that overflowed (possible only after ~1e7 rows near the 1e150 cap) shows None."""
    return value if math.isfinite(value) else None


def regression_report(
    sums: Row | None, moments: Row | None, bounds: Sequence[float]
) -> dict[str, Any]:
    """The ``regression`` summary of one span: ``sums`` of its :func:`error_sums` rows (None
    when it has none) and the truth's :class:`~cm_models.statistics.MomentsRow`."""
    width = len(bounds) + 1
    if sums is None:
        sums = (0, 0.0, 0.0, 0.0, 0.0, np.zeros(width))
    rows, error_sum, abs_sum, squared_sum, ape_sum, stored = sums
    counts = np.cumsum(vector_array(stored)).astype(np.int64).tolist()
    histogram = {
        "count": int(rows),
        "sum": _finite(abs_sum),
        "buckets": dict(zip([*map(repr, map(float, bounds)), "+Inf"], counts)),
    }
    if not rows:
        metrics = dict.fromkeys(("mae", "mse", "rmse", "r2", "mape", "mean_error"))
        return {"rows": 0, **metrics, "abs_error": histogram}
    mse = squared_sum / rows
    return {
        "rows": int(rows),
        "mae": _finite(abs_sum / rows),
        "mse": _finite(mse),
        "rmse": _finite(math.sqrt(mse)),
        "r2": _finite(r2(squared_sum, moments)) if rows >= 2 and moments is not None else None,
        "mape": _finite(ape_sum / rows),
        "mean_error": _finite(error_sum / rows),
        "abs_error": histogram,
    }


def r2(squared_error_sum: float, moments: Row) -> float:
    """scikit-learn's ``r2_score`` (``force_finite=True``): 1 - SSE / M2 of the truth."""
    m2 = MomentsRow(*moments).m2
    if m2 == 0:
        return 1.0 if squared_error_sum == 0 else 0.0
    return 1.0 - squared_error_sum / m2
