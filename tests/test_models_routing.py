"""Many models in one server (--models_config): routing, the path route, unknown models,
segment values, and start-up refusals of a bad config."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests

from adserver.catalogue.wire import KSERVE_RESPONSE_TYPE, SELDON_RESPONSE_TYPE
from adserver.ingest.routing import Route, Router, segment_values
from adserver.wire.cloudevents import IncomingEvent
from tests.support.events import ce_headers, feedback, ndarray
from tests.support.http import cells, post_json, scrape, value
from tests.test_startup import refused

CONFIG = """\
models:
  - name: iris
    storage_uri: MultiClassNumeric
    match: {inferenceservicename: iris}
  - name: wine
    storage_uri: MultiClassNumeric
    match: {inferenceservicename: wine}
  - name: v2model
    storage_uri: MultiClassNumeric
    match: {model_name: digits}
  - name: node-a
    storage_uri: MultiClassNumeric
    match: {inferenceservicename: graph, modelid: a}
  - name: node-b
    storage_uri: MultiClassNumeric
    match: {inferenceservicename: graph, modelid: b}
  - name: direct
    storage_uri: MultiClassNumeric
    segment_by: ["tag:region"]
"""


def config_file(tmp_path: Path, text: str = CONFIG) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return str(path)


def event(attributes: dict[str, Any]) -> IncomingEvent:
    return IncomingEvent({"type": KSERVE_RESPONSE_TYPE, **attributes}, None)


def test_precedence_body_then_most_keys_then_first_then_default() -> None:
    routes = [
        Route("isvc", {"inferenceservicename": "m"}),
        Route("isvc-ns", {"inferenceservicename": "m", "namespace": "prod"}),
        Route("twin", {"inferenceservicename": "m", "namespace": "prod"}),
        Route("body", {"model_name": "m-v2"}),
        Route("fallback", default=True),
    ]
    router = Router(routes)
    by_name = {"inferenceservicename": "m", "namespace": "prod"}
    assert router.route(event(by_name), {"model_name": "m-v2"}).name == "body"
    assert router.route(event(by_name), {}).name == "isvc-ns"  # most keys, first in the file
    assert router.route(event({"inferenceservicename": "m"}), None).name == "isvc"
    assert router.route(event({"inferenceservicename": "x"}), None).name == "fallback"
    assert Router(routes[:4]).route(event({}), None) is None


def test_segment_values_from_extensions_body_and_tags() -> None:
    route = Route(
        "m",
        segment_by=(
            "endpoint",
            "component",
            "model_version",
            "annotation:serving.kserve.io/revision",
            "metadata:X-Tenant",
            "tag:region",
        ),
    )
    attributes = {
        "endpoint": "canary",
        "annotations": json.dumps({"serving.kserve.io/revision": "r2"}),
        "metadata": json.dumps({"x-tenant": ["acme", "other"]}),
    }
    values = segment_values(route, event(attributes), {"model_version": "7"}, {"region": "eu"})
    assert values == ("canary", None, "7", "r2", "acme", "eu")
    # a logger event has no tags; unreadable JSON extensions tell nothing
    broken = {"annotations": "{not json", "metadata": "[]"}
    assert segment_values(route, event(broken), None) == (None,) * 6


def logged(url: str, event_type: str, request_id: str, body: Any, **extensions: str) -> None:
    headers = ce_headers(request_id, event_type=event_type, **extensions)
    if event_type == SELDON_RESPONSE_TYPE:
        headers["ce-requestid"] = request_id
    answer = post_json(url, body, headers)
    assert answer.status_code == 200, answer.text


def label(
    url: str, request_id: str, truth: list[int], path: str = "", **extensions: str
) -> requests.Response:
    """A label routes like its prediction: by the same extensions, or by its path."""
    headers = ce_headers(requestid=request_id, **extensions)
    body = json.dumps({"truth": ndarray(truth)})
    return requests.post(f"{url}{path or '/'}", data=body, headers=headers, timeout=5)


def models_doc(url: str) -> dict[str, Any]:
    answer = requests.get(url + "/v1/metrics", params={"format": "json"}, timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.json()["models"]


def test_three_inference_services_and_two_graph_nodes_count_apart(servers, tmp_path) -> None:
    server = servers("--models_config", config_file(tmp_path), "--state", "memory")
    expected: dict[str, Counter[tuple[int, int]]] = {}
    streams = [  # (model, event type, extensions, body of a response, its prediction, truth)
        ("iris", KSERVE_RESPONSE_TYPE, {"inferenceservicename": "iris"}, "v1", [0, 1], [0, 0]),
        ("wine", KSERVE_RESPONSE_TYPE, {"inferenceservicename": "wine"}, "v1", [2, 2], [2, 1]),
        ("v2model", KSERVE_RESPONSE_TYPE, {"inferenceservicename": "x"}, "v2", [1, 0], [1, 0]),
        (
            "node-a",
            SELDON_RESPONSE_TYPE,
            {"inferenceservicename": "graph", "modelid": "a"},
            "seldon",
            [1],
            [0],
        ),
        (
            "node-b",
            SELDON_RESPONSE_TYPE,
            {"inferenceservicename": "graph", "modelid": "b"},
            "seldon",
            [0],
            [0],
        ),
    ]
    for model, event_type, extensions, form, prediction, truth in streams:
        request_id = f"req-{model}"  # one id per model, the same text in no two models
        body = {
            "v1": {"predictions": prediction},
            "v2": {
                "model_name": "digits",
                "outputs": [
                    {
                        "name": "o",
                        "datatype": "INT64",
                        "shape": [len(prediction)],
                        "data": prediction,
                    }
                ],
            },
            "seldon": {"data": {"ndarray": prediction}},
        }[form]
        logged(server.url, event_type, request_id, body, **extensions)
        path = f"/v1/models/{model}" if form == "v2" else ""  # its body names no model
        assert label(server.url, request_id, truth, path, **extensions).status_code == 200
        expected[model] = Counter(zip(truth, prediction))
    found = models_doc(server.url)
    for model, counts in expected.items():
        assert cells(found[model]) == counts, model


def test_two_models_logging_one_ce_id_each_keep_their_prediction(servers, tmp_path) -> None:
    """The KServe agent sends one ce-source from every pod and propagates the caller's Ce-Id: two
    InferenceServices' responses with the same (source, id) are two predictions, not a
    redelivery."""
    server = servers("--models_config", config_file(tmp_path), "--state", "memory")
    for model, prediction in (("iris", [1]), ("wine", [2])):
        logged(
            server.url,
            KSERVE_RESPONSE_TYPE,
            "shared-id",
            {"predictions": prediction},
            inferenceservicename=model,
        )
        answer = label(server.url, "shared-id", prediction, inferenceservicename=model)
        assert answer.status_code == 200, answer.text
    found = models_doc(server.url)
    assert cells(found["iris"]) == Counter({(1, 1): 1})
    assert cells(found["wine"]) == Counter({(2, 2): 1})


def test_unknown_model_logger_is_ignored_and_feedback_refused(servers, tmp_path) -> None:
    path = config_file(tmp_path, CONFIG.replace('    segment_by: ["tag:region"]\n', ""))
    server = servers("--models_config", path, "--state", "memory", "--model_name", "srv")
    before = models_doc(server.url)
    logged(server.url, KSERVE_RESPONSE_TYPE, "r1", {"predictions": [1]}, inferenceservicename="x")
    answer = post_json(server.url, feedback([1], [1]), ce_headers())
    assert answer.status_code == 400
    assert answer.json()["reason"] == "unknown_model"
    samples = scrape(server.url)
    assert value(samples, "feedback_logger_events_total", model="srv",
                 kind="ignored_unknown_model") == 1  # fmt: skip
    assert value(samples, "feedback_events_rejected_total", model="srv",
                 reason="unknown_model") == 1  # fmt: skip
    after = models_doc(server.url)
    assert {m: cells(d) for m, d in after.items()} == {m: cells(d) for m, d in before.items()}


def test_path_route_and_unknown_path_model(servers, tmp_path) -> None:
    server = servers("--models_config", config_file(tmp_path), "--state", "memory")
    answer = requests.post(
        server.url + "/v1/models/wine",
        data=json.dumps(feedback([1, 2], [1, 1])),
        headers=ce_headers(),
        timeout=5,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["Prediction-Time-Source"] == "arrival"
    one = requests.get(server.url + "/v1/models/wine/metrics", timeout=5)
    assert one.status_code == 200
    assert cells(one.json()["models"]["wine"]) == Counter({(1, 1): 1, (2, 1): 1})
    for missing in ("/v1/models/nope", "/v1/models/nope/metrics"):
        method = requests.post if missing.count("/") == 3 else requests.get
        answer = method(server.url + missing, data=b"{}", timeout=5)
        assert answer.status_code == 404, missing
        assert answer.json()["reason"] == "unknown_model"


def test_one_model_answers_its_name_on_the_path(servers) -> None:
    server = servers("--state", "memory", "--model_name", "solo")
    headers = ce_headers(time="2026-01-01T00:00:00Z")
    body = json.dumps(feedback([[0, 1]], [[0, 1]]))
    answer = requests.post(server.url + "/v1/models/solo", data=body, headers=headers, timeout=5)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Prediction-Time-Source"] == "event"
    doc = requests.get(server.url + "/v1/models/solo/metrics", timeout=5).json()["models"]
    assert doc["solo"]["rows"] == 1 and "segments" not in doc["solo"]
    assert requests.post(server.url + "/v1/models/other", data=body, timeout=5).status_code == 404


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        ("models:\n  - name: a\n    storage_uri: MultiClassNumeric\n"
         "  - name: a\n    storage_uri: MultiClassNumeric\n", 4, "given twice"),
        ("models:\n  - name: a\n    storage_uri: MultiClassNumeric\n    default: true\n"
         "  - name: b\n    storage_uri: MultiClassNumeric\n    default: true\n", 7, "default"),
        ("models:\n  - name: a\n    storage_uri: MultiClassNumeric\n    colour: red\n", 4,
         "unknown key 'colour'"),
        ("models:\n  - name: a\n    storage_uri: MultiClassNumeric\n    match: {pod: x}\n", 4,
         "unknown match key 'pod'"),
        ("models:\n  - name: a\n    storage_uri: MultiClassNumeric\n    segment_by: [host]\n", 4,
         "unknown segment dimension 'host'"),
        ("models:\n  - name: a\n    storage_uri: NoSuchModel\n", 3, "unknown model"),
        ("models:\n  - name: a\n    storage_uri: [unclosed\n", 4, "not valid YAML"),
        ("models:\n  - name: a b\n    storage_uri: MultiClassNumeric\n", 2, "is not"),
        ("models:\n  - name: a\n    storage_uri: MultiClassNumeric\n"
         "  - name: b\n    storage_uri: BinaryMetrics\n    classes: [0, 1, 2, 3]\n", 4,
         "cannot configure BinaryMetrics"),
    ],
)  # fmt: skip
def test_a_bad_config_exits_2_naming_the_line(tmp_path, text: str, line: int, says: str) -> None:
    path = config_file(tmp_path, text)
    stderr = refused("--models_config", path)
    assert f"{path}:line {line}" in stderr and says in stderr, stderr


def test_max_models(tmp_path) -> None:
    text = "models:\n" + "".join(
        f"  - name: m{i}\n    storage_uri: MultiClassNumeric\n" for i in range(3)
    )
    stderr = refused("--models_config", config_file(tmp_path, text), "--max_models", "2")
    assert "--max_models" in stderr and "line 1" in stderr, stderr
