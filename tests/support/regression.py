"""scikit-learn's regression metrics of what was sent: the reference for the ``regression``
section (JSON) and its gauges (Prometheus)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    mean_absolute_error,
    mean_absolute_percentage_error,
    mean_squared_error,
    r2_score,
    root_mean_squared_error,
)


def sklearn_regression(truth: Sequence[float], predicted: Sequence[float]) -> dict[str, float]:
    """The section's metrics by name (mean_error = the mean of prediction - truth)."""
    y, p = np.asarray(truth, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    return {
        "mae": mean_absolute_error(y, p),
        "mse": mean_squared_error(y, p),
        "rmse": root_mean_squared_error(y, p),
        "r2": r2_score(y, p),
        "mape": mean_absolute_percentage_error(y, p),
        "mean_error": float(np.mean(p - y)),
    }
