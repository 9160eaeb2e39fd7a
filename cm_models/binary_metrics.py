"""Binary model: 0/1 truth, 0/1 or probability predictions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from adserver.catalogue import reasons
from cm_models.base import (
    InvalidFeedback,
    MetricModel,
    class_id_column,
    matching_rows,
    numeric_array,
)
from cm_models.scores import DEFAULT_SCORE_BINS, DEFAULT_SCORE_RANGE, Scoring


class BinaryMetrics(MetricModel):
    """Class 1 is positive. A probability predicts 1 when it reaches ``threshold``.

    A two-column prediction (scikit-learn's ``predict_proba``) uses the column of class 1.
    With scores on (``score_range``, default [0, 1]) the scores of class 1 also give log loss,
    Brier score, ROC AUC and calibration (:mod:`cm_models.scores`).
    """

    seldon_class_label = False

    def __init__(
        self,
        name: str = "model",
        classes: Iterable[int] = (),
        threshold: float = 0.5,
        score_bins: int = DEFAULT_SCORE_BINS,
        score_range: object = DEFAULT_SCORE_RANGE,
        **options: object,
    ) -> None:
        super().__init__(name, classes or (0, 1), **options)
        if not set(self.classes) <= {0, 1}:
            raise ValueError(f"binary classes are 0 and 1, not {sorted(self.classes)}")
        self.scoring = Scoring.of(self.name, score_bins, score_range, binary=True)
        # a threshold splits the scores' range: (0, 1] for probabilities, e.g. 0 for logits
        low, high = (0.0, 1.0) if self.scoring is None else self.scoring.scale.range
        if not low < threshold <= high:
            raise ValueError(f"threshold must be in ({low:g}, {high:g}], got {threshold}")
        self.threshold = threshold
        if self.scoring is not None:
            self.statistics = self.scoring.statistics
            self.sections = self.scoring.sections

    def rows(self, values: object, what: str) -> np.ndarray:
        """A response's scores (``what`` other than truth) must be in range when logged."""
        rows = numeric_array(values, what)
        if self.scoring is not None and what != "truth":
            self.scoring.scale.check(rows, what)
        return rows

    def labels(self, truth: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        truth_ids = class_id_column(truth, "truth")
        if not np.isin(truth_ids, (0, 1)).all():
            raise InvalidFeedback("truth: binary labels must be 0 or 1", reasons.NOT_BINARY)
        scores = positive_scores(response)
        if self.scoring is not None:
            self.scoring.scale.check(response, "response")
        elif scores.min() < 0 or scores.max() > 1:
            raise InvalidFeedback("response: scores must lie in [0, 1]", reasons.NOT_BINARY)
        matching_rows(truth_ids, scores)
        return truth_ids, (scores >= self.threshold).astype(np.int64)

    def updates(self, truth_ids: np.ndarray, response: np.ndarray) -> Mapping[str, Sequence[Any]]:
        if self.scoring is None:
            return {}
        if not (response.ndim == 2 and response.shape[1] == 2):
            response = positive_scores(response)
        return self.scoring.updates(truth_ids, response)


def positive_scores(response: np.ndarray) -> np.ndarray:
    """Class 1's score per row: a column, ``predict_proba``'s second column, or a flat list."""
    if response.ndim == 2 and response.shape[1] in (1, 2):
        response = response[:, -1]
    if response.ndim != 1:
        raise InvalidFeedback(
            f"response: expected one score per row, got shape {list(response.shape)}",
            reasons.BAD_SHAPE,
        )
    return response
