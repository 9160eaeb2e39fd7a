"""The Kafka transport on librdkafka's mock cluster: exactly once, through kills and rebalances.

The cluster lives in this process (its Producer owns it); each server is a real subprocess
consuming it over loopback. Every record is one-row feedback with a random truth and
prediction, so the server's confusion cells must equal the produced ones exactly: a record lost
or counted twice shows.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
import requests

from tests.support.events import new_id
from tests.support.http import cells, model_doc, scrape, value
from tests.support.kafka import MockCluster, feedback_record, kafka_args, wait_for
from tests.support.processes import (
    MULTICLASS_NUMERIC,
    ServerProcess,
    free_port,
    launch,
    start_server,
)

pytestmark = pytest.mark.e2e
Cells = Counter[tuple[int, int]]
PARTITIONS = 4  # the mock cluster's default for a topic created by producing


def produce(cluster: MockCluster, topic: str, count: int, seed: int) -> Cells:
    """``count`` one-row feedback records, round robin over the partitions; their cells."""
    rng = random.Random(seed)
    produced: Cells = Counter()
    for index in range(count):
        truth, prediction = rng.randrange(3), rng.randrange(3)
        body, headers = feedback_record(truth, prediction)
        cluster.produce(topic, body, headers, partition=index % PARTITIONS)
        produced[(truth, prediction)] += 1
    cluster.flush()
    return produced


def consuming(cluster: MockCluster, state: Path, *topics: str, **extra: str) -> ServerProcess:
    return start_server(
        "--storage_uri",
        MULTICLASS_NUMERIC,
        "--state_dir",
        str(state),
        *kafka_args(cluster, *topics, **extra),
    )


def rows(server: ServerProcess) -> int:
    return sum(cells(model_doc(server.url)).values())


def kafka(server: ServerProcess, name: str, **labels: str) -> float:
    return value(scrape(server.url), name, **labels)


def by_label(server: ServerProcess, name: str, label: str) -> dict[str, float]:
    """The samples of ``name``, by the value of one of their labels."""
    return {
        dict(labels)[label]: count
        for (sample, labels), count in scrape(server.url).items()
        if sample == name
    }


def settled(servers: list[ServerProcess], expected: int) -> Cells:
    """The servers' cells once their rows reach ``expected`` and stay (a second more)."""
    wait_for(lambda: sum(rows(s) for s in servers) >= expected, 90, f"{expected} rows")
    time.sleep(1.0)
    total: Cells = Counter()
    for server in servers:
        total += cells(model_doc(server.url))
    return total


def test_every_record_counts_once_and_drain_commits(tmp_path: Path) -> None:
    """N records: exactly N rows; after SIGTERM the offsets are committed, so a restart takes
    no record again."""
    cluster = MockCluster()
    produced = produce(cluster, "feedback", 300, seed=1)
    server = consuming(cluster, tmp_path, "feedback")
    try:
        assert settled([server], 300) == produced
        assert kafka(server, "feedback_kafka_records_total", topic="feedback") == 300
        assert kafka(server, "feedback_kafka_commit_seconds_count") >= 1
    finally:
        assert server.stop() == 0
    again = consuming(cluster, tmp_path, "feedback")
    try:
        wait_for(lambda: "partitions assigned" in again.stderr(), 30, "an assignment")
        time.sleep(1.0)
        assert cells(model_doc(again.url)) == produced
        assert kafka(again, "feedback_kafka_records_total", topic="feedback") == 0
        lag = "feedback_kafka_consumer_lag"
        wait_for(lambda: len(by_label(again, lag, "partition")) == 4, 15, "the lag gauges")
        assert set(by_label(again, lag, "partition").values()) == {0}
    finally:
        again.stop()


def test_kill_9_mid_consume_then_restart_counts_exactly(tmp_path: Path) -> None:
    cluster = MockCluster()
    produced = produce(cluster, "feedback", 3000, seed=2)
    server = consuming(cluster, tmp_path, "feedback")
    try:
        wait_for(lambda: rows(server) >= 1000, 60, "a third of the rows")
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
    counted_before = None
    again = consuming(cluster, tmp_path, "feedback")
    try:
        assert settled([again], 3000) == produced
        counted_before = kafka(again, "feedback_kafka_records_total", topic="feedback")
    finally:
        again.stop()
    assert counted_before is not None and counted_before < 3000  # it resumed, not restarted


def test_sigterm_mid_consume_loses_nothing(tmp_path: Path) -> None:
    """Records taken while draining are refused as shutting_down: not committed, taken again."""
    cluster = MockCluster()
    produced = produce(cluster, "feedback", 3000, seed=3)
    server = consuming(cluster, tmp_path, "feedback")
    wait_for(lambda: rows(server) > 0, 60, "the first rows")
    assert server.stop() == 0
    again = consuming(cluster, tmp_path, "feedback")
    try:
        assert settled([again], 3000) == produced
    finally:
        again.stop()


def test_two_servers_split_the_partitions(tmp_path: Path) -> None:
    cluster = MockCluster(brokers=3)
    produce(cluster, "feedback", 4, seed=4)  # the topic (4 partitions) exists before they join
    first = consuming(cluster, tmp_path / "a", "feedback")
    second = consuming(cluster, tmp_path / "b", "feedback")
    try:
        wait_for(lambda: "partitions assigned" in second.stderr(), 60, "the second's partitions")
        produce(cluster, "feedback", 400, seed=5)
        total = settled([first, second], 404)
        assert sum(total.values()) == 404
        assert rows(first) > 0 and rows(second) > 0
    finally:
        first.stop()
        second.stop()


def test_a_rebalance_mid_stream_loses_nothing(tmp_path: Path) -> None:
    """A second member joins while records flow: partitions move and no record is lost.

    Each server has its own store here, so a record finished after its partition's last
    successful commit is counted again by the new owner: librdkafka's mock coordinator refuses
    commits while a rebalance is in progress (a real broker accepts the old generation's commits
    until the rebalance completes). Exact only when no commit failed; a shared store (PostgreSQL)
    dedups either way.
    """
    cluster = MockCluster()
    produced = produce(cluster, "feedback", 1, seed=6)  # the topic exists before it joins
    first = consuming(cluster, tmp_path / "a", "feedback")
    done = threading.Event()

    def stream() -> None:
        seed = 7
        while not done.is_set():
            produced.update(produce(cluster, "feedback", 50, seed=seed))
            seed += 1
            time.sleep(0.05)

    producer = threading.Thread(target=stream)
    producer.start()
    second = None
    try:
        wait_for(lambda: rows(first) > 100, 60, "the first rows")
        second = consuming(cluster, tmp_path / "b", "feedback")
        wait_for(lambda: "partitions assigned" in second.stderr(), 60, "the second's partitions")
        time.sleep(1.0)
        done.set()
        producer.join()
        expected = sum(produced.values())
        total = settled([first, second], expected)
        assert all(total[cell] >= count for cell, count in produced.items())
        assert "partitions revoked" in first.stderr()
        if "offset commit failed" not in first.stderr():
            assert total == produced
    finally:
        done.set()
        producer.join()
        first.stop()
        if second is not None:
            second.stop()


def on_postgres(cluster: MockCluster, dsn: str, *topics: str) -> ServerProcess:
    """A consuming server whose state is the shared database (``--state postgres``)."""
    return start_server(
        "--storage_uri",
        MULTICLASS_NUMERIC,
        "--state",
        "postgres",
        "--postgres_dsn",
        dsn,
        "--postgres_refresh_seconds",
        "0.25",
        *kafka_args(cluster, *topics),
    )


@pytest.mark.postgres
def test_on_shared_postgres_rebalances_and_a_kill_9_count_exactly(
    postgres_dsn: str,
) -> None:
    """Two servers in one group on one database while records flow: a member joins (a
    rebalance), one is killed with SIGKILL mid-consume and another starts in its place. Records
    redelivered (after refused commits or the kill) are CloudEvents seen before, by source and
    id, so the database counts each once: exactly the produced cells, one document everywhere."""
    cluster = MockCluster()
    produced = produce(cluster, "feedback", 1, seed=20)  # the topic exists before they join
    first = on_postgres(cluster, postgres_dsn, "feedback")
    servers = [first]
    done = threading.Event()

    resent = 0

    def stream() -> None:
        nonlocal resent
        seed = 21
        while not done.is_set():
            produced.update(produce(cluster, "feedback", 20, seed=seed))
            produced[resend(cluster, "feedback", seed=seed)] += 1
            resent += 1
            seed += 1
            time.sleep(0.05)

    producer = threading.Thread(target=stream)
    producer.start()
    docs: list[dict[str, object]] = []
    try:
        wait_for(lambda: rows(first) > 100, 60, "the first rows")
        second = on_postgres(cluster, postgres_dsn, "feedback")
        servers.append(second)
        wait_for(lambda: "partitions assigned" in second.stderr(), 60, "the second's partitions")
        wait_for(lambda: "partitions revoked" in first.stderr(), 60, "the first's revocation")
        before = rows(second)
        wait_for(lambda: rows(second) > before + 100, 60, "both consuming")
        first.process.send_signal(signal.SIGKILL)  # mid-consume: no drain, no commit
        first.process.wait(10)
        third = on_postgres(cluster, postgres_dsn, "feedback")
        servers.append(third)
        wait_for(lambda: "partitions assigned" in third.stderr(), 60, "the third's partitions")
        done.set()
        producer.join()
        expected = sum(produced.values())
        alive = [second, third]

        def one_document() -> bool:
            docs[:] = [model_doc(server.url) for server in alive]
            return all(doc == docs[0] for doc in docs) and rows_of(docs[0]) >= expected

        wait_for(one_document, 60, f"both servers showing the same {expected} rows")
        assert cells(docs[0]) == produced, f"{rows_of(docs[0])} rows, {expected} produced"
        assert docs[0]["events"] == expected
        # Still so once the last commits and the views' refresh are past (a double count shows).
        time.sleep(2.0)
        assert [model_doc(server.url) for server in alive] == [docs[0]] * 2
        # The resent ones at least; redeliveries after the kill or refused commits add more.
        for server in alive:
            assert kafka(server, "feedback_events_duplicate_total", model="model") >= resent
    finally:
        done.set()
        producer.join()
        for server in servers:
            if server.process.poll() is None:
                server.stop()


def resend(cluster: MockCluster, topic: str, seed: int) -> tuple[int, int]:
    """One record sent twice, as a producer's retry does (the same source and id), to two
    partitions, so often two servers: one row, one duplicate. Its cell."""
    rng = random.Random(-seed)
    truth, prediction = rng.randrange(3), rng.randrange(3)
    body, headers = feedback_record(truth, prediction, new_id())
    cluster.produce(topic, body, headers, partition=seed % PARTITIONS)
    cluster.produce(topic, body, headers, partition=(seed + 1) % PARTITIONS)
    cluster.flush()
    return truth, prediction


def rows_of(doc: dict[str, object]) -> int:
    return sum(cells(doc).values())


def test_poison_records_are_counted_skipped_and_dead_lettered(tmp_path: Path) -> None:
    cluster = MockCluster()
    good = produce(cluster, "feedback", 20, seed=8)
    cluster.produce("feedback", b"{not json", partition=0)
    body, headers = feedback_record(1, 1)
    cluster.produce("feedback", body, {**headers, "ce_specversion": "0.3"}, partition=1)
    cluster.produce("feedback", orjson.dumps({"truth": "x"}), partition=2)
    # valid feedback, but over --max_body_bytes
    large, large_headers = feedback_record(1, 1)
    cluster.produce("feedback", large + b" " * 2000, large_headers, partition=3)
    cluster.flush()
    good += produce(cluster, "feedback", 20, seed=9)  # after the poison: still consumed
    server = consuming(
        cluster, tmp_path, "feedback", kafka_dead_letter_topic="dead", max_body_bytes="2000"
    )
    try:
        assert settled([server], 40) == good
        refused = "feedback_kafka_records_rejected_total"
        wait_for(lambda: sum(by_label(server, refused, "reason").values()) == 4, 30, "refusals")
        rejected = by_label(server, refused, "reason")
        assert sum(rejected.values()) == 4
        assert rejected["unknown_record_format"] == 1  # no CloudEvent, no JSON, no Avro read
        assert rejected["unsupported_specversion"] == 1
        assert rejected["body_too_large"] == 1
        events = by_label(server, "feedback_events_rejected_total", "reason")
        assert events["body_too_large"] == 1
        copies = cluster.consume_all("dead", 4)
        origins = {}
        for copy in copies:
            headers = dict(copy.headers())
            origins[headers["dead-letter-origin"].decode()] = headers["dead-letter-reason"].decode()
        assert len(origins) == 4
        assert set(origins.values()) == set(rejected)
    finally:
        server.stop()


def test_records_meeting_a_store_fault_are_retried_and_count_once(tmp_path: Path) -> None:
    """Another process holds the state file's write lock for longer than the server's busy
    timeout: its commits fail (store_error, a 503 over HTTP), the records are fetched again
    after the backoff, never skipped nor refused, and count once when the lock is gone."""
    cluster = MockCluster()
    produced = produce(cluster, "feedback", 40, seed=10)
    server = consuming(cluster, tmp_path, "feedback")
    try:
        assert settled([server], 40) == produced
        locker = sqlite3.connect(tmp_path / "feedback-state.sqlite3", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            produced += produce(cluster, "feedback", 40, seed=11)
            wait_for(lambda: "state commit failed" in server.stderr(), 30, "a store fault")
            time.sleep(1.0)  # past a retry's backoff: fetched again, failing again
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert settled([server], 80) == produced
        taken = kafka(server, "feedback_kafka_records_total", topic="feedback")
        assert taken > 80  # some were taken again
        assert by_label(server, "feedback_kafka_records_rejected_total", "reason") == {}
    finally:
        server.stop()


def test_readiness_fails_while_the_brokers_are_down(tmp_path: Path) -> None:
    port = free_port()
    process, stderr = launch(
        [
            "--http_host",
            "127.0.0.1",
            "--http_port",
            str(port),
            "--state_dir",
            str(tmp_path),
            "--kafka_bootstrap_servers",
            f"127.0.0.1:{free_port()}",
            "--kafka_topics",
            "feedback",
        ]
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def unhealthy() -> bool:
            try:
                answer = requests.get(url + "/health/ready", timeout=1)
            except requests.RequestException:
                return False
            return answer.status_code == 503 and answer.json()["reason"] == "unhealthy"

        wait_for(unhealthy, 30, "readiness to fail")
        assert requests.get(url + "/health/live", timeout=1).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
        stderr.unlink()


def test_without_the_extra_kafka_settings_exit_2(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "confluent_kafka.py").write_text("raise ImportError('no librdkafka here')\n")
    process, stderr = launch(
        ["--kafka_bootstrap_servers", "127.0.0.1:9", "--kafka_topics", "t"],
        env={"PYTHONPATH": str(shadow), "STATE_DIR": str(tmp_path / new_id())},
    )
    try:
        assert process.wait(20) == 2
        assert "pip install '.[kafka]'" in stderr.read_text()
    finally:
        stderr.unlink()
        assert os.path.exists(shadow)
