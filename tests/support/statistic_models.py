"""A test model declaring one statistic of each stored kind beyond plain numbers: a keyed
vector (a histogram of predicted classes per true class) and keyed moments (of the predictions
per true class), loaded by ``--storage_uri tests.support.statistic_models.Spread``."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cm_models import MultiClassNumeric
from cm_models.base import Observation
from cm_models.statistics import Moments, Row, Sums, moments_of, vector_bytes

#: Bins of the predicted-class histogram: classes 0..WIDTH-2, and every other one at an edge.
WIDTH = 4
HISTOGRAM = Sums(
    "spread_histogram",
    keys=[("truth", "int")],
    values=[("rows", "int"), ("predicted", "vector")],
    width=WIDTH,
)
MOMENTS = Moments("spread_moments", keys=[("truth", "int")])
SPREAD = "tests.support.statistic_models.Spread"


def spread_rows(truth: np.ndarray, predicted: np.ndarray) -> dict[str, list[Row]]:
    """Per true class: its rows and histogram, and the moments of its predictions."""
    histogram, moments = [], []
    for label in np.unique(truth):
        chosen = predicted[truth == label]
        counts = np.bincount(np.clip(chosen, 0, WIDTH - 1), minlength=WIDTH)
        histogram.append((int(label), int(chosen.size), vector_bytes(counts)))
        moments.append((int(label), *moments_of(chosen.astype(np.float64))))
    return {HISTOGRAM.name: histogram, MOMENTS.name: moments}


class Spread(MultiClassNumeric):
    """Class ids as :class:`MultiClassNumeric` counts them, and how predictions spread."""

    statistics = (HISTOGRAM, MOMENTS)

    def observe(self, truth: Any, response: Any, request: Any = None) -> Observation:
        observation = super().observe(truth, response, request)
        t, p = self.labels(self.rows(truth, "truth"), self.rows(response, "response"))
        return dataclasses.replace(observation, updates=spread_rows(t, p))
