"""Many models in the Prometheus exposition (--models_config): each family once, with every
model's samples; each model's counts its own; Seldon's series apart by ``model_name``."""

from __future__ import annotations

from collections import Counter

import pytest
import requests
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families

from tests.support.events import ce_headers, feedback
from tests.support.processes import ServerFactory
from tests.test_promtool_metrics import assert_no_problems, check_metrics

CONFIG = """\
models:
  - name: income
    storage_uri: BinaryMetrics
  - name: iris
    storage_uri: MultiClassNumeric
  - name: wine
    storage_uri: MultiClassNumeric
"""
#: Each model's (truth, response) rows; the binary model's response is a score (> 0.5: 1).
ROWS = {
    "income": ([1, 0, 1, 1], [0.9, 0.2, 0.4, 0.7]),
    "iris": ([0, 1, 2, 2, 1], [0, 1, 2, 1, 0]),
    "wine": ([3, 3, 4], [3, 4, 4]),
}
#: Each model's (truth, prediction) cells, and its accuracy.
CELLS = {
    "income": Counter({(1, 1): 2, (0, 0): 1, (1, 0): 1}),
    "iris": Counter({(0, 0): 1, (1, 1): 1, (2, 2): 1, (2, 1): 1, (1, 0): 1}),
    "wine": Counter({(3, 3): 1, (3, 4): 1, (4, 4): 1}),
}
ACCURACY = {"income": 3 / 4, "iris": 3 / 5, "wine": 2 / 3}
TEXT = "text/plain;version=0.0.4"
OPENMETRICS = "application/openmetrics-text;version=1.0.0"


@pytest.fixture(scope="module")
def three(module_servers: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("models") / "models.yaml"
    path.write_text(CONFIG)
    server = module_servers(
        "--models_config",
        str(path),
        "--state",
        "memory",
        "--model_name",
        "srv",
        env={"PREDICTIVE_UNIT_ID": "unit"},
    )
    for model, (truth, response) in ROWS.items():
        url = f"{server.url}/v1/models/{model}"
        answer = requests.post(url, json=feedback(truth, response), headers=ce_headers(), timeout=5)
        assert answer.status_code == 200, answer.text
    return server.url


def exposition(url: str, accept: str) -> str:
    answer = requests.get(url + "/v1/metrics", headers={"Accept": accept}, timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.text


def parsed(url: str) -> dict[str, list[Metric]]:
    """Both formats parsed by prometheus_client (the OpenMetrics parser refuses a family whose
    metadata repeats)."""
    return {
        TEXT: list(text_families(exposition(url, TEXT))),
        OPENMETRICS: list(openmetrics_families(exposition(url, OPENMETRICS))),
    }


def by_model(family: Metric, label: str = "model") -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for sample in family.samples:
        found.setdefault(sample.labels[label], []).append((sample.labels, sample.value))
    return found


def test_each_family_once_with_each_models_own_counts(three: str) -> None:
    for accept, metrics in parsed(three).items():
        names = [metric.name for metric in metrics]
        assert len(names) == len(set(names)), (accept, Counter(names).most_common(3))
        family = {metric.name: metric for metric in metrics}
        cells = by_model(family["feedback_confusion_matrix"])
        assert set(cells) == set(ROWS), accept  # the server's own counts no rows
        for model, samples in cells.items():
            found = Counter(
                {(int(ls["truth"]), int(ls["prediction"])): int(v) for ls, v in samples}
            )
            assert found == CELLS[model], (accept, model)
        accuracy = {m: s[0][1] for m, s in by_model(family["feedback_accuracy"]).items()}
        assert accuracy == pytest.approx(ACCURACY), accept
        rows = {m: s[0][1] for m, s in by_model(family["feedback_rows_accepted"]).items()}
        assert rows == {**{m: len(truth) for m, (truth, _) in ROWS.items()}, "srv": 0}, accept


def test_seldon_series_of_each_model_apart(three: str) -> None:
    """Seldon's ``model_name`` is each configured model's name; the binary model's counter has
    only its positive class, the multiclass ones one series per class."""
    metrics = {metric.name: metric for metric in parsed(three)[TEXT]}
    true_positives = by_model(metrics["seldon_metric_true_positive"], "model_name")
    assert set(true_positives) == set(ROWS)
    [(income, value)] = true_positives["income"]
    assert "class" not in income and value == 2
    iris = {labels["class"]: value for labels, value in true_positives["iris"]}
    assert iris == {"CLASS_0": 1, "CLASS_1": 1, "CLASS_2": 1}
    wine = {labels["class"]: value for labels, value in true_positives["wine"]}
    assert wine == {"CLASS_3": 1, "CLASS_4": 1}
    series = [frozenset(s.labels.items()) for s in metrics["seldon_metric_true_positive"].samples]
    assert len(series) == len(set(series)) == 6


def test_server_families_stay_under_the_servers_name(three: str) -> None:
    """Connections, and a refusal before any model is known, are the server's (--model_name)."""
    answer = requests.post(three + "/", data=b"{not json", headers=ce_headers(), timeout=5)
    assert answer.status_code == 400
    metrics = {metric.name: metric for metric in parsed(three)[TEXT]}
    assert set(by_model(metrics["feedback_http_connections"])) == {"srv"}
    [(labels, value)] = by_model(metrics["feedback_events_rejected"])["srv"]
    assert labels["reason"] == "invalid_json" and value == 1
    assert set(by_model(metrics["feedback_events_rejected"])) == {"srv"}


@pytest.mark.e2e
def test_promtool_passes_many_models(three: str) -> None:
    from tests.prometheus import require_program

    assert_no_problems(check_metrics(require_program("promtool"), exposition(three, TEXT)))
