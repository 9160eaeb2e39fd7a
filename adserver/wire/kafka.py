"""Kafka records (and Knative KafkaSource events) -> events: pure decoding, no I/O, no client.

A record's format is detected per record, so one topic may mix them:

1. the CloudEvents Kafka binding, structured (``content-type: application/cloudevents...``: the
   value is the event, as over HTTP, a batch included) or binary (``ce_*`` headers, UTF-8 and not
   percent-encoded; ``content-type`` is ``datacontenttype``; the value is the data);
2. the KFServing inference-logger's envelope ``{"type": "request"|"response", "id", "time",
   "payload"}`` (as the data of a KServe CloudEvent, or bare), unwrapped to its payload;
3. Hopsworks' ``inferenceschema`` Avro (schemaless binary, writer schemas from
   ``--kafka_avro_schema``): v1-v3 hold a request and its response, v4 one of them;
4. the Seldon executor's Kafka logger (a ``type`` header naming a Seldon logger or feedback
   type, its extensions as headers, the value the payload): the event the executor would POST;
5. a bare Seldon ``Feedback`` JSON object.

A record that is no CloudEvent gets the attributes the ingest core reads of the HTTP
equivalent: source ``kafka://<topic>/<partition>`` and id ``<offset>`` (a redelivery is the same
event), its prediction's time (the envelope's or Hopsworks', else the record's timestamp), and
a type the core knows. Logged messages use Seldon's logger types, which join by ``requestid``
(the envelope's id, Hopsworks' ``inferenceId``; v1-v3 have none, so ``<source>/<id>``), since
each message is its own record with its own id; ``inferenceservicename`` is the topic's
InferenceService (``<name>-inference-topic``) or Hopsworks' ``modelName``.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adserver.catalogue import reasons
from adserver.catalogue.wire import (
    CE_SPECVERSION,
    CONTENT_TYPE_CE_STRUCTURED,
    EXTENSION_INFERENCE_SERVICE,
    EXTENSION_REQUEST_ID,
    HEADER_SELDON_PUID,
    KAFKA_CE_PREFIX,
    KAFKA_INFERENCE_TOPIC_SUFFIX,
    KAFKA_SOURCE_PREFIX,
    KNATIVE_KAFKA_EVENT_TYPE,
    KNATIVE_KAFKA_HEADER,
    LOGGER_TYPES,
    SELDON_FEEDBACK_TYPE,
    SELDON_KAFKA_EXTENSIONS,
    SELDON_KAFKA_TYPE_HEADER,
    SELDON_REQUEST_TYPE,
    SELDON_RESPONSE_TYPE,
)
from adserver.errors import BadRequest
from adserver.wire.cloudevents import (
    IncomingEvent,
    binary_event,
    decode_request,
    media_type,
    parse_json,
)

#: A logged message's kind -> the logger type whose join key is ``requestid``.
MESSAGE_TYPES = {"request": SELDON_REQUEST_TYPE, "response": SELDON_RESPONSE_TYPE}
#: What the Seldon executor's Kafka logger names in its ``type`` header.
SELDON_TYPES = frozenset({SELDON_REQUEST_TYPE, SELDON_RESPONSE_TYPE, SELDON_FEEDBACK_TYPE})
#: Hopsworks' fields of each schema generation (v4 splits a request and its response).
HOPSWORKS_V4 = ("inferenceId", "messageType", "payload")
HOPSWORKS_V1_V3 = ("inferenceRequest", "inferenceResponse")
#: A timestamp from here on counts milliseconds (1e11 s is the year 5138, 1e11 ms is 1973):
#: Hopsworks v1-v3 log milliseconds, its v4 logger seconds.
MILLISECONDS_FROM = 10**11
#: What fastavro raises on bytes its schema does not describe.
AVRO_ERRORS = (EOFError, ValueError, IndexError, KeyError, TypeError, OverflowError)


@dataclass(frozen=True)
class KafkaRecord:
    """One consumed record, as the transport hands it over (no client object)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp_ms: int | None


class AvroSchemas:
    """The writer schemas of ``--kafka_avro_schema``: a file holding one schema or a list.

    Hopsworks sets no header naming a record's schema version (its topic is bound to one), so a
    record is read with each schema in turn and taken from the first that consumes it exactly
    and reads as an inference log (:func:`inference_log`). Reading costs at most the value's
    length for schemas like ``inferenceschema`` (records of primitives; an array of nulls could
    claim any count). fastavro is imported here only: the server runs without the ``kafka`` extra.
    """

    def __init__(self, schemas: Sequence[Any]) -> None:
        self.schemas = tuple(schemas)

    @classmethod
    def load(cls, path: str) -> AvroSchemas:
        """Parse the file; raises ``ValueError`` (or ``OSError``) naming what is wrong."""
        import fastavro

        document = json.loads(Path(path).read_text())
        schemas = document if isinstance(document, list) else [document]
        if not schemas:
            raise ValueError(f"{path} holds no Avro schema")
        try:
            return cls([fastavro.parse_schema(schema) for schema in schemas])
        except (fastavro.schema.SchemaParseException, TypeError, KeyError) as exc:
            raise ValueError(f"{path} is not an Avro schema: {exc}") from exc

    def decode(self, value: bytes) -> dict[str, Any]:
        from fastavro import schemaless_reader

        for schema in self.schemas:
            buffer = io.BytesIO(value)
            try:
                record = schemaless_reader(buffer, schema, None)
            except AVRO_ERRORS:
                continue
            if buffer.tell() == len(value) and isinstance(record, dict) and inference_log(record):
                return record
        raise BadRequest(
            f"the record value ({len(value)} bytes) is no Hopsworks inference log of any schema "
            "in --kafka_avro_schema",
            reasons.INVALID_AVRO,
        )


def inference_log(record: dict[str, Any]) -> bool:
    """Whether a decoded record is an ``inferenceschema`` record of the schema it was read with.

    v2 and v4 have the same field types in the same order, so either reads the other's bytes
    exactly: the v4 reading of a v2 record has a response body in ``messageType``, the v2 reading
    of a v4 record ``request`` or ``response`` in ``inferenceResponse`` (never a JSON body).
    """
    if all(isinstance(record.get(field), str) for field in HOPSWORKS_V4):
        return record["messageType"] in MESSAGE_TYPES
    return (
        all(isinstance(record.get(field), str) for field in HOPSWORKS_V1_V3)
        and record["inferenceResponse"] not in MESSAGE_TYPES
    )


def decode_record(record: KafkaRecord, avro: AvroSchemas | None) -> list[IncomingEvent]:
    """The events of one record; a poison record raises ``BadRequest`` with its reason."""
    headers = record_headers(record.headers)
    value = record.value or b""
    if media_type(headers).startswith(CONTENT_TYPE_CE_STRUCTURED):
        return [unwrapped(event) for event in decode_request(headers, value)]
    if KAFKA_CE_PREFIX + "specversion" in headers:
        event = binary_event(headers, value, prefix=KAFKA_CE_PREFIX, percent_encoded=False)
        return [unwrapped(event)]
    return plain_record(record, headers, value, avro)


def plain_record(
    record: KafkaRecord, headers: Mapping[str, str], value: bytes, avro: AvroSchemas | None
) -> list[IncomingEvent]:
    """A record that is no CloudEvent: identified by where it is, typed by what it holds."""
    attributes: dict[str, Any] = {
        "specversion": CE_SPECVERSION,
        "source": f"{KAFKA_SOURCE_PREFIX}{record.topic}/{record.partition}",
        "id": str(record.offset),
    }
    if record.timestamp_ms is not None and record.timestamp_ms >= 0:
        attributes["time"] = datetime.fromtimestamp(record.timestamp_ms / 1000, UTC)
    try:
        data, error = parse_json(value, "record value"), None
    except BadRequest as exc:
        data, error = None, exc
    event = IncomingEvent(attributes, data, error, headers.get(HEADER_SELDON_PUID), value)
    return seldon_logged(event, headers) or payload_events(event, record.topic, avro)


def seldon_logged(
    event: IncomingEvent, headers: Mapping[str, Any], prefix: str = ""
) -> list[IncomingEvent]:
    """What the Seldon executor's Kafka logger wrote (none if not): the event it would POST.

    Its type and extensions are headers of their own names (``prefix``-ed as a KafkaSource
    makes them extensions); the value is the payload, as is.
    """
    kind = headers.get(prefix + SELDON_KAFKA_TYPE_HEADER)
    if kind not in SELDON_TYPES:
        return []
    attributes = {**event.attributes, "type": kind}
    attributes.update(
        (name, headers[prefix + name])
        for name in SELDON_KAFKA_EXTENSIONS
        if headers.get(prefix + name)
    )
    return [IncomingEvent(attributes, event.data, event.error, event.puid)]


def delivered(event: IncomingEvent, avro: AvroSchemas | None) -> list[IncomingEvent]:
    """An event as Knative may have carried it from Kafka, decoded like the record itself.

    A KafkaSource delivers a record that is no CloudEvent as a ``dev.knative.kafka.event``
    (source ``.../kafkasources/<name>#<topic>``, id ``partition:<p>/offset:<o>``, data the value):
    its events keep that source and id, the key a redelivery is deduplicated by. Any other
    event only loses an inference-logger envelope around its data.
    """
    if event.attributes.get("type") != KNATIVE_KAFKA_EVENT_TYPE:
        return [unwrapped(event)]
    topic = str(event.attributes.get("source", "")).rpartition("#")[2]
    return seldon_logged(event, event.attributes, KNATIVE_KAFKA_HEADER) or payload_events(
        event, topic, avro
    )


def record_headers(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    """Header names lower-cased, values as UTF-8; a CloudEvent's own must be UTF-8."""
    decoded: dict[str, str] = {}
    for name, value in headers:
        name = name.lower()
        if value is None:
            continue
        try:
            decoded[name] = value.decode()
        except UnicodeDecodeError as exc:
            if name.startswith(KAFKA_CE_PREFIX) or name == "content-type":
                raise BadRequest(
                    f"record header {name!r} is not UTF-8", reasons.INVALID_CLOUDEVENT
                ) from exc
    return decoded


def payload_events(
    event: IncomingEvent, topic: str, avro: AvroSchemas | None
) -> list[IncomingEvent]:
    """The events of a value that is no CloudEvent (``event`` holds it, parsed or raw)."""
    if event.error is None:
        return json_events(event, topic)
    if event.error.reason == reasons.INVALID_JSON and event.raw and avro is not None:
        return avro_events(event, topic, avro.decode(event.raw))
    if event.error.reason == reasons.TOO_DEEP:
        raise event.error
    hint = "" if avro is not None else " (Avro is read only with --kafka_avro_schema)"
    raise BadRequest(
        f"the record is no CloudEvent and its value no format read here{hint}: "
        f"{event.error.message}",
        reasons.UNKNOWN_RECORD_FORMAT,
    )


def json_events(event: IncomingEvent, topic: str) -> list[IncomingEvent]:
    """An inference-logger envelope or a Seldon Feedback."""
    document = event.data
    base = {k: v for k, v in event.attributes.items() if k != "type"}
    if is_envelope(document):
        attributes = {**base, "type": MESSAGE_TYPES[document["type"]]}
        if document.get("id") is not None:
            attributes[EXTENSION_REQUEST_ID] = str(document["id"])
        service = topic.removesuffix(KAFKA_INFERENCE_TOPIC_SUFFIX)
        if service != topic and service:
            attributes.setdefault(EXTENSION_INFERENCE_SERVICE, service)
        set_time(attributes, document.get("time"))
        return [IncomingEvent(attributes, document["payload"], puid=event.puid)]
    if isinstance(document, dict) and "truth" in document:
        return [IncomingEvent({**base, "type": SELDON_FEEDBACK_TYPE}, document, puid=event.puid)]
    raise BadRequest(
        "the record is no CloudEvent, and its JSON value neither an inference-logger envelope "
        '({"type": "request"|"response", "id", "time", "payload"}) nor a Seldon Feedback '
        '({"truth", ...})',
        reasons.UNKNOWN_RECORD_FORMAT,
    )


def avro_events(event: IncomingEvent, topic: str, record: dict[str, Any]) -> list[IncomingEvent]:
    """Hopsworks' ``inferenceschema`` records: v4 is one message, v1-v3 a request and response.

    A v1-v3 record whose ``responseHttpCode`` is no 2xx logs a failed inference: only its
    request is kept (there is no prediction to label).
    """
    base = {k: v for k, v in event.attributes.items() if k != "type"}
    if isinstance(record.get("modelName"), str) and record["modelName"]:
        base[EXTENSION_INFERENCE_SERVICE] = record["modelName"]
    set_time(base, record.get("requestTimestamp"))
    if "inferenceId" in record:  # v4 (AvroSchemas.decode returns inference logs only)
        base[EXTENSION_REQUEST_ID] = record["inferenceId"]
        return [logged(base, record["messageType"], record["payload"], event.puid)]
    base[EXTENSION_REQUEST_ID] = f"{base['source']}/{base['id']}"
    events = [logged(base, "request", record["inferenceRequest"], event.puid)]
    code = record.get("responseHttpCode", 200)
    if not isinstance(code, int) or 200 <= code < 300:
        events.append(logged(base, "response", record["inferenceResponse"], event.puid))
    return events


def logged(base: Mapping[str, Any], kind: str, body: str, puid: str | None) -> IncomingEvent:
    """A logged message whose body is JSON text; if it is not, the core counts it as ignored."""
    attributes = {**base, "type": MESSAGE_TYPES[kind]}
    try:
        return IncomingEvent(attributes, parse_json(body, f"logged {kind}"), puid=puid)
    except BadRequest as error:
        return IncomingEvent(attributes, None, error, puid)


def unwrapped(event: IncomingEvent) -> IncomingEvent:
    """A logger CloudEvent whose data the KFServing inference-logger wrapped in its envelope."""
    if (
        event.error is None
        and event.attributes.get("type") in LOGGER_TYPES
        and is_envelope(event.data)
    ):
        return IncomingEvent(event.attributes, event.data["payload"], puid=event.puid)
    return event


def is_envelope(document: Any) -> bool:
    return (
        isinstance(document, dict)
        and isinstance(document.get("type"), str)
        and document["type"] in MESSAGE_TYPES
        and "payload" in document
    )


def set_time(attributes: dict[str, Any], value: Any) -> None:
    """A prediction time the payload names replaces the record's: epoch (s or ms) or RFC 3339."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        # out of datetime's range: the record's time stays
        with contextlib.suppress(OverflowError, OSError, ValueError):
            attributes["time"] = epoch_time(value)
    elif isinstance(value, str) and value:
        attributes["time"] = value  # parsed leniently by the core, like structured mode's


def epoch_time(value: float) -> datetime:
    seconds = value / 1000 if value >= MILLISECONDS_FROM else value
    return datetime.fromtimestamp(seconds, UTC)
