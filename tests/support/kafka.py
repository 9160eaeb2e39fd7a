"""librdkafka's mock cluster, owned by a Producer in the test process; records to produce."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer

from tests.support.events import FEEDBACK_TYPE, feedback, new_id
from tests.support.http import scrape, value


class MockCluster:
    """A mock cluster of ``brokers`` brokers; topics are created (4 partitions) by producing."""

    def __init__(self, brokers: int = 1) -> None:
        self.producer = Producer({"test.mock.num.brokers": brokers, "linger.ms": 5})
        metadata = self.producer.list_topics(timeout=10)
        self.bootstrap = ",".join(f"{b.host}:{b.port}" for b in metadata.brokers.values())

    def produce(
        self,
        topic: str,
        value: bytes | None,
        headers: Mapping[str, str] | None = None,
        partition: int | None = None,
    ) -> None:
        where = {} if partition is None else {"partition": partition}
        self.producer.produce(topic, value=value, headers=dict(headers or {}), **where)
        self.producer.poll(0)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0

    def consume_all(self, topic: str, expected: int, timeout: float = 30.0) -> list[Any]:
        """The records of ``topic`` (e.g. a dead-letter topic), read by a group of its own."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": new_id(),
                "auto.offset.reset": "earliest",
            }
        )
        consumer.subscribe([topic])
        found: list[Any] = []
        deadline = time.monotonic() + timeout
        try:
            while len(found) < expected and time.monotonic() < deadline:
                message = consumer.poll(0.2)
                if message is not None and message.error() is None:
                    found.append(message)
        finally:
            consumer.close()
        return found


def feedback_record(
    truth: int, prediction: int, event_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """A binary-mode CloudEvent record of one row of multiclass-numeric feedback."""
    headers = {
        "ce_specversion": "1.0",
        "ce_id": event_id or new_id(),
        "ce_source": "tests/kafka",
        "ce_type": FEEDBACK_TYPE,
        "content-type": "application/json",
    }
    return orjson.dumps(feedback([[truth]], [[prediction]])), headers


def produce_feedback(cluster: MockCluster, topic: str, count: int, **where: Any) -> int:
    """``count`` single-row feedback records, all class 1 predicted 1; returns ``count``."""
    for _ in range(count):
        body, headers = feedback_record(1, 1)
        cluster.produce(topic, body, headers, **where)
    cluster.flush()
    return count


#: The mock cluster ignores a leaving member: a restarted or killed one is replaced only after
#: its session times out (the least a broker allows by default: 6 s).
FAST_GROUP = "session.timeout.ms=6000,heartbeat.interval.ms=500"


def kafka_args(cluster: MockCluster, *topics: str, **extra: str) -> list[str]:
    args = ["--kafka_bootstrap_servers", cluster.bootstrap, "--kafka_topics", ",".join(topics)]
    args += ["--kafka_config", FAST_GROUP]
    for name, setting in extra.items():
        args += [f"--{name}", setting]
    return args


def counted(url: str, name: str = "feedback_events_accepted_total", **labels: str) -> float:
    return value(scrape(url), name, **labels)


def wait_for(check: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def cluster(brokers: int = 1) -> Iterator[MockCluster]:
    running = MockCluster(brokers)
    try:
        yield running
    finally:
        running.producer.flush(5)
