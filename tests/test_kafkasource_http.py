"""Knative KafkaSource over HTTP: records that are no CloudEvent, as ``dev.knative.kafka.event``.

A real server gets the POSTs a KafkaSource makes (binary mode; id ``partition:<p>/offset:<o>``,
source ``.../kafkasources/<name>#<topic>``, data the record's value) and decodes their data as
the Kafka transport decodes a record: feedback is scored once, a redelivery is a duplicate,
the inference-logger's request and response wait for their label and join it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from adserver.catalogue.wire import KNATIVE_KAFKA_EVENT_TYPE
from tests.support.events import ce_headers
from tests.support.http import model_doc, post_json, scrape, value
from tests.support.processes import DATA, MULTICLASS_NUMERIC

KAFKA = DATA / "kafka"
ENVELOPE_ID = "7a1c2f4e-0b1d-4c39-9d8e-3f7b2a6c5e10"


def deliver(url: str, body: bytes, topic: str, partition: int, offset: int) -> Any:
    """POST one record as a KafkaSource does (its headers would be kafkaheader* extensions)."""
    headers = ce_headers(
        f"partition:{partition}/offset:{offset}",
        source=f"/apis/v1/namespaces/default/kafkasources/logs#{topic}",
        event_type=KNATIVE_KAFKA_EVENT_TYPE,
        subject=f"partition:{partition}#{offset}",
        kafkaheadertraceid="t-1",
        key="k",
        partitionkey="k",
    )
    return post_json(url, body, headers)


def sample(name: str) -> bytes:
    return Path(KAFKA / name).read_bytes()


@pytest.fixture
def server(servers):
    return servers("--storage_uri", MULTICLASS_NUMERIC, "--state", "memory")


def test_feedback_records_are_counted_once_and_a_redelivery_is_a_duplicate(server) -> None:
    for offset in (0, 1, 0):  # offset 0 redelivered after a rebalance
        answer = deliver(server.url, sample("feedback.json"), "feedback", 3, offset)
        assert answer.status_code == 200, answer.text
    samples = scrape(server.url)
    assert value(samples, "feedback_events_accepted_total") == 2
    assert value(samples, "feedback_events_duplicate_total") == 1
    assert model_doc(server.url)["rows"] == 4


def test_the_inference_loggers_request_and_response_join_their_label(server) -> None:
    topic = "iris-inference-topic"
    for name, offset in (("envelope-request.json", 7), ("envelope-response.json", 8)):
        answer = deliver(server.url, sample(name), topic, 0, offset)
        assert answer.status_code == 200 and answer.content == b"", answer.text
    assert deliver(server.url, sample("envelope-response.json"), topic, 0, 8).status_code == 200
    label = {"truth": {"data": {"ndarray": [1, 2]}}}
    answer = post_json(server.url, label, ce_headers(requestid=ENVELOPE_ID))
    assert answer.status_code == 200, answer.text
    samples = scrape(server.url)
    assert value(samples, "feedback_labels_total", outcome="joined") == 2
    assert value(samples, "feedback_logger_events_total", kind="request") == 1
    assert value(samples, "feedback_logger_events_total", kind="response") == 1
    assert value(samples, "feedback_events_duplicate_total") == 1
    doc = model_doc(server.url)
    np.testing.assert_array_equal(
        doc["confusion_matrix"], confusion_matrix([1, 2], [1, 1], labels=doc["classes"])
    )


def test_a_record_of_no_format_read_is_refused_and_counted(server) -> None:
    answer = deliver(server.url, b"[1, 2, 3]", "feedback", 0, 9)
    assert answer.status_code == 400
    assert answer.json()["reason"] == "unknown_record_format"
    samples = scrape(server.url)
    assert value(samples, "feedback_events_rejected_total", reason="unknown_record_format") == 1
    assert value(samples, "feedback_events_accepted_total") == 0


def test_hopsworks_avro_through_a_kafkasource_joins_its_label(servers) -> None:
    """--kafka_avro_schema reaches the HTTP path too: v4's request and response records (one
    inferenceId), delivered by a KafkaSource, wait for their label and join it."""
    schema = KAFKA / "inferenceschema-v4.avsc"
    url = servers(
        "--storage_uri", MULTICLASS_NUMERIC, "--state", "memory", "--kafka_avro_schema", str(schema)
    ).url
    for kind, offset in (("request", 11), ("response", 12)):
        answer = deliver(url, sample(f"hopsworks-v4-{kind}.avro"), "iris-inference", 0, offset)
        assert answer.status_code == 200, answer.text
    label = {"truth": {"data": {"ndarray": [1, 2]}}}
    requestid = "2d23b009-f968-4f6b-995a-c79b4f4fa8af"  # the samples' inferenceId
    answer = post_json(url, label, ce_headers(requestid=requestid))
    assert answer.status_code == 200, answer.text
    samples = scrape(url)
    assert value(samples, "feedback_labels_total", outcome="joined") == 2
    doc = model_doc(url)
    np.testing.assert_array_equal(
        doc["confusion_matrix"], confusion_matrix([1, 2], [1, 1], labels=doc["classes"])
    )
