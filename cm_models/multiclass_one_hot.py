"""Multiclass model over one-hot truth and one-hot or probability predictions."""

from __future__ import annotations

import numpy as np

from adserver.catalogue import reasons
from cm_models.base import InvalidFeedback, MetricModel, matching_rows, numeric_array


def score_rows(array: np.ndarray, what: str) -> np.ndarray:
    """``[0, 0, 1]`` and ``[[0, 0, 1]]`` are the same single row."""
    if array.ndim == 1:
        return array.reshape(1, -1)
    if array.ndim != 2:
        raise InvalidFeedback(
            f"{what}: expected rows of class scores, got shape {list(array.shape)}",
            reasons.BAD_SHAPE,
        )
    return array


class MulticlassOneHot(MetricModel):
    """The class of a row is its argmax, so probabilities work as predictions."""

    def rows(self, values: object, what: str) -> np.ndarray:
        return score_rows(numeric_array(values, what), what)

    def labels(self, truth: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        truth, response = score_rows(truth, "truth"), score_rows(response, "response")
        matching_rows(truth, response)
        if truth.shape[1] != response.shape[1]:
            raise InvalidFeedback(
                f"truth rows have {truth.shape[1]} columns but response rows have "
                f"{response.shape[1]}",
                reasons.WIDTH_MISMATCH,
            )
        if (truth < 0).any() or not (truth.max(axis=1) > 0).all():
            raise InvalidFeedback(
                "truth: every row needs a positive entry marking its class (one-hot)",
                reasons.INVALID_ONE_HOT,
            )
        return truth.argmax(axis=1), response.argmax(axis=1)
