"""GET /v1/models/<name>/metrics over a range of prediction time, and the window gauges, through
real servers (durable: the reader's own thread and read-only connection; memory: inline)."""

from __future__ import annotations

import time

import pytest
import requests

from adserver.catalogue import reasons
from tests.support.events import feedback
from tests.support.http import moved_samples, scrape, send_event, value
from tests.support.processes import MULTICLASS_NUMERIC, ServerFactory

HOUR = 3600


def last_hour() -> tuple[int, int]:
    end = (int(time.time()) // 60 + 1) * 60
    return end - HOUR, end


@pytest.fixture(scope="module", params=["sqlite", "memory"])
def url(module_servers: ServerFactory, request: pytest.FixtureRequest) -> str:
    return module_servers("--storage_uri", MULTICLASS_NUMERIC, "--state", request.param).url


def ranged(url: str, model: str = "model", **arguments: str) -> requests.Response:
    return requests.get(f"{url}/v1/models/{model}/metrics", params=arguments, timeout=10)


def test_a_range_answers_its_steps_and_total(url: str) -> None:
    start, end = last_hour()
    answer = ranged(url, **{"from": str(start), "to": str(end), "step": "15m"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    document = answer.json()
    assert (document["model"], document["segment"]) == ("model", "")
    assert (document["from"], document["to"], document["step"]) == (start, end, 900)
    assert [(s["from"], s["to"]) for s in document["steps"]] == [
        (s, s + 900) for s in range(start, end, 900)
    ]
    assert set(document["total"]) == {
        "classes", "confusion_matrix", "accuracy", "per_class", "macro", "weighted", "rows",
        "predictions", "label_coverage", "label_delay",
    }  # fmt: skip


def test_without_a_range_the_model_summary(url: str) -> None:
    answer = ranged(url)
    assert answer.status_code == 200
    assert set(answer.json()["models"]) == {"model"}


@pytest.mark.parametrize(
    ("arguments", "status", "reason"),
    [
        ({"to": "yesterday"}, 400, reasons.INVALID_RANGE),
        ({"from": "0"}, 400, reasons.RANGE_NOT_KEPT),
        ({"step": "90s"}, 400, reasons.INVALID_STEP),
        ({"step": "1m", "from": str(last_hour()[1] - 2 * 86400)}, 400, reasons.TOO_MANY_STEPS),
        ({"step": "1m", "from": "86400", "to": "90000"}, 400, reasons.RANGE_NOT_KEPT),
        ({"segment": "canary"}, 400, reasons.UNKNOWN_SEGMENT),
        ({"model": "rose"}, 404, reasons.UNKNOWN_MODEL),
    ],
)
def test_a_bad_range_is_a_json_error_that_changes_nothing(
    url: str, arguments: dict[str, str], status: int, reason: str
) -> None:
    start, end = last_hour()
    query = {"from": str(start), "to": str(end), **arguments}
    model = query.pop("model", "model")
    before = scrape(url)
    answer = ranged(url, model, **query)
    assert answer.status_code == status
    assert answer.json()["reason"] == reason and answer.json()["error"]
    assert moved_samples(before, scrape(url)) == []


def test_feedback_counts_under_its_own_time(servers: ServerFactory) -> None:
    """A feedback's rows count in the buckets of its ce-time: in the range and the 1h window."""
    url = servers("--storage_uri", MULTICLASS_NUMERIC, "--window_refresh_seconds", "1").url
    start, end = last_hour()
    send_event(url, feedback([[1], [2]], [[1], [1]]))
    total = ranged(url, **{"from": str(start), "to": str(end)}).json()["total"]
    assert total["rows"] == 2 and total["accuracy"] == 0.5
    samples = scrape(url)
    assert value(samples, "feedback_window_rows", model="model", segment="", window="1h") == 2
    assert value(samples, "feedback_window_accuracy", model="model", segment="", window="1h") == 0.5
