"""Issue 13 end to end: many models, segments and prediction-time windows in one real server.

A seeded stream of KServe V1/V2 logger events, Seldon executor events, labels (before and after
their predictions, days late) and direct feedback for six models is posted over HTTP; then, for
random models, segments, ranges and steps, ``GET /v1/models/<name>/metrics?from=&to=&step=``
must equal scikit-learn on exactly the rows predicted in each step (tests/support/oracle.py), and
so must ``/v1/metrics?format=json`` per model and segment and the sliding-window gauges,
after each half of the stream and, for SQLite, after a restart.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from adserver.state.buckets import DEFAULT_BUCKETS, NotKept, TimeBuckets, format_duration
from tests.support.http import scrape, value
from tests.support.models_config import write_models_config
from tests.support.oracle import OVERFLOW, Oracle, Sent, assert_matches
from tests.support.processes import ServerProcess, start_server
from tests.support.streams import MODELS, Request, Stream, generate

SEED = int(os.environ.get("STREAMS_SEED", "13"))
ITEMS = 60
WINDOWS = {"1h": 3600, "24h": 86400, "7d": 7 * 86400}
# The window gauges D9 names feedback_window_*{model, segment, window}.
WINDOW_PREFIX = "feedback_window_"
SEGMENT_OVERFLOW_ROWS = "feedback_segment_overflow_rows_total"
BUCKETS = TimeBuckets.parse(DEFAULT_BUCKETS)
# Seconds the server's clock may run ahead of the test's ``now`` while the test reads (a
# range at the edge of retention must not age out between the two).
CLOCK_MARGIN = 300


def server_args(config: Path, state: str) -> list[str]:
    return [
        "--models_config",
        str(config),
        "--state",
        state,
        "--join_ttl_seconds",
        str(30 * 86400),  # labels wait for predictions logged later in the stream
        "--windows",
        ",".join(WINDOWS),
        "--window_refresh_seconds",
        "1",
    ]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_models_config(tmp_path / "models.yaml")


def post_stream(url: str, stream: Stream, part: Sequence[Request]) -> list[Sent]:
    """Send a part of the stream's requests in order, as their peers would; each must get the
    answer it expects."""
    sent = []
    with requests.Session() as session:
        for request in part:
            before = time.time()
            answer = session.post(
                url + request.path, data=request.body, headers=dict(request.headers), timeout=10
            )
            after = time.time()
            assert answer.status_code == request.status, (request, answer.text)
            if request.role == "feedback":  # rows under the feedback's own time: which one
                assert request.item is not None
                item = stream.items[request.item]
                source = "event" if item.time is not None else "arrival"
                assert answer.headers.get("Prediction-Time-Source") == source, request
            sent.append(Sent(request, answer.status_code, before, after))
    return sent


def get(url: str, path: str, **params: Any) -> requests.Response:
    return requests.get(url + path, params=params, timeout=10)


def spell_time(seconds: int, rng: random.Random) -> str:
    """Epoch seconds or RFC 3339: both are accepted."""
    if rng.random() < 0.5:
        return str(seconds)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_documents(url: str, oracle: Oracle, context: str) -> None:
    """``/v1/metrics?format=json`` and ``/v1/models/<name>/metrics``: every model's totals and
    segments equal the oracle's."""
    answer = get(url, "/v1/metrics", format="json")
    assert answer.status_code == 200, answer.text
    documents = answer.json()["models"]
    for model in MODELS:
        actual = documents[model.name]
        assert actual["classes"] == oracle.classes(model.name), (context, model.name)
        expected = oracle.totals(model.name)
        assert set(actual.get("segments", {})) == set(expected.get("segments", {})), model.name
        assert_matches(expected, actual, f"{context}: /v1/metrics {model.name}")
        one = get(url, f"/v1/models/{model.name}/metrics")
        assert one.status_code == 200, one.text
        assert_matches(
            {"models": {model.name: expected}}, one.json(), f"{context}: {model.name} alone"
        )
    samples = scrape(url)
    for model in MODELS:  # rows and logged predictions beyond a cap are counted
        overflow = oracle.select(model.name, OVERFLOW)
        rows = sum(len(c.truth) + c.predictions for c in overflow)
        found = value(samples, SEGMENT_OVERFLOW_ROWS, model=model.name)
        assert found == rows, (context, model.name, found, rows)


def random_range(
    oracle: Oracle, model: str, segment: str | None, rng: random.Random, now: float
) -> tuple[int, ...]:
    """(start, end, step): around a row of the model's segment (or totals) or anywhere kept,
    aligned to a granularity."""
    level = rng.randrange(len(BUCKETS.levels))
    size = BUCKETS.levels[level].seconds
    rows = [c.start for c in oracle.select(model, segment)]
    if rows and rng.random() < 0.7:
        anchor = rng.choice(rows)
    else:
        anchor = now - rng.uniform(0, BUCKETS.levels[level].retention - 2 * size)
    step = size * rng.choice((1, 2, 3, 6))
    steps = rng.randint(1, 5)
    start = int(anchor // size) * size - step * rng.randrange(steps)
    return start, start + steps * step, step


def coverable(start: int, end: int, now: float) -> bool:
    """Whether the server reads the range, though its clock is later than ``now``: still kept
    CLOCK_MARGIN later, and not too far ahead (a bucket still filling is fine: every row is
    sent before a read, and ``ambiguous`` skips an edge that may cut an arrival time)."""
    try:
        BUCKETS.cover(start, end, now + CLOCK_MARGIN)
    except NotKept:
        return False
    return end <= now + BUCKETS.levels[-1].seconds


def check_range(
    url: str,
    oracle: Oracle,
    model: str,
    segment: str | None,
    span: tuple[int, ...],
    rng: random.Random,
    context: str,
) -> None:
    start, end, step = span
    params = {"from": spell_time(start, rng), "to": spell_time(end, rng)}
    if step != end - start or rng.random() < 0.5:
        params["step"] = format_duration(step) if rng.random() < 0.5 else str(step)
    if segment is not None:
        params["segment"] = segment
    answer = get(url, f"/v1/models/{model}/metrics", **params)
    where = f"{context}: {model} segment={segment!r} {params}"
    assert answer.status_code == 200, (where, answer.text)
    found = answer.json()
    assert found["model"] == model, where
    assert len(found["steps"]) == (end - start) // step, where
    for i, actual in enumerate(found["steps"]):
        low = start + i * step
        # a range shows at least the classes its rows have, at most the model's
        rows = oracle.select(model, segment, low, low + step)
        seen = {label for row in rows for label in (*row.truth, *row.predicted)}
        assert seen <= set(actual["classes"]) <= set(oracle.classes(model)), where
        expected = oracle.summary(model, segment, low, low + step, classes=actual["classes"])
        assert_matches(expected, actual, f"{where} step {i}")
    classes = found["total"]["classes"]
    assert_matches(
        oracle.summary(model, segment, start, end, classes=classes), found["total"], where
    )


def check_ranges(url: str, oracle: Oracle, now: float, rng: random.Random, context: str) -> int:
    """Random ranges and steps, segments or totals, for random models; how many were checked."""
    checked = 0
    for _ in range(60):
        model = rng.choice(MODELS).name
        segments = sorted(oracle.segments(model))
        segment = rng.choice([None, *segments]) if segments else None
        span = random_range(oracle, model, segment, rng, now)
        start, end, step = span
        edges = range(start, end + 1, step)
        if not coverable(start, end, now) or any(
            oracle.ambiguous(model, low, high) for low, high in itertools.pairwise(edges)
        ):
            continue
        check_range(url, oracle, model, segment, span, rng, context)
        checked += 1
    return checked


def check_windows(url: str, oracle: Oracle, context: str) -> None:
    """Each configured window read as a range, and its gauge, equal the oracle's rows."""
    now = time.time()
    end = int(now // BUCKETS.finest + 1) * BUCKETS.finest
    for name, seconds in WINDOWS.items():
        start, _ = BUCKETS.window(seconds, now)
        for model in MODELS:
            answer = get(url, f"/v1/models/{model.name}/metrics", **{"from": start, "to": end})
            assert answer.status_code == 200, answer.text
            total = answer.json()["total"]
            expected = oracle.summary(model.name, None, start, end, classes=total["classes"])
            assert_matches(expected, total, f"{context}: window {name} {model.name}")
    deadline = time.monotonic() + 10  # gauges refresh every --window_refresh_seconds
    while True:
        samples = scrape(url)
        wrong = window_gauge_difference(samples, oracle)
        if wrong is None:
            return
        assert time.monotonic() < deadline, f"{context}: {wrong}"
        time.sleep(0.3)


def window_gauge_difference(samples: dict, oracle: Oracle) -> str | None:
    """The first window gauge (D9's members: accuracy, rows, predictions, label coverage) that
    differs from the oracle's; a series with neither rows nor predictions has no sample."""
    now = time.time()
    end = int(now // BUCKETS.finest + 1) * BUCKETS.finest
    for name, seconds in WINDOWS.items():
        start, _ = BUCKETS.window(seconds, now)
        for model in MODELS:
            segments = [("", None), *((s, s) for s in sorted(oracle.segments(model.name)))]
            for label, segment in segments:
                expected = oracle.summary(model.name, segment, start, end)
                labels = frozenset({"model": model.name, "segment": label, "window": name}.items())
                for member, want in window_members(expected).items():
                    got = samples.get((WINDOW_PREFIX + member, labels))
                    if (got is None) != (want is None) or (
                        want is not None and abs(got - want) > 1e-9
                    ):
                        return f"{member}{dict(labels)}: expected {want}, got {got}"
    return None


def window_members(expected: dict[str, Any]) -> dict[str, float | None]:
    """A window's gauges from its range summary (None: no sample)."""
    known = expected["rows"] or expected["predictions"]
    return {
        "accuracy": expected["accuracy"] if expected["rows"] else None,
        "rows": expected["rows"] if known else None,
        "predictions": expected["predictions"] if known else None,
        "label_coverage": expected["label_coverage"],
    }


def check_refusals(url: str, oracle: Oracle, now: float) -> None:
    """Bad reads: a clear 4xx naming the reason, and nothing changed."""
    before = get(url, "/v1/metrics", format="json").json()
    hour = int(now // 3600) * 3600 - 3600
    old_minute = int(now // 60) * 60 - 5 * 86400
    refused = {
        "unknown_model": ("nope", {}),
        "invalid_range": ("iris", {"from": hour, "to": hour}),
        "invalid_step": ("iris", {"from": hour, "to": hour + 3600, "step": "90s"}),
        "range_not_kept": ("iris", {"from": old_minute, "to": old_minute + 60, "step": 60}),
        "too_many_steps": ("iris", {"from": hour - 86400, "to": hour + 60, "step": 60}),
        "unknown_segment": ("iris", {"from": hour, "to": hour + 3600, "segment": "nowhere"}),
    }
    for reason, (model, params) in refused.items():
        answer = get(url, f"/v1/models/{model}/metrics", **params)
        assert answer.status_code == (404 if reason == "unknown_model" else 400), answer.text
        body = answer.json()
        assert body["reason"] == reason and body["error"], body
    assert get(url, "/v1/metrics", format="json").json() == before


@pytest.fixture
def owned() -> Iterator[list[ServerProcess]]:
    """Servers this test starts and stops itself (a restart keeps the state directory)."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()
        server.cleanup()


@pytest.mark.parametrize("state", ["memory", "sqlite"])
def test_windows_segments_and_models_equal_the_oracle(
    config: Path, tmp_path: Path, state: str, owned: list[ServerProcess]
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    env = {"STATE_DIR": str(state_dir)}
    server = start_server(*server_args(config, state), env=env)
    owned.append(server)
    now = time.time()
    stream = generate(SEED, ITEMS, now=now)
    rng = random.Random(SEED)
    half = len(stream.requests) // 2
    sent: list[Sent] = []
    for part in (stream.requests[:half], stream.requests[half:]):  # checked after updates too
        sent += post_stream(server.url, stream, part)
        oracle = Oracle(stream, sent)
        context = f"seed {SEED}, {state}, after {len(sent)} requests"
        check_documents(server.url, oracle, context)
        assert check_ranges(server.url, oracle, now, rng, context) >= 10
        check_windows(server.url, oracle, context)
    check_refusals(server.url, oracle, now)
    if state == "sqlite":
        server.stop()
        again = start_server(*server_args(config, state), env=env)
        owned.append(again)
        context += ", after a restart"
        check_documents(again.url, oracle, context)
        assert check_ranges(again.url, oracle, now, rng, context) >= 10
        check_windows(again.url, oracle, context)
