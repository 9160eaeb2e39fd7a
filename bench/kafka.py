"""Kafka vs HTTP on one server in one run: records/s of 1-row feedback, rows/s of 1,000-row.

    python -m bench.kafka                 # 10 s HTTP cases, 20,000 + 200 records (~1 min)
    python -m bench.kafka --duration 30 --records 60000 --batch-records 600

One server (sqlite state, the one-hot model) listens on HTTP and consumes two topics of
librdkafka's mock cluster, which this process owns (its Producer). First wrk drives HTTP with
the 1-row and 1,000-row bodies of bench/payloads.py (16 connections, as the bench's grid);
then the records, binary-mode CloudEvents carrying the same bodies, are produced, and the
rate is their count over the time from the first produced to the last counted in
``feedback_events_accepted_total`` (sampled every 0.05 s). The mock broker keeps only a few MB
per partition, so records go in waves of 2 MB, the next produced once all but one wave are
counted (the server consumes one while the next is produced): conservative, since producing
is inside the time. Server on core 0,
wrk and producer on core 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from bench import servers, wrk
from bench.payloads import write_payloads
from bench.run import ONE_HOT

TOPICS = {1: "bench-single", 1000: "bench-batch"}
CONNECTIONS = 16
#: The mock broker keeps only a few MB per partition (older records are deleted, unread):
#: records are produced in waves of at most this many bytes, at most two waves unread.
WAVE_BYTES = 2 * 1024 * 1024
#: The mock broker answers a fetch that found nothing only after fetch.wait.max.ms (default
#: 500 ms), even when records arrive meanwhile (a real broker answers as they arrive): each
#: wave would wait for it.
MOCK_FETCH = "fetch.wait.max.ms=10"


def events_counted(url: str) -> float:
    text = requests.get(url + "/v1/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "feedback_events_accepted_total":
                return sample.value
    return 0.0


def consume_rate(url: str, producer: Producer, topic: str, body: bytes, count: int) -> float:
    """Records per second from the first produced to the last counted: conservative, since
    producing them is inside the time. Waves overlap: the next is produced as soon as the
    server has counted all but one wave (so the mock broker holds at most two), and the server
    consumes one wave while the next is produced, as it would a live topic."""
    begun = time.monotonic()
    prefix = uuid.uuid4().hex
    wave = max(1, WAVE_BYTES // len(body))
    base = events_counted(url)
    produced = 0
    while produced < count:
        size = min(wave, count - produced)
        for index in range(produced, produced + size):
            headers = {
                "ce_specversion": "1.0",
                "ce_id": f"{prefix}-{index}",
                "ce_source": "bench/kafka",
                "ce_type": "io.seldon.serving.feedback",
                "content-type": "application/json",
            }
            while True:
                try:
                    producer.produce(topic, value=body, headers=headers)
                    break
                except BufferError:
                    producer.poll(0.01)
            producer.poll(0)
        producer.flush(60)
        produced += size
        await_counted(url, base, topic, produced - wave if produced < count else count)
    return count / (time.monotonic() - begun)


def await_counted(url: str, base: float, topic: str, target: int) -> None:
    """Until the server has counted ``target`` records since ``base`` (a stall fails the run)."""
    deadline = time.monotonic() + 120
    while (counted := events_counted(url) - base) < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{topic}: {counted:.0f} of {target} records counted")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kafka", description=__doc__)
    parser.add_argument("--duration", type=int, default=10, help="seconds per HTTP case")
    parser.add_argument("--records", type=int, default=20_000, help="1-row records produced")
    parser.add_argument("--batch-records", type=int, default=1000, help="1,000-row records")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores 0 and 1")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    server_cpu, load_cpu = (None, None) if args.no_pin else (0, 1)
    work = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    processes = servers.ProcessSet(work)
    producer = Producer({"test.mock.num.brokers": 1, "linger.ms": 5})
    try:
        metadata = producer.list_topics(timeout=10)
        bootstrap = ",".join(f"{b.host}:{b.port}" for b in metadata.brokers.values())
        for topic in TOPICS.values():  # created (4 partitions) before the server subscribes
            producer.produce(topic, value=b"{}")
        producer.flush(10)
        payloads = write_payloads(work / "payloads", sizes=tuple(TOPICS))
        port = servers.free_port()
        command = servers.adserver_argv(port, ONE_HOT, state="sqlite", state_dir=work / "state")
        topics = ",".join(TOPICS.values())
        command = [*command[:-1], "--kafka_bootstrap_servers", bootstrap, "--kafka_topics", topics]
        command += ["--kafka_config", MOCK_FETCH]
        command.append("MetricsServer")
        server = processes.start("kafka", command, port, server_cpu)
        figures: dict[str, float] = {}
        for rows, payload in payloads.items():
            result = wrk.run(
                server.base_url + "/",
                payload.path,
                uuid.uuid4().hex,
                CONNECTIONS,
                args.duration,
                load_cpu,
            )
            figures[f"http_{rows}_rows_per_s"] = result.ok_per_s * rows
        time.sleep(2)  # the group has assigned the topics' partitions by now
        for rows, payload in payloads.items():
            count = args.records if rows == 1 else args.batch_records
            rate = consume_rate(
                server.base_url, producer, TOPICS[rows], payload.path.read_bytes(), count
            )
            figures[f"kafka_{rows}_rows_per_s"] = rate * rows
        for rows in payloads:
            http, kafka = figures[f"http_{rows}_rows_per_s"], figures[f"kafka_{rows}_rows_per_s"]
            print(
                f"{rows:>5} row(s)/event  HTTP {http:>11,.0f} rows/s  Kafka {kafka:>11,.0f} "
                f"rows/s  Kafka/HTTP {kafka / http:.2f}"
            )
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return 0
    finally:
        processes.stop_all()
        producer.flush(5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
