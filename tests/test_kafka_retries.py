"""The consumer thread's retries against a scripted client: seeks that fail, stalled partitions.

No broker: the transport's librdkafka consumer is replaced by a fake that records the calls
and fails the seeks it is told to, so the thread's side is driven step by step.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from adserver.catalogue import reasons
from adserver.ingest.service import Accepted
from adserver.kafka import consumer
from adserver.kafka.consumer import FAULT, KafkaOptions, KafkaTransport, Taken
from adserver.kafka.progress import PartitionProgress
from adserver.kafka.stats import KafkaStats
from adserver.wire.kafka import KafkaRecord

PARTITION = ("feedback", 0)


class FakeClient:
    """What the thread calls of librdkafka; ``failing_seeks`` seeks raise, then they work."""

    def __init__(self) -> None:
        self.failing_seeks = 0
        self.calls: list[tuple[str, Any]] = []

    def seek(self, where: TopicPartition) -> None:
        self.calls.append(("seek", where.offset))
        if self.failing_seeks:
            self.failing_seeks -= 1
            raise KafkaException(KafkaError(KafkaError._STATE, "Erroneous state"))

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.calls.append(("pause", [p.partition for p in partitions]))

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.calls.append(("resume", [p.partition for p in partitions]))

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.calls.append(("commit", [p.offset for p in offsets]))


@pytest.fixture
def transport() -> Any:
    options = KafkaOptions({"bootstrap.servers": "127.0.0.1:9", "group.id": "t"}, ["feedback"])
    made = KafkaTransport(service=None, options=options, stats=KafkaStats("m"))  # type: ignore[arg-type]
    made.consumer.close()  # its error callback saw no broker at 127.0.0.1:9
    made.consumer, made.brokers_down = FakeClient(), False
    made.progress[PARTITION] = PartitionProgress()
    yield made


def take(transport: KafkaTransport, *offsets: int) -> list[Taken]:
    taken = []
    for offset in offsets:
        token = next(transport.takes)
        transport.progress[PARTITION].take(offset, token)
        transport.in_flight += 1
        taken.append(Taken(record_at(offset), token))
    return taken


def due(transport: KafkaTransport) -> None:
    """The backoff of every partition ends now."""
    transport.backoff = dict.fromkeys(transport.backoff, 0.0)


def test_a_failed_seek_is_tried_again_and_the_partition_stays_paused(transport) -> None:
    """A fault at 5 seeks back to 5; while that seek fails the partition is not resumed (it
    would go on from 7, and 5 and 6 would be committed unread)."""
    client = transport.consumer
    client.failing_seeks = 2
    five, six = take(transport, 5, 6)
    transport.apply(six, consumer.ACCEPTED)
    transport.apply(five, FAULT)
    assert client.calls == [("seek", 5), ("pause", [0])]
    due(transport)
    transport.housekeep()  # the seek fails again: still paused
    assert ("resume", [0]) not in client.calls
    assert client.calls[-1] == ("seek", 5)
    due(transport)
    transport.housekeep()
    assert client.calls[-2:] == [("seek", 5), ("resume", [0])]
    assert not transport.unsought and not transport.backoff
    assert not any(call == "commit" for call, _ in client.calls)


def test_a_partition_without_progress_fails_readiness(transport) -> None:
    transport.thread = threading.current_thread()  # alive
    transport.rebalanced = True
    (five,) = take(transport, 5)
    transport.housekeep()
    assert transport.stalled == () and transport.healthy()
    transport.progress[PARTITION].moved -= consumer.STALL_SECONDS + 1
    transport.housekeep()
    assert transport.stalled == ("feedback/0",)
    assert not transport.healthy()
    transport.apply(five, consumer.ACCEPTED)
    transport.housekeep()  # 5 is final: committed, so it moved
    assert transport.consumer.calls[-1] == ("commit", [6])
    assert transport.stalled == () and transport.healthy()


def test_an_idle_partition_never_stalls(transport) -> None:
    transport.progress[PARTITION].moved -= consumer.STALL_SECONDS + 1
    transport.housekeep()
    assert transport.stalled == ()


def record_at(offset: int) -> KafkaRecord:
    return KafkaRecord(*PARTITION, offset, None, b"{}", (), None)


def test_an_earlier_record_finishing_after_a_later_ones_fault_still_counts(transport) -> None:
    """6 meets a fault first: seeking back to 6 leaves 5 as taken, so its outcome still
    applies (were it dropped as stale, 5 would stay pending and the partition never commit)."""
    five, six = take(transport, 5, 6)
    transport.apply(six, FAULT)
    transport.apply(five, consumer.ACCEPTED)
    transport.housekeep()
    assert ("commit", [6]) in transport.consumer.calls


def test_faults_out_of_offset_order_seek_back_to_the_earliest(transport) -> None:
    five, six = take(transport, 5, 6)
    transport.apply(six, FAULT)
    transport.apply(five, FAULT)
    seeks = [offset for call, offset in transport.consumer.calls if call == "seek"]
    assert seeks == [6, 5]
    assert transport.progress[PARTITION].pending == 0


def test_outcomes_of_records_sought_past_are_stale(transport) -> None:
    """5 meets a fault while 6 is in flight: 6 is fetched again, so the first 6's outcome is
    dropped and only the second one's counts."""
    five, six = take(transport, 5, 6)
    transport.apply(five, FAULT)
    transport.apply(six, consumer.ACCEPTED)
    assert transport.progress[PARTITION].position() is None
    five, six = take(transport, 5, 6)
    transport.apply(five, consumer.ACCEPTED)
    transport.apply(six, consumer.ACCEPTED)
    assert transport.progress[PARTITION].position() == 7


class FakeProducer:
    """A dead-letter producer whose deliveries are reported on its next poll."""

    def __init__(self) -> None:
        self.deliveries: list[Any] = []

    def produce(self, topic: str, on_delivery: Any, **_record: Any) -> None:
        self.deliveries.append(on_delivery)

    def poll(self, _timeout: float) -> None:
        for delivered in self.deliveries:
            delivered(None, None)
        self.deliveries = []


def test_a_revoke_waits_for_dead_letter_copies_not_past_them(transport, monkeypatch) -> None:
    """A refused record is final once its copy is delivered: a revoke polls for that, so it
    commits past the record instead of waiting its whole bound and leaving it to be redone."""
    monkeypatch.setattr(consumer, "REVOKE_WAIT_SECONDS", 0.5)
    transport.dead_letters = FakeProducer()
    (five,) = take(transport, 5)
    transport.apply(five, consumer.Verdict(final=True, reason=reasons.INVALID_JSON))
    transport.on_revoke(None, [TopicPartition(*PARTITION)])
    assert transport.consumer.calls[-1] == ("commit", [6])
    assert PARTITION not in transport.progress


def test_a_batch_is_started_a_slice_at_a_time(transport) -> None:
    """What the first record's receive schedules (as its group commit's flush) runs before
    the batch's last records start: the store writes while the IOLoop decodes the rest."""
    started: list[Any] = []

    class Service:
        async def receive(self, _headers: Any, _body: bytes, binding: Any) -> Any:
            if not started:
                asyncio.get_running_loop().call_soon(started.append, "flush")
            started.append("record")
            return Accepted([True])

    async def scenario() -> None:
        transport.service = Service()
        transport.loop = asyncio.get_running_loop()
        transport.hand(take(transport, *range(3 * consumer.HAND_SLICE)))
        while len(started) <= 3 * consumer.HAND_SLICE:
            await asyncio.sleep(0)

    asyncio.run(scenario())
    assert started.index("flush") <= consumer.HAND_SLICE
    assert transport.outcomes.qsize() == 3 * consumer.HAND_SLICE


def test_close_waits_for_every_slice_of_a_batch(transport) -> None:
    """SIGTERM while a batch is being started: the slices started after close() began are
    waited for too, so their outcomes are in before the final commit."""
    slices = 3
    calls = iter(range(slices * consumer.HAND_SLICE))

    class Service:
        async def receive(self, _headers: Any, _body: bytes, binding: Any) -> Any:
            await asyncio.sleep(0.02 * (1 + next(calls) // consumer.HAND_SLICE))  # slice by slice
            return Accepted([True])

    async def scenario() -> None:
        transport.service = Service()
        transport.loop = asyncio.get_running_loop()
        transport.thread = threading.Thread(target=lambda: None)
        transport.thread.start()
        transport.hand(take(transport, *range(slices * consumer.HAND_SLICE)))
        await transport.close()

    asyncio.run(scenario())
    assert transport.outcomes.qsize() == slices * consumer.HAND_SLICE
