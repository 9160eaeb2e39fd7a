"""The Kafka consumer: records in, each given to the ingest core, offsets committed after.

One thread owns the ``confluent_kafka.Consumer`` (polls, pauses, seeks, commits: librdkafka's
calls block, so never on the IOLoop). It hands records to the IOLoop, where each is given to
``FeedbackService.receive`` concurrently with the others and with HTTP (so they share group
commits), and gets their outcomes back through a queue. An offset is committed only up to the
first record of its partition whose outcome is not final (:mod:`adserver.kafka.progress`):

- accepted: final;
- refused for its input (a poison record): final, counted as rejected by topic and reason, and
  copied to the dead-letter topic when there is one (final once the copy is delivered);
- a fault (the store unavailable, the server shutting down): not final; the partition is sought
  back to the record and paused for a backoff, then fetched again (never skipped);
- a bug (an internal error): retried like a fault up to :data:`INTERNAL_ATTEMPTS` times, then
  refused like a poison record, so it can never block its partition forever.

Redelivered records (after a crash, a retry or a rebalance) count once: the ingest core dedups
by CloudEvent (source, id), which the record decoding gives every record.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import confluent_kafka
import orjson
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from adserver.catalogue import reasons
from adserver.catalogue.wire import DEAD_LETTER_ORIGIN, DEAD_LETTER_REASON
from adserver.errors import ErrorKind, InternalError, PayloadTooLarge
from adserver.ingest.service import Accepted, FeedbackService, Outcome
from adserver.kafka.progress import PartitionProgress
from adserver.kafka.stats import KafkaStats
from adserver.wire.kafka import AvroSchemas, KafkaRecord, decode_record

log = logging.getLogger(__name__)

#: Records taken and not yet final, at most (then none is taken until some finish).
MAX_RECORDS_IN_FLIGHT = 2000
#: Bytes of record values taken and not yet final, at most.
MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024
#: Records asked of librdkafka per poll.
BATCH = 500
#: Records whose receive starts in one turn of the IOLoop (the rest in the turns after).
HAND_SLICE = 16
#: How long one poll waits for records (also how soon a finished record's offset is committed).
POLL_SECONDS = 0.02
#: A partition whose record met a fault is fetched again after this long.
RETRY_BACKOFF_SECONDS = 1.0
#: A record that meets an internal error is refused after this many attempts.
INTERNAL_ATTEMPTS = 3
#: How long a revoke waits for the revoked partitions' records to finish before it commits.
REVOKE_WAIT_SECONDS = 10.0
#: Lag is refreshed from librdkafka's statistics this often.
LAG_REFRESH_SECONDS = 5.0
#: Not ready when the group has not assigned this consumer anything (or nothing) by then.
FIRST_REBALANCE_SECONDS = 60.0
#: Not ready when the consumer thread has not come round its loop for this long.
STUCK_SECONDS = REVOKE_WAIT_SECONDS + 20.0
#: Not ready when a partition with records to finish (or to fetch again) has committed nothing
#: new for this long: e.g. its seek back keeps failing, or its records keep meeting faults.
STALL_SECONDS = 120.0

Partition = tuple[str, int]


@dataclass(frozen=True)
class KafkaOptions:
    """What the transport is configured with (built from the settings by app.py)."""

    config: Mapping[str, Any]  # librdkafka's: bootstrap servers, group, security
    topics: Sequence[str]
    dead_letter_topic: str = ""
    avro: AvroSchemas | None = None
    max_record_bytes: int = 10 * 1024 * 1024  # --max_body_bytes: larger values are refused


@dataclass(frozen=True)
class Taken:
    """A record handed to the IOLoop; ``token`` tells a stale outcome (its partition was
    sought back past it or revoked meanwhile) from a current one."""

    record: KafkaRecord
    token: int


@dataclass(frozen=True)
class Verdict:
    """What the consumer thread does with a record's outcome."""

    final: bool
    reason: str | None = None  # a refusal's (final) or an internal error's (not yet final)
    internal: bool = False


ACCEPTED = Verdict(final=True)
FAULT = Verdict(final=False)


def verdict(outcome: Outcome) -> Verdict:
    if isinstance(outcome, Accepted):
        return ACCEPTED
    if outcome.kind is ErrorKind.INTERNAL:
        return Verdict(final=False, reason=outcome.reason, internal=True)
    if outcome.kind.fault:
        return FAULT
    return Verdict(final=True, reason=outcome.reason)


def as_record(message: Message) -> KafkaRecord:
    kind, stamp = message.timestamp()
    return KafkaRecord(
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        key=message.key(),
        value=message.value(),
        headers=tuple((name, as_bytes(value)) for name, value in header_list(message)),
        timestamp_ms=None if kind == confluent_kafka.TIMESTAMP_NOT_AVAILABLE else stamp,
    )


@dataclass
class KafkaTransport:
    """The consumer as the lifecycle sees it: started with the server, drained on SIGTERM."""

    service: FeedbackService
    options: KafkaOptions
    stats: KafkaStats
    outcomes: queue.SimpleQueue[tuple[Taken, Verdict]] = field(default_factory=queue.SimpleQueue)
    progress: dict[Partition, PartitionProgress] = field(default_factory=dict)
    takes: Iterator[int] = field(default_factory=itertools.count)  # tokens of Taken
    attempts: dict[tuple[Partition, int], int] = field(default_factory=dict)
    backoff: dict[Partition, float] = field(default_factory=dict)  # paused until
    unsought: dict[Partition, int] = field(default_factory=dict)  # seeks back that failed
    stalled: tuple[str, ...] = ()  # partitions with no progress for STALL_SECONDS
    in_flight: int = 0
    bytes_in_flight: int = 0
    stopped: bool = False
    closing: bool = False
    rebalanced: bool = False
    brokers_down: bool = False
    beat: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        config = {
            "auto.offset.reset": "earliest",  # a new group counts what was sent before it
            **self.options.config,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "error_cb": self.on_error,
            "stats_cb": self.on_statistics,
            "statistics.interval.ms": int(LAG_REFRESH_SECONDS * 1000),
        }
        self.consumer = confluent_kafka.Consumer(config)
        self.dead_letters = None
        if self.options.dead_letter_topic:
            producer = {k: v for k, v in self.options.config.items() if k != "group.id"}
            self.dead_letters = confluent_kafka.Producer(
                {**producer, "enable.idempotence": True, "error_cb": self.on_error}
            )
        self.thread = threading.Thread(target=self.run, name="kafka-consumer", daemon=True)

    # -- the lifecycle's side (IOLoop) --

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.consumer.subscribe(
            list(self.options.topics),
            on_assign=self.on_assign,
            on_revoke=self.on_revoke,
            on_lost=self.on_lost,
        )
        self.thread.start()

    def stop(self) -> None:
        """Fetch no more records; those taken go on to their outcome."""
        self.stopped = True

    async def close(self) -> None:
        """After the events in flight (and the slices of a batch started meanwhile): the final
        commit, then the consumer is closed."""
        deadline = self.loop.time() + REVOKE_WAIT_SECONDS
        while self.tasks and (left := deadline - self.loop.time()) > 0:
            await asyncio.wait(set(self.tasks), timeout=left)
        self.closing = True
        await self.loop.run_in_executor(None, self.thread.join, REVOKE_WAIT_SECONDS + 5)

    def healthy(self) -> bool:
        """A readiness check: joined its group in time, brokers reachable, thread not stuck,
        no partition stalled."""
        now = time.monotonic()
        if self.stopped:
            return True  # draining: the lifecycle's readiness says so already
        if not self.thread.is_alive() or now - self.beat > STUCK_SECONDS or self.brokers_down:
            return False
        if self.stalled:
            return False
        return self.rebalanced or now - self.started < FIRST_REBALANCE_SECONDS

    def hand(self, taken: list[Taken]) -> None:
        """On the IOLoop: the records' receives start, :data:`HAND_SLICE` per turn of the loop,
        all concurrent. Started all at once, a batch's records would all be decoded before the
        first group commit could start; a slice at a time, the store writes one slice while
        the IOLoop decodes the next."""
        for each in taken[:HAND_SLICE]:
            task = asyncio.ensure_future(self.process(each))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if len(taken) > HAND_SLICE:
            self.loop.call_soon(self.hand, taken[HAND_SLICE:])

    async def process(self, taken: Taken) -> None:
        record = taken.record
        value = record.value or b""
        try:
            outcome: Outcome
            if len(value) > self.options.max_record_bytes:
                outcome = PayloadTooLarge(
                    f"the record has {len(value)} bytes; at most "
                    f"{self.options.max_record_bytes} are read (--max_body_bytes)",
                    reasons.BODY_TOO_LARGE,
                )
                await self.service.reject(outcome.reason)
            else:
                avro = self.options.avro
                # The value as the body: a large one is decoded off the IOLoop, as over HTTP.
                outcome = await self.service.receive(
                    {}, value, binding=lambda _h, _b: decode_record(record, avro)
                )
        except Exception:  # a bug: retried a few times, never allowed to stop consumption
            log.exception("record failed", extra={"topic": record.topic, "offset": record.offset})
            outcome = InternalError("internal error", reasons.INTERNAL_SERVER_ERROR)
        self.outcomes.put((taken, verdict(outcome)))

    # -- the consumer thread's side --

    def run(self) -> None:
        try:
            while not self.closing:
                self.beat = time.monotonic()
                self.settle(POLL_SECONDS if self.stopped or self.full else 0.0)
                self.housekeep()
                if not self.stopped and not self.full:
                    self.fetch()
            self.settle(0.0)
            self.commit()
            if self.dead_letters is not None:
                self.dead_letters.flush(REVOKE_WAIT_SECONDS)
        except Exception:
            log.exception("the Kafka consumer failed")
        finally:
            self.consumer.close()

    @property
    def full(self) -> bool:
        """At a cap: nothing more is taken (librdkafka's own queue holds what it prefetched)
        until records finish. A batch may pass the bytes cap by what was already fetched."""
        return (
            self.in_flight >= MAX_RECORDS_IN_FLIGHT or self.bytes_in_flight >= MAX_BYTES_IN_FLIGHT
        )

    def fetch(self) -> None:
        """Take a batch, at most as many records as the count cap leaves room for."""
        messages = self.consumer.consume(
            min(BATCH, MAX_RECORDS_IN_FLIGHT - self.in_flight), POLL_SECONDS
        )
        taken: list[Taken] = []
        for message in messages:
            error = message.error()
            if error is not None:
                self.on_error(error)
                continue
            self.brokers_down = False
            record = as_record(message)
            partition = (record.topic, record.partition)
            progress = self.progress.get(partition)
            if progress is None:
                continue  # revoked meanwhile: its new owner reads it
            token = next(self.takes)
            progress.take(record.offset, token)
            self.in_flight += 1
            self.bytes_in_flight += len(record.value or b"")
            taken.append(Taken(record, token))
        for topic in {t.record.topic for t in taken}:
            self.stats.taken(topic, sum(t.record.topic == topic for t in taken))
        if taken:
            self.loop.call_soon_threadsafe(self.hand, taken)

    def settle(self, timeout: float) -> None:
        """Apply the outcomes that arrived (waiting up to ``timeout`` for the first)."""
        try:
            item = self.outcomes.get(timeout=timeout) if timeout else self.outcomes.get_nowait()
        except queue.Empty:
            return
        while True:
            self.apply(*item)
            try:
                item = self.outcomes.get_nowait()
            except queue.Empty:
                break

    def apply(self, taken: Taken, outcome: Verdict) -> None:
        record = taken.record
        self.in_flight -= 1
        self.bytes_in_flight -= len(record.value or b"")
        partition = (record.topic, record.partition)
        progress = self.progress.get(partition)
        if progress is None or not progress.current(record.offset, taken.token):
            return  # sought back past or revoked since: fetched again, or by another member
        key = (partition, record.offset)
        if outcome.internal:
            self.attempts[key] = self.attempts.get(key, 0) + 1
            if self.attempts[key] < INTERNAL_ATTEMPTS:
                self.retry(record)
                return
            outcome = Verdict(final=True, reason=outcome.reason)
        if not outcome.final:
            self.retry(record)
            return
        self.attempts.pop(key, None)
        if outcome.reason is None:
            progress.finish(record.offset)
        else:
            self.stats.refused(record.topic, outcome.reason)
            self.refuse(taken, outcome.reason, progress)

    def refuse(self, taken: Taken, reason: str, progress: PartitionProgress) -> None:
        """A poison record is final, once its dead-letter copy (if any) is delivered."""
        record = taken.record
        if self.dead_letters is None:
            progress.finish(record.offset)
            return
        origin = f"{record.topic}/{record.partition}/{record.offset}"

        def delivered(error: KafkaError | None, _message: Message) -> None:
            owned = self.progress.get((record.topic, record.partition)) is progress
            if not owned or not progress.current(record.offset, taken.token):
                return  # revoked, or sought back past it, since
            if error is None:
                progress.finish(record.offset)
            else:
                log.warning(
                    "dead-letter copy failed", extra={"origin": origin, "error": str(error)}
                )
                self.retry(record)

        try:
            self.dead_letters.produce(
                self.options.dead_letter_topic,
                value=record.value,
                key=record.key,
                headers=[
                    *record.headers,
                    (DEAD_LETTER_REASON, reason.encode()),
                    (DEAD_LETTER_ORIGIN, origin.encode()),
                ],
                on_delivery=delivered,
            )
        except (BufferError, KafkaException) as exc:
            log.warning("dead-letter copy failed", extra={"origin": origin, "error": str(exc)})
            self.retry(record)

    def retry(self, record: KafkaRecord) -> None:
        """Seek the partition back to the record and fetch it again after the backoff."""
        partition = (record.topic, record.partition)
        self.progress[partition].rewind(record.offset)
        where = TopicPartition(record.topic, record.partition, record.offset)
        self.seek(where)
        self.pause([where])
        self.backoff[partition] = time.monotonic() + RETRY_BACKOFF_SECONDS

    def housekeep(self) -> None:
        """Commit what became final, seek again where a seek failed, resume the partitions
        whose backoff ended (and whose seek back succeeded), tell the stalled ones."""
        self.commit()
        self.deliver()
        now = time.monotonic()
        due = [p for p, until in self.backoff.items() if until <= now and self.sought(p)]
        for partition in due:
            del self.backoff[partition]
        if due:
            self.resume([TopicPartition(t, p) for t, p in due if (t, p) in self.progress])
        self.watch(now)

    def deliver(self) -> None:
        """Serve the dead-letter copies' delivery reports (which make refused records final)."""
        if self.dead_letters is not None:
            self.dead_letters.poll(0)

    def sought(self, partition: Partition) -> bool:
        """Whether the partition's seek back is done (tried again if it failed)."""
        offset = self.unsought.get(partition)
        return offset is None or self.seek(TopicPartition(*partition, offset))

    def watch(self, now: float) -> None:
        """Note when each partition last moved or was idle; list those stalled since."""
        stalled = []
        for partition, progress in self.progress.items():
            if not (progress.pending or partition in self.backoff):
                progress.moved = now
            elif now - progress.moved > STALL_SECONDS:
                stalled.append(f"{partition[0]}/{partition[1]}")
        if stalled and not self.stalled:
            log.warning("partitions stalled", extra={"partitions": stalled})
        self.stalled = tuple(stalled)

    def commit(self, only: Sequence[Partition] | None = None) -> None:
        """Commit each partition up to its first record not yet final (synchronously)."""
        offsets = []
        for partition in self.progress if only is None else only:
            position = self.progress[partition].to_commit()
            if position is not None:
                offsets.append((partition, position))
        if not offsets:
            return
        begun = time.monotonic()
        try:
            self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets], asynchronous=False
            )
        except KafkaException as exc:  # committed again on the next round
            log.warning("offset commit failed", extra={"error": str(exc)})
            return
        self.stats.committed(time.monotonic() - begun)
        for partition, position in offsets:
            self.progress[partition].committed = position
            self.progress[partition].moved = begun

    def on_statistics(self, document: str) -> None:
        """librdkafka's statistics (every :data:`LAG_REFRESH_SECONDS`): each assigned
        partition's lag, which it keeps from the high watermark of every fetch response and
        the committed offset (no request of ours)."""
        lag = {}
        for topic, about in orjson.loads(document).get("topics", {}).items():
            for number, partition in about.get("partitions", {}).items():
                key = (topic, int(number))
                if key in self.progress and partition.get("consumer_lag", -1) >= 0:
                    lag[key] = int(partition["consumer_lag"])
        self.stats.lagging(lag)
        if self.brokers_down:
            try:
                self.consumer.list_topics(timeout=1.0)
                self.brokers_down = False
            except KafkaException:
                pass

    def on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self.brokers_down = True
        log.warning("kafka error", extra={"error": error.str()})

    # -- rebalances (called by librdkafka on the consumer thread, inside consume) --

    def on_assign(
        self, _consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]
    ) -> None:
        """Start each partition from its committed offset (librdkafka's default position)."""
        self.rebalanced = True
        for each in partitions:
            self.progress[(each.topic, each.partition)] = PartitionProgress()
        log.info("partitions assigned", extra={"partitions": names(partitions)})

    def on_revoke(
        self, _consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]
    ) -> None:
        """Wait (bounded) for the revoked partitions' records, commit them, then let go."""
        revoked = [(each.topic, each.partition) for each in partitions]
        deadline = time.monotonic() + REVOKE_WAIT_SECONDS
        while (
            any(self.progress[p].pending for p in revoked if p in self.progress)
            and time.monotonic() < deadline
        ):
            self.beat = time.monotonic()
            self.settle(POLL_SECONDS)
            self.deliver()
        self.commit([p for p in revoked if p in self.progress])
        self.forget(revoked)
        log.info("partitions revoked", extra={"partitions": names(partitions)})

    def on_lost(
        self, _consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]
    ) -> None:
        """Lost, not revoked: another member may own them already, so nothing is committed."""
        self.forget([(each.topic, each.partition) for each in partitions])
        log.warning("partitions lost", extra={"partitions": names(partitions)})

    def forget(self, partitions: list[Partition]) -> None:
        for partition in partitions:
            self.progress.pop(partition, None)
            self.backoff.pop(partition, None)
            self.unsought.pop(partition, None)  # late outcomes: stale, no progress to apply to
        self.attempts = {k: v for k, v in self.attempts.items() if k[0] in self.progress}

    # -- librdkafka calls that may fail on a partition being revoked --

    def seek(self, where: TopicPartition) -> bool:
        """Seek, or remember to try again (the partition stays paused until it succeeds)."""
        partition = (where.topic, where.partition)
        try:
            self.consumer.seek(where)
        except KafkaException as exc:
            log.warning("seek failed", extra={"partition": names([where]), "error": str(exc)})
            self.unsought[partition] = where.offset
            return False
        self.unsought.pop(partition, None)
        return True

    def pause(self, partitions: list[TopicPartition]) -> None:
        with_errors(self.consumer.pause, partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        with_errors(self.consumer.resume, partitions)


def with_errors(
    call: Callable[[list[TopicPartition]], Any], partitions: list[TopicPartition]
) -> None:
    if not partitions:
        return
    try:
        call(partitions)
    except KafkaException as exc:
        log.warning("pause or resume failed", extra={"error": str(exc)})


def header_list(message: Message) -> list[tuple[str, str | bytes | None]]:
    headers = message.headers() or []
    return list(headers.items()) if isinstance(headers, dict) else headers


def as_bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def names(partitions: Sequence[TopicPartition]) -> list[str]:
    return [f"{each.topic}/{each.partition}" for each in partitions]
