"""Multiclass model over integer class ids."""

from __future__ import annotations

import numpy as np

from cm_models.base import MetricModel, class_id_column, matching_rows


class MultiClassNumeric(MetricModel):
    """Truth and prediction are class ids, one per row (``[[4]]`` is class 4)."""

    def labels(self, truth: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        truth_ids = class_id_column(truth, "truth")
        predicted_ids = class_id_column(response, "response")
        matching_rows(truth_ids, predicted_ids)
        return truth_ids, predicted_ids
