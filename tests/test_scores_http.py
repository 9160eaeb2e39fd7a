"""A real server's ``scores`` (GET /v1/metrics?format=json) equal scikit-learn's over the rows
sent, in memory and durable (across a restart); out-of-range scores are refused at the door."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adserver.catalogue import reasons
from adserver.catalogue.wire import SELDON_RESPONSE_TYPE
from tests.support.events import ce_headers, feedback, new_id
from tests.support.http import model_doc, post_json, scrape, send_event, value
from tests.support.processes import ServerFactory, start_server
from tests.support.scores import assert_close, assert_scores

#: MulticlassOneHot keeps scores only when asked (its default, auto, is off).
SCORES_ON = ("--score_range", "0,1")


def stream(seed: int, width: int, events: int = 6) -> list[tuple[np.ndarray, np.ndarray]]:
    """Events of 1..40 rows; every other one's rows are raw (not summing to 1)."""
    rng = np.random.default_rng(seed)
    sent = []
    for i in range(events):
        rows = int(rng.integers(1, 41))
        truth = rng.integers(0, width, size=rows)
        scores = rng.dirichlet(np.ones(width), size=rows) if i % 2 else rng.random((rows, width))
        sent.append((truth, scores))
    return sent


@pytest.mark.parametrize("state", ["memory", "sqlite"])
def test_multiclass_scores_equal_sklearn(servers: ServerFactory, state: str) -> None:
    url = servers("--state", state, *SCORES_ON).url
    events = stream(1, 3)
    for truth, scores in events:
        send_event(url, feedback(np.eye(3)[truth].tolist(), scores.tolist()))
    truth = np.concatenate([t for t, _ in events])
    scores = np.concatenate([s for _, s in events])
    assert_scores(model_doc(url)["scores"], truth, scores, binary=False, width=3)


def test_binary_scores_survive_a_restart(tmp_path: Path) -> None:
    """predict_proba's columns, kept in the state file: the same section after a restart."""
    args = ("--storage_uri", "BinaryMetrics", "--state_dir", str(tmp_path))
    events = [(t % 2, s) for t, s in stream(2, 2)]
    first = start_server(*args)
    try:
        for truth, scores in events:
            send_event(first.url, feedback(truth.tolist(), scores.tolist()))
        before = model_doc(first.url)["scores"]
    finally:
        first.stop()
    truth = np.concatenate([t for t, _ in events])
    scores = np.concatenate([s for _, s in events])  # odd rows raw: class 0's column as sent
    assert_scores(before, truth, scores, binary=True, width=2)
    second = start_server(*args)
    try:
        assert_close(model_doc(second.url)["scores"], before)
    finally:
        second.stop()


def rejected(url: str, reason: str) -> float:
    return value(scrape(url), "feedback_events_rejected_total", reason=reason)


def test_scores_out_of_range_are_refused(servers: ServerFactory) -> None:
    """Feedback: 400 and counted; a logged response: acknowledged, not stored, counted."""
    url = servers("--state", "memory", *SCORES_ON).url
    answer = post_json(url, feedback([[0, 1]], [[0.5, 1.5]]), ce_headers())
    assert answer.status_code == 400
    assert answer.json()["reason"] == reasons.SCORE_OUT_OF_RANGE
    assert rejected(url, reasons.SCORE_OUT_OF_RANGE) == 1
    logged: dict[str, Any] = {"data": {"ndarray": [[-0.2, 1.2]]}}
    rid = new_id()
    headers = ce_headers(event_type=SELDON_RESPONSE_TYPE, requestid=rid)
    assert post_json(url, logged, headers).status_code == 200
    samples = scrape(url)
    kind = f"ignored_{reasons.SCORE_OUT_OF_RANGE}"
    assert value(samples, "feedback_logger_events_total", kind=kind) == 1
    assert model_doc(url)["scores"]["rows"] == 0


def test_score_range_off_accepts_any_numbers(servers: ServerFactory) -> None:
    url = servers("--state", "memory", "--score_range", "off").url
    send_event(url, feedback([[0, 1]], [[-3.0, 7.5]]))
    doc = model_doc(url)
    assert doc["rows"] == 1 and "scores" not in doc


def test_a_label_scores_its_logged_prediction(servers: ServerFactory) -> None:
    url = servers("--state", "memory", *SCORES_ON).url
    rid = new_id()
    response = {"data": {"ndarray": [[0.2, 0.8], [0.6, 0.4]]}}
    headers = ce_headers(event_type=SELDON_RESPONSE_TYPE, requestid=rid)
    assert post_json(url, response, headers).status_code == 200
    label = post_json(
        url, {"truth": {"data": {"ndarray": [[0, 1], [1, 0]]}}}, {"ce-requestid": rid}
    )
    assert label.status_code == 200, label.text
    scores = model_doc(url)["scores"]
    assert scores["rows"] == 2
    assert scores["log_loss"] == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2, rel=1e-12)


def test_a_response_wider_than_max_classes_is_refused(servers: ServerFactory) -> None:
    """Each column's scores are kept per class, so --max_classes caps the columns too (a 1-row
    event of 100,000 columns would otherwise keep 100,000 histograms)."""
    url = servers("--state", "memory", "--max_classes", "4", *SCORES_ON).url
    wide = [[0.2, 0.2, 0.2, 0.2, 0.2]]
    answer = post_json(url, feedback([[1, 0, 0, 0, 0]], wide), ce_headers())
    assert answer.status_code == 400
    assert answer.json()["reason"] == reasons.TOO_MANY_CLASSES
    headers = ce_headers(event_type=SELDON_RESPONSE_TYPE, requestid=new_id())
    assert post_json(url, {"data": {"ndarray": wide}}, headers).status_code == 200
    kind = f"ignored_{reasons.TOO_MANY_CLASSES}"
    assert value(scrape(url), "feedback_logger_events_total", kind=kind) == 1
    assert model_doc(url)["scores"]["rows"] == 0
    send_event(url, feedback([[0, 0, 0, 1]], [[0.1, 0.2, 0.3, 0.4]]))
    assert model_doc(url)["scores"]["rows"] == 1
