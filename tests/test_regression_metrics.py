"""RegressionMetrics: derived metrics equal scikit-learn's after every update of random streams,
two halves of a stream merge into the whole, and bad input is refused with its reason."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    mean_absolute_error,
    mean_absolute_percentage_error,
    mean_squared_error,
    r2_score,
    root_mean_squared_error,
)

from adserver.catalogue import reasons
from adserver.loader import ModelLoadError, load_model, resolve_class
from adserver.models_config import ModelsConfigError, load_models_config
from adserver.settings import Settings
from adserver.state.view import Delta, MetricsState
from cm_models import RegressionMetrics
from cm_models.base import InvalidFeedback
from cm_models.regression_metrics import (
    DEFAULT_ERROR_BUCKETS,
    REGRESSION,
    TRUTH_MOMENTS,
    error_bounds,
)

pytestmark = pytest.mark.unit

Events = list[tuple[list[float], list[float]]]


def close(found: float | None, expected: float) -> None:
    assert found is not None
    assert found == pytest.approx(expected, rel=1e-9, abs=1e-12)


def state_of(model: RegressionMetrics) -> MetricsState:
    return MetricsState(model.classes, model.statistics, model.sections)


def counted(model: RegressionMetrics, state: MetricsState, truth: object, response: object) -> None:
    observation = model.observe(truth, response)
    assert {name: len(items) for name, items in observation.updates.items()} == {
        REGRESSION: 1,
        TRUTH_MOMENTS: 1,
    }  # one row per statistic per event, whatever its rows
    state.apply(Delta(updates=observation.updates))


def assert_r2(found: float | None, y: np.ndarray, p: np.ndarray) -> None:
    """rtol 1e-9 of 1 - R2 too (SSE / SST), so a truth far from zero (1e9 +- 1) cannot hide an
    imprecise variance behind an R2 near 1."""
    expected = r2_score(y, p)
    assert found is not None
    assert found == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 1 - found == pytest.approx(1 - expected, rel=1e-9, abs=1e-12)


def assert_matches_sklearn(
    section: dict[str, Any], truth: list[float], predicted: list[float], bounds: list[float]
) -> None:
    y, p = np.array(truth), np.array(predicted)
    assert section["rows"] == y.size
    close(section["mae"], mean_absolute_error(y, p))
    close(section["mse"], mean_squared_error(y, p))
    close(section["rmse"], root_mean_squared_error(y, p))
    close(section["mape"], mean_absolute_percentage_error(y, p))
    close(section["mean_error"], float(np.mean(p - y)))
    if y.size < 2:
        assert section["r2"] is None
    else:
        assert_r2(section["r2"], y, p)
    errors = np.abs(p - y)
    histogram = section["abs_error"]
    assert histogram["count"] == y.size
    close(histogram["sum"], float(errors.sum()))
    cumulative = [int((errors <= bound).sum()) for bound in bounds] + [int(y.size)]
    assert list(histogram["buckets"].values()) == cumulative
    assert list(histogram["buckets"]) == [*map(repr, bounds), "+Inf"]


def replay(model: RegressionMetrics, events: Events) -> MetricsState:
    """Feed events one by one, checking the oracle after each update."""
    state = state_of(model)
    truth: list[float] = []
    predicted: list[float] = []
    for event_truth, event_response in events:
        counted(model, state, event_truth, event_response)
        truth += event_truth
        predicted += event_response
        section = state.derived()[REGRESSION]
        assert_matches_sklearn(section, truth, predicted, model.bounds.tolist())
    return state


#: Dyadic values (exact sums): constant truth has an exact mean, as scikit-learn's has.
values = st.builds(
    lambda n, k: n / 2**k, st.integers(-(10**6), 10**6), st.integers(0, 12)
)  # fmt: skip
small = st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0])  # ties, zeros in truth, exact bucket edges


@st.composite
def regression_events(draw: st.DrawFn, offset: float = 0.0) -> Events:
    events = []
    for _ in range(draw(st.integers(1, 8))):
        n = draw(st.integers(1, 6))
        pick = st.one_of(values, small)
        truth = [offset + draw(pick) for _ in range(n)]
        events.append((truth, [offset + draw(pick) for _ in range(n)]))
    return events


@settings(max_examples=80, deadline=None)
@given(regression_events())
def test_random_streams_match_sklearn_after_every_update(events: Events) -> None:
    replay(RegressionMetrics(), events)


@settings(max_examples=30, deadline=None)
@given(regression_events(offset=1e9))
def test_truth_around_1e9_keeps_r2_exact(events: Events) -> None:
    """Chan's merge of (count, shift, mean, M2): sum y^2 - (sum y)^2 / n would be noise here."""
    replay(RegressionMetrics(), events)


@settings(max_examples=30, deadline=None)
@given(regression_events(), st.lists(st.floats(0.001, 100.0), min_size=1, max_size=6, unique=True))
def test_configured_buckets(events: Events, bounds: list[float]) -> None:
    replay(RegressionMetrics(error_buckets=sorted(bounds)), events)


def noisy_events(spread: float, batch: int) -> Events:
    rng = np.random.default_rng(7)
    truth = 1e9 + rng.normal(0, spread, 1000)
    predicted = truth + rng.normal(0, spread / 2, 1000)
    return [
        (truth[i : i + batch].tolist(), predicted[i : i + batch].tolist())
        for i in range(0, 1000, batch)
    ]


@pytest.mark.parametrize("batch", [1, 10, 100])
def test_noise_around_1e9_within_rtol(batch: int) -> None:
    section = replay(RegressionMetrics(), noisy_events(1000.0, batch)).derived()[REGRESSION]
    assert 0.5 < section["r2"] < 0.9  # far from the 0 or less a naive variance would give


@pytest.mark.parametrize("batch", [1, 10, 100])
def test_tiny_noise_around_1e9_within_rtol(batch: int) -> None:
    replay(RegressionMetrics(), noisy_events(1.0, batch))


def test_no_rows_no_metrics() -> None:
    section = state_of(RegressionMetrics()).derived()[REGRESSION]
    assert section["rows"] == 0
    for name in ("mae", "mse", "rmse", "r2", "mape", "mean_error"):
        assert section[name] is None
    assert section["abs_error"]["count"] == 0
    assert set(section["abs_error"]["buckets"].values()) == {0}


def test_one_row_has_no_r2() -> None:
    section = replay(RegressionMetrics(), [([3.0], [5.0])]).derived()[REGRESSION]
    assert (section["rows"], section["mae"], section["mse"], section["r2"]) == (1, 2.0, 4.0, None)


@pytest.mark.parametrize(("predicted", "r2"), [([4, 4, 4, 4], 1.0), ([4, 5, 4, 3], 0.0)])
def test_constant_truth_follows_sklearn(predicted: list[float], r2: float) -> None:
    events = [([4, 4], predicted[:2]), ([4, 4], predicted[2:])]
    section = replay(RegressionMetrics(), events).derived()[REGRESSION]
    assert section["r2"] == r2 == r2_score([4] * 4, predicted)
    assert section["mean_error"] == np.mean(predicted) - 4  # exact: integers


def test_zeros_in_truth_use_sklearns_epsilon() -> None:
    section = replay(RegressionMetrics(), [([0.0, 1.0], [0.5, 1.0])]).derived()[REGRESSION]
    assert math.isfinite(section["mape"]) and section["mape"] > 1e14


def test_negative_values() -> None:
    replay(RegressionMetrics(), [([-3.5, -1.0], [-2.0, -8.0]), ([-1e6], [2.5])])


def test_an_error_on_an_edge_counts_in_its_bucket() -> None:
    model = RegressionMetrics(error_buckets=[0.25, 0.5, 1])
    state = replay(model, [([0.0, 0.0, 0.0, 0.0], [0.5, -0.25, 0.75, 3.0])])
    buckets = state.derived()[REGRESSION]["abs_error"]["buckets"]
    assert buckets == {"0.25": 1, "0.5": 2, "1.0": 3, "+Inf": 4}


def test_one_column_and_flat_rows_are_the_same() -> None:
    model = RegressionMetrics()
    flat, column = state_of(model), state_of(model)
    counted(model, flat, [1.5, 2], [1, 2.5])
    counted(model, column, [[1.5], [2]], [[1], [2.5]])
    assert flat.derived() == column.derived()


def rows_of(state: MetricsState, name: str) -> list[tuple[Any, ...]]:
    """What a store would hold of one statistic: key columns, then values."""
    return [(*key, *values) for key, values in state.tables[name].items()]


@settings(max_examples=40, deadline=None)
@given(regression_events(offset=1e9), st.data())
def test_two_halves_merge_into_the_whole(events: Events, data: st.DataObject) -> None:
    model = RegressionMetrics()
    cut = data.draw(st.integers(0, len(events)))
    whole = replay(model, events)
    merged = state_of(model)
    for half in (events[:cut], events[cut:]):
        part = replay(model, half) if half else state_of(model)
        for name in (REGRESSION, TRUTH_MOMENTS):
            merged.load(name, rows_of(part, name))
    found, expected = merged.derived()[REGRESSION], whole.derived()[REGRESSION]
    assert found["rows"] == expected["rows"]  # counts are exact, sums within rounding
    assert found["abs_error"]["buckets"] == expected["abs_error"]["buckets"]
    truth = [t for event, _ in events for t in event]
    predicted = [p for _, event in events for p in event]
    assert_matches_sklearn(found, truth, predicted, model.bounds.tolist())


@pytest.mark.parametrize(
    ("truth", "response", "reason"),
    [
        ([[1, 2], [3, 4]], [1, 2], reasons.NOT_A_REGRESSION_TARGET),
        ([1, 2], [[[1]], [[2]]], reasons.NOT_A_REGRESSION_TARGET),
        ([1e151, 2], [1, 2], reasons.VALUE_TOO_LARGE),
        ([1, 2], [1, -2e150], reasons.VALUE_TOO_LARGE),
        ([1, float("nan")], [1, 2], reasons.NON_FINITE),
        ([1, 2], [1, float("inf")], reasons.NON_FINITE),
        (["a", "b"], [1, 2], reasons.NON_NUMERIC),
        ([1, 2, 3], [1, 2], reasons.ROW_COUNT_MISMATCH),
        (4.0, [1], reasons.SCALAR),
        ([], [], reasons.EMPTY),
        ([[1], [1, 2]], [1, 2], reasons.RAGGED_ROWS),
    ],
)
def test_bad_input_is_refused_with_its_reason(truth: Any, response: Any, reason: str) -> None:
    with pytest.raises(InvalidFeedback) as refused:
        RegressionMetrics().observe(truth, response)
    assert refused.value.reason == reason


def test_a_logged_prediction_is_checked_as_it_is_stored() -> None:
    model = RegressionMetrics()
    np.testing.assert_array_equal(model.rows([[1.5], [2]], "response"), [1.5, 2.0])
    with pytest.raises(InvalidFeedback) as refused:
        model.rows([[1, 2]], "response")
    assert refused.value.reason == reasons.NOT_A_REGRESSION_TARGET


@pytest.mark.parametrize(
    "bounds",
    ["", "1,1", "2,1", "0,1", "-1,1", "1,inf", "1,nan", "a", [True, 2], [], ["1", "x"]],
)
def test_bad_error_buckets_are_refused(bounds: Any) -> None:
    with pytest.raises(ValueError, match="error buckets"):
        error_bounds(bounds)


def test_error_buckets_setting() -> None:
    assert Settings().error_buckets == DEFAULT_ERROR_BUCKETS
    model = load_model(Settings(storage_uri="RegressionMetrics", error_buckets="0.5,2"))
    assert isinstance(model, RegressionMetrics)
    assert model.bounds.tolist() == [0.5, 2.0]
    assert model.statistics[0].width == 3
    with pytest.raises(ModelLoadError, match="--error_buckets '2,1'"):
        load_model(Settings(error_buckets="2,1"))  # refused whatever the model


@pytest.mark.parametrize(
    "path",
    [
        "RegressionMetrics",
        "cm_models.regression_metrics.RegressionMetrics",
        "adserver.cm_models.regression_metrics.RegressionMetrics",
    ],
)
def test_every_spelling_loads_it(path: str) -> None:
    assert resolve_class(path) is RegressionMetrics


def test_a_regressor_has_no_classes() -> None:
    with pytest.raises(ModelLoadError, match="no classes"):
        load_model(Settings(storage_uri="RegressionMetrics", classes=(0, 1)))
    model = RegressionMetrics(score_bins=200, score_range="0,1", threshold=0.5)  # ignored
    assert (model.has_confusion, model.seldon_class_label, model.numeric_rows) == (
        False,
        False,
        True,
    )


def config_file(tmp_path, buckets: Any) -> str:
    path = tmp_path / "models.yaml"
    entry = {"name": "price", "storage_uri": "RegressionMetrics", "error_buckets": buckets}
    path.write_text(yaml.safe_dump({"models": [entry]}))
    return str(path)


def test_models_config_error_buckets(tmp_path) -> None:
    settings = Settings()
    (config,) = load_models_config(config_file(tmp_path, [0.5, 2, 10]), settings)
    model = load_model(config.settings(settings))
    assert isinstance(model, RegressionMetrics)
    assert model.bounds.tolist() == [0.5, 2.0, 10.0]
    with pytest.raises(ModelsConfigError, match="line 2: error buckets must increase"):
        load_models_config(config_file(tmp_path, [2, 1]), settings)
    with pytest.raises(ModelsConfigError, match="must be a list"):
        load_models_config(config_file(tmp_path, "0.5,2"), settings)
