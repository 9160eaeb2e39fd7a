"""Durability under kill -9, redelivery like Knative's, and graceful SIGTERM drain.

Real processes only: the server runs as a subprocess with SQLite state; clients re-send an event
with the same id until they get a 2xx, exactly as a Broker does on errors and dropped connections.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from sklearn.metrics import confusion_matrix

from tests.support.events import ce_headers, feedback
from tests.support.http import post_json
from tests.support.processes import (
    MULTICLASS_NUMERIC,
    ServerProcess,
    launch,
    start_server,
    wait_ready,
)

Event = tuple[str, list[int], list[int]]  # (ce-id, truth class ids, predicted class ids)
EVENTS = 300
ROWS_MAX = 5


def make_events(seed: int) -> list[Event]:
    rng = np.random.default_rng(seed)
    events = []
    for i in range(EVENTS):
        rows = int(rng.integers(1, ROWS_MAX + 1))
        events.append(
            (f"event-{i}", rng.integers(0, 4, rows).tolist(), rng.integers(0, 4, rows).tolist())
        )
    return events


def crash_args(state: str, state_dir: Path) -> tuple[str, ...]:
    return (
        "--model_name", "crash", "--storage_uri", MULTICLASS_NUMERIC,
        "--state", state, "--state_dir", str(state_dir),
    )  # fmt: skip


def deliver(url: str, event: Event, source: str, timeout: float) -> requests.Response:
    """One binary-mode delivery of the event, as a Broker sends it."""
    event_id, truth, predicted = event
    headers = ce_headers(event_id, source=source)
    return post_json(url, feedback(truth, predicted), headers, timeout=timeout)


def send_until_acknowledged(base: list[str], event: Event) -> int:
    """Like Knative: redeliver the same (source, id) until a 2xx; returns attempts made."""
    for attempt in range(1, 2000):
        try:
            response = deliver(base[0], event, "crash-test", timeout=2)
            if 200 <= response.status_code < 300:
                return attempt
            assert response.status_code >= 500, response.text  # never a 4xx for good input
        except requests.RequestException:
            pass
        time.sleep(0.02)
    raise AssertionError(f"{event[0]} never acknowledged")


def restart_on(url: str, args: tuple[str, ...]) -> ServerProcess:
    """A new server on the same port as the one that died, as a Pod restart would be."""
    port = url.rsplit(":", 1)[1]
    process, stderr = launch(
        ["--http_host", "127.0.0.1", "--http_port", port, *args, "MetricsServer"]
    )
    wait_ready(url, process, stderr, timeout=10)
    return ServerProcess(url, process, stderr)


def metrics(server_url: str) -> dict:
    return requests.get(server_url + "/v1/metrics?format=json", timeout=5).json()["models"]["crash"]


def test_kill_9_loses_nothing_and_counts_nothing_twice(tmp_path: Path) -> None:
    args = crash_args("sqlite", tmp_path)
    server = start_server(*args)
    base = [server.url]
    events = make_events(seed=7)
    done = threading.Event()
    acknowledged = [0]
    lock = threading.Lock()
    kills = 0

    def chaos() -> None:
        """Five kills at random points of the stream, never after it (a fast server could
        acknowledge all events before a kill timed by the clock alone)."""
        nonlocal server, kills
        chance = random.Random(3)
        for milestone in sorted(chance.sample(range(EVENTS // 10, EVENTS * 9 // 10), 5)):
            while acknowledged[0] < milestone and not done.is_set():
                time.sleep(0.002)
            if done.is_set():
                return
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(5)
            kills += 1
            server = restart_on(server.url, args)

    def send(event: Event) -> int:
        attempts = send_until_acknowledged(base, event)
        with lock:
            acknowledged[0] += 1
        return attempts

    killer = threading.Thread(target=chaos)
    killer.start()
    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            attempts = list(pool.map(send, events))
    finally:
        done.set()
        killer.join()
    try:
        state = metrics(server.url)
    finally:
        server.stop()
    truth = [t for _, ts, _ in events for t in ts]
    predicted = [p for _, _, ps in events for p in ps]
    assert kills == 5 and sum(attempts) > EVENTS  # the chaos really forced redeliveries
    assert state["events"] == EVENTS
    assert state["rows"] == len(truth)
    np.testing.assert_array_equal(
        state["confusion_matrix"], confusion_matrix(truth, predicted, labels=state["classes"])
    )


def test_sigterm_drains_in_flight_events(tmp_path: Path) -> None:
    """Events acknowledged before and during SIGTERM are all there after a restart."""
    args = crash_args("sqlite", tmp_path)  # the default mode, said explicitly
    server: ServerProcess = start_server(*args)
    events = make_events(seed=11)[:120]
    acknowledged: list[Event] = []

    def send_once(event: Event) -> None:
        try:
            response = deliver(server.url, event, "drain", timeout=5)
        except requests.RequestException:
            return
        if response.status_code == 200:
            acknowledged.append(event)

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(send_once, e) for e in events]
        time.sleep(0.1)
        server.terminate()
        for future in futures:
            future.result()
    assert server.wait(15) == 0
    restarted = start_server(*args)
    try:
        state = metrics(restarted.url)
    finally:
        restarted.stop()
    assert acknowledged, "no event was acknowledged before the drain"
    assert state["events"] == len(acknowledged)
    assert state["rows"] == sum(len(t) for _, t, _ in acknowledged)


def test_memory_mode_starts_empty_after_restart(tmp_path: Path) -> None:
    args = crash_args("memory", tmp_path)
    server = start_server(*args)
    send_until_acknowledged([server.url], ("m-1", [1, 2], [1, 1]))
    assert metrics(server.url)["rows"] == 2
    server.stop()
    restarted = start_server(*args)
    try:
        assert metrics(restarted.url)["rows"] == 0
    finally:
        restarted.stop()
    assert not any(tmp_path.iterdir())  # memory mode writes no state file
