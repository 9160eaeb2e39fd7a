"""Test-only models with the server's sections (S4/S5 shapes): readers are tested on them
until the real regression and score models land, and keep a small independent derivation.

``FakeRegressor`` (``--storage_uri tests.support.sections.FakeRegressor``) scores one number per
row; ``FakeScorer`` is a binary classifier whose response is the positive class's score.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from cm_models.base import MetricModel, Observation, numeric_array
from cm_models.confusion import Cells
from cm_models.sections import Section
from cm_models.statistics import Moments, Statistic, Sums, moments_of, vector_array, vector_bytes

ERROR_BOUNDS = (0.5, 1.0, 5.0)
SCORE_BINS = 200  # the default --score_bins: a statistic has one width in a state file
CALIBRATION_BINS = 15
EPS = float(np.finfo(np.float64).eps)

REGRESSION = Sums(
    "regression",
    keys=(),
    values=(
        ("rows", "int"),
        ("error_sum", "real"),
        ("abs_error_sum", "real"),
        ("squared_error_sum", "real"),
        ("ape_sum", "real"),
        ("abs_error_buckets", "vector"),
    ),
    width=len(ERROR_BOUNDS) + 1,
)
TRUTH_MOMENTS = Moments("truth_moments")
SCORES = Sums(
    "scores",
    keys=(),
    values=(
        ("rows", "int"),
        ("log_loss_sum", "real"),
        ("brier_sum", "real"),
        ("unnormalised_rows", "int"),
    ),
)
HISTOGRAM = Sums(
    "score_histogram",
    keys=(("class", "int"),),
    values=(("positives", "vector"), ("negatives", "vector")),
    width=SCORE_BINS,
)
CALIBRATION = Sums(
    "calibration",
    keys=(),
    values=(("rows", "vector"), ("score_sum", "vector"), ("positives", "vector")),
    width=CALIBRATION_BINS,
)


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


class RegressionSection(Section):
    name = "regression"

    def derive(self, tables: Mapping[str, Any]) -> dict[str, Any]:
        values = tables["regression"].get(())
        n, error, absolute, squared, ape = values[:5] if values else (0, 0.0, 0.0, 0.0, 0.0)
        buckets = np.cumsum(vector_array(values[5])) if values else np.zeros(REGRESSION.width)
        moments = tables["truth_moments"].get((), (0, 0.0, 0.0, 0.0))
        mse = ratio(squared, n)
        r2 = None
        if n >= 2:
            m2 = moments[3]
            r2 = 1 - squared / m2 if m2 else (1.0 if squared == 0 else 0.0)
        return {
            "rows": n,
            "mae": ratio(absolute, n),
            "mse": mse,
            "rmse": math.sqrt(mse) if mse is not None else None,
            "r2": r2,
            "mape": ratio(ape, n),
            "mean_error": ratio(error, n),
            "abs_error": {
                "count": n,
                "sum": absolute,
                "buckets": dict(
                    zip([*(repr(b) for b in ERROR_BOUNDS), "+Inf"], buckets.astype(int).tolist())
                ),
            },
        }


class FakeRegressor(MetricModel):
    """One number per row of truth and response."""

    has_confusion = False
    statistics: tuple[Statistic[Any, Any], ...] = (REGRESSION, TRUTH_MOMENTS)
    sections: tuple[Section, ...] = (RegressionSection(),)

    def labels(self, truth: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError("a regressor has no labels")

    def observe(self, truth: object, response: object, request: object = None) -> Observation:
        y = numeric_array(truth, "truth").astype(np.float64).reshape(-1)
        p = numeric_array(response, "response").astype(np.float64).reshape(-1)
        error = p - y
        absolute = np.abs(error)
        counts = np.bincount(np.searchsorted(ERROR_BOUNDS, absolute), minlength=REGRESSION.width)
        row = (
            int(y.size),
            float(error.sum()),
            float(absolute.sum()),
            float(np.square(error).sum()),
            float((absolute / np.maximum(np.abs(y), EPS)).sum()),
            vector_bytes(counts),
        )
        return Observation(
            updates={"regression": [row], "truth_moments": [moments_of(y)]},
            scored_rows=int(y.size),
        )


class ScoresSection(Section):
    name = "scores"

    def derive(self, tables: Mapping[str, Any]) -> dict[str, Any]:
        n, log_loss, brier, unnormalised = tables["scores"].get((), (0, 0.0, 0.0, 0))
        per_class = {}
        for (label,), (positives, negatives) in sorted(tables["score_histogram"].items()):
            below = np.cumsum(negatives) - negatives
            pairs = float(positives.sum() * negatives.sum())
            per_class[str(label)] = {
                "auc": ratio(float((positives * (below + 0.5 * negatives)).sum()), pairs),
                "error_bound": ratio(0.5 * float((positives * negatives).sum()), pairs),
            }
        defined = [v for v in per_class.values() if v["auc"] is not None]
        average = {
            key: float(np.mean([v[key] for v in defined])) if defined else None
            for key in ("auc", "error_bound")
        }
        rows, sums, positive = tables["calibration"].get((), (np.zeros(CALIBRATION_BINS),) * 3)
        edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
        bins = [
            {
                "lower": float(edges[i]),
                "upper": float(edges[i + 1]),
                "rows": int(rows[i]),
                "mean_score": ratio(float(sums[i]), float(rows[i])),
                "observed": ratio(float(positive[i]), float(rows[i])),
            }
            for i in range(CALIBRATION_BINS)
        ]
        gap = float(np.abs(positive - sums).sum())
        return {
            "rows": n,
            "log_loss": ratio(log_loss, n),
            "brier_score": ratio(brier, n),
            "unnormalised_rows": unnormalised,
            "roc_auc": {"per_class": per_class, "macro": average, "weighted": average},
            "calibration": {"ece": ratio(gap, float(rows.sum())), "bins": bins},
        }


class FakeScorer(MetricModel):
    """Binary: truth 0/1, response the positive class's score in [0, 1] (class = score >= .5)."""

    seldon_class_label = False
    statistics: tuple[Statistic[Any, Any], ...] = (SCORES, HISTOGRAM, CALIBRATION)
    sections: tuple[Section, ...] = (ScoresSection(),)

    def labels(self, truth: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return truth.reshape(-1).astype(np.int64), (response.reshape(-1) >= 0.5).astype(np.int64)

    def observe(self, truth: object, response: object, request: object = None) -> Observation:
        y = numeric_array(truth, "truth").reshape(-1).astype(np.int64)
        p = numeric_array(response, "response").reshape(-1).astype(np.float64)
        true_score = np.clip(np.where(y == 1, p, 1 - p), EPS, 1 - EPS)
        score_bin = np.minimum((p * SCORE_BINS).astype(np.int64), SCORE_BINS - 1)
        positives = np.bincount(score_bin[y == 1], minlength=SCORE_BINS)
        negatives = np.bincount(score_bin[y != 1], minlength=SCORE_BINS)
        calibration_bin = np.searchsorted(np.linspace(0, 1, CALIBRATION_BINS + 1)[1:-1], p)
        by_bin = [
            np.bincount(calibration_bin, weights=w, minlength=CALIBRATION_BINS)
            for w in (np.ones_like(p), p, (y == 1).astype(np.float64))
        ]
        truth_ids, predicted = self.labels(y, p)
        return Observation(
            cells=Cells.from_labels(truth_ids, predicted),
            updates={
                "scores": [
                    (
                        int(y.size),
                        float(-np.log(true_score).sum()),
                        float(np.square(p - y).sum()),
                        0,
                    )
                ],
                "score_histogram": [(1, vector_bytes(positives), vector_bytes(negatives))],
                "calibration": [tuple(vector_bytes(v) for v in by_bin)],
            },
        )
