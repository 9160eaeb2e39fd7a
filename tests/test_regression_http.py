"""RegressionMetrics through real servers (memory and durable state): direct feedback, a label
joined to a logged prediction, replies, and bad input, compared with scikit-learn."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adserver.catalogue import reasons
from adserver.catalogue.wire import KSERVE_REQUEST_TYPE, KSERVE_RESPONSE_TYPE
from tests.support.events import ce_headers, feedback, new_id
from tests.support.http import model_doc, moved_samples, post_json, scrape, send_event, value
from tests.support.processes import REPLY_FLAGS, ServerFactory
from tests.support.regression import sklearn_regression
from tests.test_join import label, logged
from tests.test_startup import refused

REGRESSOR = "adserver.cm_models.regression_metrics.RegressionMetrics"


@pytest.fixture(scope="module", params=["memory", "sqlite"])
def url(module_servers: ServerFactory, request: pytest.FixtureRequest) -> str:
    flags = ("--storage_uri", REGRESSOR, "--state", request.param, *REPLY_FLAGS)
    return module_servers(*flags).url


def assert_matches_sklearn(section: dict[str, Any], truth: list[float], predicted: list[float]):
    y, p = np.array(truth), np.array(predicted)
    expected = {"rows": y.size, **sklearn_regression(truth, predicted)}
    assert {name: section[name] for name in expected} == pytest.approx(expected, rel=1e-9)
    assert section["abs_error"]["count"] == y.size
    assert section["abs_error"]["buckets"]["1.0"] == int((np.abs(p - y) <= 1).sum())


def test_feedback_joins_and_replies_match_sklearn(url: str) -> None:
    rng = random.Random(14)
    truth: list[float] = []
    predicted: list[float] = []
    for _ in range(5):
        n = rng.randint(1, 20)
        event_truth = [round(rng.uniform(-50, 50), 3) for _ in range(n)]
        event_response = [[t + round(rng.gauss(0, 2), 3)] for t in event_truth]  # one column
        send_event(url, feedback(event_truth, event_response))
        truth += event_truth
        predicted += [row[0] for row in event_response]
        assert_matches_sklearn(model_doc(url)["regression"], truth, predicted)

    rid = new_id()  # KServe's iris example predicts [1, 1]; the label comes later
    logged(url, "kserve-iris-request.json", KSERVE_REQUEST_TYPE, rid)
    logged(url, "kserve-iris-response.json", KSERVE_RESPONSE_TYPE, rid)
    label(url, [1.5, 0.25], **{"ce-requestid": rid})
    truth += [1.5, 0.25]
    predicted += [1.0, 1.0]
    doc = model_doc(url)
    assert_matches_sklearn(doc["regression"], truth, predicted)
    assert doc["rows"] == len(truth)

    answer = post_json(url, feedback([2.0], [3.0]), {**ce_headers(new_id()), "Prefer": "reply"})
    assert answer.status_code == 200, answer.text
    assert_matches_sklearn(answer.json()["regression"], [*truth, 2.0], [*predicted, 3.0])


@pytest.mark.parametrize(
    ("truth", "response", "reason"),
    [
        ([[1, 2]], [1], reasons.NOT_A_REGRESSION_TARGET),
        ([1e200], [1], reasons.VALUE_TOO_LARGE),
        ([1, 2], [1], reasons.ROW_COUNT_MISMATCH),
        (["x"], [1], reasons.NON_NUMERIC),
    ],
)
def test_bad_input_is_a_json_400_that_changes_nothing_but_its_count(
    url: str, truth: Any, response: Any, reason: str
) -> None:
    before, doc = scrape(url), model_doc(url)
    answer = post_json(url, feedback(truth, response), ce_headers(new_id()))
    assert answer.status_code == 400
    assert answer.json()["reason"] == reason and answer.json()["error"]
    assert model_doc(url) == doc
    assert moved_samples(before, scrape(url)) == [
        ("feedback_events_rejected_total", frozenset({("model", "model"), ("reason", reason)}))
    ]


def test_a_logged_prediction_of_no_number_per_row_is_acknowledged_not_stored(url: str) -> None:
    """So a later label never fails on it: it parks, as for a prediction never logged."""
    kind = "ignored_" + reasons.NOT_A_REGRESSION_TARGET
    before = value(scrape(url), "feedback_logger_events_total", kind=kind)
    rid = new_id()
    sent = ce_headers(rid, source="predictor", event_type=KSERVE_RESPONSE_TYPE)
    answer = post_json(url, {"predictions": [[1.0, 2.0]]}, sent)
    assert answer.status_code == 200, answer.text
    assert value(scrape(url), "feedback_logger_events_total", kind=kind) == before + 1


def test_a_durable_state_keeps_its_sums_and_its_histogram_width(
    servers: ServerFactory, tmp_path: Path
) -> None:
    flags = ("--state_dir", str(tmp_path), "--storage_uri", REGRESSOR)
    first = servers(*flags)
    send_event(first.url, feedback([1.0, 2.0, 4.0], [1.5, 2.0, 3.0]))
    section = model_doc(first.url)["regression"]
    assert first.stop() == 0
    assert "--error_buckets" in refused(*flags, "--error_buckets", "1,2")
    assert model_doc(servers(*flags).url)["regression"] == section
