"""The caching encoder writes what prometheus_client writes, byte for byte, in every format.

The library is the oracle: the server's own families (every model family, custom metrics with
awkward tags, histograms, the confusion grid) and random families with arbitrary names and label
values are encoded by both, in text and OpenMetrics with every escaping scheme, twice (the second
time from the cache), synchronously and in slices; what the encoder leaves to the library
(``_created`` samples, units, info metrics) must come out unchanged too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from adserver.exposition import encoder as exposition_module
from adserver.exposition.collector import FeedbackCollector, ModelSource
from adserver.exposition.encoder import CachingEncoder, Exposition, Grid, Grids
from adserver.state.view import Delta, MetricsState
from cm_models.confusion import Cells
from cm_models.custom_metrics import CustomMetric

ACCEPTS = [
    "",
    "text/plain;version=0.0.4",
    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    "application/openmetrics-text; version=1.0.0; escaping=allow-utf-8",  # Prometheus 3
    "application/openmetrics-text; version=1.0.0; escaping=dots",
    "application/openmetrics-text; version=1.0.0; escaping=values",
    "application/openmetrics-text; version=2.0.0",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=underscores",
    "text/plain;version=1.0.0;escaping=dots",
    "text/plain;version=1.0.0;escaping=values",
]
TRICKY = 'a "quoted" \\ välue\nnext'


class Fixed:
    """A collector that yields the same families on every scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def registry_of(*collectors: object) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)  # type: ignore[arg-type]
    return registry


def assert_same_as_library(registry: CollectorRegistry) -> None:
    encoder = CachingEncoder()
    exposition = Exposition(registry, encoder)
    for accept in ACCEPTS:
        library, library_type = choose_encoder(accept)
        expected = library(registry)
        for _ in range(2):  # rendered, then from the cache
            ours, content_type = encoder.choose(accept)
            assert content_type == library_type
            assert ours(registry) == expected, accept
        parts, content_type = asyncio.run(exposition.scrape(accept))
        assert (b"".join(parts), content_type) == (expected, library_type), accept


def server_state() -> MetricsState:
    state = MetricsState([0, 1])
    truth, predicted = np.array([0, 1, 2, -5, 2]), np.array([0, 2, 2, 1, 1])
    metrics = (
        CustomMetric("requests", "COUNTER", 3.0, (("path", TRICKY),)),
        CustomMetric("backlog", "GAUGE", 2.5, (("queue", "é"), ("zone", ""))),
        CustomMetric("latency", "TIMER", 12.0, (("stage", "a\\b"),)),
    )
    state.apply(
        Delta(
            cells=Cells.from_labels(truth, predicted),
            metrics=metrics,
            counters=(("rows_accepted", "", 5), ("events_rejected", "invalid_json", 2)),
            delays=((0.5, 1), (40.0, 1)),
        )
    )
    return state


@pytest.mark.parametrize("seldon_class_label", [True, False])
def test_the_servers_families(seldon_class_label: bool) -> None:
    source = ModelSource(
        'model "x"\n',
        server_state(),
        has_confusion=True,
        seldon_class_label=seldon_class_label,
        seldon_labels={"deployment_name": TRICKY, "method": "feedback"},
    )
    collector = FeedbackCollector(
        'model "x"\n',
        [source],
        reply_stats=lambda: {
            "sent": 1,
            "failed": 0,
            "dropped": 0,
            "retries": 2,
            "queued": 0,
            "in_flight": 3,
        },
    )
    assert_same_as_library(registry_of(collector))


def test_several_models_in_each_family() -> None:
    """Every model's samples in one family each: a grid per model (one of them rendered sample
    by sample, its label holding a placeholder), a binary model beside a class-labelled one, a
    model without confusion."""
    sources = [
        ModelSource(
            name,
            server_state(),
            has_confusion=confusion,
            seldon_class_label=class_label,
            seldon_labels={"model_name": name, "method": "feedback"},
        )
        for name, confusion, class_label in (
            ("iris", True, True),
            ("bin\x01ary", True, False),
            ("plain", False, True),
        )
    ]
    registry = registry_of(FeedbackCollector("server", sources))
    assert_same_as_library(registry)
    [cells] = [f for f in registry.collect() if f.name == "feedback_confusion_matrix"]
    assert isinstance(cells.samples, Grids) and len(cells.samples.grids) == 2  # rendered in bulk
    text = CachingEncoder().choose("")[0](registry).decode()
    assert text.count("# TYPE feedback_confusion_matrix_total counter") == 1
    assert 'model="bin\x01ary",prediction="0",truth="0"' in text
    assert 'feedback_confusion_matrix_total{model="plain"' not in text


def test_what_the_library_keeps() -> None:
    registry = registry_of()
    Counter("with_created", "a counter with a _created sample", ["a"], registry=registry).labels(
        "x"
    ).inc()
    Info("build", "an info metric", registry=registry).info({"version": "1"})
    assert_same_as_library(registry)
    assert_same_as_library(
        registry_of(Fixed([GaugeMetricFamily("temp", "t", 1.0, unit="celsius")]))
    )


names = st.sampled_from(["plain", "with:colon", "dash-ed", "ünï", "9lead", "x_total", "a.b"])
label_names = st.sampled_from(["class", "le", "dash-ed", "ünï", "a.b", "x"])
label_sets = st.dictionaries(label_names, st.text(max_size=6), max_size=3)
values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**40), 2**40))


@st.composite
def families(draw: st.DrawFn) -> Metric:
    name, kind = draw(names), draw(st.sampled_from(["counter", "gauge", "histogram"]))
    documentation = draw(st.text(max_size=8))
    if kind == "histogram":
        family: Metric = HistogramMetricFamily(name, documentation, labels=None)
        labels = draw(label_sets)
        labels.pop("le", None)
        for bound in ("0.5", "+Inf"):
            family.add_sample(name + "_bucket", {**labels, "le": bound}, draw(values))
        family.add_sample(name + "_count", labels, draw(values))
        family.add_sample(name + "_sum", labels, draw(values))
        return family
    family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
        name, documentation, labels=None
    )
    suffix = "_total" if kind == "counter" else ""
    for labels in draw(st.lists(label_sets, max_size=3)):
        family.add_sample(family.name + suffix, labels, draw(values))
    return family


@settings(max_examples=200, deadline=None)
@given(st.lists(families(), max_size=4, unique_by=lambda f: f.name))
def test_random_families(generated: list[Metric]) -> None:
    assert_same_as_library(registry_of(Fixed(generated)))


def grid_family(matrix: np.ndarray, fixed: dict[str, str], labels: list[str]) -> Metric:
    family = CounterMetricFamily("cells", "the grid", labels=None)
    family.samples = Grid("cells_total", fixed, "truth", labels, "prediction", labels, matrix)
    return family


def test_a_big_grid_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows, counts past Go's exponent threshold, zeros left out."""
    monkeypatch.setattr(exposition_module, "GRID_BLOCK_CELLS", 100)
    rng = np.random.default_rng(3)
    matrix = rng.integers(0, 3, (40, 40)) * rng.choice([1, 999_999, 1_000_000, 2**60], (40, 40))
    labels = [str(i - 7) for i in range(40)]
    assert_same_as_library(registry_of(Fixed([grid_family(matrix, {"model": TRICKY}, labels)])))


@given(
    st.dictionaries(label_names.filter(lambda n: n not in ("truth", "prediction")), st.text()),
    st.lists(st.text(max_size=4), min_size=2, max_size=2, unique=True),
)
@example(fixed={"x": "\x01"}, labels=["1", "2"])  # a placeholder: rendered sample by sample
@settings(max_examples=100, deadline=None)
def test_grids_with_any_labels(fixed: dict[str, str], labels: list[str]) -> None:
    """Any fixed labels (even the template's placeholder characters) and label values."""
    matrix = np.array([[1, 0], [5, 2_000_000]])
    assert_same_as_library(registry_of(Fixed([grid_family(matrix, fixed, labels)])))
