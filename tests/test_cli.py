"""``python -m adserver``: the reference's container args, every model path, env vars, errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from adserver.settings import Settings
from tests.support.events import REPLY_SOURCE, REPLY_TYPE, ce_headers, feedback
from tests.support.http import cells, model_doc, post_json, scrape, send_event, value
from tests.support.processes import (
    DATA,
    REPLY_FLAGS,
    ROOT,
    ServerFactory,
    ServerProcess,
    child_env,
    free_port,
    launch,
    wait_ready,
)
from tests.support.sink import Sink

REFERENCE_FLAGS = (
    "--model_name",
    "--http_port",
    "--protocol",
    "--storage_uri",
    "--reply_url",
    "--event_type",
    "--event_source",
    "--elasticsearch_uri",
)
USER_MODELS = str(DATA / "user_models")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A command that must finish by itself (help, bad configuration)."""
    return subprocess.run(
        [sys.executable, "-m", "adserver", *args],
        cwd=ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=20,
    )


def start_exact(
    argv: list[str], port: int, tmp_path: Path, env: dict[str, str] | None = None
) -> ServerProcess:
    """Start with exactly ``argv`` (no flags added), state kept under ``tmp_path``."""
    process, stderr = launch(argv, {"STATE_DIR": str(tmp_path / "state"), **(env or {})})
    url = f"http://127.0.0.1:{port}"
    server = ServerProcess(url, process, stderr)
    try:
        wait_ready(url, process, stderr, timeout=10)
    except RuntimeError:
        server.cleanup()
        raise
    return server


def test_reference_container_args_start_and_serve(tmp_path: Path) -> None:
    """The args of Seldon's example manifest, unchanged (the reply sink is down)."""
    port = free_port()
    argv = [
        "--model_name",
        "multiclassserver",
        "--http_port",
        str(port),
        "--protocol",
        "seldonfeedback.http",
        "--storage_uri",
        "adserver.cm_models.multiclass_one_hot.MulticlassOneHot",
        "--reply_url",
        f"http://127.0.0.1:{free_port()}",
        "--event_type",
        "io.seldon.serving.feedback.metrics",
        "--event_source",
        "io.seldon.serving.feedback",
        "MetricsServer",
    ]
    server = start_exact(argv, port, tmp_path)
    try:
        assert requests.get(server.url + "/protocol", timeout=5).text == "seldonfeedback.http"
        headers = ce_headers(requestid="r-1")
        answer = post_json(server.url, feedback([[0, 0, 1]], [[0.0007, 0.0037, 0.9956]]), headers)
        assert answer.status_code == 200, answer.text
        assert answer.headers["Ce-Type"] == "io.seldon.serving.feedback.metrics"
        assert answer.headers["Ce-Source"] == "io.seldon.serving.feedback"
        assert answer.headers["Ce-Id"] == headers["ce-id"]
        doc = model_doc(server.url, "multiclassserver")
        assert (doc["events"], doc["rows"], cells(doc)) == (1, 1, Counter({(2, 2): 1}))
        assert server.stop() == 0
    finally:
        server.terminate()
        server.cleanup()


@pytest.mark.parametrize(
    ("storage_uri", "truth", "response", "expected"),
    [
        (
            "cm_models.multiclass_numeric.MultiClassNumeric",
            [[4], [1]],
            [[4], [2]],
            {(4, 4): 1, (1, 2): 1},
        ),
        ("adserver.cm_models.multiclass_numeric.MultiClassNumeric", [3], [3], {(3, 3): 1}),
        (
            "adserver.cm_models.binary_metrics.BinaryMetrics",
            [[1], [0]],
            [[1], [1]],
            {(1, 1): 1, (0, 1): 1},
        ),
        ("BinaryMetrics", [1, 0, 1], [0.9, 0.2, 0.4], {(1, 1): 1, (0, 0): 1, (1, 0): 1}),
        ("MulticlassOneHot", [[0, 1]], [[0.3, 0.7]], {(1, 1): 1}),
    ],
)
def test_storage_uri_forms(
    module_servers: ServerFactory,
    storage_uri: str,
    truth: list,
    response: list,
    expected: dict[tuple[int, int], int],
) -> None:
    url = module_servers("--storage_uri", storage_uri).url
    send_event(url, feedback(truth, response))
    assert cells(model_doc(url)) == Counter(expected)


def test_users_own_seldon_style_class_on_pythonpath(servers: ServerFactory) -> None:
    """Metric dicts from the user's transform are exported; the one invalid dict is dropped."""
    server = servers(
        "--storage_uri",
        "my_metrics.MyMetrics",
        "--model_name",
        "mine",
        env={"PYTHONPATH": USER_MODELS},
    )
    truth, response = [[0, 1, 0], [1, 0, 0]], [[0.1, 0.8, 0.1], [0.2, 0.5, 0.3]]
    for _ in range(2):
        send_event(server.url, feedback(truth, response))
    samples = scrape(server.url)
    assert value(samples, "user_correct_total") == 2
    assert value(samples, "user_seen_total", by="user") == 4
    assert value(samples, "user_last_score") == 0.8
    assert not any(name.startswith("user_broken") for (name, _) in samples)
    assert value(samples, "feedback_custom_metrics_rejected_total", model="mine") == 2
    assert model_doc(server.url, "mine")["events"] == 2


def test_user_class_rejecting_input_is_a_400(servers: ServerFactory) -> None:
    """A ValueError from the user's transform means bad input: 400, nothing counted."""
    url = servers("--storage_uri", "my_metrics.MyMetrics", env={"PYTHONPATH": USER_MODELS}).url
    answer = post_json(url, feedback([[0, 1]], [[0.1, 0.8, 0.1]]), ce_headers())
    assert answer.status_code == 400, answer.text
    assert answer.json()["reason"] == "model_rejected"
    assert model_doc(url)["events"] == 0


def test_any_failure_of_the_user_transform_is_a_400(servers: ServerFactory) -> None:
    """Retrying cannot fix a deterministic model failure, so Knative must not get a 500."""
    url = servers("--storage_uri", "my_metrics.FragileMetrics", env={"PYTHONPATH": USER_MODELS}).url
    assert post_json(url, feedback([[1]], [[1]]), ce_headers()).status_code == 200
    answer = post_json(url, feedback([[0]], [[1]]), ce_headers())
    assert answer.status_code == 400, answer.text
    assert "ZeroDivisionError" in answer.json()["error"]
    assert model_doc(url)["events"] == 1


def test_user_class_returning_a_seldon_response(servers: ServerFactory) -> None:
    url = servers(
        "--storage_uri", "my_metrics.MyMetricsResponse", env={"PYTHONPATH": USER_MODELS}
    ).url
    send_event(url, feedback([[1]], [[1]]))
    send_event(url, feedback([[0]], [[1]]))
    assert value(scrape(url), "user_events_total") == 2


@pytest.mark.parametrize(
    ("storage_uri", "mentioned"),
    [
        ("no_such_package.models.Model", "no_such_package"),
        ("cm_models.multiclass_numeric.NoSuchClass", "NoSuchClass"),
        ("NoSuchModel", "NoSuchModel"),
        ("json.JSONDecoder", "JSONDecoder"),
    ],
)
def test_bad_storage_uri_fails_start_up(storage_uri: str, mentioned: str) -> None:
    started = time.monotonic()
    result = run_cli(
        "--http_port",
        str(free_port()),
        "--storage_uri",
        storage_uri,
        "MetricsServer",
        env={"STATE": "memory"},
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 10
    assert mentioned in result.stderr
    assert "Traceback" not in result.stderr


def test_every_option_is_in_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in REFERENCE_FLAGS:
        assert flag in result.stdout
    for item in dataclasses.fields(Settings):
        assert f"--{item.name}" in result.stdout
        assert item.metadata["env"] in result.stdout
    assert "MetricsServer" in result.stdout


def test_options_from_environment_variables(tmp_path: Path, sink: Sink) -> None:
    """Kubernetes manifests often set env instead of args: every setting has a variable."""
    port = free_port()
    env = {
        "HTTP_PORT": str(port),
        "HTTP_HOST": "127.0.0.1",
        "MODEL_NAME": "from-env",
        "STORAGE_URI": "MultiClassNumeric",
        "EVENT_TYPE": REPLY_TYPE,
        "EVENT_SOURCE": REPLY_SOURCE,
        "REPLY_URL": sink.url,
        "MAX_BODY_BYTES": "2000",
        "CESERVER_LOGLEVEL": "DEBUG",
    }
    server = start_exact(["MetricsServer"], port, tmp_path, env)
    try:
        headers = ce_headers()
        answer = post_json(server.url, feedback([[7]], [[7]]), headers)
        assert answer.headers["Ce-Type"] == REPLY_TYPE
        assert answer.headers["Ce-Source"] == REPLY_SOURCE
        assert cells(model_doc(server.url, "from-env")) == Counter({(7, 7): 1})
        sink.wait_for(lambda: len(sink.requests_with(headers["ce-id"])) == 1)
        big = post_json(server.url, b" " * 2001, ce_headers())
        assert big.status_code == 413
        assert server.stop() == 0
        assert '"level": "DEBUG"' in server.stderr()
    finally:
        server.terminate()
        server.cleanup()


def test_flag_wins_over_environment(servers: ServerFactory) -> None:
    server = servers("--model_name", "from-flag", env={"MODEL_NAME": "from-env"})
    document = requests.get(server.url + "/v1/metrics?format=json", timeout=5).json()
    assert list(document["models"]) == ["from-flag"]


def test_invalid_environment_value_is_reported() -> None:
    result = run_cli("MetricsServer", env={"HTTP_PORT": "eighty"})
    assert result.returncode != 0
    assert "HTTP_PORT" in result.stderr


def test_unknown_subcommand_is_refused() -> None:
    result = run_cli("--http_port", str(free_port()), "OutlierDetector")
    assert result.returncode == 2
    assert "MetricsServer" in result.stderr


def test_malformed_reply_url_fails_start_up() -> None:
    result = run_cli(
        "--http_port",
        str(free_port()),
        *REPLY_FLAGS,
        "--reply_url",
        "message-dumper",
        "MetricsServer",
    )
    assert result.returncode == 2
    assert "--reply_url" in result.stderr and "not an http(s) URL" in result.stderr


def test_elasticsearch_uri_is_accepted_and_said_unsupported(servers: ServerFactory) -> None:
    server = servers("--elasticsearch_uri", "http://elasticsearch:9200")
    assert requests.get(server.url + "/health/ready", timeout=5).status_code == 200
    warning = [line for line in server.stderr().splitlines() if "elasticsearch" in line.lower()]
    assert warning and "unsupported" in warning[0]


def test_logs_are_json_lines_without_a_line_per_event(servers: ServerFactory) -> None:
    """At INFO, ingesting events adds no log line; every line is a JSON object."""
    server = servers()
    lines_before = len(server.stderr().splitlines())
    for _ in range(5):
        send_event(server.url, feedback([[1, 0]], [[0.6, 0.4]]))
    post_json(server.url, b"not json", ce_headers())
    assert len(server.stderr().splitlines()) == lines_before
    assert server.stop() == 0
    records = [json.loads(line) for line in server.stderr().splitlines()]
    assert records and all({"level", "message"} <= set(r) for r in records)
    assert not any(r["level"] == "ERROR" for r in records)


def test_sigterm_stops_promptly_with_exit_0(servers: ServerFactory) -> None:
    server = servers()
    send_event(server.url, feedback([[1, 0]], [[0.6, 0.4]]))
    started = time.monotonic()
    assert server.stop(timeout=5) == 0
    assert time.monotonic() - started < 3


def test_debug_logs_name_the_event_request_and_model(servers: ServerFactory) -> None:
    server = servers("--model_name", "traced", env={"CESERVER_LOGLEVEL": "DEBUG"})
    send_event(server.url, feedback([[1, 0]], [[0.6, 0.4]]), "evt-42", requestid="req-7")
    post_json(server.url, b"not json", ce_headers("evt-43"))
    server.stop()
    records = [json.loads(line) for line in server.stderr().splitlines()]
    committed = [r for r in records if r["message"] == "events committed"]
    refused = [r for r in records if r["message"] == "event refused"]
    assert (
        committed[0] | {"event_id": "evt-42", "request_id": "req-7", "model": "traced"}
        == (committed[0])
    )
    assert refused[0]["event_id"] == "evt-43" and refused[0]["reason"] == "invalid_json"
