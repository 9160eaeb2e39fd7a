"""The consumer's own figures, exposed as the ``feedback_kafka_*`` families.

Process-local, like the HTTP connection statistics: they describe this consumer (what it took,
refused, lags behind, and how long its commits take), which another replica's store cannot
know, and they must not cost a store transaction per record. The events themselves are counted
in the store by the ingest core as over HTTP.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from adserver.catalogue.families import KAFKA, Family

#: Bounds of feedback_kafka_commit_seconds: a synchronous commit is one broker round trip.
COMMIT_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class KafkaStats(Collector):
    """Updated by the consumer thread, read by scrapes on the IOLoop: one lock between them."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.lock = threading.Lock()
        self.records: Counter[str] = Counter()
        self.rejected: Counter[tuple[str, str]] = Counter()
        self.lag: dict[tuple[str, int], int] = {}
        self.commit_buckets = [0] * (len(COMMIT_BOUNDS) + 1)
        self.commit_sum = 0.0

    def taken(self, topic: str, count: int) -> None:
        with self.lock:
            self.records[topic] += count

    def refused(self, topic: str, reason: str) -> None:
        with self.lock:
            self.rejected[(topic, reason)] += 1

    def committed(self, seconds: float) -> None:
        bucket = next((i for i, b in enumerate(COMMIT_BOUNDS) if seconds <= b), len(COMMIT_BOUNDS))
        with self.lock:
            self.commit_buckets[bucket] += 1
            self.commit_sum += seconds

    def lagging(self, lag: dict[tuple[str, int], int]) -> None:
        self.lag = lag  # replaced whole: a scrape reads one refresh or the next

    def collect(self) -> Iterator[Metric]:
        model = self.model_name
        with self.lock:
            records, rejected = dict(self.records), dict(self.rejected)
            buckets, total = list(self.commit_buckets), self.commit_sum
        family = new(KAFKA["records"])
        for topic, count in records.items():
            family.add_metric((model, topic), count)
        yield family
        family = new(KAFKA["rejected"])
        for (topic, reason), count in rejected.items():
            family.add_metric((model, topic, reason), count)
        yield family
        gauge = new(KAFKA["lag"])
        for (topic, partition), lag in sorted(self.lag.items()):
            gauge.add_metric((model, topic, str(partition)), lag)
        yield gauge
        declared = KAFKA["commit_seconds"]
        histogram = HistogramMetricFamily(declared.name, declared.help, labels=declared.labels)
        cumulative, running = [], 0
        for bound, count in zip([*map(repr, COMMIT_BOUNDS), "+Inf"], buckets):
            running += count
            cumulative.append((bound, running))
        histogram.add_metric((model,), cumulative, total)
        yield histogram


def new(family: Family) -> CounterMetricFamily | GaugeMetricFamily:
    kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
    return kind(family.name, family.help, labels=family.labels)
