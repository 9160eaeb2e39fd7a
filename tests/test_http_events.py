"""POST / over real HTTP: every content mode, every data form, every row counted exactly once."""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import requests

from tests.support.events import ce_headers, feedback, new_id, structured, tensor, tftensor_content
from tests.support.http import cells, model_doc, post_json, progress, scrape, send_event, value
from tests.support.processes import MULTICLASS_NUMERIC, ServerFactory

# One one-hot row: truth class 2, predicted class 2 (probabilities, argmax).
ROW = feedback([[0, 0, 1]], [[0.0007, 0.0037, 0.9956]])
ROW_CELL = Counter({(2, 2): 1})
STRUCTURED = {"Content-Type": "application/cloudevents+json"}
BATCH = {"Content-Type": "application/cloudevents-batch+json"}


@pytest.fixture(scope="module")
def onehot(module_servers: ServerFactory) -> str:
    """The reference's default model, shared by the module (tests compare before/after)."""
    return module_servers().url


@pytest.fixture(scope="module")
def numeric(module_servers: ServerFactory) -> str:
    return module_servers("--storage_uri", MULTICLASS_NUMERIC).url


def assert_one_row_counted(url: str, body: Any, headers: dict[str, str]) -> None:
    """The delivery is accepted and adds exactly ROW: one event, one row, its one cell."""
    before = model_doc(url)
    answer = post_json(url, body, headers)
    assert answer.status_code == 200, answer.text
    change = progress(before, model_doc(url))
    assert (change.events, change.rows, change.cells) == (1, 1, ROW_CELL)


def test_binary_event_counts_one_row(onehot: str) -> None:
    """The Broker's usual delivery: binary mode, Feedback JSON body."""
    assert_one_row_counted(
        onehot, ROW, ce_headers(requestid="r-1", knativearrivaltime="2021-02-22")
    )


def test_header_names_in_any_case(onehot: str) -> None:
    """HTTP header names are case-insensitive; the id must still be read (proved by dedup)."""
    event_id = new_id()
    shouting = {
        "CE-SPECVERSION": "1.0",
        "Ce-Id": event_id,
        "cE-sOuRcE": "case-test",
        "CE-TYPE": "io.seldon.serving.feedback",
        "Ce-Requestid": "r-case",
        "CONTENT-TYPE": "application/json",
    }
    before = model_doc(onehot)
    assert post_json(onehot, ROW, shouting).status_code == 200
    lower = {k.lower(): v for k, v in shouting.items()}
    assert post_json(onehot, ROW, lower).status_code == 200
    change = progress(before, model_doc(onehot))
    assert (change.events, change.rows) == (1, 1)


@pytest.mark.parametrize(
    "content_type", ["application/cloudevents+json; charset=UTF-8", "application/cloudevents+json"]
)
def test_structured_mode_with_data(onehot: str, content_type: str) -> None:
    assert_one_row_counted(onehot, structured(ROW), {"Content-Type": content_type})


def test_structured_mode_with_data_base64(onehot: str) -> None:
    event = structured(None)
    del event["data"]
    event["data_base64"] = base64.b64encode(json.dumps(ROW).encode()).decode()
    assert_one_row_counted(onehot, event, STRUCTURED)


def test_structured_mode_deduplicates_on_source_and_id(onehot: str) -> None:
    event = structured(ROW)
    before = model_doc(onehot)
    for _ in range(2):
        answer = post_json(onehot, event, STRUCTURED)
        assert answer.status_code == 200
    assert progress(before, model_doc(onehot)).events == 1


def test_batched_mode_counts_every_element(onehot: str) -> None:
    """Each element of a batch is an event; a two-row element adds two rows."""
    batch = [
        structured(feedback([[1, 0, 0]], [[0.9, 0.05, 0.05]])),
        structured(feedback([[0, 1, 0], [0, 0, 1]], [[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]])),
        structured(feedback([[0, 0, 1]], [[0.2, 0.2, 0.6]])),
    ]
    before = model_doc(onehot)
    answer = post_json(onehot, batch, BATCH)
    assert answer.status_code == 200, answer.text
    assert answer.content == b""
    change = progress(before, model_doc(onehot))
    assert (change.events, change.rows) == (3, 4)
    assert change.cells == Counter({(0, 0): 1, (1, 1): 1, (2, 0): 1, (2, 2): 1})


def test_batch_repeating_an_event_counts_it_once(onehot: str) -> None:
    event = structured(ROW)
    before = model_doc(onehot)
    samples_before = scrape(onehot)
    answer = post_json(onehot, [event, event], BATCH)
    assert answer.status_code == 200
    assert progress(before, model_doc(onehot)).events == 1
    duplicates = value(scrape(onehot), "feedback_events_duplicate_total")
    assert duplicates - value(samples_before, "feedback_events_duplicate_total") == 1


def test_plain_json_post_without_ce_headers(onehot: str) -> None:
    """Direct clients POST plain Feedback; without an id there is nothing to deduplicate on."""
    before = model_doc(onehot)
    for _ in range(2):
        answer = post_json(onehot, ROW)
        assert answer.status_code == 200, answer.text
        assert answer.content == b""
    change = progress(before, model_doc(onehot))
    assert (change.events, change.rows, change.cells) == (2, 2, Counter({(2, 2): 2}))


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", "application/octet-stream"]
)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "plain"])
def test_json_body_whatever_the_content_type(onehot: str, content_type: str, binary: bool) -> None:
    """KServe labels JSON as form data (curl -d); the body is JSON all the same."""
    headers = ce_headers(content_type=content_type) if binary else {"Content-Type": content_type}
    assert_one_row_counted(onehot, ROW, headers)


def test_json_body_without_content_type(onehot: str) -> None:
    before = model_doc(onehot)
    answer = requests.post(onehot + "/", data=json.dumps(ROW).encode(), timeout=5)
    assert answer.status_code == 200, answer.text
    assert progress(before, model_doc(onehot)).rows == 1


def chunks(payload: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(payload), size):
        yield payload[start : start + size]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "plain"])
def test_chunked_request_body(onehot: str, binary: bool) -> None:
    """A generator body makes requests send ``Transfer-Encoding: chunked``."""
    body = json.dumps(feedback([[1, 0, 0]] * 50, [[0.8, 0.1, 0.1]] * 50)).encode()
    headers = ce_headers() if binary else {"Content-Type": "application/json"}
    before = model_doc(onehot)
    answer = requests.post(onehot + "/", data=chunks(body, 7), headers=headers, timeout=5)
    assert answer.request.headers.get("Transfer-Encoding") == "chunked"
    assert answer.status_code == 200, answer.text
    change = progress(before, model_doc(onehot))
    assert (change.events, change.rows, change.cells) == (1, 50, Counter({(0, 0): 50}))


def test_large_event_over_64_kib_is_accepted(onehot: str) -> None:
    """CloudEvents consumers should accept events of at least 64 KiB."""
    rows = 3000
    body = feedback([[0, 1, 0]] * rows, [[0.1, 0.8, 0.1]] * rows)
    assert len(json.dumps(body)) > 64 * 1024
    before = model_doc(onehot)
    send_event(onehot, body)
    assert progress(before, model_doc(onehot)).cells == Counter({(1, 1): rows})


# --------------------------------------------------------------------------- data forms


def tf_int64_camel(rows: list[list[int]]) -> dict[str, Any]:
    """protobuf JSON of a DT_INT64 tensor: camelCase keys, int64 values as strings."""
    dims = [{"size": str(len(rows))}, {"size": str(len(rows[0]))}]
    values = [str(v) for row in rows for v in row]
    proto = {"dtype": "DT_INT64", "int64Val": values, "tensorShape": {"dim": dims}}
    return {"data": {"names": [], "tftensor": proto}}


def tf_float_snake(rows: list[list[float]]) -> dict[str, Any]:
    dims = [{"size": len(rows)}, {"size": len(rows[0])}]
    proto = {
        "dtype": "DT_FLOAT",
        "float_val": [v for row in rows for v in row],
        "tensor_shape": {"dim": dims},
    }
    return {"data": {"tftensor": proto}}


DATA_FORMS = {
    "ndarray": (
        {"data": {"ndarray": [[0, 1, 0], [1, 0, 0]]}},
        {"data": {"ndarray": [[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]}},
    ),
    "ndarray_with_names": (
        {"data": {"names": ["t:0", "t:1", "t:2"], "ndarray": [[0, 1, 0], [1, 0, 0]]}},
        {"data": {"names": ["p:0", "p:1", "p:2"], "ndarray": [[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]}},
    ),
    "tensor": (
        tensor([2, 3], [0, 1, 0, 1, 0, 0]),
        tensor([2, 3], [0.2, 0.7, 0.1, 0.1, 0.1, 0.8]),
    ),
    "tftensor_int64_camel_and_float_snake": (
        tf_int64_camel([[0, 1, 0], [1, 0, 0]]),
        tf_float_snake([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]),
    ),
    "tftensor_content_dt_float": (
        tftensor_content(np.array([[0, 1, 0], [1, 0, 0]])),
        tftensor_content(np.array([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])),
    ),
    "mixed_forms": (
        tf_int64_camel([[0, 1, 0], [1, 0, 0]]),
        tensor([2, 3], [0.2, 0.7, 0.1, 0.1, 0.1, 0.8]),
    ),
}


@pytest.mark.parametrize("form", list(DATA_FORMS))
def test_data_forms_decode_to_the_same_rows(onehot: str, form: str) -> None:
    """Every SeldonMessage form of the same two rows: truth 1 -> 1 right, truth 0 -> 2 wrong."""
    truth, response = DATA_FORMS[form]
    before = model_doc(onehot)
    send_event(onehot, feedback(truth, response))
    change = progress(before, model_doc(onehot))
    assert (change.events, change.rows) == (1, 2)
    assert change.cells == Counter({(1, 1): 1, (0, 2): 1})


@pytest.mark.parametrize(
    ("truth", "response"),
    [
        ([0, 0, 1], [0.1, 0.2, 0.7]),
        ([[0, 0, 1]], [0.1, 0.2, 0.7]),
        ([0, 0, 1], [[0.1, 0.2, 0.7]]),
        ([[0, 0, 1]], [[0.1, 0.2, 0.7]]),
    ],
    ids=["flat-flat", "nested-flat", "flat-nested", "nested-nested"],
)
def test_flat_and_nested_single_row_are_the_same(onehot: str, truth: Any, response: Any) -> None:
    before = model_doc(onehot)
    send_event(onehot, feedback(truth, response))
    change = progress(before, model_doc(onehot))
    assert (change.events, change.rows, change.cells) == (1, 1, ROW_CELL)


def test_batch_of_rows_counts_every_row(onehot: str) -> None:
    """The reference counted only the first row of a batch; every row counts here."""
    truth = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]]
    response = [[0.9, 0.1, 0], [0.1, 0.1, 0.8], [0, 0.1, 0.9], [0, 0.2, 0.8], [0.2, 0.7, 0.1]]
    before, samples_before = model_doc(onehot), scrape(onehot)
    send_event(onehot, feedback(truth, response))
    after, samples_after = model_doc(onehot), scrape(onehot)
    change = progress(before, after)
    assert (change.events, change.rows) == (1, 5)
    assert change.cells == Counter({(0, 0): 1, (1, 2): 1, (2, 2): 2, (0, 1): 1})

    def moved(name: str, **labels: str) -> float:
        return value(samples_after, name, **labels) - value(samples_before, name, **labels)

    assert moved("feedback_rows_accepted_total") == 5
    assert moved("feedback_events_accepted_total") == 1
    assert moved("feedback_confusion_matrix_total", truth="2", prediction="2") == 2
    assert moved("feedback_confusion_matrix_total", truth="1", prediction="2") == 1
    assert moved("seldon_metric_true_positive_total", **{"class": "CLASS_2"}) == 2
    assert moved("seldon_metric_false_positive_total", **{"class": "CLASS_2"}) == 1
    assert moved("seldon_metric_false_negative_total", **{"class": "CLASS_1"}) == 1
    # One-vs-rest true negatives of class 1: the 4 rows neither true nor predicted as 1.
    assert moved("seldon_metric_true_negative_total", **{"class": "CLASS_1"}) == 3


def test_multiclass_numeric_nested_id_is_class_4(numeric: str) -> None:
    """``[[4]]`` is class 4: label CLASS_4, never the reference's CLASS_[4]."""
    send_event(numeric, feedback([[4]], [[4]]))
    samples = scrape(numeric)
    assert value(samples, "seldon_metric_true_positive_total", **{"class": "CLASS_4"}) == 1
    classes = {dict(labels).get("class") for (_, labels) in samples}
    assert not any("[" in c for c in classes if c), classes
    assert 4 in model_doc(numeric)["classes"]


def test_multiclass_numeric_batch_of_ids(numeric: str) -> None:
    before = model_doc(numeric)
    send_event(numeric, feedback([[1], [2], [3]], [1, 2, 0]))
    send_event(numeric, feedback(tensor([2, 1], [5, 5]), tensor([2], [5, 1])))
    change = progress(before, model_doc(numeric))
    assert (change.events, change.rows) == (2, 5)
    assert change.cells == Counter({(1, 1): 1, (2, 2): 1, (3, 0): 1, (5, 5): 1, (5, 1): 1})


def test_binary_metrics_threshold_and_probabilities(servers: ServerFactory) -> None:
    """Scores at or above --binary_threshold predict 1; predict_proba's second column is used."""
    url = servers("--storage_uri", "BinaryMetrics", "--binary_threshold", "0.7").url
    send_event(url, feedback([1, 1, 0, 0], [0.6, 0.8, 0.2, 0.9]))
    send_event(url, feedback([[1]], [[0.35, 0.65]]))
    doc = model_doc(url)
    assert doc["classes"] == [0, 1]
    assert doc["confusion_matrix"] == [[1, 1], [2, 1]]
    assert (doc["events"], doc["rows"]) == (2, 5)
    samples = scrape(url)
    assert value(samples, "seldon_metric_true_positive_total") == 1
    assert value(samples, "seldon_metric_false_negative_total") == 2
    assert value(samples, "seldon_metric_true_negative_total") == 1
    assert value(samples, "seldon_metric_false_positive_total") == 1
    assert not any(
        "class" in dict(labels) for (name, labels) in samples if name.startswith("seldon_metric")
    )


# --------------------------------------------------------------------------- duplicates


def test_duplicate_delivery_counts_once(servers: ServerFactory) -> None:
    """Knative redelivers: same (source, id) twice is 200 both times and counted once."""
    url = servers().url
    headers = ce_headers(source="http://classifier:8000/")
    first = post_json(url, ROW, headers)
    second = post_json(url, ROW, headers)
    assert (first.status_code, second.status_code) == (200, 200)
    doc = model_doc(url)
    assert (doc["events"], doc["rows"]) == (1, 1)
    samples = scrape(url)
    assert value(samples, "feedback_events_duplicate_total") == 1
    assert value(samples, "feedback_events_accepted_total") == 1


def test_concurrent_deliveries_count_each_event_exactly_once(servers: ServerFactory) -> None:
    """Every event sent twice at once from many clients: each counted once, each copy acked."""
    url = servers().url
    ids = [new_id() for _ in range(60)]

    def deliver(event_id: str) -> int:
        return post_json(url, ROW, ce_headers(event_id)).status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(deliver, ids + ids[::-1]))
    assert statuses == [200] * 120
    doc = model_doc(url)
    assert (doc["events"], doc["rows"], cells(doc)) == (60, 60, Counter({(2, 2): 60}))
    assert value(scrape(url), "feedback_events_duplicate_total") == 60


def test_same_id_from_another_source_is_another_event(onehot: str) -> None:
    event_id = new_id()
    before = model_doc(onehot)
    send_event(onehot, ROW, event_id, source="pod-a")
    send_event(onehot, ROW, event_id, source="pod-b")
    assert progress(before, model_doc(onehot)).events == 2


def test_rejected_delivery_does_not_burn_the_id(onehot: str) -> None:
    """A 400 counts nothing, so a corrected event with the same id is still counted."""
    headers = ce_headers()
    before = model_doc(onehot)
    assert post_json(onehot, {"response": ROW["response"]}, headers).status_code == 400
    assert post_json(onehot, ROW, headers).status_code == 200
    assert progress(before, model_doc(onehot)).events == 1
