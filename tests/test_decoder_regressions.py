"""Inputs the decoder fuzz test found (issue 11), against a real server: a 4xx, never a 500.

Each refused body changes nothing but ``feedback_events_rejected_total{reason}``; a logged
request carrying ``binData`` (an image model's input) is acknowledged and counted as ignored.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from adserver.catalogue.wire import SELDON_REQUEST_TYPE, SELDON_RESPONSE_TYPE
from adserver.wire.json_body import SMALL_BODY_BYTES
from tests.support.events import ce_headers, new_id, tensor
from tests.support.http import model_doc, moved_samples, post_json, scrape, value
from tests.support.processes import DATA, ServerFactory
from tests.test_bad_input import GOOD, assert_json_error, assert_only_rejection_moved

RESPONSE = GOOD["response"]
USER_MODEL = ("--storage_uri", "my_metrics.MyMetricsResponse", "--state", "memory")
USER_ENV = {"PYTHONPATH": str(DATA / "user_models")}
BIN_DATA = {"binData": base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()}
LOGGER_EVENTS = "feedback_logger_events_total"


def deep_feedback(depth: int, padded: bool) -> bytes:
    """Truth nested ``depth`` levels; a padded body takes json_body's simdjson path."""
    pad = f', "pad": "{"x" * SMALL_BODY_BYTES}"' if padded else ""
    truth = b"[" * depth + b"1" + b"]" * depth
    return b'{"truth": {"data": {"ndarray": %s}}, "response": %s%s}' % (
        truth,
        json.dumps(RESPONSE).encode(),
        pad.encode(),
    )


def v2(kind: str, shape: list[int]) -> dict[str, Any]:
    return {kind: [{"name": "t", "shape": shape, "datatype": "FP32", "data": []}]}


def tftensor(**proto: Any) -> dict[str, Any]:
    return {"data": {"tftensor": proto}}


LOGGED_RESPONSE = {"ce-type": "org.kubeflow.serving.inference.response"}
LOGGED_REQUEST = {"ce-type": "org.kubeflow.serving.inference.request"}
CASES: dict[str, tuple[Any, dict[str, str], str]] = {
    "tensor_65_dims": (
        {"truth": tensor([1] * 65, [1]), "response": RESPONSE},
        {},
        "invalid_tensor",
    ),
    "tensor_empty_huge_dim": (
        {"truth": tensor([0, 2**62], []), "response": RESPONSE},
        {},
        "invalid_tensor",
    ),
    "tensor_many_empty_rows": (
        {"truth": tensor([2**31, 0], []), "response": RESPONSE},
        {},
        "tensor_too_large",
    ),
    "tftensor_many_empty_rows": (
        {
            "truth": tftensor(
                dtype="DT_FLOAT",
                tensorShape={"dim": [{"size": str(2**31)}, {"size": "0"}]},
                tensorContent="",
            ),
            "response": RESPONSE,
        },
        {},
        "tensor_too_large",
    ),
    "tftensor_float_overflow": (
        {"truth": tftensor(dtype="DT_FLOAT", floatVal=[1e300]), "response": RESPONSE},
        {},
        "invalid_tftensor",
    ),
    "v2_output_empty_huge_dim": (v2("outputs", [0, 2**62]), LOGGED_RESPONSE, "invalid_tensor"),
    "v2_input_many_empty_rows": (v2("inputs", [2**31, 0]), LOGGED_REQUEST, "tensor_too_large"),
    "ndarray_65_deep": (deep_feedback(65, padded=False), {}, "too_deep"),
    "ndarray_65_deep_simdjson": (deep_feedback(65, padded=True), {}, "too_deep"),
    "ndarray_500_deep_simdjson": (deep_feedback(500, padded=True), {}, "too_deep"),
    "json_beyond_orjson_depth": (deep_feedback(1100, padded=False), {}, "too_deep"),
    "json_beyond_orjson_depth_simdjson": (deep_feedback(1100, padded=True), {}, "too_deep"),
}


@pytest.fixture(scope="module")
def user_server(module_servers: ServerFactory) -> str:
    """A user's Seldon-style model: it takes any data, so rows of every shape reach storage."""
    return module_servers(*USER_MODEL, env=USER_ENV).url


@pytest.fixture(scope="module")
def builtin_server(module_servers: ServerFactory) -> str:
    return module_servers("--state", "memory").url


@pytest.mark.parametrize("model", ["builtin", "user"])
@pytest.mark.parametrize("name", list(CASES))
def test_found_by_fuzzing_is_a_4xx(request, name: str, model: str) -> None:
    url = request.getfixturevalue(f"{model}_server")
    body, headers, reason = CASES[name]
    doc_before, before = model_doc(url), scrape(url)
    answer = post_json(url, body, {**ce_headers(), **headers})
    assert_json_error(answer, 400, reason)
    assert model_doc(url) == doc_before
    assert_only_rejection_moved(before, scrape(url), reason)


@pytest.mark.parametrize("model", ["builtin", "user"])
@pytest.mark.parametrize("event_type", [SELDON_REQUEST_TYPE, SELDON_RESPONSE_TYPE])
def test_a_logged_bin_data_message_is_acknowledged_and_ignored(
    request, model: str, event_type: str
) -> None:
    """An image model's logged input (binData) has no rows to keep: 200, counted as ignored."""
    url = request.getfixturevalue(f"{model}_server")
    before = scrape(url)
    headers = ce_headers(event_type=event_type, requestid=new_id())
    answer = post_json(url, BIN_DATA, headers)
    assert answer.status_code == 200, answer.text
    after = scrape(url)
    moved = moved_samples(before, after)
    assert len(moved) == 1 and moved[0][0] == LOGGER_EVENTS, moved
    ignored = value(after, LOGGER_EVENTS, kind="ignored_bin_data")
    assert ignored == value(before, LOGGER_EVENTS, kind="ignored_bin_data") + 1


def test_a_bin_data_label_under_a_user_model_is_a_clear_400(user_server: str) -> None:
    """A truth-only label waits in storage by row; binData has none: send it with its response."""
    doc_before, before = model_doc(user_server), scrape(user_server)
    answer = post_json(user_server, {"truth": BIN_DATA}, ce_headers(requestid=new_id()))
    assert_json_error(answer, 400, "unjoinable_bin_data")
    assert model_doc(user_server) == doc_before
    assert_only_rejection_moved(before, scrape(user_server), "unjoinable_bin_data")


def test_bin_data_with_its_response_reaches_a_user_model(user_server: str) -> None:
    """With the response in the event there is nothing to store: the model gets the bytes."""
    before = model_doc(user_server)["events"]
    answer = post_json(user_server, {"truth": BIN_DATA, "response": BIN_DATA}, ce_headers())
    assert answer.status_code == 200, answer.text
    assert model_doc(user_server)["events"] == before + 1
