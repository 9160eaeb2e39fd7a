"""Binary model: 0/1 truth, 0/1 or probability predictions."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from adserver.catalogue import reasons
from cm_models.base import InvalidFeedback, MetricModel, class_id_column, matching_rows


class BinaryMetrics(MetricModel):
    """Class 1 is positive. A probability predicts 1 when it reaches ``threshold``.

    A two-column prediction (scikit-learn's ``predict_proba``) uses the column of class 1.
    """

    seldon_class_label = False

    def __init__(
        self,
        name: str = "model",
        classes: Iterable[int] = (),
        threshold: float = 0.5,
        **options: object,
    ) -> None:
        super().__init__(name, classes or (0, 1), **options)
        if not set(self.classes) <= {0, 1}:
            raise ValueError(f"binary classes are 0 and 1, not {sorted(self.classes)}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold

    def labels(self, truth: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        truth_ids = class_id_column(truth, "truth")
        if not np.isin(truth_ids, (0, 1)).all():
            raise InvalidFeedback("truth: binary labels must be 0 or 1", reasons.NOT_BINARY)
        if response.ndim == 2 and response.shape[1] == 2:
            response = response[:, 1]
        if response.ndim == 2 and response.shape[1] == 1:
            response = response[:, 0]
        if response.ndim != 1:
            raise InvalidFeedback(
                f"response: expected one score per row, got shape {list(response.shape)}",
                reasons.BAD_SHAPE,
            )
        if response.min() < 0 or response.max() > 1:
            raise InvalidFeedback("response: scores must lie in [0, 1]", reasons.NOT_BINARY)
        matching_rows(truth_ids, response)
        return truth_ids, (response >= self.threshold).astype(np.int64)
