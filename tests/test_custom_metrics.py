"""Custom metrics keep a valid exposition: one type per family, no sample-name clashes."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from adserver.exposition.seldon_labels import seldon_default_labels
from cm_models.custom_metrics import SERVER_LABELS, CustomMetric, MetricCatalog, parse_metric
from tests.support.events import feedback, structured
from tests.support.http import model_doc, post_json, scrape, value
from tests.support.processes import start_server


def metric(key: str, kind: str, value: float = 1.0) -> CustomMetric:
    return CustomMetric(key, kind, value)  # type: ignore[arg-type]


def test_catalog_keeps_the_first_type_and_refuses_clashing_sample_names() -> None:
    catalog = MetricCatalog(reserved_prefixes=("feedback_", "process_"))
    kept, refused = catalog.admit(
        [
            metric("dual", "COUNTER"),
            metric("dual", "GAUGE"),  # same family, other type
            metric("lat", "TIMER"),
            metric("lat_count", "COUNTER"),  # would expose lat_count_total beside lat_count
            metric("lat_sum", "GAUGE"),  # the timer's own sample
            metric("queue_total", "GAUGE"),  # a gauge keeps its name
            metric("queue", "COUNTER"),  # exposes queue_total: taken by the gauge
            metric("process_cpu_seconds", "COUNTER"),  # the server's own family
            metric("dual_total", "COUNTER"),  # the same counter family as dual
        ]
    )
    assert [m.key for m in kept] == ["dual", "lat", "queue_total", "dual_total"]
    assert refused == 5


def test_conflicting_types_in_one_batch_survive_a_restart_identically(tmp_path: Path) -> None:
    """The file and the memory decide alike (in commit order), so a restart shows the same."""
    args = ("--state_dir", str(tmp_path))
    server = start_server(*args)

    def with_metric(kind: str, amount: float) -> dict:
        body = feedback([[0, 1]], [[0.2, 0.8]])
        body["truth"]["meta"] = {"metrics": [{"key": "dual", "type": kind, "value": amount}]}
        return structured(body)

    batch = [with_metric("COUNTER", 5), with_metric("GAUGE", 2), with_metric("COUNTER", 1)]
    answer = post_json(server.url, batch, {"Content-Type": "application/cloudevents-batch+json"})
    assert answer.status_code == 200, answer.text
    before = scrape(server.url)
    server.stop()
    restarted = start_server(*args)
    try:
        after = scrape(restarted.url)
        assert model_doc(restarted.url)["events"] == 3
        text = requests.get(restarted.url + "/v1/metrics", timeout=5).text
    finally:
        restarted.stop()
    for samples in (before, after):
        assert value(samples, "dual_total") == 6
        assert value(samples, "feedback_custom_metrics_rejected_total") == 1
    assert text.count("# TYPE dual") == 1


def test_a_doubly_suffixed_counter_is_refused() -> None:
    """``x_total_total`` would be exposed as family ``x``, clashing with a gauge ``x``."""
    catalog = MetricCatalog()
    kept, refused = catalog.admit([metric("a_total_total", "COUNTER"), metric("a", "GAUGE")])
    assert [m.key for m in kept] == ["a"] and refused == 1


def test_catalog_rollback_forgets_uncommitted_families() -> None:
    catalog = MetricCatalog()
    catalog.admit([metric("kept", "GAUGE")])
    mark = catalog.mark()
    catalog.admit([metric("x", "GAUGE"), metric("lat", "TIMER")])
    catalog.rollback(mark)
    kept, refused = catalog.admit([metric("x", "COUNTER"), metric("lat_count", "GAUGE")])
    assert refused == 0 and [m.key for m in kept] == ["x", "lat_count"]
    assert catalog.admit([metric("kept", "COUNTER")]) == ([], 1)


def test_a_rolled_back_batch_leaves_no_classes_or_metric_types_behind(servers) -> None:
    """A refused batch must not use up --max_classes nor fix a custom metric's type."""
    server = servers(
        "--storage_uri", "cm_models.multiclass_numeric.MultiClassNumeric", "--max_classes", "2"
    )

    def event(truth: int, predicted: int, kind: str) -> dict:
        body = feedback([[truth]], [[predicted]])
        body["truth"]["meta"] = {"metrics": [{"key": "x", "type": kind, "value": 1}]}
        return structured(body)

    batch = {"Content-Type": "application/cloudevents-batch+json"}
    refused = post_json(server.url, [event(0, 0, "GAUGE"), event(1, 2, "GAUGE")], batch)
    assert refused.status_code == 400 and refused.json()["reason"] == "too_many_classes"
    accepted = post_json(server.url, [event(5, 6, "COUNTER")], batch)
    assert accepted.status_code == 200, accepted.text
    assert model_doc(server.url)["classes"] == [5, 6]
    assert value(scrape(server.url), "x_total") == 1


def tagged(key: str, kind: str, team: str) -> CustomMetric:
    return CustomMetric(key, kind, 1.0, (("team", team),))  # type: ignore[arg-type]


def test_catalog_caps_series_not_updates_of_known_ones() -> None:
    catalog = MetricCatalog(max_series=2)
    kept, refused = catalog.admit(
        [tagged("a", "GAUGE", "x"), tagged("a", "GAUGE", "y"), tagged("a", "GAUGE", "z")]
    )
    assert ([m.tags for m in kept], refused) == ([(("team", "x"),), (("team", "y"),)], 1)
    kept, refused = catalog.admit([tagged("b", "COUNTER", "x"), tagged("a", "GAUGE", "y")])
    assert ([m.key for m in kept], refused) == (["a"], 1)
    assert "b" not in catalog.types  # a refused series does not claim its family either


def test_catalog_rollback_frees_the_series_of_uncommitted_metrics() -> None:
    catalog = MetricCatalog(max_series=2)
    catalog.admit([tagged("a", "GAUGE", "x")])
    mark = catalog.mark()
    catalog.admit([tagged("b", "COUNTER", "x")])
    catalog.rollback(mark)
    assert catalog.admit([tagged("b", "GAUGE", "y")]) == ([tagged("b", "GAUGE", "y")], 0)
    assert catalog.admit([tagged("c", "GAUGE", "x")]) == ([], 1)


def test_catalog_loads_series_at_start_up_and_keeps_them_past_a_lowered_cap() -> None:
    catalog = MetricCatalog(max_series=1)
    catalog.load({"a": "GAUGE"}, [("a", (("team", "x"),)), ("a", (("team", "y"),))])
    assert catalog.admit([tagged("a", "GAUGE", "y"), tagged("a", "GAUGE", "z")]) == (
        [tagged("a", "GAUGE", "y")],
        1,
    )


def custom_body(*teams: str) -> dict:
    body = feedback([[0, 1]], [[0.2, 0.8]])
    metrics = [{"key": "jobs", "type": "COUNTER", "value": 1, "tags": {"t": t}} for t in teams]
    body["truth"]["meta"] = {"metrics": metrics}
    return structured(body)


def test_series_past_max_custom_series_are_refused_and_counted(tmp_path: Path) -> None:
    """The cap holds across a restart: the series in the state file count."""
    args = ("--state_dir", str(tmp_path), "--max_custom_series", "3")
    structured_type = {"Content-Type": "application/cloudevents+json"}
    server = start_server(*args)
    try:
        answer = post_json(server.url, custom_body("a", "b", "c", "d"), structured_type)
        assert answer.status_code == 200, answer.text
    finally:
        server.stop()
    restarted = start_server(*args)
    try:
        answer = post_json(restarted.url, custom_body("a", "e"), structured_type)
        assert answer.status_code == 200, answer.text
        samples = scrape(restarted.url)
    finally:
        restarted.stop()
    assert {t: value(samples, "jobs_total", t=t) for t in "abcde"} == {
        "a": 2,
        "b": 1,
        "c": 1,
        "d": 0,
        "e": 0,
    }
    assert value(samples, "feedback_custom_metrics_rejected_total") == 2


def parse(item: dict) -> CustomMetric:
    return parse_metric({"key": "k", "value": 1, **item})


@pytest.mark.parametrize(
    "item",
    [
        {"type": "COUNTER", "tags": {"model_name": "a"}},  # overwritten by Seldon's label
        {"type": "GAUGE", "tags": {"method": "a"}},
        {"type": "TIMER", "tags": {"deployment_name": "a", "team": "b"}},
        {"type": "TIMER", "tags": {"le": "5"}},  # a histogram's bucket label
        {"type": "TIMER", "value": -3},  # a negative histogram sum
        {"type": "COUNTER", "tags": {"__name__": "x"}},
    ],
    ids=["model_name", "method", "deployment_name", "timer_le", "negative_timer", "dunder"],
)
def test_a_metric_that_would_break_the_exposition_is_refused(item: dict) -> None:
    with pytest.raises(ValueError, match="metric k"):
        parse(item)


def test_tags_only_a_histogram_reserves_are_fine_elsewhere() -> None:
    assert parse({"type": "COUNTER", "tags": {"le": "5"}}).tags == (("le", "5"),)
    assert parse({"type": "TIMER", "value": 0, "tags": {"quantile": "x"}}).value == 0


def test_the_server_labels_are_the_ones_it_sets() -> None:
    """The refused tag names are Seldon's default labels and the ``method`` label."""
    assert set(seldon_default_labels({})) | {"method"} == SERVER_LABELS


def test_tags_never_make_an_invalid_exposition(servers) -> None:
    """Tags named like the server's labels, ``le`` on a TIMER and a negative TIMER: refused one
    by one and counted; what is exposed has no duplicate series and parses as OpenMetrics."""
    server = servers("--state", "memory")
    bad = [
        {"key": "tagged", "type": "COUNTER", "value": 1, "tags": {"model_name": "a"}},
        {"key": "tagged", "type": "COUNTER", "value": 1, "tags": {"model_name": "b"}},
        {"key": "tagged", "type": "COUNTER", "value": 1, "tags": {"method": "m"}},
        {"key": "latency", "type": "TIMER", "value": 5, "tags": {"le": "0.5"}},
        {"key": "latency", "type": "TIMER", "value": -3},
    ]
    good = [
        {"key": "tagged", "type": "COUNTER", "value": 1, "tags": {"team": "a"}},
        {"key": "latency", "type": "TIMER", "value": 2, "tags": {"quantile": "q"}},
    ]
    body = feedback([[0, 1]], [[0.2, 0.8]])
    body["truth"]["meta"] = {"metrics": [*bad, *good]}
    answer = post_json(server.url, body)
    assert answer.status_code == 200, answer.text
    samples = scrape(server.url)
    assert value(samples, "feedback_custom_metrics_rejected_total") == len(bad)
    assert value(samples, "tagged_total") == 1
    text = requests.get(server.url + "/v1/metrics", timeout=5).text
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")]
    assert len(series) == len(set(series)), "duplicate series"
    openmetrics = requests.get(
        server.url + "/v1/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        timeout=5,
    ).text
    families = {f.name: f for f in openmetrics_families(openmetrics)}  # raises if invalid
    assert families["latency"].samples
