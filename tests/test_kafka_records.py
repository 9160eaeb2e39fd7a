"""Kafka records -> events (adserver/wire/kafka.py): every format, exact attributes, poison.

Pure decoding, no broker: records are built as a consumer hands them over. The last tests feed
a mixed topic through the ingest core as the Kafka transport does (one ``receive`` per record)
and count what it kept, redeliveries included.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from sklearn.metrics import confusion_matrix

from adserver.app import build_server
from adserver.catalogue.families import EVENTS_ACCEPTED, EVENTS_REJECTED, LOGGER_EVENTS
from adserver.catalogue.wire import (
    KNATIVE_KAFKA_EVENT_TYPE,
    KSERVE_REQUEST_TYPE,
    KSERVE_RESPONSE_TYPE,
    SELDON_FEEDBACK_TYPE,
    SELDON_REQUEST_TYPE,
    SELDON_RESPONSE_TYPE,
)
from adserver.errors import BadRequest
from adserver.ingest.service import Accepted, FeedbackService, Outcome
from adserver.settings import Settings
from adserver.wire.cloudevents import IncomingEvent, decode_request
from adserver.wire.kafka import AvroSchemas, KafkaRecord, decode_record, delivered
from tests.support.processes import DATA, MULTICLASS_NUMERIC

KAFKA = DATA / "kafka"
ENVELOPE_ID = "7a1c2f4e-0b1d-4c39-9d8e-3f7b2a6c5e10"
INFERENCE_ID = "2d23b009-f968-4f6b-995a-c79b4f4fa8af"
IRIS_REQUEST = {"instances": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]}
IRIS_RESPONSE = {"predictions": [1, 1]}
RECORD_MS = 1_700_000_000_500


def record(
    value: bytes | None,
    *headers: tuple[str, bytes | None],
    topic: str = "feedback",
    partition: int = 0,
    offset: int = 0,
    timestamp_ms: int | None = RECORD_MS,
) -> KafkaRecord:
    return KafkaRecord(topic, partition, offset, None, value, tuple(headers), timestamp_ms)


def decode(each: KafkaRecord, avro: AvroSchemas | None = None) -> list[IncomingEvent]:
    return decode_record(each, avro)


def sample(name: str) -> bytes:
    return (KAFKA / name).read_bytes()


@pytest.fixture(scope="module")
def avro(tmp_path_factory: pytest.TempPathFactory) -> AvroSchemas:
    """All four generations in one file, as a list, v1 first (v4 must still be told apart)."""
    path = tmp_path_factory.mktemp("avro") / "inferenceschema.avsc"
    schemas = [json.loads(sample(f"inferenceschema-v{v}.avsc")) for v in (1, 2, 3, 4)]
    path.write_text(json.dumps(schemas))
    return AvroSchemas.load(str(path))


def reason(excinfo: pytest.ExceptionInfo[BadRequest]) -> str:
    return excinfo.value.reason


# 1. CloudEvents Kafka binding


def test_a_binary_cloudevent_takes_its_attributes_from_ce_headers_verbatim() -> None:
    (event,) = decode(
        record(
            sample("../logger/kserve-iris-request.json"),
            ("ce_specversion", b"1.0"),
            ("ce_id", b"abc-1"),
            ("ce_source", b"http://localhost:9081/"),
            ("ce_type", KSERVE_REQUEST_TYPE.encode()),
            ("ce_time", b"2021-04-10T00:23:26.080736Z"),
            ("ce_inferenceservicename", b"sklearn-iris"),
            ("ce_endpoint", b"50%25"),  # no percent-decoding in the Kafka binding
            ("content-type", b"application/json"),
            ("traceparent", b"\xff\xfe"),  # not UTF-8, not ours: ignored
        )
    )
    assert dict(event.attributes) == {
        "specversion": "1.0",
        "id": "abc-1",
        "source": "http://localhost:9081/",
        "type": KSERVE_REQUEST_TYPE,
        "time": datetime(2021, 4, 10, 0, 23, 26, 80736, tzinfo=UTC),
        "inferenceservicename": "sklearn-iris",
        "endpoint": "50%25",
        "datacontenttype": "application/json",
    }
    assert event.data == IRIS_REQUEST and event.key == ("http://localhost:9081/", "abc-1")


def test_the_inference_loggers_envelope_in_a_cloudevent_is_unwrapped() -> None:
    """What the KFServing inference-logger writes: the agent's CloudEvent, data in envelope."""
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", ENVELOPE_ID.encode()),
        ("ce_source", b"http://localhost:8080/"),
        ("ce_type", KSERVE_RESPONSE_TYPE.encode()),
        ("content-type", b"application/json"),
    ]
    (event,) = decode(record(sample("envelope-response.json"), *headers))
    assert event.attributes["type"] == KSERVE_RESPONSE_TYPE
    assert event.attributes["id"] == ENVELOPE_ID and event.data == IRIS_RESPONSE


def test_a_structured_cloudevent_and_a_batch_are_read_as_over_http() -> None:
    document = json.loads(sample("cloudevent-structured.json"))
    structured = ("content-type", b"application/cloudevents+json; charset=utf-8")
    (event,) = decode(record(sample("cloudevent-structured.json"), structured))
    assert event.attributes["id"] == "ce-1" and event.data == document["data"]
    batch = ("content-type", b"application/cloudevents-batch+json")
    second = {**document, "id": "ce-2"}
    events = decode(record(orjson.dumps([document, second]), batch))
    assert [e.attributes["id"] for e in events] == ["ce-1", "ce-2"]


# 2-5. values that are no CloudEvent


def test_a_bare_envelope_is_a_logged_message_of_the_topics_inference_service() -> None:
    (event,) = decode(
        record(
            sample("envelope-request.json"), topic="iris-inference-topic", partition=2, offset=17
        )
    )
    assert dict(event.attributes) == {
        "specversion": "1.0",
        "source": "kafka://iris-inference-topic/2",
        "id": "17",
        "type": SELDON_REQUEST_TYPE,  # joined by requestid: the message has its own id
        "requestid": ENVELOPE_ID,
        "inferenceservicename": "iris",
        "time": datetime.fromtimestamp(1618014206, UTC),  # the envelope's, not the record's
    }
    assert event.data == IRIS_REQUEST


def test_an_envelope_on_another_topic_names_no_service_and_keeps_an_rfc3339_time() -> None:
    envelope = {"type": "response", "id": 5, "time": "2021-04-10T00:23:26Z", "payload": {}}
    (event,) = decode(record(orjson.dumps(envelope), topic="logs"))
    assert "inferenceservicename" not in event.attributes
    assert event.attributes["time"] == "2021-04-10T00:23:26Z"
    assert event.attributes["requestid"] == "5"
    assert event.attributes["type"] == SELDON_RESPONSE_TYPE


@pytest.mark.parametrize("version", [1, 2, 3])
def test_hopsworks_v1_to_v3_is_a_request_and_its_response(avro: AvroSchemas, version: int) -> None:
    events = decode(record(sample(f"hopsworks-v{version}.avro"), topic="t", offset=5), avro)
    expected = {
        "specversion": "1.0",
        "source": "kafka://t/0",
        "id": "5",
        "requestid": "kafka://t/0/5",  # v1-v3 have no id: the record's names the pair
        "inferenceservicename": "irisflowerclassifier",
        "time": datetime.fromtimestamp(1652885019.123, UTC),  # requestTimestamp, milliseconds
    }
    assert [dict(e.attributes) for e in events] == [
        {**expected, "type": SELDON_REQUEST_TYPE},
        {**expected, "type": SELDON_RESPONSE_TYPE},
    ]
    assert [e.data for e in events] == [IRIS_REQUEST, IRIS_RESPONSE]


def test_a_failed_hopsworks_inference_logs_only_its_request(avro: AvroSchemas) -> None:
    (event,) = decode(record(sample("hopsworks-v3-failed.avro")), avro)
    assert event.attributes["type"] == SELDON_REQUEST_TYPE


@pytest.mark.parametrize("kind", ["request", "response"])
def test_hopsworks_v4_is_one_message_joined_by_its_inference_id(
    avro: AvroSchemas, kind: str
) -> None:
    (event,) = decode(record(sample(f"hopsworks-v4-{kind}.avro"), offset=9), avro)
    assert event.attributes["requestid"] == INFERENCE_ID
    assert (
        event.attributes["type"] == (SELDON_REQUEST_TYPE, SELDON_RESPONSE_TYPE)[kind == "response"]
    )
    assert event.attributes["time"] == datetime.fromtimestamp(1652885019, UTC)  # seconds
    assert event.data == (IRIS_REQUEST if kind == "request" else IRIS_RESPONSE)


def test_one_schema_in_a_file_reads_its_own_generation_only(tmp_path: Path) -> None:
    path = tmp_path / "v4.avsc"
    path.write_bytes(sample("inferenceschema-v4.avsc"))
    only_v4 = AvroSchemas.load(str(path))
    assert len(decode(record(sample("hopsworks-v4-request.avro")), only_v4)) == 1
    with pytest.raises(BadRequest) as excinfo:  # v2's bytes read exactly as v4, but are no v4
        decode(record(sample("hopsworks-v2.avro")), only_v4)
    assert reason(excinfo) == "invalid_avro"


def test_the_seldon_executors_kafka_logger_is_the_event_it_would_post() -> None:
    """executor/logger/worker.go sendKafkaEvent: a ``type`` header, extensions as headers."""
    headers = [
        ("type", SELDON_RESPONSE_TYPE.encode()),
        ("content-type", b"application/json"),
        ("modelid", b"classifier"),
        ("requestid", b"puid-1"),
        ("inferenceservicename", b"sdep"),
        ("namespace", b"seldon"),
        ("endpoint", b"default"),
        ("protocol", b"seldon"),
    ]
    body = sample("../logger/seldon-response.json")
    (event,) = decode(record(body, *headers, topic="seldon", offset=4))
    assert dict(event.attributes) == {
        "specversion": "1.0",
        "source": "kafka://seldon/0",
        "id": "4",
        "type": SELDON_RESPONSE_TYPE,
        "time": datetime.fromtimestamp(RECORD_MS / 1000, UTC),
        "requestid": "puid-1",
        "modelid": "classifier",
        "inferenceservicename": "sdep",
        "namespace": "seldon",
        "endpoint": "default",
        "protocol": "seldon",
    }
    assert event.data == json.loads(body)
    over_http = decode_request(
        {
            "ce-specversion": "1.0",
            "ce-id": "partition:0/offset:4",
            "ce-source": "/apis/v1/namespaces/ns/kafkasources/logs#seldon",
            "ce-type": KNATIVE_KAFKA_EVENT_TYPE,
            **{f"ce-kafkaheader{n.replace('-', '')}": v.decode() for n, v in headers},
        },
        body,
    )
    (via_source,) = delivered(over_http[0], None)
    assert via_source.attributes["type"] == SELDON_RESPONSE_TYPE
    assert via_source.attributes["requestid"] == "puid-1"
    assert via_source.key == (
        "/apis/v1/namespaces/ns/kafkasources/logs#seldon",
        "partition:0/offset:4",
    )


def test_a_bare_feedback_is_a_seldon_feedback_event_deduplicated_by_its_offset() -> None:
    (event,) = decode(
        record(sample("feedback.json"), ("Seldon-Puid", b"p-1"), partition=1, offset=3)
    )
    assert dict(event.attributes) == {
        "specversion": "1.0",
        "source": "kafka://feedback/1",
        "id": "3",
        "type": SELDON_FEEDBACK_TYPE,
        "time": datetime.fromtimestamp(RECORD_MS / 1000, UTC),  # the record's timestamp
    }
    assert event.puid == "p-1" and event.key == ("kafka://feedback/1", "3")


def test_a_record_without_a_timestamp_has_no_time() -> None:
    (event,) = decode(record(sample("feedback.json"), timestamp_ms=-1))
    assert "time" not in event.attributes


@pytest.mark.parametrize(
    ("value", "headers", "with_avro", "expected"),
    [
        (b"[1, 2]", [], False, "unknown_record_format"),
        (b'{"hello": 1}', [], False, "unknown_record_format"),
        (None, [], False, "unknown_record_format"),  # a tombstone
        (b"\x02\x04ab", [], False, "unknown_record_format"),  # binary, no schema to read it
        (b"\x02\x04ab", [], True, "invalid_avro"),
        (b"[" * 2000 + b"]" * 2000, [], False, "too_deep"),
        (b"{}", [("ce_specversion", b"1.0"), ("ce_type", b"t")], False, "invalid_cloudevent"),
        (b"{}", [("ce_specversion", b"\xff")], False, "invalid_cloudevent"),
        (b"{}", [("content-type", b"application/cloudevents+json")], False, "invalid_cloudevent"),
    ],
    ids=[
        "array",
        "other-object",
        "tombstone",
        "binary",
        "bad-avro",
        "too-deep",
        "ce-lacks-id",
        "ce-not-utf8",
        "structured-not-event",
    ],
)
def test_a_poison_record_is_refused_with_its_reason(
    avro: AvroSchemas,
    value: bytes | None,
    headers: list[tuple[str, bytes]],
    with_avro: bool,
    expected: str,
) -> None:
    with pytest.raises(BadRequest) as excinfo:
        decode(record(value, *headers), avro if with_avro else None)
    assert reason(excinfo) == expected


def test_a_logged_hopsworks_body_that_is_no_json_keeps_its_error_for_the_core(
    tmp_path: Path, avro: AvroSchemas
) -> None:
    import fastavro

    schema = fastavro.parse_schema(json.loads(sample("inferenceschema-v4.avsc")))
    path = tmp_path / "v.avro"
    with path.open("wb") as out:
        fastavro.schemaless_writer(
            out,
            schema,
            {
                "servingId": 1,
                "modelName": "m",
                "modelVersion": 1,
                "requestTimestamp": 1,
                "responseHttpCode": 200,
                "inferenceId": "i",
                "messageType": "response",
                "payload": "<html>",
            },
        )
    (event,) = decode(record(path.read_bytes()), avro)
    assert event.error is not None and event.error.reason == "invalid_json"


def test_a_schema_file_that_is_no_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.avsc"
    for text in ('{"type": "nothing"}', "[]"):
        path.write_text(text)
        with pytest.raises(ValueError):
            AvroSchemas.load(str(path))


# Knative KafkaSource: the same payloads as the data of a dev.knative.kafka.event


def kafka_source_event(body: bytes, offset: int = 4) -> IncomingEvent:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": f"partition:1/offset:{offset}",
        "ce-source": "/apis/v1/namespaces/ns/kafkasources/logs#iris-inference-topic",
        "ce-type": KNATIVE_KAFKA_EVENT_TYPE,
        "ce-subject": f"partition:1#{offset}",
        "ce-kafkaheadertrace": "t",
    }
    (event,) = decode_request(headers, body)
    return event


def test_a_kafkasource_event_keeps_its_source_and_id_and_decodes_its_data(
    avro: AvroSchemas,
) -> None:
    (envelope,) = delivered(kafka_source_event(sample("envelope-request.json")), None)
    assert envelope.key == (
        "/apis/v1/namespaces/ns/kafkasources/logs#iris-inference-topic",
        "partition:1/offset:4",
    )
    assert envelope.attributes["type"] == SELDON_REQUEST_TYPE
    assert envelope.attributes["requestid"] == ENVELOPE_ID
    assert envelope.attributes["inferenceservicename"] == "iris"  # after the source's '#'
    assert envelope.attributes["kafkaheadertrace"] == "t"
    request, response = delivered(kafka_source_event(sample("hopsworks-v1.avro")), avro)
    assert request.key == response.key == envelope.key
    assert request.attributes["requestid"] == f"{envelope.key[0]}/{envelope.key[1]}"
    with pytest.raises(BadRequest) as excinfo:
        delivered(kafka_source_event(sample("hopsworks-v1.avro")), None)
    assert reason(excinfo) == "unknown_record_format"


def test_any_other_event_is_left_alone_but_for_an_envelope_in_a_logger_event() -> None:
    plain = IncomingEvent({"specversion": "1.0", "type": "x", "id": "1", "source": "s"}, {"a": 1})
    assert delivered(plain, None) == [plain]
    envelope = json.loads(sample("envelope-request.json"))
    logger = IncomingEvent({**plain.attributes, "type": KSERVE_REQUEST_TYPE}, envelope)
    (unwrapped,) = delivered(logger, None)
    assert unwrapped.attributes == logger.attributes and unwrapped.data == IRIS_REQUEST
    feedback_named_type = IncomingEvent(plain.attributes, {"type": "request", "payload": {}})
    assert delivered(feedback_named_type, None) == [feedback_named_type]  # not a logger event


# A mixed topic through the ingest core, one receive per record as the transport calls it


def consume(
    tmp_path: Path, records: list[KafkaRecord], avro: AvroSchemas | None
) -> tuple[FeedbackService, list[Outcome]]:
    settings = Settings(state="memory", state_dir=str(tmp_path), storage_uri=MULTICLASS_NUMERIC)
    service = build_server(settings).service
    outcomes: list[Outcome] = []

    async def main() -> None:
        try:
            for each in records:
                outcomes.append(
                    await service.receive(
                        {}, b"", binding=lambda _h, _b, r=each: decode_record(r, avro)
                    )
                )
        finally:
            await service.close()

    asyncio.run(main())
    return service, outcomes


def test_a_mixed_topic_counts_each_event_once_and_skips_poison(
    tmp_path: Path, avro: AvroSchemas
) -> None:
    label = {"truth": {"data": {"ndarray": [1, 2]}}}
    ce_label = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"label-1"),
        ("ce_source", b"labeller"),
        ("ce_type", SELDON_FEEDBACK_TYPE.encode()),
        ("ce_requestid", INFERENCE_ID.encode()),
    ]
    topic = [
        record(sample("feedback.json"), offset=0),  # 2 rows scored
        record(b"not json, no inference log", offset=1),  # poison
        record(sample("hopsworks-v4-request.avro"), offset=2),
        record(sample("hopsworks-v4-response.avro"), offset=3),
        record(orjson.dumps(label), *ce_label, offset=4),  # joins the v4 pair: 2 rows
        record(sample("feedback.json"), offset=0),  # a redelivery
        record(sample("hopsworks-v1.avro"), offset=5),  # request and response, never labelled
        record(
            sample("cloudevent-structured.json"),
            ("content-type", b"application/cloudevents+json"),
            offset=6,
        ),
    ]
    service, outcomes = consume(tmp_path, topic, avro)
    new = [list(o.new) if isinstance(o, Accepted) else o.reason for o in outcomes]
    assert new == [
        [True],
        "invalid_avro",
        [True],
        [True],
        [True],
        [False],
        [True, True],
        [True],
    ]
    state = service.store.state
    assert state.labelled(EVENTS_REJECTED) == {"invalid_avro": 1}
    assert state.count(EVENTS_ACCEPTED) == 3  # two feedback events and the label
    assert state.labelled(LOGGER_EVENTS) == {"request": 2, "response": 2}
    summary: dict[str, Any] = orjson.loads(service.document())
    (model,) = summary["models"].values() if "models" in summary else (summary,)
    assert model["rows"] == 2 + 1 + 2  # feedback, structured event, joined label
    truth, predicted = [1, 2, 2, 1, 2], [1, 1, 2, 1, 1]
    assert model["confusion_matrix"] == confusion_matrix(truth, predicted, labels=[1, 2]).tolist()


def test_every_format_redelivered_counts_once(tmp_path: Path, avro: AvroSchemas) -> None:
    """A topic of every format read twice (a crash before any commit): the second reading
    changes nothing, each event's dedup key (given or made from the record) the same again."""
    seldon = [("type", SELDON_RESPONSE_TYPE.encode()), ("requestid", b"puid-1")]
    binary = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"binary-1"),
        ("ce_source", b"tests"),
        ("ce_type", SELDON_FEEDBACK_TYPE.encode()),
        ("content-type", b"application/json"),
    ]
    structured = [("content-type", b"application/cloudevents+json")]
    topic = [
        record(sample("feedback.json"), offset=0),
        record(orjson.dumps(feedback_body()), *binary, offset=1),
        record(sample("cloudevent-structured.json"), *structured, offset=2),
        record(sample("envelope-request.json"), topic="iris-inference-topic", offset=3),
        record(sample("envelope-response.json"), topic="iris-inference-topic", offset=4),
        record(sample("../logger/seldon-response.json"), *seldon, topic="seldon", offset=5),
        *(record(sample(f"hopsworks-{v}.avro"), offset=6 + i) for i, v in enumerate(AVRO)),
    ]
    service, outcomes = consume(tmp_path, topic + topic, avro)
    first, again = outcomes[: len(topic)], outcomes[len(topic) :]
    assert all(isinstance(o, Accepted) and all(o.new) for o in first), first
    assert all(isinstance(o, Accepted) and not any(o.new) for o in again), again
    state = service.store.state
    assert state.count(EVENTS_ACCEPTED) == 3  # the feedback events
    assert state.labelled(LOGGER_EVENTS) == {"request": 6, "response": 6}


AVRO = ("v1", "v2", "v3", "v3-failed", "v4-request", "v4-response")


def feedback_body() -> dict[str, Any]:
    return {"truth": {"data": {"ndarray": [1]}}, "response": {"data": {"ndarray": [1]}}}
