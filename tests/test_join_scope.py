"""Which predictions a server keeps for the join, and what share of them is labelled.

A Trigger on the logger type alone delivers every model's predictions in the namespace; with
--inference_service the server keeps only its own model's and counts the others. Label coverage
is right both when labels are joined to logged predictions and in Seldon's classic flow, where
feedback carries its response and no logger reports predictions.
"""

from __future__ import annotations

import pytest

from adserver.catalogue.wire import KSERVE_RESPONSE_TYPE
from tests.support.events import ce_headers, feedback, new_id
from tests.support.http import model_doc, post_json, scrape, send_event, value
from tests.support.processes import DATA, MULTICLASS_NUMERIC, ServerFactory

IRIS_RESPONSE = (DATA / "logger" / "kserve-iris-response.json").read_bytes()  # 2 rows


def log_prediction(url: str, request_id: str, **extensions: str) -> None:
    answer = post_json(
        url, IRIS_RESPONSE, ce_headers(request_id, event_type=KSERVE_RESPONSE_TYPE, **extensions)
    )
    assert answer.status_code == 200, answer.text


def label(url: str, request_id: str, truth: list[int]) -> None:
    answer = post_json(url, {"truth": {"data": {"ndarray": truth}}}, {"ce-requestid": request_id})
    assert answer.status_code == 200, answer.text


@pytest.fixture
def numeric(servers: ServerFactory):
    def start(*args: str, env: dict[str, str] | None = None):
        return servers("--storage_uri", MULTICLASS_NUMERIC, "--state", "memory", *args, env=env)

    return start


@pytest.mark.parametrize("how", ["flag", "env"])
def test_logger_events_of_other_models_are_counted_not_kept(numeric, how: str) -> None:
    server = (
        numeric("--inference_service", "sklearn-iris")
        if how == "flag"
        else numeric(env={"INFERENCE_SERVICE": "sklearn-iris"})
    )
    other, unnamed, own = new_id(), new_id(), new_id()
    log_prediction(server.url, other, inferenceservicename="another-model")
    log_prediction(server.url, unnamed)
    log_prediction(server.url, own, inferenceservicename="sklearn-iris")
    for request_id in (other, unnamed, own):
        label(server.url, request_id, [1, 0])
    samples = scrape(server.url)
    assert value(samples, "feedback_logger_events_total", kind="ignored_other_service") == 2
    assert value(samples, "feedback_logger_events_total", kind="response") == 1
    assert value(samples, "feedback_predicted_rows_total") == 2
    assert value(samples, "feedback_labels_total", outcome="joined") == 2
    assert value(samples, "feedback_labels_total", outcome="parked") == 4
    assert model_doc(server.url)["rows"] == 2


def test_without_inference_service_every_logger_event_is_kept(numeric) -> None:
    server = numeric()
    for name in ("one-model", "another-model"):
        log_prediction(server.url, new_id(), inferenceservicename=name)
    assert value(scrape(server.url), "feedback_predicted_rows_total") == 4


def test_label_coverage_in_the_classic_flow(numeric) -> None:
    """Feedback carrying its response labels the prediction it carries: every one is labelled."""
    server = numeric()
    assert value(scrape(server.url), "feedback_label_coverage") == 0
    send_event(server.url, feedback([[1], [2]], [[1], [0]]))
    assert value(scrape(server.url), "feedback_label_coverage") == 1


def test_label_coverage_of_logged_predictions(numeric) -> None:
    """Labelled rows over logged rows; labels that carry their response count as labelled."""
    server = numeric()
    first, second = new_id(), new_id()
    log_prediction(server.url, first)
    log_prediction(server.url, second)
    label(server.url, first, [1])  # row 0 of 4 logged rows
    assert value(scrape(server.url), "feedback_label_coverage") == 0.25
    send_event(server.url, feedback([[1]], [[1]]))  # its prediction was one of the logged rows
    assert value(scrape(server.url), "feedback_label_coverage") == 0.5
