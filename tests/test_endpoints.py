"""The small endpoints Knative, kubelet and Seldon clients probe: answers they can use."""

from __future__ import annotations

import pytest
import requests

from tests.support.processes import ServerFactory


@pytest.fixture(scope="module")
def url(module_servers: ServerFactory) -> str:
    return module_servers().url


def test_protocol_names_the_wire_protocol(url: str) -> None:
    answer = requests.get(url + "/protocol", timeout=5)
    assert answer.status_code == 200
    assert answer.text == "seldonfeedback.http"


@pytest.mark.parametrize("path", ["/health/live", "/health/ready"])
def test_health_endpoints_answer_200(url: str, path: str) -> None:
    answer = requests.get(url + path, timeout=5)
    assert answer.status_code == 200
    assert "html" not in answer.headers.get("Content-Type", "")


def test_options_advertises_post(url: str) -> None:
    """Knative may probe the subscriber with OPTIONS."""
    answer = requests.options(url + "/", timeout=5)
    assert answer.status_code == 200
    allowed = {method.strip() for method in answer.headers["Allow"].split(",")}
    assert "POST" in allowed
    assert answer.content == b""
    assert "html" not in answer.headers.get("Content-Type", "")


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
@pytest.mark.parametrize("path", ["/nope", "/api/v1.0/feedback", "/v1/metrics/extra"])
def test_unknown_path_is_a_json_404(url: str, method: str, path: str) -> None:
    answer = requests.request(method, url + path, data=b"{}", timeout=5)
    assert answer.status_code == 404
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json() == {"error": "Not Found", "reason": "not_found"}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_events_endpoint_only_takes_post(url: str, method: str) -> None:
    answer = requests.request(method, url + "/", timeout=5)
    assert answer.status_code == 405
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json()["reason"] == "method_not_allowed"


def test_metrics_answer_200_before_any_event(url: str) -> None:
    """An empty server is scrapeable (not 404), and its JSON document is all zeros."""
    text = requests.get(url + "/v1/metrics", timeout=5)
    assert text.status_code == 200
    document = requests.get(url + "/v1/metrics?format=json", timeout=5).json()
    model = document["models"]["model"]
    assert (model["events"], model["rows"], model["classes"]) == (0, 0, [])
    assert model["confusion_matrix"] == []
