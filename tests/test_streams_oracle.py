"""The event corpus and the oracle of issue 13's end-to-end tests, checked on their own.

Every generated request must decode with the server's own decoders and score to the classes the
item says; the oracle must give hand-computed numbers on a hand-made stream.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable

import pytest
import yaml
from hypothesis import given, settings

from adserver.catalogue.wire import LOGGER_TYPES
from adserver.loader import resolve_class
from adserver.wire.cloudevents import decode_request
from adserver.wire.inference import prediction_payload
from adserver.wire.seldon_feedback import parse_feedback
from tests.support.models_config import models_config
from tests.support.oracle import (
    MISSING,
    OVERFLOW,
    Between,
    Oracle,
    Sent,
    first_difference,
    segment_name,
    value_name,
)
from tests.support.streams import (
    MODELS,
    OVERLONG,
    Item,
    ModelSpec,
    Stream,
    draw_scores,
    generate,
    item_requests,
    streams,
    truth_rows,
)

pytestmark = pytest.mark.unit

NOW = 1_750_000_000.0
BY_NAME = {model.name: model for model in MODELS}


def sent_in_order(stream: Stream, at: float = NOW) -> list[Sent]:
    """Every request answered as it must be, one millisecond each."""
    return [
        Sent(request, request.status, at + i / 1000, at + (i + 1) / 1000)
        for i, request in enumerate(stream.requests)
    ]


def scorer(model: ModelSpec):
    options = {"threshold": model.threshold} if model.threshold is not None else {}
    return resolve_class(model.storage_uri)(classes=model.classes, **options)


def cells(truth: Iterable[int], predicted: Iterable[int]) -> Counter[tuple[int, int]]:
    return Counter(zip(truth, predicted, strict=True))


def observed(model: ModelSpec, truth: object, response: object) -> Counter[tuple[int, int]]:
    found = scorer(model).observe(truth, response).cells
    return Counter({(t, p): n for t, p, n in found.items()})


@settings(max_examples=25, deadline=None)
@given(streams(NOW))
def test_every_request_decodes_and_scores_as_its_item_says(stream: Stream) -> None:
    items = {item.index: item for item in stream.items}
    for request in stream.requests:
        (event,) = decode_request(request.lower_headers(), request.body)
        if request.item is None or request.role == "redelivery":  # noise, or a copy
            continue
        item = items[request.item]
        kind = LOGGER_TYPES.get(event.attributes.get("type"), (None,))[0]
        if request.role in ("label", "feedback"):
            feedback = parse_feedback(event.payload())
            assert (feedback.response is None) == (request.role == "label")
            response = feedback.response if feedback.response is not None else item.scores
            tags = event.payload()["truth"].get("meta", {}).get("tags", {})
            for dimension, value in item.label_values.items():
                assert tags.get(dimension.split(":", 1)[1]) == value
            assert observed(item.model, feedback.truth, response) == cells(
                item.truth, item.predicted
            ), request
        elif kind == "response":
            rows = prediction_payload(event.payload())
            assert observed(item.model, truth_rows(item), rows) == cells(item.truth, item.predicted)
            assert event.attributes["time"].timestamp() == pytest.approx(item.time, abs=1e-6)
        else:
            assert kind == "request", request


def test_a_seed_replays_the_same_stream() -> None:
    first, again = generate(7, 30, now=NOW), generate(7, 30, now=NOW)
    assert [(r.path, dict(r.headers), r.body) for r in first.requests] == [
        (r.path, dict(r.headers), r.body) for r in again.requests
    ]
    assert generate(8, 30, now=NOW).requests != first.requests


@pytest.mark.parametrize("seed", range(5))
def test_streams_are_out_of_order_and_keep_each_items_order(seed: int) -> None:
    stream = generate(seed, 60, now=NOW, days=3)
    times = [item.time for item in stream.items if item.time is not None]
    assert all(NOW - 3 * 86400 <= t < NOW for t in times)
    assert times != sorted(times)
    for item in stream.items:
        steps = [r.role for r in stream.requests if r.item == item.index and r.role != "redelivery"]
        assert steps == [r.role for r in item_requests(item, random.Random(0))]
    flows = Counter(item.flow for item in stream.items)
    assert len(flows) == 4, flows  # every flow appears in a stream this long
    # a request id is one model's only; Seldon graph nodes may share one puid across models
    owners: dict[str, set[str]] = {}
    for item in stream.items:
        assert item.model.name not in owners.get(item.request_id, set())
        owners.setdefault(item.request_id, set()).add(item.model.name)


def test_some_stream_sends_one_puid_through_both_graph_nodes() -> None:
    owners: dict[str, set[str]] = {}
    for seed in range(10):
        for item in generate(seed, 60, now=NOW).items:
            owners.setdefault(item.request_id, set()).add(item.model.name)
    shared = [names for names in owners.values() if len(names) > 1]
    assert shared and all(names == {"classifier", "ranker"} for names in shared)


def test_binary_scores_keep_the_side_of_the_threshold() -> None:
    rng = random.Random(3)
    churn = BY_NAME["churn"]
    for predicted in (0, 1) * 200:
        assert (draw_scores(churn, predicted, rng) >= 0.5) == bool(predicted)


def item(
    index: int,
    model: str,
    flow: str,
    time: float | None,
    truth: tuple[int, ...],
    predicted: tuple[int, ...],
    values: dict | None = None,
    label: dict | None = None,
) -> Item:
    spec = BY_NAME[model]
    return Item(
        index,
        spec,
        f"r{index}",
        flow,
        None if time is None else int(time * 1e6),
        truth,
        predicted,
        values or {},
        label or {},
        tuple(draw_scores(spec, p, random.Random(0)) for p in predicted),
    )


def hand_stream() -> Stream:
    """Three iris predictions an hour apart, and one for churn."""
    t = NOW - 86400
    items = (
        item(0, "iris", "direct", t, (0, 1), (0, 0), {"endpoint": "canary"}),
        item(1, "iris", "logged_then_label", t + 3600, (2,), (2,), {"endpoint": ""}),
        item(2, "iris", "label_then_logged", t + 7200, (1, 1), (1, 2), {"endpoint": "default"}),
        item(3, "iris", "logged_only", t + 30, (0,), (0,), {"endpoint": "canary"}),
        item(4, "iris", "direct", None, (2,), (0,), {"endpoint": "canary"}),
    )
    rng = random.Random(0)
    requests = [r for it in items for r in item_requests(it, rng)]
    return Stream(items, tuple(requests), NOW, MODELS)


def test_oracle_on_a_hand_computed_stream() -> None:
    stream = hand_stream()
    sent = sent_in_order(stream)
    oracle = Oracle(stream, sent)
    t = NOW - 86400
    # all rows: truth 0,1,2,1,1,2 against 0,0,2,1,2,0
    totals = oracle.totals("iris")
    assert totals["classes"] == [0, 1, 2]
    assert totals["confusion_matrix"] == [[1, 0, 0], [1, 1, 1], [1, 0, 1]]
    assert totals["rows"] == 6
    assert totals["accuracy"] == pytest.approx(3 / 6)
    assert totals["predictions"] == 4  # rows logged: item 1 (1), 2 (2), 3 (1)
    assert totals["label_coverage"] == 1.0  # rows scored (6) >= rows logged (4)
    assert totals["events"] == 4  # two direct feedbacks, two labels
    assert totals["per_class"]["0"] == {
        "precision": pytest.approx(1 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.5),
        "support": 1,
    }
    assert totals["macro"]["recall"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert set(totals["segments"]) == {"canary", MISSING, "default"}
    canary = totals["segments"]["canary"]
    assert (canary["rows"], canary["predictions"], canary["label_coverage"]) == (3, 1, 1.0)
    # by prediction time: only item 1's row is in [t + 3600, t + 3660)
    hour = oracle.summary("iris", None, t + 3600, t + 3660)
    assert (hour["rows"], hour["predictions"], hour["confusion_matrix"]) == (
        1,
        1,
        [[0, 0, 0], [0, 0, 0], [0, 0, 1]],
    )
    assert hour["label_delay"]["count"] == 1
    # item 1's label is the 4th request: sent 3..4 ms after NOW, a day minus an hour late
    delay = hour["label_delay"]["sum"]
    assert (delay.low, delay.high) == pytest.approx((86400 - 3600 + 0.003, 86400 - 3600 + 0.004))
    # item 2's label came first: it is joined when its response arrives, delay from the label
    late = oracle.summary("iris", "default", t + 7200, t + 7260)
    assert (late["rows"], late["label_coverage"], late["label_delay"]["count"]) == (2, 1.0, 2)
    # the first minute holds item 0 (rows) and item 3 (a prediction nobody labelled)
    first = oracle.summary("iris", "canary", t, t + 60)
    assert (first["rows"], first["predictions"], first["label_coverage"]) == (2, 1, 1.0)
    # item 4 counts at its arrival: a range ending inside that instant is ambiguous
    arrival = sent[-1]
    assert oracle.ambiguous("iris", arrival.before - 60, (arrival.before + arrival.after) / 2)
    assert not oracle.ambiguous("iris", t, t + 60)
    assert oracle.summary("iris", None, arrival.before, arrival.after + 1)["rows"] == 1


def test_the_segment_cap_admits_in_order_of_arrival() -> None:
    t = NOW - 3600
    items = tuple(
        item(i, "churn", "logged_only", t + i, (1,), (1,), {"annotation:rollout": value})
        for i, value in enumerate(("stable", None, "canary", "stable"))
    )
    stream = Stream(
        items, tuple(r for it in items for r in item_requests(it, random.Random(0))), NOW
    )
    oracle = Oracle(stream, sent_in_order(stream))
    segments = {s: oracle.summary("churn", s)["predictions"] for s in oracle.segments("churn")}
    assert segments == {"stable": 2, MISSING: 1, OVERFLOW: 1}  # max_segments: 2


def test_segment_names() -> None:
    fraud = BY_NAME["fraud"]
    assert segment_name(fraud, {"endpoint": "default"}, {"tag:region": "eu"}) == "default/eu"
    assert segment_name(fraud, {"endpoint": ""}, {"tag:region": None}) == f"{MISSING}/{MISSING}"
    # the prediction's value wins; the label fills what the prediction does not know
    assert segment_name(fraud, {"endpoint": "a", "tag:region": "us"}, {"tag:region": "eu"}) == (
        "a/us"
    )
    assert segment_name(BY_NAME["ranker"], {"endpoint": "x"}) == ""
    assert value_name(OVERLONG) == OVERFLOW and value_name("a\nb") == OVERFLOW
    assert value_name("x" * 64) == "x" * 64


def test_first_difference_names_the_place() -> None:
    expected = {"a": {"b": [1, 2.0]}, "c": Between(1, 2)}
    assert first_difference(expected, {"a": {"b": [1, 2.0 + 1e-12]}, "c": 1.5, "d": 0}) is None
    assert first_difference(expected, {"a": {"b": [1, 2.5]}, "c": 1.5}) == (
        "$.a.b[1]: expected 2.0, got 2.5"
    )
    assert "between 1 and 2" in first_difference(expected, {"a": {"b": [1, 2.0]}, "c": 3})
    assert "key 'c' is missing" in first_difference(expected, {"a": {"b": [1, 2.0]}})
    assert first_difference([1, 2], [1]) == "$: expected [1, 2], got [1]"


def test_models_config_names_the_peers_of_issue_13() -> None:
    document = yaml.safe_load(models_config())
    models = document["models"]
    assert len({m["name"] for m in models}) == len(models)
    by_isvc = [
        m
        for m in models
        if set(m["match"]) & {"inferenceservicename"} and "modelid" not in m["match"]
    ]
    assert len(by_isvc) == 3
    assert [m["name"] for m in models if "model_name" in m["match"]] == ["digits-v2"]
    assert len([m for m in models if "modelid" in m["match"]]) == 2
    kinds = {d.split(":")[0] for m in models for d in m.get("segment_by", [])}
    assert {"endpoint", "annotation", "tag", "model_version"} <= kinds
    assert json.loads(json.dumps(document)) == document  # plain YAML: no tags, no anchors
