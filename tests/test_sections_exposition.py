"""Models' sections in every reader: the JSON summary, the Prometheus families (text and
OpenMetrics, each once, promtool-clean), the window gauges and range documents.

The models are the server's own: RegressionMetrics and BinaryMetrics (with scores); a
classifier without sections beside them shows that nothing else changes. The readers are tested
in process on their states, then through a real server (its gauges against scikit-learn's
metrics of the rows sent).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import numpy as np
import orjson
import pytest
import requests
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    brier_score_loss,
    log_loss,
    roc_auc_score,
)

from adserver.catalogue import families
from adserver.catalogue.families import EVENTS_ACCEPTED, ROWS_ACCEPTED
from adserver.exposition.collector import FeedbackCollector, ModelSource
from adserver.exposition.summary import SummaryCache
from adserver.exposition.windows import RangeDocuments, RangeQuery, WindowGauges
from adserver.state.buckets import DEFAULT_BUCKETS, TimeBuckets
from adserver.state.reads import WindowKey
from adserver.state.view import Delta, MetricsState
from cm_models.binary_metrics import BinaryMetrics
from cm_models.multiclass_numeric import MultiClassNumeric
from cm_models.protocol import FeedbackModel
from cm_models.regression_metrics import RegressionMetrics
from cm_models.scores import CALIBRATION_BINS
from tests.support.events import ce_headers, feedback
from tests.support.http import model_doc
from tests.support.processes import ServerFactory
from tests.support.regression import sklearn_regression
from tests.support.scores import RTOL, SLACK
from tests.test_exposition_encoder import registry_of
from tests.test_models_exposition import OPENMETRICS, TEXT, by_model, exposition

CONFIG = """\
models:
  - name: reg
    storage_uri: RegressionMetrics
    error_buckets: [0.5, 1, 5]
  - name: bin
    storage_uri: BinaryMetrics
  - name: iris
    storage_uri: MultiClassNumeric
"""
ROWS = {
    "reg": ([1.0, 2.0, 4.0, 10.0], [1.5, 1.0, 4.0, 16.0]),
    "bin": ([1, 0, 1, 1, 0], [0.9, 0.2, 0.4, 0.7, 0.65]),
    "iris": ([0, 1, 2], [0, 1, 1]),
}
CLASSIFICATION_KEYS = {
    "classes",
    "confusion_matrix",
    "accuracy",
    "per_class",
    "macro",
    "weighted",
    "micro",
}
WINDOW = "1h"
STEP = 3600
MODELS: dict[str, FeedbackModel] = {
    "reg": RegressionMetrics("reg", error_buckets="0.5,1,5"),
    "bin": BinaryMetrics("bin"),
    "iris": MultiClassNumeric("iris"),
}


def observed(name: str) -> MetricsState:
    """A model's state after its ROWS, as the ingest core counts one event."""
    model = MODELS[name]
    state = MetricsState.for_model(model)
    observation = model.observe(*ROWS[name])
    counters = ((ROWS_ACCEPTED, "", observation.rows), (EVENTS_ACCEPTED, "", 1))
    state.apply(Delta(cells=observation.cells, counters=counters, updates=observation.updates))
    return state


@pytest.fixture(scope="module")
def states() -> dict[str, MetricsState]:
    return {name: observed(name) for name in MODELS}


def in_process(states: dict[str, MetricsState]) -> dict[str, str]:
    """The exposition of the states, in both formats (as the server renders the same families)."""
    sources = [
        ModelSource(
            name,
            state,
            has_confusion=MODELS[name].has_confusion,
            seldon_class_label=MODELS[name].seldon_class_label,
            seldon_labels={"model_name": name, "method": "feedback"},
        )
        for name, state in states.items()
    ]
    registry = registry_of(FeedbackCollector("srv", sources))
    return {
        TEXT: generate_latest(registry).decode(),
        OPENMETRICS: openmetrics_latest(registry).decode(),
    }


def documents(states: dict[str, MetricsState]) -> dict[str, dict[str, Any]]:
    return {name: SummaryCache(state).document() for name, state in states.items()}


def parse(texts: dict[str, str]) -> dict[str, dict[str, Metric]]:
    """Both formats parsed by prometheus_client, each family once (the OpenMetrics parser also
    refuses a family whose metadata repeats)."""
    parsed_texts = {
        TEXT: list(text_families(texts[TEXT])),
        OPENMETRICS: list(openmetrics_families(texts[OPENMETRICS])),
    }
    found = {}
    for accept, metrics in parsed_texts.items():
        names = [metric.name for metric in metrics]
        assert len(names) == len(set(names)), (accept, Counter(names).most_common(3))
        found[accept] = {metric.name: metric for metric in metrics}
    return found


def one_value(family: Metric, model: str, **labels: str) -> float:
    [value] = [
        v for ls, v in by_model(family)[model] if all(ls.get(k) == x for k, x in labels.items())
    ]
    return value


def check_regressor_summary(doc: dict[str, Any]) -> None:
    assert set(doc) == {"rows", "events", "predictions", "label_coverage", "regression"}
    regression = doc["regression"]
    assert regression["rows"] == doc["rows"] == 4
    truth, response = ROWS["reg"]
    errors = [p - y for y, p in zip(truth, response)]
    assert regression["mae"] == pytest.approx(sum(map(abs, errors)) / 4)
    assert regression["mean_error"] == pytest.approx(sum(errors) / 4)
    assert regression["abs_error"]["buckets"] == {"0.5": 2, "1.0": 3, "5.0": 3, "+Inf": 4}


def check_scorer_summary(doc: dict[str, Any], iris: dict[str, Any]) -> None:
    assert {"classes", "confusion_matrix", "accuracy", "per_class", "scores"} <= set(doc)
    assert doc["scores"]["rows"] == 5
    assert doc["scores"]["roc_auc"]["per_class"]["1"]["auc"] == pytest.approx(5 / 6)
    assert "scores" not in iris and "regression" not in iris
    assert CLASSIFICATION_KEYS - {"micro"} <= set(iris)


def check_families(metrics: dict[str, Metric], docs: dict[str, dict[str, Any]]) -> None:
    """Every section family with the values of the derived sections; only the models with the
    section have samples; a regressor has no confusion families."""
    regression, scores = docs["reg"]["regression"], docs["bin"]["scores"]
    for key, declared in families.REGRESSION_GAUGES.items():
        assert by_model(metrics[declared.name]).keys() == {"reg"}, declared.name
        assert one_value(metrics[declared.name], "reg") == pytest.approx(regression[key])
    rows = metrics[families.REGRESSION_COUNTERS["rows"].name]
    assert one_value(rows, "reg") == 4
    squared = metrics[families.REGRESSION_COUNTERS["squared_error_sum"].name]
    assert one_value(squared, "reg") == pytest.approx(regression["mse"] * 4)
    error_sum = one_value(metrics[families.REGRESSION_ERROR_SUM.name], "reg")
    assert error_sum == pytest.approx(regression["mean_error"] * 4)
    histogram = metrics[families.REGRESSION_ABS_ERROR.name]
    buckets = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    [total] = [s.value for s in histogram.samples if s.name.endswith("_sum")]
    assert total == pytest.approx(regression["abs_error"]["sum"])
    want = regression["abs_error"]["buckets"]
    assert {float(k): v for k, v in buckets.items()} == {float(k): v for k, v in want.items()}
    for key, declared in families.SCORE_GAUGES.items():
        assert one_value(metrics[declared.name], "bin") == pytest.approx(scores[key])
    auc = scores["roc_auc"]
    one = {"class": "1"}
    got = one_value(metrics[families.ROC_AUC.name], "bin", **one)
    assert got == pytest.approx(auc["per_class"]["1"]["auc"])
    bound = one_value(metrics[families.ROC_AUC_ERROR_BOUND.name], "bin", **one)
    assert bound == pytest.approx(auc["per_class"]["1"]["error_bound"])
    for average in ("macro", "weighted"):
        got = one_value(metrics[families.ROC_AUC_AVERAGE.name], "bin", average=average)
        assert got == pytest.approx(auc[average]["auc"])
        bound_family = metrics[families.ROC_AUC_AVERAGE_ERROR_BOUND.name]
        got = one_value(bound_family, "bin", average=average)
        assert got == pytest.approx(auc[average]["error_bound"])
    ece = metrics[families.EXPECTED_CALIBRATION_ERROR.name]
    assert one_value(ece, "bin") == pytest.approx(scores["calibration"]["ece"])
    bins = scores["calibration"]["bins"]
    for key, declared in families.CALIBRATION_GAUGES.items():
        exported = {ls["bin"]: v for ls, v in by_model(metrics[declared.name])["bin"]}
        assert exported == {
            f"{b['upper']:.4g}": pytest.approx(b[key]) for b in bins if b[key] is not None
        }
    calibration_rows = metrics[families.CALIBRATION_COUNTERS["rows"].name]
    exported = {ls["bin"]: v for ls, v in by_model(calibration_rows)["bin"]}
    assert exported == {f"{b['upper']:.4g}": b["rows"] for b in bins}
    assert one_value(metrics[families.SCORE_COUNTERS["rows"].name], "bin") == 5
    for declared in (families.CONFUSION_MATRIX, families.ACCURACY, *families.PER_CLASS.values()):
        assert by_model(metrics[declared.name]).keys() == {"bin", "iris"}, declared.name
    assert "reg" not in by_model(metrics["seldon_metric_true_positive"], "model_name")


def test_a_regressors_summary_has_its_section_and_no_classification(
    states: dict[str, MetricsState],
) -> None:
    docs = documents(states)
    check_regressor_summary(docs["reg"])
    assert SummaryCache(states["reg"]).summary() == docs["reg"]  # replies: the same keys


def test_a_scorers_summary_keeps_its_classification(states: dict[str, MetricsState]) -> None:
    docs = documents(states)
    check_scorer_summary(docs["bin"], docs["iris"])


def test_segments_show_their_sections(states: dict[str, MetricsState]) -> None:
    doc = SummaryCache(states["reg"]).document({"a": states["reg"], "b": states["reg"].like()})
    assert doc["segments"]["a"]["regression"] == doc["regression"]
    assert set(doc["segments"]["b"]) == {
        "rows",
        "events",
        "predictions",
        "label_coverage",
        "regression",
    }
    assert doc["segments"]["b"]["regression"]["mae"] is None


def test_every_section_family_once_with_the_derived_values(
    states: dict[str, MetricsState],
) -> None:
    for metrics in parse(in_process(states)).values():
        check_families(metrics, documents(states))


#: Every family of the sections, the window gauges' included.
SECTION_FAMILIES = (
    *families.REGRESSION_GAUGES.values(),
    *families.REGRESSION_COUNTERS.values(),
    families.REGRESSION_ERROR_SUM,
    families.REGRESSION_ABS_ERROR,
    *families.SCORE_GAUGES.values(),
    families.EXPECTED_CALIBRATION_ERROR,
    families.ROC_AUC,
    families.ROC_AUC_ERROR_BOUND,
    families.ROC_AUC_AVERAGE,
    families.ROC_AUC_AVERAGE_ERROR_BOUND,
    *families.CALIBRATION_GAUGES.values(),
    *families.SCORE_COUNTERS.values(),
    *families.CALIBRATION_COUNTERS.values(),
    *families.WINDOW_SECTIONS.values(),
)


def test_without_sections_no_section_family(states: dict[str, MetricsState]) -> None:
    """The seed's models export what they did (their golden files only gain nothing)."""
    text = in_process({"iris": states["iris"]})[TEXT]
    assert families.ACCURACY.name in text
    for declared in SECTION_FAMILIES:
        assert f"# TYPE {declared.exposed} " not in text, declared.name


def test_each_section_family_is_exported(states: dict[str, MetricsState]) -> None:
    metrics = parse(in_process(states))[TEXT]
    exported = {*metrics, *window_values(states)}
    assert {declared.name for declared in SECTION_FAMILIES} <= exported


def test_an_empty_section_exports_counters_and_no_undefined_gauge() -> None:
    empty = {"reg": MetricsState.for_model(MODELS["reg"])}
    metrics = parse(in_process(empty))[TEXT]
    assert one_value(metrics[families.REGRESSION_COUNTERS["rows"].name], "reg") == 0
    assert not metrics[families.REGRESSION_GAUGES["mae"].name].samples


@pytest.mark.e2e
def test_promtool_passes_the_section_families(states: dict[str, MetricsState]) -> None:
    from tests.prometheus import require_program
    from tests.test_promtool_metrics import assert_no_problems, check_metrics

    text = in_process(states)[TEXT]
    assert_no_problems(check_metrics(require_program("promtool"), text))


class Found:
    """A bucket reader that finds the given states in every window."""

    def __init__(self, states: dict[WindowKey, MetricsState]) -> None:
        self.states = states

    async def read_windows(self, spans: list[list[int]]) -> list[dict[WindowKey, MetricsState]]:
        return [self.states for _ in spans]

    async def read_range(self, *_: object) -> list[MetricsState]:
        raise NotImplementedError


def window_values(states: dict[str, MetricsState]) -> dict[str, Metric]:
    buckets = TimeBuckets.parse(DEFAULT_BUCKETS)
    found = {(name, ""): state for name, state in states.items()}
    gauges = WindowGauges(Found(found), buckets, {WINDOW: STEP}, lambda: list(states), 0)  # type: ignore[arg-type]
    asyncio.run(gauges.refresh())
    return parse(
        {
            TEXT: generate_latest(registry_of(gauges)).decode(),
            OPENMETRICS: openmetrics_latest(registry_of(gauges)).decode(),
        }
    )[TEXT]


def check_windows(metrics: dict[str, Metric], docs: dict[str, dict[str, Any]]) -> None:
    regression, scores = docs["reg"]["regression"], docs["bin"]["scores"]
    want: dict[str, tuple[str, Any]] = {
        "mae": ("reg", regression["mae"]),
        "rmse": ("reg", regression["rmse"]),
        "r2": ("reg", regression["r2"]),
        "log_loss": ("bin", scores["log_loss"]),
        "brier_score": ("bin", scores["brier_score"]),
        "roc_auc": ("bin", scores["roc_auc"]["macro"]["auc"]),
        "expected_calibration_error": ("bin", scores["calibration"]["ece"]),
    }
    for name, (model, value) in want.items():
        family = metrics[families.WINDOW_SECTIONS[name].name]
        assert by_model(family).keys() == {model}, name
        assert one_value(family, model, segment="", window=WINDOW) == pytest.approx(value)


def test_window_gauges_of_the_sections(states: dict[str, MetricsState]) -> None:
    check_windows(window_values(states), documents(states))
    without = window_values({"iris": states["iris"]})
    assert not set(without) & {f.name for f in families.WINDOW_SECTIONS.values()}


def test_range_documents_carry_the_sections(states: dict[str, MetricsState]) -> None:
    query = RangeQuery(0, 2 * STEP, STEP, None)
    for model, section in (("reg", "regression"), ("bin", "scores")):
        state = states[model]
        encoded = RangeDocuments.encode(model, query, [state.like(), state, state])
        document = orjson.loads(encoded)
        assert document["total"][section] == documents(states)[model][section]
        assert document["steps"][0][section]["rows"] == 0
        classification = CLASSIFICATION_KEYS & set(document["total"])
        assert classification == (set() if model == "reg" else CLASSIFICATION_KEYS - {"micro"})


@pytest.fixture(scope="module")
def url(module_servers: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("models") / "models.yaml"
    path.write_text(CONFIG)
    server = module_servers(
        "--models_config",
        str(path),
        "--state",
        "memory",
        "--windows",
        WINDOW,
        "--window_refresh_seconds",
        "0.2",
    )
    for model, (truth, response) in ROWS.items():
        answer = requests.post(
            f"{server.url}/v1/models/{model}",
            json=feedback(truth, response),
            headers=ce_headers(),
            timeout=5,
        )
        assert answer.status_code == 200, answer.text
    return server.url


def test_a_servers_readers_show_the_sections(url: str) -> None:
    docs = {name: model_doc(url, name) for name in MODELS}
    check_regressor_summary(docs["reg"])
    check_scorer_summary(docs["bin"], docs["iris"])
    texts = {accept: exposition(url, accept) for accept in (TEXT, OPENMETRICS)}
    for metrics in parse(texts).values():
        check_families(metrics, docs)
    deadline = time.monotonic() + 10  # the window gauges are read in the background
    while families.WINDOW_SECTIONS["mae"].name not in parse(texts)[TEXT]:
        assert time.monotonic() < deadline, "no window gauges"
        time.sleep(0.2)
        texts = {accept: exposition(url, accept) for accept in (TEXT, OPENMETRICS)}
    check_windows(parse(texts)[TEXT], docs)


def test_a_servers_gauges_are_sklearns_of_the_rows_sent(url: str) -> None:
    """The Prometheus text, not the JSON: what a dashboard or an alert reads."""
    metrics = parse({accept: exposition(url, accept) for accept in (TEXT, OPENMETRICS)})[TEXT]
    expected = sklearn_regression(*ROWS["reg"])
    for key, declared in families.REGRESSION_GAUGES.items():
        assert one_value(metrics[declared.name], "reg") == pytest.approx(expected[key], rel=RTOL)
    truth, scores = (np.array(v) for v in ROWS["bin"])
    gauges = families.SCORE_GAUGES
    got = one_value(metrics[gauges["log_loss"].name], "bin")
    assert got == pytest.approx(log_loss(truth, scores), rel=RTOL)
    got = one_value(metrics[gauges["brier_score"].name], "bin")
    assert got == pytest.approx(brier_score_loss(truth, scores), rel=RTOL)
    auc = one_value(metrics[families.ROC_AUC.name], "bin", **{"class": "1"})
    bound = one_value(metrics[families.ROC_AUC_ERROR_BOUND.name], "bin", **{"class": "1"})
    assert abs(auc - roc_auc_score(truth, scores)) <= bound + SLACK
    observed, mean_score = calibration_curve(truth, scores, n_bins=CALIBRATION_BINS)
    for values, declared in ((observed, "observed"), (mean_score, "mean_score")):
        family = metrics[families.CALIBRATION_GAUGES[declared].name]
        exported = sorted(by_model(family)["bin"], key=lambda item: float(item[0]["bin"]))
        assert [v for _, v in exported] == pytest.approx(values.tolist(), rel=RTOL)


def test_a_servers_range_documents_carry_the_sections(url: str) -> None:
    end = (int(time.time()) // STEP + 1) * STEP
    arguments = {"from": str(end - 2 * STEP), "to": str(end), "step": str(STEP)}
    for model, section in (("reg", "regression"), ("bin", "scores")):
        answer = requests.get(f"{url}/v1/models/{model}/metrics", params=arguments, timeout=10)
        assert answer.status_code == 200, answer.text
        document = answer.json()
        assert document["total"][section] == model_doc(url, model)[section]
        assert document["steps"][-1][section] == document["total"][section]


@pytest.mark.e2e
def test_promtool_passes_a_servers_section_families(url: str) -> None:
    from tests.prometheus import require_program
    from tests.test_promtool_metrics import assert_no_problems, check_metrics

    assert_no_problems(check_metrics(require_program("promtool"), exposition(url, TEXT)))
