"""Bad input gets a JSON 4xx naming the problem and changes nothing but the rejection counter.

Knative does not retry a 4xx, so a 400 (never a 500, which the reference answered and which made
Knative redeliver and double count) is what a malformed event must get.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from tests.support.events import STRUCTURED_TYPE, ce_headers, feedback, ndarray, structured, tensor
from tests.support.http import Samples, model_doc, post_json, scrape
from tests.support.processes import MULTICLASS_NUMERIC, ServerFactory

GOOD = feedback([[0, 0, 1]], [[0.1, 0.2, 0.7]])
RESPONSE = GOOD["response"]
REJECTED = "feedback_events_rejected_total"


@dataclass(frozen=True)
class Bad:
    """One malformed request and the reason the server must give."""

    body: Any
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 400


def truth_only(truth: Any) -> dict[str, Any]:
    return {"truth": truth, "response": RESPONSE}


def tftensor(**proto: Any) -> dict[str, Any]:
    return {"data": {"tftensor": proto}}


def dims(*sizes: int) -> dict[str, Any]:
    return {"dim": [{"size": str(size)} for size in sizes]}


def b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode()


def without_data(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "data"}


BATCH = {"Content-Type": "application/cloudevents-batch+json"}
STRUCT = {"Content-Type": STRUCTURED_TYPE}
CASES: dict[str, Bad] = {
    "invalid_json": Bad(b'{"truth": {"data": ', "invalid_json"),
    "not_json_at_all": Bad(
        b"truth=1&response=2", "invalid_json", {"Content-Type": "application/x-www-form-urlencoded"}
    ),
    "empty_body": Bad(b"", "empty_body"),
    "array_body": Bad([GOOD], "invalid_body"),
    "string_body": Bad(b'"feedback"', "invalid_body"),
    "missing_truth": Bad({"response": RESPONSE}, "missing_truth"),
    "null_truth": Bad({"truth": None, "response": RESPONSE}, "missing_truth"),
    "truth_not_an_object": Bad(truth_only([[0, 0, 1]]), "invalid_message"),
    "truth_without_data": Bad(truth_only({"meta": {"tags": {"a": "b"}}}), "missing_data"),
    "unknown_data_form": Bad(truth_only({"data": {"names": ["t:0"]}}), "unknown_data_form"),
    "data_not_an_object": Bad(truth_only({"data": [[0, 0, 1]]}), "invalid_message"),
    "missing_response": Bad({"truth": ndarray([[0, 0, 1]])}, "missing_response"),
    "ragged_rows": Bad(feedback([[0, 1], [1]], [[0.1, 0.9], [0.8, 0.2]]), "ragged_rows"),
    "empty_array": Bad(feedback([], []), "empty"),
    "empty_row": Bad(feedback([[]], [[]]), "empty"),
    "scalar_ndarray": Bad(truth_only({"data": {"ndarray": 1}}), "invalid_ndarray"),
    "scalar_tensor": Bad(truth_only(tensor([], [1])), "scalar"),
    "strings": Bad(feedback([["a", "b", "c"]], [[0.1, 0.2, 0.7]]), "non_numeric"),
    "null_in_row": Bad(feedback([[0, None, 1]], [[0.1, 0.2, 0.7]]), "non_numeric"),
    "objects_in_row": Bad(feedback([[{"x": 1}]], [[1]]), "non_numeric"),
    "raw_nan": Bad(
        b'{"truth":{"data":{"ndarray":[[NaN,0,1]]}},'
        + json.dumps({"response": RESPONSE}).encode()[1:],
        "invalid_json",
    ),
    "raw_infinity": Bad(
        b'{"truth":{"data":{"ndarray":[[0,0,1]]}},"response":{"data":'
        b'{"ndarray":[[Infinity,0,0]]}}}',
        "invalid_json",
    ),
    "overflowing_float": Bad(
        b'{"truth":{"data":{"ndarray":[[0,0,1]]}},"response":{"data":{"ndarray":[[1e999,0,0]]}}}',
        "invalid_json",
    ),
    "three_d_rows": Bad(feedback([[[0, 0, 1]]], [[[0.1, 0.2, 0.7]]]), "bad_shape"),
    "tensor_shape_mismatch": Bad(truth_only(tensor([2, 3], [0, 0, 1])), "tensor_shape_mismatch"),
    "tensor_bad_shape": Bad(truth_only(tensor([-1, 3], [0, 0, 1])), "invalid_tensor"),
    "tensor_not_flat": Bad(truth_only(tensor([1, 3], [[0, 0, 1]])), "invalid_tensor"),
    "tftensor_string_dtype": Bad(
        truth_only(tftensor(dtype="DT_STRING", stringVal=["YQ=="])), "invalid_tftensor"
    ),
    "tftensor_shape_mismatch": Bad(
        truth_only(tftensor(dtype="DT_FLOAT", tensorShape=dims(1, 3), floatVal=[0, 1])),
        "tensor_shape_mismatch",
    ),
    "tftensor_bad_values": Bad(
        truth_only(tftensor(dtype="DT_INT64", tensorShape=dims(1, 3), int64Val=["a", "b", "c"])),
        "invalid_tftensor",
    ),
    "tftensor_fractional_int": Bad(
        truth_only(tftensor(dtype="DT_INT32", tensorShape=dims(1, 3), intVal=[0, 0.5, 1])),
        "invalid_tftensor",
    ),
    "tftensor_bad_content": Bad(
        truth_only(tftensor(dtype="DT_FLOAT", tensorShape=dims(1, 3), tensorContent=b64(b"abc"))),
        "invalid_tftensor",
    ),
    "tftensor_huge_fill": Bad(
        truth_only(tftensor(dtype="DT_FLOAT", tensorShape=dims(100_000, 100_000), floatVal=[1])),
        "tensor_too_large",
    ),
    "tftensor_impossible_shape": Bad(
        truth_only(tftensor(dtype="DT_FLOAT", tensorShape=dims(0, 10**30), tensorContent="")),
        "invalid_tftensor",
    ),
    "width_mismatch": Bad(feedback([[0, 1]], [[0.1, 0.2, 0.7]]), "width_mismatch"),
    "row_count_mismatch": Bad(
        feedback([[0, 0, 1], [0, 1, 0]], [[0.1, 0.2, 0.7]]), "row_count_mismatch"
    ),
    "metrics_not_a_list": Bad(
        {**GOOD, "truth": {**GOOD["truth"], "meta": {"metrics": {"key": "x"}}}}, "invalid_metrics"
    ),
    "binary_missing_attributes": Bad(
        GOOD,
        "invalid_cloudevent",
        {"ce-specversion": "1.0", "ce-requestid": "r", "Content-Type": "application/json"},
    ),
    "binary_empty_id": Bad(GOOD, "invalid_cloudevent", {**ce_headers(), "ce-id": ""}),
    "binary_invalid_extension_name": Bad(GOOD, "invalid_cloudevent", ce_headers(my_ext="x")),
    "binary_invalid_time": Bad(GOOD, "invalid_cloudevent", ce_headers(time="yesterday")),
    "binary_wrong_specversion": Bad(
        GOOD, "unsupported_specversion", {**ce_headers(), "ce-specversion": "0.3"}
    ),
    "binary_bad_body": Bad(b"not json", "invalid_json", ce_headers()),
    "structured_not_an_object": Bad([1], "invalid_cloudevent", STRUCT),
    "structured_missing_id": Bad(
        {k: v for k, v in structured(GOOD).items() if k != "id"}, "invalid_cloudevent", STRUCT
    ),
    "structured_wrong_specversion": Bad(
        structured(GOOD, specversion="0.3"), "unsupported_specversion", STRUCT
    ),
    "structured_numeric_id": Bad(structured(GOOD, id=7), "invalid_cloudevent", STRUCT),
    "structured_invalid_extension_name": Bad(
        structured(GOOD, my_ext="x"), "invalid_cloudevent", STRUCT
    ),
    "structured_bad_base64": Bad(
        {**without_data(structured(GOOD)), "data_base64": "!!!"}, "invalid_cloudevent", STRUCT
    ),
    "structured_base64_not_json": Bad(
        {**without_data(structured(GOOD)), "data_base64": b64(b"<xml/>")}, "invalid_json", STRUCT
    ),
    "structured_data_string_not_json": Bad(structured("not json"), "invalid_json", STRUCT),
    "structured_data_array": Bad(structured([GOOD]), "invalid_body", STRUCT),
    "structured_invalid_json": Bad(b"{", "invalid_json", STRUCT),
    "batch_empty": Bad([], "invalid_batch", BATCH),
    "batch_not_an_array": Bad(structured(GOOD), "invalid_batch", BATCH),
    "batch_with_one_bad_element": Bad(
        [structured(GOOD), structured({"response": RESPONSE}), structured(GOOD)],
        "missing_truth",
        BATCH,
    ),
    "batch_with_non_event": Bad([structured(GOOD), "x"], "invalid_cloudevent", BATCH),
}


@pytest.fixture(scope="module")
def url(module_servers: ServerFactory) -> str:
    return module_servers().url


def unchanged_part(samples: Samples) -> Samples:
    """Everything but the rejection counter and the process' own metrics (and connections)."""
    return {
        key: v
        for key, v in samples.items()
        if key[0] not in (REJECTED, "feedback_http_connections")
        and not key[0].startswith("process_")
    }


def rejections(samples: Samples) -> dict[str, float]:
    return {dict(labels)["reason"]: v for (name, labels), v in samples.items() if name == REJECTED}


def assert_json_error(answer: requests.Response, status: int, reason: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"error", "reason"}
    assert body["reason"] == reason, body
    assert isinstance(body["error"], str) and body["error"]


def assert_only_rejection_moved(before: Samples, after: Samples, reason: str) -> None:
    assert unchanged_part(after) == unchanged_part(before)
    moved = {
        r: n - rejections(before).get(r, 0)
        for r, n in rejections(after).items()
        if n != rejections(before).get(r, 0)
    }
    assert moved == {reason: 1}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_json_4xx_and_changes_nothing(url: str, name: str) -> None:
    case = CASES[name]
    doc_before, before = model_doc(url), scrape(url)
    answer = post_json(url, case.body, case.headers)
    assert_json_error(answer, case.status, case.reason)
    assert model_doc(url) == doc_before
    assert_only_rejection_moved(before, scrape(url), case.reason)


def test_server_still_counts_after_bad_input(url: str) -> None:
    """Nothing above left the server broken: a good event is still counted."""
    before = model_doc(url)
    assert post_json(url, GOOD, ce_headers()).status_code == 200
    assert model_doc(url)["events"] == before["events"] + 1


# --------------------------------------------------------------------------- body limit

LIMIT = 1000


@pytest.fixture(scope="module")
def small(module_servers: ServerFactory) -> str:
    return module_servers("--max_body_bytes", str(LIMIT)).url


def padded(size: int) -> bytes:
    """A valid Feedback body of exactly ``size`` bytes (whitespace padding)."""
    body = json.dumps(GOOD).encode()
    return body + b" " * (size - len(body))


def pieces(payload: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(payload), size):
        yield payload[start : start + size]


def test_body_at_the_limit_is_accepted(small: str) -> None:
    before = model_doc(small)
    assert post_json(small, padded(LIMIT), ce_headers()).status_code == 200
    assert model_doc(small)["events"] == before["events"] + 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size", [LIMIT + 1, 50 * LIMIT])
def test_body_over_the_limit_is_413(small: str, chunked: bool, size: int) -> None:
    doc_before, before = model_doc(small), scrape(small)
    payload = padded(size)
    data = pieces(payload, 300) if chunked else payload
    answer = requests.post(small + "/", data=data, headers=ce_headers(), timeout=5)
    assert ("Transfer-Encoding" in answer.request.headers) is chunked
    assert_json_error(answer, 413, "body_too_large")
    assert model_doc(small) == doc_before
    assert_only_rejection_moved(before, scrape(small), "body_too_large")


def test_declared_huge_body_is_refused_before_it_is_sent(small: str) -> None:
    """Content-Length of 10 GB and no body: the 413 comes at once, nothing is buffered."""
    host, port = small.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000000\r\n\r\n"
        )
        received = b""
        while chunk := connection.recv(4096):  # the server closes after answering
            received += chunk
    assert received.startswith(b"HTTP/1.1 413 "), received
    assert b"Connection: close" in received
    assert received.endswith(b'"reason":"body_too_large"}'), received


def test_nothing_answers_500_or_html(url: str) -> None:
    """Odd requests on every route: no 5xx, no HTML, ever."""
    attempts = [
        requests.post(url + "/", data=b"\xff\xfe\x00", timeout=5),
        requests.post(url + "/", data=b"{}", headers={"ce-specversion": "1.0"}, timeout=5),
        requests.put(url + "/", data=b"{}", timeout=5),
        requests.delete(url + "/v1/metrics", timeout=5),
        requests.post(url + "/v1/metrics", data=b"{}", timeout=5),
        requests.get(url + "/api/v1.0/feedback", timeout=5),
    ]
    for answer in attempts:
        assert 400 <= answer.status_code < 500, (answer.request.method, answer.status_code)
        assert "html" not in answer.headers.get("Content-Type", ""), answer.headers
        assert set(answer.json()) == {"error", "reason"}


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (
            {"truth": {"data": {"ndarray": [1]}}},
            {"ce-requestid": "r", "ce-rowindex": "9" * 20},
            "invalid_row_index",
        ),
        (
            {
                "truth": {"data": {"ndarray": [[0, 0, 0]]}},
                "response": {"data": {"ndarray": [[1, 0, 0]]}},
            },
            {},
            "invalid_one_hot",
        ),
        (
            {"outputs": [{"name": "o", "shape": [2.0], "datatype": "FP32", "data": [1, 2]}]},
            {"ce-type": "org.kubeflow.serving.inference.response"},
            "invalid_tensor",
        ),
        (
            {"outputs": [{"name": "o", "shape": [-1, -2], "datatype": "FP32", "data": [1, 2]}]},
            {"ce-type": "org.kubeflow.serving.inference.response"},
            "invalid_tensor",
        ),
        (
            {"outputs": [{"name": "o", "shape": [2], "datatype": "FP32", "data": [[1], [2, 3]]}]},
            {"ce-type": "org.kubeflow.serving.inference.response"},
            "invalid_tensor",
        ),
        (
            {
                "truth": {"data": {"tftensor": {"dtype": "DT_INT8", "intVal": [300]}}},
                "response": {"data": {"ndarray": [1]}},
            },
            {},
            "invalid_tftensor",
        ),
    ],
    ids=[
        "huge_row_index",
        "all_zero_one_hot_truth",
        "v2_float_shape",
        "v2_negative_shape",
        "v2_ragged",
        "tftensor_overflow",
    ],
)
def test_review_cases_are_400_not_500(module_servers, body, headers, reason) -> None:
    """Inputs that once crashed the server (500, or a hang) are plain 400s naming the problem."""
    server = module_servers("--state", "memory")
    answer = post_json(server.url, body, {**ce_headers(), **headers})
    assert answer.status_code == 400, answer.text
    assert answer.json()["reason"] == reason


def test_too_many_classes_is_a_400_and_changes_nothing(servers) -> None:
    server = servers("--storage_uri", MULTICLASS_NUMERIC, "--max_classes", "5", "--state", "memory")
    assert post_json(server.url, feedback([[0], [1]], [[1], [2]]), ce_headers()).status_code == 200
    answer = post_json(server.url, feedback([[3], [4]], [[5], [6]]), ce_headers())
    assert answer.status_code == 400 and answer.json()["reason"] == "too_many_classes"
    assert model_doc(server.url)["classes"] == [0, 1, 2]
