"""A real Prometheus scrapes real servers: PromQL over our families equals scikit-learn.

Three servers are scraped every second by one Prometheus that also evaluates
config/prometheus-rules.yaml. One (model ``single``) receives a known stream; two replicas
(model ``replicated``, the same --model_name) each receive part of the same stream, as behind
a load balancer. What users will query -- the recording rules, the README's PromQL, our gauges,
every dashboard panel -- must give scikit-learn's numbers on the stream, and the replicas summed
must equal the single process.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_score, recall_score

from tests.dashboard import dashboard_targets
from tests.prometheus import (
    Prometheus,
    Result,
    by_label,
    host_port,
    require_program,
    run_prometheus,
    samples,
    single,
)
from tests.support.events import feedback
from tests.support.http import send_event
from tests.support.processes import MULTICLASS_NUMERIC, ROOT, ServerFactory

pytestmark = pytest.mark.e2e

CLASSES = 4
ROWS = 200
EVENTS = 20
MODELS = ("single", "replicated")
CELLS = "feedback_confusion_matrix_total"
README = (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class Stream:
    """A deterministic labelled stream: truth and prediction class per row."""

    truth: np.ndarray
    prediction: np.ndarray

    def bodies(self) -> list[dict[str, Any]]:
        """The stream as EVENTS feedback events of ROWS / EVENTS rows each (``[[class]]`` rows)."""
        chunks = zip(np.array_split(self.truth, EVENTS), np.array_split(self.prediction, EVENTS))
        return [
            feedback([[int(c)] for c in truth], [[int(c)] for c in prediction])
            for truth, prediction in chunks
        ]

    def accuracy(self) -> float:
        return float(accuracy_score(self.truth, self.prediction))

    def per_class(self, score: Any) -> dict[str, float]:
        """A scikit-learn per-class score keyed like our ``class`` label (the bare id)."""
        values = score(
            self.truth, self.prediction, labels=range(CLASSES), average=None, zero_division=0
        )
        return {str(c): float(v) for c, v in enumerate(values)}

    def cells(self) -> dict[tuple[str, str], float]:
        """Non-zero confusion-matrix cells {(truth, prediction): rows}."""
        matrix = confusion_matrix(self.truth, self.prediction, labels=range(CLASSES))
        return {
            (str(t), str(p)): float(matrix[t, p])
            for t in range(CLASSES)
            for p in range(CLASSES)
            if matrix[t, p]
        }


def make_stream(seed: int = 20240607) -> Stream:
    """About 70% correct, every class both true and predicted (so every ratio is defined)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, CLASSES, ROWS)
    noise = rng.integers(0, CLASSES, ROWS)
    prediction = np.where(rng.random(ROWS) < 0.7, truth, noise)
    assert set(truth) == set(prediction) == set(range(CLASSES))
    return Stream(truth, prediction)


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Scraped:
    """The Prometheus and the ``instance`` label of each server, by model."""

    prometheus: Prometheus
    instances: dict[str, list[str]]


@pytest.fixture(scope="module")
def stream() -> Stream:
    return make_stream()


@pytest.fixture(scope="module")
def scraped(module_servers: ServerFactory, stream: Stream) -> Iterator[Scraped]:
    """Servers and Prometheus up, the stream sent while being scraped, and fully scraped."""
    require_program("prometheus")  # before starting servers for nothing
    flags = ("--state", "memory", "--storage_uri", MULTICLASS_NUMERIC, "--model_name")
    urls = {
        "single": [module_servers(*flags, "single").url],
        "replicated": [module_servers(*flags, "replicated").url for _ in range(2)],
    }
    instances = {model: [host_port(url) for url in group] for model, group in urls.items()}
    with run_prometheus([i for group in instances.values() for i in group]) as prometheus:
        for index, body in enumerate(stream.bodies()):
            send_event(urls["single"][0], body)
            replicas = urls["replicated"]
            send_event(replicas[index % len(replicas)], body)  # round robin
        for model in MODELS:
            prometheus.wait_for(
                f'model:feedback_rows:sum{{model="{model}"}}',
                lambda result: bool(result) and single(result) == ROWS,
            )
        yield Scraped(prometheus, instances)


# --------------------------------------------------------------------------- PromQL


def readme_promql() -> dict[str, str]:
    """The README's accuracy, precision and recall PromQL (M = the confusion-matrix counter).

    Recall is precision with "prediction" replaced by "truth" in the lines marked ``# D``, as
    the README says. Comments are dropped (``#`` appears nowhere else in the block).
    """
    block = re.search(r"```promql\n(.*?)```", README, re.S)
    assert block, "the README lost its PromQL block"
    accuracy, precision = re.split(r"\n\s*\n", block.group(1).strip())
    recall = "\n".join(
        line.replace('"prediction"', '"truth"') if line.rstrip().endswith("# D") else line
        for line in precision.splitlines()
    )
    return {
        name: re.sub(r"#[^\n]*", "", expr)
        for name, expr in {"accuracy": accuracy, "precision": precision, "recall": recall}.items()
    }


def on_model(expr: str, model: str) -> str:
    """The README's ``M`` made concrete for one model."""
    return re.sub(r"\bM\b", f'{CELLS}{{model="{model}"}}', expr)


def seldon_promql(instances: list[str]) -> dict[str, str]:
    """The README's formulas on the Seldon counters (no ``model`` label: select by instance)."""
    selector = f"{{instance=~`{'|'.join(map(re.escape, instances))}`}}"  # raw string
    tp, fp, fn = (
        f"seldon_metric_{kind}_total{selector}"
        for kind in ("true_positive", "false_positive", "false_negative")
    )
    return {
        "accuracy": f"sum({tp}) / sum({tp} + {fn})",
        "precision": f"sum by (class) ({tp}) / sum by (class) ({tp} + {fp})",
        "recall": f"sum by (class) ({tp}) / sum by (class) ({tp} + {fn})",
    }


def per_class(result: Result, prefix: str = "") -> dict[str, float]:
    """{class id: value}; Seldon's ``CLASS_<n>`` becomes ``<n>``."""
    return {key.removeprefix(prefix): v for key, v in by_label(result, "class").items()}


def expected(stream: Stream) -> dict[str, Any]:
    return {
        "accuracy": pytest.approx(stream.accuracy()),
        "precision": pytest.approx(stream.per_class(precision_score)),
        "recall": pytest.approx(stream.per_class(recall_score)),
    }


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("model", MODELS)
def test_recording_rules_equal_sklearn(scraped: Scraped, stream: Stream, model: str) -> None:
    query, want = scraped.prometheus.query, expected(stream)
    selector = f'{{model="{model}"}}'
    assert single(query(f"model:feedback_accuracy:ratio{selector}")) == want["accuracy"]
    assert per_class(query(f"model_class:feedback_precision:ratio{selector}")) == want["precision"]
    assert per_class(query(f"model_class:feedback_recall:ratio{selector}")) == want["recall"]


@pytest.mark.parametrize("model", MODELS)
def test_readme_promql_equals_sklearn(scraped: Scraped, stream: Stream, model: str) -> None:
    exprs, want = readme_promql(), expected(stream)
    query = scraped.prometheus.query
    assert single(query(on_model(exprs["accuracy"], model))) == want["accuracy"]
    assert per_class(query(on_model(exprs["precision"], model))) == want["precision"]
    assert per_class(query(on_model(exprs["recall"], model))) == want["recall"]


@pytest.mark.parametrize("model", MODELS)
def test_readme_seldon_counter_promql_equals_sklearn(
    scraped: Scraped, stream: Stream, model: str
) -> None:
    exprs, want = seldon_promql(scraped.instances[model]), expected(stream)
    query = scraped.prometheus.query
    assert single(query(exprs["accuracy"])) == want["accuracy"]
    assert per_class(query(exprs["precision"]), "CLASS_") == want["precision"]
    assert per_class(query(exprs["recall"]), "CLASS_") == want["recall"]


def test_gauges_equal_sklearn(scraped: Scraped, stream: Stream) -> None:
    """The per-process gauges (meaningful for one process; replicas are summed via counters)."""
    query, want = scraped.prometheus.query, expected(stream)
    assert single(query('feedback_accuracy{model="single"}')) == want["accuracy"]
    assert per_class(query('feedback_precision{model="single"}')) == want["precision"]
    assert per_class(query('feedback_recall{model="single"}')) == want["recall"]


def test_replicas_are_two_targets_each_with_part_of_the_stream(scraped: Scraped) -> None:
    rows = scraped.prometheus.query('feedback_rows_accepted_total{model="replicated"}')
    per_instance = by_label(rows, "instance")
    assert sorted(per_instance) == sorted(scraped.instances["replicated"])
    assert all(0 < count < ROWS for count in per_instance.values()), per_instance
    assert sum(per_instance.values()) == ROWS


def test_replicas_summed_equal_the_single_process_and_sklearn(
    scraped: Scraped, stream: Stream
) -> None:
    """Counters add: the summed cells of two replicas are the cells of one process on the union."""
    query = scraped.prometheus.query
    summed = {
        model: samples(
            query(f'sum by (truth, prediction) ({CELLS}{{model="{model}"}})'), "truth", "prediction"
        )
        for model in MODELS
    }
    recorded = samples(
        query('model_truth_prediction:feedback_confusion_matrix:sum{model="replicated"}'),
        "truth",
        "prediction",
    )
    assert summed["replicated"] == summed["single"] == recorded == stream.cells()
    events = query('sum by (model) (feedback_events_accepted_total{model=~"single|replicated"})')
    assert by_label(events, "model") == {"single": EVENTS, "replicated": EVENTS}


def test_every_dashboard_panel_query_runs(scraped: Scraped) -> None:
    """Grafana would show an error for a query Prometheus refuses; quality panels show data."""
    quality = ("Accuracy", "Precision by class", "Recall by class", "Confusion matrix (all time)")
    targets = dashboard_targets()
    assert targets, "the dashboard has no queries"
    for title, ref, expr in targets:
        result = scraped.prometheus.query(expr)  # fails with Prometheus's error message
        if title in quality and ref == "A":
            assert result, f"panel {title!r} ({ref}) is empty: {expr}"
