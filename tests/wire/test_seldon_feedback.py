"""``parse_feedback``: a Seldon ``Feedback`` body ``{request?, response?, truth, reward?}``.

Custom metrics come from ``truth.meta.metrics`` (as in Seldon's server), each item validated on
its own; ``meta.puid`` is kept; ``reward`` is ignored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from adserver.catalogue import reasons
from adserver.errors import BadRequest
from adserver.wire.seldon_feedback import Feedback, parse_feedback
from cm_models.custom_metrics import CustomMetric
from tests.support.events import feedback, ndarray, tensor

#: protocols.md 1.2, with a request, a puid and custom metrics added.
SELDON_EXAMPLE = {
    "reward": 0,
    "truth": {
        "data": {"names": ["t:0", "t:1", "t:2"], "ndarray": [[0, 0, 1]]},
        "meta": {
            "tags": {"user": "Seldon Admin"},
            "puid": "f8b21985",
            "metrics": [
                {"key": "mygauge", "type": "GAUGE", "value": 2.5, "tags": {"b": "2", "a": "1"}},
                {"key": "clicks", "type": "COUNTER", "value": 1},
            ],
        },
    },
    "response": {"data": {"ndarray": [[0.0007, 0.0037, 0.9956]]}},
    "request": tensor([1, 4], [1, 2, 3, 4]),
}


def refused(body: Any, reason: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_feedback(body)
    assert caught.value.reason == reason, caught.value.message


def test_every_part_of_a_feedback_body() -> None:
    parsed = parse_feedback(SELDON_EXAMPLE)
    assert parsed.truth.tolist() == [[0, 0, 1]]
    assert parsed.response.tolist() == [[0.0007, 0.0037, 0.9956]]
    assert parsed.request.shape == (1, 4)
    assert parsed.puid == "f8b21985"
    assert parsed.metrics == (
        CustomMetric("mygauge", "GAUGE", 2.5, (("a", "1"), ("b", "2"))),
        CustomMetric("clicks", "COUNTER", 1),
    )
    assert parsed.metric_problems == ()


def test_a_label_alone() -> None:
    """A truth without its response (joined later by request id): nothing else is required."""
    parsed = parse_feedback({"truth": ndarray([1]), "response": None})
    assert parsed == Feedback(truth=parsed.truth)
    assert parsed.truth.tolist() == [1]


def test_truth_as_jsondata_for_a_user_model() -> None:
    parsed = parse_feedback({"truth": {"jsonData": {"label": "cat"}}, "response": ndarray([1])})
    assert parsed.truth == {"label": "cat"}
    assert isinstance(parsed.response, np.ndarray)


def test_bad_metric_items_are_refused_one_by_one() -> None:
    """Seldon dropped the whole list (and the update) for one bad item; we keep the rest."""
    metrics = [
        {"key": "ok", "type": "COUNTER", "value": 1},
        {"key": "bad name", "type": "COUNTER", "value": 1},
        {"key": "t", "type": "TIMER", "value": "12"},
        "not a dict",
    ]
    body = {"truth": {**ndarray([1]), "meta": {"metrics": metrics}}, "response": ndarray([1])}
    parsed = parse_feedback(body)
    assert [m.key for m in parsed.metrics] == ["ok"]
    assert len(parsed.metric_problems) == 3


@pytest.mark.parametrize("meta", [None, [], "x", {"puid": 7}, {"metrics": None}], ids=repr)
def test_odd_meta_is_ignored(meta: Any) -> None:
    parsed = parse_feedback(feedback({"meta": meta, **ndarray([1])}, [1]))
    assert parsed.puid is None and parsed.metrics == () and parsed.metric_problems == ()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([SELDON_EXAMPLE], reasons.INVALID_BODY),
        ("feedback", reasons.INVALID_BODY),
        ({"response": ndarray([1])}, reasons.MISSING_TRUTH),
        ({"truth": None, "response": ndarray([1])}, reasons.MISSING_TRUTH),
        ({"truth": [1], "response": ndarray([1])}, reasons.INVALID_MESSAGE),
        ({"truth": {"meta": {}}}, reasons.MISSING_DATA),
        ({"truth": ndarray([1]), "response": [1]}, reasons.INVALID_MESSAGE),
        ({"truth": ndarray([1]), "request": {"data": {}}}, reasons.UNKNOWN_DATA_FORM),
        (
            {"truth": {**ndarray([1]), "meta": {"metrics": {"key": "x"}}}},
            reasons.INVALID_METRICS,
        ),
    ],
    ids=[
        "a_list",
        "a_string",
        "no_truth",
        "null_truth",
        "truth_not_a_message",
        "truth_without_data",
        "response_not_a_message",
        "request_without_a_form",
        "metrics_not_a_list",
    ],
)
def test_refused_bodies(body: Any, reason: str) -> None:
    refused(body, reason)
