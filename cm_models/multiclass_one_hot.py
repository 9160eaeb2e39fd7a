"""Multiclass model over one-hot truth and one-hot or probability predictions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from adserver.catalogue import reasons
from cm_models.base import InvalidFeedback, MetricModel, matching_rows, numeric_array
from cm_models.scores import DEFAULT_SCORE_BINS, DEFAULT_SCORE_RANGE, Scoring


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
    """The class of a row is its argmax, so probabilities work as predictions.

    With scores on (``score_range``, default [0, 1]), a response's columns are the scores of
    classes 0, 1, ...: they must lie in the range, and log loss, Brier score, ROC AUC and
    calibration are kept (:mod:`cm_models.scores`). Every column is then a class whose scores
    are kept, so a response wider than ``max_classes`` (``--max_classes``) is refused before
    any of them is counted: the class cap bounds the histograms as it bounds the matrix.
    """

    def __init__(
        self,
        name: str = "model",
        classes: Iterable[int] = (),
        score_bins: int = DEFAULT_SCORE_BINS,
        score_range: object = DEFAULT_SCORE_RANGE,
        max_classes: int | None = None,
        **options: object,
    ) -> None:
        super().__init__(name, classes, **options)
        self.max_classes = max_classes
        self.scoring = Scoring.of(self.name, score_bins, score_range, binary=False)
        if self.scoring is not None:
            self.statistics = self.scoring.statistics
            self.sections = self.scoring.sections

    def rows(self, values: object, what: str) -> np.ndarray:
        """Rows of class scores; a response's (``what`` other than truth) must be in range."""
        rows = score_rows(numeric_array(values, what), what)
        if self.scoring is not None and what != "truth":
            self.check_scores(self.scoring, rows, what)
        return rows

    def check_scores(self, scoring: Scoring, rows: np.ndarray, what: str) -> None:
        """Scores that will be kept: no more columns than classes may be, each in range."""
        if self.max_classes is not None and rows.shape[1] > self.max_classes:
            raise InvalidFeedback(
                f"{what}: {rows.shape[1]} columns of scores, more classes than --max_classes "
                f"({self.max_classes})",
                reasons.TOO_MANY_CLASSES,
            )
        scoring.scale.check(rows, what)

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
        if self.scoring is not None:
            self.check_scores(self.scoring, response, "response")
        return truth.argmax(axis=1), response.argmax(axis=1)

    def updates(self, truth_ids: np.ndarray, response: np.ndarray) -> Mapping[str, Sequence[Any]]:
        if self.scoring is None:
            return {}
        return self.scoring.updates(truth_ids, score_rows(response, "response"))
