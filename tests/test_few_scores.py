"""The Python path of a few rows' scores gives the rows of the whole-array path, bit for bit."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cm_models.scores import (
    CALIBRATION_EDGES,
    EPS,
    FEW_ROWS,
    FEW_SCORES,
    ScoreScale,
    array_score_updates,
    few_score_updates,
    numpy_sum,
    score_updates,
)

SCALES = [ScoreScale(200, 0.0, 1.0), ScoreScale(2, 0.0, 1.0), ScoreScale(7, -3.0, 5.0)]
#: Scores where binning and clipping turn: bin and calibration edges, the clip's bounds.
EDGES = sorted({0.0, -0.0, EPS, 1.0 - EPS, 1.0, 0.5, 0.005, *CALIBRATION_EDGES.tolist()})


@st.composite
def few_events(draw: st.DrawFn) -> tuple[ScoreScale, np.ndarray, np.ndarray, bool]:
    """1-4 rows of a binary model (one score or two columns) or of 2-16 classes, normalised
    (as predict_proba's) or not, with scores on the edges that matter."""
    scale = draw(st.sampled_from(SCALES))
    rows = draw(st.integers(1, FEW_ROWS))
    kind = draw(st.sampled_from(["flat", "two", "classes"]))
    classes = 2 if kind != "classes" else draw(st.integers(2, FEW_SCORES // rows))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    edges = [e for e in EDGES if scale.low <= e <= scale.high]
    scores = rng.uniform(scale.low, scale.high, (rows, classes))
    scores = np.where(rng.random(scores.shape) < 0.3, rng.choice(edges, scores.shape), scores)
    if scale.probabilities and draw(st.booleans()):
        scores = rng.dirichlet(np.ones(classes), rows)
    truth = rng.integers(0, classes, rows)
    if kind == "flat":
        return scale, truth, scores[:, 1].copy(), True
    return scale, truth, scores, kind == "two"


@settings(max_examples=400, deadline=None)
@given(few_events())
def test_few_rows_give_the_array_paths_rows_bit_for_bit(
    event: tuple[ScoreScale, np.ndarray, np.ndarray, bool],
) -> None:
    few: Any = few_score_updates(*event)
    whole: Any = array_score_updates(*event)
    assert repr(few) == repr(whole)  # repr: -0.0 and 0.0 differ, floats to the last bit
    assert repr(score_updates(*event)) == repr(whole)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=0, max_size=128))
def test_numpy_sum_is_numpys(values: list[float]) -> None:
    assert repr(numpy_sum(values)) == repr(float(np.sum(np.array(values, dtype=np.float64))))
