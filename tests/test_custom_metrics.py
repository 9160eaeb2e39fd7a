"""Custom metrics keep a valid exposition: one type per family, no sample-name clashes."""

from __future__ import annotations

from pathlib import Path

import requests

from cm_models.custom_metrics import CustomMetric, MetricCatalog
from tests.helpers import feedback, model_doc, post_json, scrape, start_server, structured, value


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
