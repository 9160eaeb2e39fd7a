"""scikit-learn's probabilistic metrics over the rows sent, compared with a ``scores`` section
(in-memory states for the oracle tests, and a server's JSON summary)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from adserver.state.view import Delta, MetricsState
from cm_models.base import MetricModel
from cm_models.scores import CALIBRATION_BINS

RTOL = 1e-9
#: Float slack on top of the exported bound (sums of up to a few hundred terms).
SLACK = 1e-12


def fresh(model: MetricModel) -> MetricsState:
    return MetricsState(model.classes, model.statistics, model.sections)


def add(state: MetricsState, model: MetricModel, truth: Any, response: Any) -> None:
    observation = model.observe(truth, response)
    state.apply(Delta(cells=observation.cells, updates=observation.updates))


def scores_of(state: MetricsState) -> dict[str, Any]:
    return state.derived()["scores"]


def assert_close(found: Any, expected: Any) -> None:
    """Nested dicts and lists equal, floats within RTOL (sums added in another order)."""
    if isinstance(expected, dict):
        assert found.keys() == expected.keys()
        for key in expected:
            assert_close(found[key], expected[key])
    elif isinstance(expected, list):
        assert len(found) == len(expected)
        for a, b in zip(found, expected, strict=True):
            assert_close(a, b)
    elif isinstance(expected, float):
        assert found == pytest.approx(expected, rel=RTOL, abs=1e-15)
    else:
        assert found == expected


def assert_auc_within(found: dict[str, Any], expected: float) -> None:
    assert abs(found["auc"] - expected) <= found["error_bound"] + SLACK


def assert_scores(
    section: dict[str, Any], truth: np.ndarray, scores: np.ndarray, binary: bool, width: int
) -> None:
    """``scores``: (rows, width) for a multiclass model; a binary model's rows as sent."""
    labels = [0, 1] if binary else list(range(width))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rows that do not sum to 1, as sent
        assert section["log_loss"] == pytest.approx(
            log_loss(truth, scores, labels=labels), rel=RTOL
        )
        positive = (scores[:, 1] if scores.ndim == 2 else scores) if binary else scores
        assert section["brier_score"] == pytest.approx(
            brier_score_loss(truth, positive, labels=labels, scale_by_half=binary), rel=RTOL
        )
    assert section["rows"] == truth.size
    columns = {1: positive} if binary else {k: scores[:, k] for k in range(width)}
    expected = {}
    for k, column in columns.items():
        found = section["roc_auc"]["per_class"][str(k)]
        if (truth == k).all() or (truth != k).all():
            assert found == {"auc": None, "error_bound": None}
            continue
        expected[k] = roc_auc_score(truth == k, column)
        assert_auc_within(found, expected[k])
    averages = section["roc_auc"]
    if not expected:
        assert averages["macro"] == averages["weighted"] == {"auc": None, "error_bound": None}
    else:
        assert_auc_within(averages["macro"], float(np.mean(list(expected.values()))))
        weights = [float((truth == k).sum()) for k in expected]
        assert_auc_within(
            averages["weighted"], float(np.average(list(expected.values()), weights=weights))
        )
    if binary:
        confidence, correct = positive, truth == 1
    else:
        confidence, correct = scores.max(axis=1), scores.argmax(axis=1) == truth
    assert_calibration(section["calibration"], confidence, correct)


def assert_calibration(found: dict[str, Any], confidence: np.ndarray, correct: np.ndarray) -> None:
    prob_true, prob_pred = calibration_curve(
        correct.astype(int), confidence, n_bins=CALIBRATION_BINS, pos_label=1
    )
    kept = [b for b in found["bins"] if b["rows"]]
    assert sum(b["rows"] for b in found["bins"]) == confidence.size
    np.testing.assert_allclose([b["observed"] for b in kept], prob_true, rtol=RTOL)
    np.testing.assert_allclose([b["mean_score"] for b in kept], prob_pred, rtol=RTOL)
    ece = sum(b["rows"] / confidence.size * abs(b["observed"] - b["mean_score"]) for b in kept)
    assert found["ece"] == pytest.approx(ece, rel=RTOL, abs=1e-15)
