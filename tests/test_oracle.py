"""Derived metrics equal scikit-learn's (zero_division=0) after every update of random streams."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from adserver.exposition.summary import model_summary
from adserver.state.view import Delta, MetricsState
from cm_models import BinaryMetrics, MultiClassNumeric, MulticlassOneHot

ZERO = {"zero_division": 0}


def assert_matches_sklearn(summary: dict, truth: list[int], predicted: list[int]) -> None:
    labels = summary["classes"]
    assert labels == sorted(set(truth) | set(predicted) | set(labels))
    np.testing.assert_array_equal(
        summary["confusion_matrix"], confusion_matrix(truth, predicted, labels=labels)
    )
    assert summary["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, average=None, **ZERO
    )
    for i, label in enumerate(labels):
        row = summary["per_class"][str(label)]
        assert row["precision"] == pytest.approx(precision[i])
        assert row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]
        negatives = [t != label for t in truth]
        true_negatives = sum(n and p != label for n, p in zip(negatives, predicted, strict=True))
        expected = true_negatives / sum(negatives) if sum(negatives) else 0.0
        assert row["specificity"] == pytest.approx(expected)
    for average in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            truth, predicted, labels=labels, average=average, **ZERO
        )
        assert summary[average] == pytest.approx({"precision": p, "recall": r, "f1": f})


def replay(model, events, to_labels) -> None:
    """Feed events one by one, checking the oracle after each update."""
    state = MetricsState(model.classes)
    truth: list[int] = []
    predicted: list[int] = []
    for event_truth, event_response in events:
        observation = model.observe(event_truth, event_response)
        state.apply(Delta(cells=observation.cells, counters=(("rows_accepted", "", 1),)))
        t, p = to_labels(event_truth, event_response)
        truth += t
        predicted += p
        assert_matches_sklearn(model_summary(state), truth, predicted)


class_ids = st.integers(min_value=-3, max_value=6)
numeric_events = st.lists(
    st.integers(1, 5).flatmap(
        lambda n: st.tuples(
            st.lists(class_ids, min_size=n, max_size=n), st.lists(class_ids, min_size=n, max_size=n)
        )
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(numeric_events, st.lists(class_ids, max_size=3))
def test_multiclass_numeric_stream(events, fixed_classes) -> None:
    model = MultiClassNumeric(classes=fixed_classes)
    replay(model, events, lambda t, p: (list(t), list(p)))


@st.composite
def one_hot_events(draw):
    width = draw(st.integers(2, 5))
    rows = st.integers(1, 4)

    def scores(n: int):
        return st.lists(
            st.lists(st.floats(0, 1, allow_nan=False), min_size=width, max_size=width),
            min_size=n,
            max_size=n,
        )

    events = []
    for _ in range(draw(st.integers(1, 10))):
        n = draw(rows)
        hot = draw(st.lists(st.integers(0, width - 1), min_size=n, max_size=n))
        truth = [[1.0 if j == k else 0.0 for j in range(width)] for k in hot]
        events.append((truth, draw(scores(n))))
    return events


@settings(max_examples=60, deadline=None)
@given(one_hot_events())
def test_multiclass_one_hot_stream(events) -> None:
    replay(
        MulticlassOneHot(),
        events,
        lambda t, p: (np.argmax(t, axis=1).tolist(), np.argmax(p, axis=1).tolist()),
    )


binary_events = st.lists(
    st.integers(1, 5).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(0, 1), min_size=n, max_size=n),
            st.lists(st.floats(0, 1, allow_nan=False), min_size=n, max_size=n),
        )
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(binary_events, st.sampled_from([0.3, 0.5, 0.9]))
def test_binary_stream(events, threshold) -> None:
    replay(
        BinaryMetrics(threshold=threshold),
        events,
        lambda t, p: (list(t), [int(x >= threshold) for x in p]),
    )


def test_batch_counts_every_row() -> None:
    """The reference counted only row 0 of a batch; here a 1000-row batch is 1000 rows."""
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 4, 1000), rng.integers(0, 4, 1000)
    state = MetricsState()
    state.apply(Delta(cells=MultiClassNumeric().observe(truth.tolist(), predicted.tolist()).cells))
    assert_matches_sklearn(model_summary(state), truth.tolist(), predicted.tolist())
    assert int(state.confusion.matrix().sum()) == 1000
