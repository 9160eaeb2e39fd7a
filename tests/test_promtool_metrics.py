"""``promtool check metrics`` on our exposition: what Prometheus's own linter says about it.

promtool parses the classic text format and lints names, types and HELP (a counter without
``_total``, a missing HELP, a non-base unit, a type in the name...). Every model type is checked
with custom metrics (COUNTER, GAUGE, TIMER) present and a reply sink configured, so every family
the server can export is in the text promtool sees.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from tests.prometheus import require_program
from tests.support.events import feedback
from tests.support.http import model_doc, send_event
from tests.support.processes import DATA, MULTICLASS_NUMERIC, ONE_HOT, REPLY_FLAGS, ServerFactory
from tests.support.sink import Sink

pytestmark = pytest.mark.e2e

# Seldon's three custom metric types; names a user would pick that break no promtool lint.
CUSTOM = [
    {"key": "reviews", "type": "COUNTER", "value": 2, "tags": {"team": "risk"}},
    {"key": "review_backlog", "type": "GAUGE", "value": 7},
    {"key": "review_time", "type": "TIMER", "value": 125.0},
]


@dataclass(frozen=True)
class Case:
    """A model type, a feedback body it accepts, and extra environment for the server."""

    storage_uri: str
    body: dict[str, Any]
    env: Mapping[str, str] = field(default_factory=dict)
    families: tuple[str, ...] = ()  # the model's own families, beyond the built-in ones


CASES = {
    "MulticlassOneHot": Case(ONE_HOT, feedback([[0, 1, 0], [1, 0, 0]], [[0.2, 0.7, 0.1]] * 2)),
    "MultiClassNumeric": Case(MULTICLASS_NUMERIC, feedback([[1], [2], [0]], [[1], [0], [0]])),
    "BinaryMetrics": Case("BinaryMetrics", feedback([1, 0, 1], [0.9, 0.2, 0.4])),
    "user Seldon-style class": Case(
        "my_metrics.MyMetrics",
        feedback([[0, 1], [1, 0]], [[0.3, 0.7], [0.4, 0.6]]),
        {"PYTHONPATH": str(DATA / "user_models")},
        ("user_correct_total", "user_seen_total", "user_last_score"),
    ),
}


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_program("promtool")


def with_custom_metrics(body: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Seldon reads custom metrics from ``truth.meta.metrics``."""
    return {**body, "truth": {**body["truth"], "meta": {"metrics": metrics}}}


def exposition(url: str) -> str:
    """``GET /v1/metrics`` as a plain scraper gets it (classic text format)."""
    answer = requests.get(url + "/v1/metrics", timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.text


def check_metrics(promtool: str, text: str) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` with the exposition on stdin (as `curl | promtool`)."""
    return subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def assert_no_problems(result: subprocess.CompletedProcess[str]) -> None:
    report = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not report, f"promtool (exit {result.returncode}): {report}"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_every_model_with_custom_metrics_and_a_reply_sink_passes(
    promtool: str, servers: ServerFactory, sink: Sink, case: Case
) -> None:
    server = servers(
        "--state",
        "memory",
        "--storage_uri",
        case.storage_uri,
        "--reply_url",
        sink.url,
        *REPLY_FLAGS,
        env=case.env,
    )
    event_id = send_event(server.url, with_custom_metrics(case.body, CUSTOM))
    sink.wait_for(lambda: bool(sink.requests_with(event_id)))
    assert model_doc(server.url)["events"] == 1
    text = exposition(server.url)
    expected = ("reviews_total", "review_backlog", "review_time_bucket", "feedback_reply_sent")
    for family in (*expected, *case.families):
        assert family in text, f"{family} is missing: promtool would not see it"
    assert_no_problems(check_metrics(promtool, text))


def test_a_fresh_server_passes(promtool: str, servers: ServerFactory) -> None:
    """Families without samples yet (HELP and TYPE only) are valid too."""
    assert_no_problems(check_metrics(promtool, exposition(servers("--state", "memory").url)))


def test_promtool_reports_a_bad_name(promtool: str, servers: ServerFactory) -> None:
    """The check can fail: a custom GAUGE named ``*_gauge`` is linted (a user's naming choice)."""
    server = servers("--state", "memory", "--storage_uri", MULTICLASS_NUMERIC)
    metrics = [{"key": "backlog_gauge", "type": "GAUGE", "value": 1}]
    send_event(server.url, with_custom_metrics(CASES["MultiClassNumeric"].body, metrics))
    result = check_metrics(promtool, exposition(server.url))
    assert result.returncode != 0
    lint = "backlog_gauge metric name should not include type 'gauge'"
    assert lint in result.stdout + result.stderr
