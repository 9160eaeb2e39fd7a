"""GET /v1/metrics as Prometheus, OpenMetrics and JSON, with Seldon's names and labels."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest
import requests
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families

from tests.support.events import REPLY_TYPE, feedback, ndarray
from tests.support.http import model_doc, scrape, send_event, value
from tests.support.processes import MULTICLASS_NUMERIC, REPLY_FLAGS, ServerFactory

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
SELDON_ENV = {
    "SELDON_DEPLOYMENT_ID": "multiclass-model",
    "PREDICTIVE_UNIT_ID": "classifier",
    "PREDICTIVE_UNIT_IMAGE": "seldonio/alibi-detect-server:1.6.0",
    "PREDICTOR_ID": "default",
    "PREDICTOR_LABELS": '{"version": "v2"}',
    "SELDON_DEPLOYMENT_NAMESPACE": "seldon",
}
SELDON_LABELS = {
    "deployment_name": "multiclass-model",
    "seldon_deployment_name": "multiclass-model",
    "model_name": "classifier",
    "model_image": "seldonio/alibi-detect-server",
    "image_name": "seldonio/alibi-detect-server",
    "model_version": "1.6.0",
    "image_version": "1.6.0",
    "predictor_name": "default",
    "predictor_version": "v2",
    "seldon_deployment_namespace": "seldon",
    "method": REPLY_TYPE,
}
TRICKY = 'a "quoted" \\ value\nnext line'
# Truth and predicted class ids of the stream every check below is computed from.
TRUTH = [0, 1, 2, 2]
PREDICTED = [0, 2, 2, 1]


def with_metrics(body: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Seldon reads custom metrics from ``truth.meta.metrics``."""
    return {**body, "truth": {**body["truth"], "meta": {"metrics": metrics}}}


@pytest.fixture(scope="module")
def url(module_servers: ServerFactory) -> str:
    """A Seldon-configured server fed a known stream and custom metrics once."""
    server = module_servers(
        "--storage_uri",
        MULTICLASS_NUMERIC,
        "--model_name",
        "iris",
        *REPLY_FLAGS,
        env=SELDON_ENV,
    )
    first = [
        {"key": "my_counter", "type": "COUNTER", "value": 2, "tags": {"team": "a"}},
        {"key": "my_gauge", "type": "GAUGE", "value": 5},
        {"key": "my_timer", "type": "TIMER", "value": 250},
        {"key": "my_broken", "type": "SUMMARY", "value": 1},
    ]
    second = [
        {"key": "my_counter", "type": "COUNTER", "value": 3, "tags": {"team": "a"}},
        {"key": "my_counter", "type": "COUNTER", "value": 1, "tags": {"team": "b"}},
        {"key": "my_gauge", "type": "GAUGE", "value": 1.5},
        {"key": "my_timer", "type": "TIMER", "value": 2000},
        {"key": "my_tricky", "type": "GAUGE", "value": 7, "tags": {"note": TRICKY}},
        {"key": "seldon_metric_true_positive", "type": "COUNTER", "value": 100},
    ]
    send_event(server.url, with_metrics(feedback([[0], [1]], [[0], [2]]), first))
    send_event(server.url, with_metrics(feedback([2, 2], [2, 1]), second))
    return server.url


def get(url: str, accept: str | None = None, **params: str) -> requests.Response:
    headers = {"Accept": accept} if accept is not None else {}
    answer = requests.get(url + "/v1/metrics", headers=headers, params=params, timeout=5)
    assert answer.status_code == 200, answer.text
    return answer


def metadata_counts(text: str) -> tuple[Counter[str], Counter[str]]:
    """How often each family has a HELP and a TYPE line, asserting HELP text is not empty."""
    helps: Counter[str] = Counter()
    types: Counter[str] = Counter()
    for line in text.splitlines():
        if match := re.match(r"# HELP (\S+)(?: (.*))?$", line):
            assert (match.group(2) or "").strip(), f"empty HELP: {line!r}"
            helps[match.group(1)] += 1
        elif match := re.match(r"# TYPE (\S+) ", line):
            types[match.group(1)] += 1
    return helps, types


@pytest.mark.parametrize("accept", [None, "*/*", "text/plain", "text/plain;version=0.0.4"])
def test_default_is_text_0_0_4(url: str, accept: str | None) -> None:
    answer = get(url, accept)
    assert answer.headers["Content-Type"] == TEXT_0_0_4
    families = list(text_families(answer.text))
    assert {f.name for f in families} >= {"seldon_metric_true_positive", "feedback_accuracy"}


def test_openmetrics_when_the_scraper_asks(url: str) -> None:
    """Prometheus 2.x prefers OpenMetrics; it must be valid (one metadata block per family)."""
    answer = get(url, PROMETHEUS_ACCEPT)
    assert answer.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert answer.text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(answer.text)}
    assert families["seldon_metric_true_positive"].type == "counter"
    assert families["my_timer"].type == "histogram"


@pytest.mark.parametrize("accept", [None, PROMETHEUS_ACCEPT], ids=["text", "openmetrics"])
def test_one_help_and_type_block_per_family(url: str, accept: str | None) -> None:
    """Seldon repeated HELP/TYPE per label set, which OpenMetrics parsers refuse."""
    helps, types = metadata_counts(get(url, accept).text)
    assert helps and set(helps) == set(types)
    assert {name for name, n in helps.items() if n != 1} == set()
    assert {name for name, n in types.items() if n != 1} == set()


def test_seldon_families_carry_seldon_default_labels(url: str) -> None:
    samples = scrape(url)
    seldon = [
        (name, dict(labels)) for (name, labels) in samples if name.startswith("seldon_metric_")
    ]
    assert {name for name, _ in seldon} == {
        f"seldon_metric_{kind}_total"
        for kind in ("true_positive", "false_positive", "false_negative", "true_negative")
    }
    for _, labels in seldon:
        assert labels == {**SELDON_LABELS, "class": labels["class"]}
        assert "worker_id" not in labels
    assert all(
        not name.startswith("seldon_") or "worker_id" not in dict(labels)
        for (name, labels) in samples
    )


def test_seldon_counters_are_one_vs_rest_counts(url: str) -> None:
    """TP/FP/FN/TN per class from TRUTH/PREDICTED; the custom seldon_metric_ key was refused."""
    samples = scrape(url)
    expected = {  # class: (tp, fp, fn, tn)
        "0": (1, 0, 0, 3),
        "1": (0, 1, 1, 2),
        "2": (1, 1, 1, 1),
    }
    for label, counts in expected.items():
        got = tuple(
            value(samples, f"seldon_metric_{kind}_total", **{"class": f"CLASS_{label}"})
            for kind in ("true_positive", "false_positive", "false_negative", "true_negative")
        )
        assert got == counts, label


def test_custom_metrics_follow_seldon_semantics(url: str) -> None:
    """COUNTER adds, GAUGE sets, TIMER (ms) fills a seconds histogram; a bad dict drops alone."""
    samples = scrape(url)
    assert value(samples, "my_counter_total", team="a") == 5
    assert value(samples, "my_counter_total", team="b") == 1
    assert value(samples, "my_gauge") == 1.5
    assert value(samples, "my_timer_count") == 2
    assert value(samples, "my_timer_sum") == pytest.approx(2.25)
    buckets = {
        float(dict(labels)["le"]): v
        for (name, labels), v in samples.items()
        if name == "my_timer_bucket"
    }
    assert len(buckets) == 51 and buckets[float("inf")] == 2
    assert min(buckets) == pytest.approx(0.001) and max(b for b in buckets if b < 1e9) == 30
    for bound, count in buckets.items():
        assert count == (bound >= 0.25) + (bound >= 2.0), bound
    assert not any(name.startswith("my_broken") for (name, _) in samples)
    # my_broken (unknown type) and the reserved seldon_metric_ key: two refusals.
    assert value(samples, "feedback_custom_metrics_rejected_total", model="iris") == 2
    labels = dict(next(ls for (name, ls) in samples if name == "my_counter_total"))
    assert labels == {**SELDON_LABELS, "team": labels["team"]}


def test_label_values_are_escaped(url: str) -> None:
    """Quotes, backslashes and newlines in a tag survive the round trip through a parser."""
    text = get(url).text
    assert '\\"quoted\\"' in text and "\\n" in text
    assert value(scrape(url), "my_tricky", note=TRICKY) == 7
    om = {f.name: f for f in openmetrics_families(get(url, PROMETHEUS_ACCEPT).text)}
    assert om["my_tricky"].samples[0].labels["note"] == TRICKY


def test_derived_gauges_match_the_stream(url: str) -> None:
    samples = scrape(url)
    assert value(samples, "feedback_accuracy", model="iris") == 0.5
    assert value(samples, "feedback_precision", model="iris", **{"class": "0"}) == 1.0
    assert value(samples, "feedback_recall", model="iris", **{"class": "1"}) == 0.0
    assert value(samples, "feedback_precision", model="iris", **{"class": "2"}) == 0.5
    assert value(samples, "feedback_specificity", model="iris", **{"class": "0"}) == 1.0
    assert value(samples, "feedback_support", model="iris", **{"class": "2"}) == 2
    assert value(samples, "feedback_precision_average", average="macro") == 0.5
    assert value(samples, "feedback_recall_average", average="micro") == 0.5
    assert value(samples, "feedback_confusion_matrix_total", truth="1", prediction="2") == 1
    assert value(samples, "feedback_events_accepted_total", model="iris") == 2
    assert value(samples, "feedback_rows_accepted_total", model="iris") == 4


def test_json_by_query_or_accept_header(url: str) -> None:
    by_query = get(url, format="json")
    by_accept = get(url, "application/json")
    for answer in (by_query, by_accept):
        assert answer.headers["Content-Type"].startswith("application/json")
    assert by_query.json() == by_accept.json()
    document = by_query.json()
    assert list(document["models"]) == ["iris"]
    model = document["models"]["iris"]
    assert model["classes"] == [0, 1, 2]
    assert model["confusion_matrix"] == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    assert (model["accuracy"], model["events"], model["rows"]) == (0.5, 2, 4)
    assert model["per_class"]["2"] == {
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "specificity": 0.5,
        "support": 2,
    }
    for average in ("macro", "micro", "weighted"):
        assert set(model[average]) == {"precision", "recall", "f1"}
    assert model["weighted"]["precision"] == 0.5


def test_without_seldon_environment_labels_are_not_implemented(servers: ServerFactory) -> None:
    url = servers().url
    send_event(url, feedback(ndarray([[1, 0]]), ndarray([[0.9, 0.1]])))
    [labels] = [
        dict(ls) for (name, ls) in scrape(url) if name == "seldon_metric_true_positive_total"
    ]
    assert labels["deployment_name"] == labels["model_image"] == "NOT_IMPLEMENTED"
    assert labels["class"] == "CLASS_0"
    assert model_doc(url)["events"] == 1
