"""Probabilistic metrics equal scikit-learn's after every update of random streams: log loss and
Brier exactly (rtol 1e-9), ROC AUC within the exported bound, calibration bins equal."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from adserver.catalogue import reasons
from adserver.models_config import ModelsConfigError, load_models_config
from adserver.settings import Settings
from adserver.state.view import Delta
from cm_models import BinaryMetrics, MulticlassOneHot
from cm_models.base import InvalidFeedback, MetricModel
from cm_models.scores import PROBABILITIES, ScoreScale
from cm_models.statistics import vector_array
from tests.support.scores import (
    RTOL,
    add,
    assert_auc_within,
    assert_close,
    assert_scores,
    fresh,
    scores_of,
)

# --------------------------------------------------------------------------- random streams

#: Scores that land on histogram (k/200) and calibration (k/15) bin edges, and anywhere.
edges = st.sampled_from(sorted({k / 200 for k in range(201)} | {k / 15 for k in range(16)}))
unit_scores = st.one_of(edges, st.floats(0.0, 1.0))


def scored() -> MulticlassOneHot:
    """MulticlassOneHot keeping its scores (its default, auto, keeps none)."""
    return MulticlassOneHot(score_range=PROBABILITIES)


@st.composite
def multiclass_streams(draw: st.DrawFn) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]]:
    width = draw(st.integers(2, 5))
    events = []
    for _ in range(draw(st.integers(1, 6))):
        rows = draw(st.integers(1, 8))
        truth = np.array(draw(st.lists(st.integers(0, width - 1), min_size=rows, max_size=rows)))
        raw = np.array(
            draw(st.lists(unit_scores, min_size=rows * width, max_size=rows * width))
        ).reshape(rows, width)
        if draw(st.booleans()):  # probabilities; else rows as sent (counted unnormalised)
            raw = np.where(raw.sum(axis=1, keepdims=True) > 0, raw, 1.0)
            raw = raw / raw.sum(axis=1, keepdims=True)
        events.append((truth, raw))
    return width, events


@settings(max_examples=60, deadline=None)
@given(multiclass_streams())
def test_multiclass_scores_match_sklearn_after_every_event(
    stream: tuple[int, list[tuple[np.ndarray, np.ndarray]]],
) -> None:
    width, events = stream
    model = scored()
    state = fresh(model)
    truth, scores = np.zeros(0, dtype=int), np.zeros((0, width))
    for event_truth, event_scores in events:
        add(state, model, np.eye(width)[event_truth].tolist(), event_scores.tolist())
        truth = np.concatenate([truth, event_truth])
        scores = np.concatenate([scores, event_scores])
        assert_scores(scores_of(state), truth, scores, binary=False, width=width)
    sums = scores.sum(axis=1)
    assert scores_of(state)["unnormalised_rows"] == int((~np.isclose(sums, 1, rtol=1.5e-8)).sum())


@st.composite
def binary_streams(draw: st.DrawFn) -> list[tuple[np.ndarray, list[Any]]]:
    events = []
    for _ in range(draw(st.integers(1, 6))):
        rows = draw(st.integers(1, 8))
        truth = np.array(draw(st.lists(st.integers(0, 1), min_size=rows, max_size=rows)))
        p = draw(st.lists(unit_scores, min_size=rows, max_size=rows))
        form = draw(st.sampled_from(["flat", "column", "proba"]))
        sent = {"flat": p, "column": [[x] for x in p], "proba": [[1 - x, x] for x in p]}[form]
        events.append((truth, sent))
    return events


@settings(max_examples=60, deadline=None)
@given(binary_streams())
def test_binary_scores_match_sklearn_after_every_event(
    events: list[tuple[np.ndarray, list[Any]]],
) -> None:
    """A flat score, a one-column score and predict_proba's two columns all score class 1."""
    model = BinaryMetrics()
    state = fresh(model)
    truth, positive = np.zeros(0, dtype=int), np.zeros(0)
    for event_truth, sent in events:
        add(state, model, event_truth.tolist(), sent)
        array = np.asarray(sent, dtype=float)
        truth = np.concatenate([truth, event_truth])
        positive = np.concatenate([positive, array[:, -1] if array.ndim == 2 else array])
        assert_scores(scores_of(state), truth, positive, binary=True, width=2)


# --------------------------------------------------------------------------- edge cases


def test_a_class_never_seen_has_no_auc_and_no_weight() -> None:
    model = scored()
    state = fresh(model)
    truth = np.array([0, 1, 0, 1])
    scores = np.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.4, 0.4, 0.2], [0.5, 0.4, 0.1]])
    add(state, model, np.eye(3)[truth].tolist(), scores.tolist())
    section = scores_of(state)
    assert section["roc_auc"]["per_class"]["2"] == {"auc": None, "error_bound": None}
    assert_scores(section, truth, scores, binary=False, width=3)


def test_ties_in_one_bin_count_half_and_bound_the_error() -> None:
    """Every pair shares a bin: AUC 0.5 with the widest bound, and sklearn's 0.5 inside it."""
    model = BinaryMetrics()
    state = fresh(model)
    add(state, model, [0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3])
    assert scores_of(state)["roc_auc"]["per_class"]["1"] == {"auc": 0.5, "error_bound": 0.5}
    state = fresh(model)
    add(state, model, [0, 1], [0.3001, 0.3002])  # one bin of 200: ordered, yet a tie
    assert scores_of(state)["roc_auc"]["per_class"]["1"] == {"auc": 0.5, "error_bound": 0.5}
    fine = BinaryMetrics(score_bins=10_000)
    state = fresh(fine)
    add(state, fine, [0, 1], [0.3001, 0.3004])  # more bins: told apart, no bound left
    assert scores_of(state)["roc_auc"]["per_class"]["1"] == {"auc": 1.0, "error_bound": 0.0}


def test_scores_on_bin_edges() -> None:
    """k/B opens bin k (1.0 is in the last); an inner k/15 falls in calibration's lower bin."""
    scale = ScoreScale(200, 0.0, 1.0)
    edges = np.array([0.0, 1 / 200, 0.5, 199 / 200, 1.0])
    assert scale.bin_of(edges).tolist() == [0, 1, 100, 199, 199]
    model = BinaryMetrics()
    state = fresh(model)
    scores = np.array([k / 15 for k in range(16)])
    truth = np.arange(16) % 2
    add(state, model, truth.tolist(), scores.tolist())
    section = scores_of(state)
    assert [b["rows"] for b in section["calibration"]["bins"]] == [2] + [1] * 14
    assert_scores(section, truth, scores, binary=True, width=2)


def test_one_row() -> None:
    model = scored()
    state = fresh(model)
    add(state, model, [0, 1], [0.25, 0.75])
    section = scores_of(state)
    assert section["rows"] == 1
    assert section["log_loss"] == pytest.approx(-np.log(0.75), rel=RTOL)
    assert section["brier_score"] == pytest.approx(2 * 0.25**2, rel=RTOL)
    assert section["roc_auc"]["macro"] == {"auc": None, "error_bound": None}
    assert section["calibration"]["ece"] == pytest.approx(0.25)


def test_no_rows_derive_nothing() -> None:
    section = scores_of(fresh(scored()))
    assert (section["rows"], section["log_loss"], section["brier_score"]) == (0, None, None)
    assert section["calibration"]["ece"] is None
    assert section["roc_auc"]["per_class"] == {}


def test_binary_flat_and_predict_proba_agree() -> None:
    model = BinaryMetrics()
    flat, proba = fresh(model), fresh(model)
    truth, p = [0, 1, 1, 0, 1], [0.1, 0.9, 0.35, 0.6, 1.0]
    add(flat, model, truth, p)
    add(proba, model, truth, [[1 - x, x] for x in p])
    assert scores_of(flat) == scores_of(proba)  # 1 - p is class 0's column either way
    assert list(scores_of(flat)["roc_auc"]["per_class"]) == ["1"]


@pytest.mark.parametrize(
    ("model", "truth", "response"),
    [
        (scored(), [[0, 1, 0], [1, 0, 0], [0, 0, 1]], [[0, 1, 0], [0, 0, 1], [0, 0, 1]]),
        (BinaryMetrics(), [1, 0, 1], [1, 0, 0]),
        (BinaryMetrics(), [1, 0, 1], [[0, 1], [1, 0], [1, 0]]),
    ],
)
def test_integer_scores_count_as_floats(model: MetricModel, truth: Any, response: Any) -> None:
    """One-hot predictions sent as integers are scores of 0 and 1 (computed in float64)."""
    ints, floats = fresh(model), fresh(model)
    add(ints, model, truth, response)
    add(floats, model, truth, np.array(response, dtype=float).tolist())
    assert scores_of(ints) == scores_of(floats)
    assert scores_of(ints)["rows"] == 3


@pytest.mark.parametrize(
    ("model", "truth", "response"),
    [
        (scored(), [[True, False], [False, True]], [[True, False], [True, False]]),
        (BinaryMetrics(), [1, 0], [True, False]),
        (BinaryMetrics(), [1, 0], [[False, True], [True, False]]),
    ],
)
def test_boolean_scores_count_as_0_and_1(model: MetricModel, truth: Any, response: Any) -> None:
    """JSON true/false are numbers to numpy (the seed counted them): scores of 1 and 0."""
    bools, floats = fresh(model), fresh(model)
    add(bools, model, truth, response)
    as_floats = [np.array(values, dtype=float).tolist() for values in (truth, response)]
    add(floats, model, *as_floats)
    assert scores_of(bools) == scores_of(floats)
    assert scores_of(bools)["rows"] == 2


def test_log_loss_clips_certain_mistakes() -> None:
    model = scored()
    state = fresh(model)
    add(state, model, [[1, 0], [0, 1]], [[0.0, 1.0], [0.0, 1.0]])
    expected = log_loss([0, 1], [[0.0, 1.0], [0.0, 1.0]], labels=[0, 1])
    assert scores_of(state)["log_loss"] == pytest.approx(expected, rel=RTOL)


def test_another_range_gives_auc_only() -> None:
    """Logits in [-10, 10]: not probabilities, so no log loss, Brier or calibration."""
    model = MulticlassOneHot(score_range="-10,10", score_bins=1000)
    assert [s.name for s in model.statistics] == ["scores", "score_histogram"]
    state = fresh(model)
    truth = np.array([0, 1, 2, 1, 0])
    logits = np.array([[3, -1, 0.5], [-2, 4, 1], [0, 0, 9], [1, 2, -3], [-10, 10, 0]])
    add(state, model, np.eye(3)[truth].tolist(), logits.tolist())
    section = scores_of(state)
    assert (section["log_loss"], section["brier_score"], section["calibration"]) == (None,) * 3
    assert section["unnormalised_rows"] == 0
    for k in range(3):
        assert_auc_within(
            section["roc_auc"]["per_class"][str(k)], roc_auc_score(truth == k, logits[:, k])
        )
    with pytest.raises(InvalidFeedback) as refused:
        model.observe([[1, 0, 0]], [[11, 0, 0]])
    assert refused.value.reason == reasons.SCORE_OUT_OF_RANGE


def test_scores_off_behaves_as_before() -> None:
    onehot = MulticlassOneHot(score_range="off")
    assert (onehot.statistics, onehot.sections) == ((), ())
    observation = onehot.observe([[0, 1]], [[-3.0, 7.5]])  # any numbers: the argmax
    assert observation.updates == {} and observation.cells.rows == 1
    binary = BinaryMetrics(score_range="off")
    with pytest.raises(InvalidFeedback) as refused:
        binary.observe([1], [1.5])
    assert refused.value.reason == reasons.NOT_BINARY


# --------------------------------------------------------------------------- merge


def test_two_halves_loaded_equal_the_whole() -> None:
    """Rows of each half's statistics (vectors as bytes), loaded into one state, derive what
    the whole stream derives."""
    rng = np.random.default_rng(7)
    model = scored()
    whole, merged = fresh(model), fresh(model)
    halves: list[list[Delta]] = [[], []]
    for i in range(20):
        truth = rng.integers(0, 4, size=30)
        scores = rng.dirichlet(np.ones(4), size=30)
        observation = model.observe(np.eye(4)[truth].tolist(), scores.tolist())
        delta = Delta(cells=observation.cells, updates=observation.updates)
        whole.apply(delta)
        halves[i % 2].append(delta)
    for half in halves:
        for statistic in model.statistics:
            items = [item for delta in half for item in delta.parts.get(statistic.name, ())]
            merged.load(statistic.name, list(statistic.rows(items)))
    assert_close(scores_of(merged), scores_of(whole))
    assert scores_of(merged)["rows"] == 600


def test_one_histogram_row_per_class_and_one_row_else() -> None:
    model = MulticlassOneHot(score_bins=50, score_range=PROBABILITIES)
    observation = model.observe(np.eye(3)[[0, 1, 2, 2]].tolist(), np.full((4, 3), 1 / 3).tolist())
    assert {name: len(items) for name, items in observation.updates.items()} == {
        "score_histogram": 3,
        "scores": 1,
        "calibration": 1,
    }
    _, counts = observation.updates["score_histogram"][2]
    assert vector_array(counts).size == 2 * 50


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("model", "truth", "response", "reason"),
    [
        (scored(), [[0, 1]], [[-0.1, 1.1]], reasons.SCORE_OUT_OF_RANGE),
        (scored(), [[0, 1]], [[0.5, 1.0000001]], reasons.SCORE_OUT_OF_RANGE),
        (BinaryMetrics(), [1], [1.5], reasons.SCORE_OUT_OF_RANGE),
        (BinaryMetrics(), [1], [[0.5, -0.5]], reasons.SCORE_OUT_OF_RANGE),
        (scored(), [[0, 1]], [[float("nan"), 1.0]], reasons.NON_FINITE),
        (BinaryMetrics(), [1], [float("inf")], reasons.NON_FINITE),
        (scored(), [[0, 1]], [["a", "b"]], reasons.NON_NUMERIC),
        (scored(), [[0, 1], [1, 0]], [[0.5, 0.5]], reasons.ROW_COUNT_MISMATCH),
        (BinaryMetrics(), [1, 0], [0.5], reasons.ROW_COUNT_MISMATCH),
    ],
)
def test_bad_scores_are_refused(model: MetricModel, truth: Any, response: Any, reason: str) -> None:
    with pytest.raises(InvalidFeedback) as refused:
        model.observe(truth, response)
    assert refused.value.reason == reason


def test_logged_responses_out_of_range_are_refused_when_logged() -> None:
    """rows() of a response checks the range (a later label never fails on it); truth not."""
    for model, response in ((scored(), [[0.2, 1.2]]), (BinaryMetrics(), [2.0])):
        with pytest.raises(InvalidFeedback) as refused:
            model.rows(response, "response")
        assert refused.value.reason == reasons.SCORE_OUT_OF_RANGE
    logits = MulticlassOneHot(score_range="2,3")
    assert logits.rows([[0, 1]], "truth").tolist() == [[0, 1]]


def test_unnormalised_rows_are_counted_and_scored_as_sent(caplog: pytest.LogCaptureFixture) -> None:
    model = MulticlassOneHot(name="unnormalised", score_range=PROBABILITIES)
    state = fresh(model)
    sent = [[0.2, 0.2], [0.9, 0.6], [0.5, 0.5]]
    with caplog.at_level("WARNING", logger="cm_models.scores"):
        add(state, model, [[1, 0], [0, 1], [1, 0]], sent)
        add(state, model, [[1, 0]], [[0.1, 0.1]])
    section = scores_of(state)
    assert section["unnormalised_rows"] == 3
    as_sent = -np.mean(np.log([0.2, 0.6, 0.5, 0.1]))
    assert section["log_loss"] == pytest.approx(as_sent, rel=RTOL)  # not renormalised
    warned = [r for r in caplog.records if "not renormalised" in r.getMessage()]
    assert len(warned) == 1  # once a minute at most


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options",
    [
        {"score_bins": 1},
        {"score_bins": 10_001},
        {"score_bins": True},
        {"score_bins": "200"},
        {"score_range": "1,0"},
        {"score_range": "a,b"},
        {"score_range": "0,inf"},
        {"score_range": "0,1,2"},
        {"score_range": 3},
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="score_"):
        MulticlassOneHot(**options)


def write_config(tmp_path: Path, lines: Sequence[str]) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n  - name: m\n    storage_uri: BinaryMetrics\n"
        + "".join(f"    {line}\n" for line in lines)
    )
    return str(path)


@pytest.mark.parametrize(
    ("lines", "bins", "scores_range"),
    [
        ([], 200, "auto"),
        (["score_range: auto"], 200, "auto"),
        (["score_bins: 50", "score_range: [-1, 1]"], 50, "-1.0,1.0"),
        (["score_range: off"], 200, "off"),
        (["score_range: '0,2'"], 200, "0.0,2.0"),
    ],
)
def test_models_config_keys(tmp_path: Path, lines: list[str], bins: int, scores_range: str) -> None:
    (config,) = load_models_config(write_config(tmp_path, lines), Settings())
    model_settings = config.settings(Settings())
    assert (model_settings.score_bins, model_settings.score_range) == (bins, scores_range)


@pytest.mark.parametrize("line", ["score_bins: 1", "score_range: [1, 0]", "score_range: yes"])
def test_models_config_refuses_bad_keys_naming_the_line(tmp_path: Path, line: str) -> None:
    with pytest.raises(ModelsConfigError, match=r"line 4: `score_"):
        load_models_config(write_config(tmp_path, [line]), Settings())


def test_a_binary_threshold_splits_the_configured_range() -> None:
    """Logits (--score_range -10,10) are split at 0; probabilities keep (0, 1]."""
    logits = BinaryMetrics(score_range="-10,10", threshold=0.0)
    cells = logits.observe([1, 0, 1], [0.2, -3.0, -0.1]).cells
    assert cells is not None
    assert sorted(zip(cells.truth.tolist(), cells.prediction.tolist())) == [(0, 0), (1, 0), (1, 1)]
    with pytest.raises(ValueError, match="threshold"):
        BinaryMetrics(threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        BinaryMetrics(score_range="-10,10", threshold=10.5)


def test_auto_keeps_the_binary_models_scores_and_the_multiclass_one_s_argmax() -> None:
    """The default: BinaryMetrics scores [0, 1] (it refused others before); MulticlassOneHot
    keeps none, so the reference's args take logits as they did, at their old cost."""
    assert BinaryMetrics().sections and not MulticlassOneHot().sections
    assert MulticlassOneHot().observe([[0, 1]], [[-3.0, 7.5]]).rows == 1
    with pytest.raises(InvalidFeedback):
        BinaryMetrics().observe([1], [1.5])
