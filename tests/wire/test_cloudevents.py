"""CloudEvents over HTTP: binary, structured and batched events and plain POSTs decoded in-process,
and reply events that both our decoder and the Python SDK read back as sent.

Headers are given lower-case, as the HTTP layer hands them over.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import pytest
from cloudevents.core.bindings.http import (
    HTTPMessage,
    from_http_event,
    to_binary_event,
    to_structured_event,
)
from cloudevents.core.v1.event import CloudEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from adserver.catalogue import reasons
from adserver.catalogue.wire import CORRELATION_EXTENSIONS
from adserver.errors import BadRequest
from adserver.wire.cloudevents import (
    HEADER_SAFE_CHARS,
    IncomingEvent,
    attribute_text,
    binary_event,
    decode_request,
    encode_header,
)
from tests.support.events import (
    BATCH_TYPE,
    FEEDBACK_TYPE,
    STRUCTURED_TYPE,
    ce_headers,
    feedback,
    lower,
    reply_message,
    structured,
)

BODY = feedback([[0, 0, 1]], [[0.1, 0.2, 0.7]])
RAW = json.dumps(BODY).encode()
#: protocols.md 1.5: a feedback event as a Broker Trigger delivers it.
SELDON_HEADERS = {
    "ce-specversion": "1.0",
    "ce-id": "9d2c51c0-3f4e-4c1e-9a55-1e0f1b6c2d11",
    "ce-type": "io.seldon.serving.feedback",
    "ce-source": "http://multiclass-model-default-0-classifier-7d9f-xk2p:8000/",
    "ce-time": "2021-02-22T18:09:51.5715734Z",
    "ce-requestid": "f8b21985-8687-4bb8-a94c-4fac362eb34c",
    "ce-modelid": "classifier",
    "ce-inferenceservicename": "multiclass-model",
    "ce-namespace": "seldon",
    "ce-endpoint": "default",
    "ce-protocol": "seldon",
    "ce-knativearrivaltime": "2021-02-22T18:09:51.58Z",
    "prefer": "reply",
    "content-type": "application/json",
}


def one(headers: dict[str, str], body: bytes) -> IncomingEvent:
    (event,) = decode_request(lower(headers), body)
    return event


def refused(headers: dict[str, str], body: Any, reason: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(BadRequest) as caught:
        for event in decode_request(lower(headers), raw):
            event.payload()
    assert caught.value.reason == reason, caught.value.message


# --------------------------------------------------------------------------- modes


def test_a_binary_event_from_the_seldon_executor() -> None:
    event = one(SELDON_HEADERS, b'{"reward":0,"truth":{"data":{"ndarray":[[0,0,1]]}}}')
    assert event.is_cloudevent
    assert event.key == (SELDON_HEADERS["ce-source"], SELDON_HEADERS["ce-id"])
    assert event.attributes["requestid"] == "f8b21985-8687-4bb8-a94c-4fac362eb34c"
    assert event.attributes["endpoint"] == "default"
    assert event.attributes["datacontenttype"] == "application/json"
    # nanoseconds truncated to microseconds
    assert event.attributes["time"] == datetime(2021, 2, 22, 18, 9, 51, 571573, tzinfo=UTC)
    assert "prefer" not in event.attributes
    assert event.payload()["truth"] == {"data": {"ndarray": [[0, 0, 1]]}}


def test_binary_attributes_are_percent_decoded() -> None:
    headers = ce_headers("a%20b", requestid="caf%C3%A9", endpoint="", namespace="100%")
    event = one(headers, RAW)
    assert event.key == ("tests", "a b")
    assert event.attributes["requestid"] == "café"
    assert event.attributes["endpoint"] == ""  # KServe sends it empty
    assert event.attributes["namespace"] == "100%"  # no escape: kept as sent


def test_a_binary_event_whose_data_is_not_json_keeps_the_error() -> None:
    """A logged inference may carry raw bytes (V2 binary extension); feedback never does."""
    event = one(ce_headers(content_type="application/octet-stream"), b"\x00\x01binary")
    assert event.data is None and event.error is not None
    with pytest.raises(BadRequest) as caught:
        event.payload()
    assert caught.value.reason == reasons.INVALID_JSON


def test_json_labelled_as_form_data_is_json() -> None:
    """KServe gives both events the inference request's Content-Type (curl -d: form data)."""
    event = one(ce_headers(content_type="application/x-www-form-urlencoded"), RAW)
    assert event.payload() == BODY


@pytest.mark.parametrize(
    "content_type",
    [
        STRUCTURED_TYPE,
        "application/cloudevents+json; charset=UTF-8",
        "Application/CloudEvents+JSON",
    ],
)
def test_a_structured_event(content_type: str) -> None:
    document = structured(BODY, "e1", requestid="r1")
    event = one({"Content-Type": content_type}, json.dumps(document).encode())
    assert event.key == ("tests", "e1") and event.attributes["requestid"] == "r1"
    assert "data" not in event.attributes
    assert event.payload() == BODY


def test_structured_body_wins_over_ce_headers() -> None:
    headers = {**ce_headers("from-header"), "Content-Type": STRUCTURED_TYPE}
    assert one(headers, json.dumps(structured(BODY, "from-body")).encode()).key[1] == "from-body"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"data_base64": base64.b64encode(RAW).decode()}, BODY),
        ({"data": json.dumps(BODY)}, BODY),  # JSON text as a string
        ({}, None),
    ],
    ids=["data_base64", "data_as_text", "no_data"],
)
def test_structured_data_forms(data: dict[str, Any], expected: Any) -> None:
    document = {k: v for k, v in structured(None).items() if k != "data"} | data
    event = one({"Content-Type": STRUCTURED_TYPE}, json.dumps(document).encode())
    assert event.payload() == expected
    assert "data_base64" not in event.attributes


def test_a_batch_is_its_events_in_order() -> None:
    batch = [structured(BODY, "b1"), structured({"truth": {"strData": "x"}}, "b2")]
    events = decode_request(lower({"Content-Type": BATCH_TYPE}), json.dumps(batch).encode())
    assert [e.key for e in events] == [("tests", "b1"), ("tests", "b2")]
    assert events[1].payload() == {"truth": {"strData": "x"}}


def test_a_plain_post_is_no_cloudevent() -> None:
    event = one({"Content-Type": "application/json", "ce-requestid": "r"}, RAW)
    assert not event.is_cloudevent and event.key is None
    assert event.attributes == {"requestid": "r"}  # extensions still join a label
    assert event.payload() == BODY


# --------------------------------------------------------------------------- refusals

STRUCT = {"Content-Type": STRUCTURED_TYPE}
BATCH = {"Content-Type": BATCH_TYPE}
WITHOUT_ID = {k: v for k, v in structured(BODY).items() if k != "id"}
PAD = "x" * 2000  # a big body takes the simdjson path


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        ({}, b"", reasons.EMPTY_BODY),
        ({}, b'{"truth": ', reasons.INVALID_JSON),
        ({}, b'{"a": NaN}', reasons.INVALID_JSON),
        ({}, b'{"a": 1e999}', reasons.INVALID_JSON),
        ({}, b"[" * 1100 + b"]" * 1100, reasons.TOO_DEEP),
        (
            {},
            b'{"p": "' + PAD.encode() + b'", "a": ' + b"[" * 1100 + b"]" * 1100 + b"}",
            "too_deep",
        ),
        ({"ce-specversion": "1.0", "ce-id": "i"}, BODY, reasons.INVALID_CLOUDEVENT),
        ({**ce_headers(), "ce-id": ""}, BODY, reasons.INVALID_CLOUDEVENT),
        (ce_headers(my_ext="x"), BODY, reasons.INVALID_CLOUDEVENT),
        (ce_headers(time="yesterday"), BODY, reasons.INVALID_CLOUDEVENT),
        ({**ce_headers(), "ce-specversion": "0.3"}, BODY, reasons.UNSUPPORTED_SPECVERSION),
        (ce_headers(), b"not json", reasons.INVALID_JSON),
        (STRUCT, [1], reasons.INVALID_CLOUDEVENT),
        (STRUCT, WITHOUT_ID, reasons.INVALID_CLOUDEVENT),
        (STRUCT, structured(BODY, specversion="0.3"), reasons.UNSUPPORTED_SPECVERSION),
        (STRUCT, structured(BODY, id=7), reasons.INVALID_CLOUDEVENT),
        (STRUCT, structured(BODY, my_ext="x"), reasons.INVALID_CLOUDEVENT),
        (STRUCT, {**WITHOUT_ID, "id": "i", "data_base64": "!!!"}, reasons.INVALID_CLOUDEVENT),
        (STRUCT, {**WITHOUT_ID, "id": "i", "data_base64": 5}, reasons.INVALID_CLOUDEVENT),
        (STRUCT, {**WITHOUT_ID, "id": "i", "data_base64": "PHgvPg=="}, reasons.INVALID_JSON),
        (STRUCT, structured("not json"), reasons.INVALID_JSON),
        (STRUCT, b"{", reasons.INVALID_JSON),
        (BATCH, [], reasons.INVALID_BATCH),
        (BATCH, structured(BODY), reasons.INVALID_BATCH),
        (BATCH, [structured(BODY), "x"], reasons.INVALID_CLOUDEVENT),
    ],
    ids=[
        "empty_body",
        "invalid_json",
        "raw_nan",
        "overflowing_float",
        "deeper_than_orjson",
        "deeper_than_orjson_simdjson",
        "binary_missing_attributes",
        "binary_empty_id",
        "binary_invalid_extension_name",
        "binary_invalid_time",
        "binary_wrong_specversion",
        "binary_bad_body",
        "structured_not_an_object",
        "structured_missing_id",
        "structured_wrong_specversion",
        "structured_numeric_id",
        "structured_invalid_extension_name",
        "structured_bad_base64",
        "structured_base64_not_a_string",
        "structured_base64_not_json",
        "structured_data_string_not_json",
        "structured_invalid_json",
        "batch_empty",
        "batch_not_an_array",
        "batch_with_non_event",
    ],
)
def test_refused_requests(headers: dict[str, str], body: Any, reason: str) -> None:
    refused(headers, body, reason)


# --------------------------------------------------------------------------- the Python SDK

names = st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True).filter(
    lambda n: (
        n not in ("id", "source", "type", "specversion", "time", "datacontenttype")
        and n not in ("dataschema", "subject", "data")
    )
)
texts = st.text(min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(texts, st.dictionaries(names, st.text(max_size=12), max_size=4), st.booleans())
def test_events_made_by_the_python_sdk(
    event_id: str, extensions: dict[str, str], binary: bool
) -> None:
    """Any id and extension values survive the SDK's encoding and our decoding."""
    attributes = {
        "id": event_id,
        "source": "/tests/sdk",
        "type": FEEDBACK_TYPE,
        "datacontenttype": "application/json",
        **extensions,
    }
    sent = CloudEvent(attributes=attributes, data=BODY)
    message = (to_binary_event if binary else to_structured_event)(sent)
    event = one(dict(message.headers), message.body)
    assert event.key == ("/tests/sdk", event_id)
    assert {name: event.attributes[name] for name in extensions} == extensions
    assert event.attributes["type"] == FEEDBACK_TYPE
    assert event.payload() == BODY


# --------------------------------------------------------------------------- replies


def incoming(**extensions: Any) -> IncomingEvent:
    return IncomingEvent(attributes={"specversion": "1.0", "id": "e1", **extensions}, data=None)


def test_a_reply_carries_the_id_the_configured_type_and_source_and_correlation_only() -> None:
    knative = {"knativearrivaltime": "2021-02-22T18:09:51Z", "traceparent": "00-ab-cd-01"}
    correlation = dict(zip(CORRELATION_EXTENSIONS, ["r 1", "isvc", "ns", "", "classifier"]))
    reply = reply_message(incoming(**correlation, **knative), "reply.type", "reply/src", b"{}")
    assert reply.body == b"{}"
    assert reply.headers["content-type"] == "application/json"
    parsed = from_http_event(HTTPMessage(reply.headers, reply.body))
    assert (parsed.get_id(), parsed.get_type(), parsed.get_source()) == (
        "e1",
        "reply.type",
        "reply/src",
    )
    assert {name: parsed.get_extension(name) for name in correlation} == correlation
    assert all(parsed.get_extension(name) is None for name in knative)


def test_a_reply_to_a_plain_post_gets_a_fresh_id() -> None:
    ids = {reply_message(IncomingEvent({}, None), "t", "s", b"{}").headers["ce-id"] for _ in "ab"}
    assert len(ids) == 2 and all(len(i) == 36 for i in ids)


def test_attribute_text_is_canonical() -> None:
    """A structured event's JSON ``true`` goes back as ``true``, as the SDKs expect."""
    assert [attribute_text(v) for v in (True, False, 3, "x")] == ["true", "false", "3", "x"]


@given(st.text())
def test_header_encoding_round_trips(value: str) -> None:
    encoded = encode_header(value)
    assert set(encoded) <= set(HEADER_SAFE_CHARS) | {"%"}
    assert unquote(encoded) == value
    if set(value) <= set(HEADER_SAFE_CHARS):
        assert encoded == value  # the common case costs nothing


@given(st.dictionaries(st.sampled_from(CORRELATION_EXTENSIONS), st.text(max_size=12)))
def test_our_replies_decode_as_we_decode_events(extensions: dict[str, str]) -> None:
    """A reply is itself a valid binary event (a Broker re-ingests it)."""
    reply = reply_message(incoming(**extensions), "reply.type", "reply/src", b"{}")
    event = binary_event(reply.headers, reply.body)
    assert event.key == ("reply/src", "e1")
    assert {name: event.attributes[name] for name in extensions} == extensions
    assert isinstance(event.attributes["time"], datetime)
