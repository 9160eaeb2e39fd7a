"""Kafka records -> events (minimal: CloudEvents binary and bare JSON; kwire16 has the full one).

Pure, no I/O. A CloudEvents binary record carries its attributes as ``ce_*`` headers; any other
record is a bare Seldon feedback JSON, given the attributes that make a redelivery dedup: source
``kafka://<topic>/<partition>`` and id ``<offset>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from adserver.catalogue.wire import CE_PREFIX, CE_SPECVERSION, SELDON_FEEDBACK_TYPE
from adserver.wire.cloudevents import IncomingEvent, binary_event, parse_json

#: The Kafka binding spells CloudEvents attribute headers with an underscore.
KAFKA_CE_PREFIX = "ce_"


@dataclass(frozen=True)
class KafkaRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp_ms: int | None


@dataclass(frozen=True)
class AvroSchemas:
    """The Avro schema of ``--kafka_avro_schema`` (parsed JSON; decoding is kwire16's)."""

    schema: Any

    @classmethod
    def load(cls, path: str) -> AvroSchemas:
        return cls(orjson.loads(Path(path).read_bytes()))


def record_headers(record: KafkaRecord) -> dict[str, str]:
    """Lower-case header names, ``ce_x`` as the HTTP binding's ``ce-x``."""
    headers = {}
    for name, value in record.headers:
        name = name.lower()
        if name.startswith(KAFKA_CE_PREFIX):
            name = CE_PREFIX + name[len(KAFKA_CE_PREFIX) :]
        headers[name] = (value or b"").decode("utf-8", "replace")
    return headers


def decode_record(record: KafkaRecord, avro: AvroSchemas | None) -> list[IncomingEvent]:
    """A record's one event; raises ``BadRequest`` for a record that is not one."""
    headers = record_headers(record)
    value = record.value or b""
    if CE_PREFIX + "specversion" in headers:
        return [binary_event(headers, value)]
    attributes = {
        "specversion": CE_SPECVERSION,
        "id": str(record.offset),
        "source": f"kafka://{record.topic}/{record.partition}",
        "type": SELDON_FEEDBACK_TYPE,
    }
    return [IncomingEvent(attributes=attributes, data=parse_json(value, "record value"))]
