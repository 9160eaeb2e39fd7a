"""HTTP's two ends of the core, without a server: the binding's decode and the answer's mapping."""

from __future__ import annotations

import orjson
import pytest

from adserver.errors import (
    BadRequest,
    ErrorKind,
    HeadersTooLarge,
    InternalError,
    PayloadTooLarge,
    RequestError,
    RequestTimeout,
    Unavailable,
    UnsupportedEncoding,
)
from adserver.http.answers import STATUS, json_error, outcome_answer
from adserver.ingest.service import Accepted
from adserver.wire.cloudevents import IncomingEvent, ReplyEvent, decode_request, reply_event

DATA = b'{"truth": {"data": {"ndarray": [[0, 1]]}}}'
CE = {"ce-specversion": "1.0", "ce-id": "e-1", "ce-source": "tests", "ce-type": "t"}
DOCUMENT = {"specversion": "1.0", "id": "e-1", "source": "tests", "type": "t", "data": {}}


@pytest.mark.parametrize(
    ("headers", "body", "events"),
    [
        ({"content-type": "application/json"}, DATA, 1),
        ({**CE, "content-type": "application/json"}, DATA, 1),
        ({"content-type": "application/cloudevents+json"}, orjson.dumps(DOCUMENT), 1),
        (
            {"content-type": "application/cloudevents-batch+json"},
            orjson.dumps([DOCUMENT, {**DOCUMENT, "id": "e-2"}]),
            2,
        ),
        ({**CE, "content-type": "application/json"}, b"not json", 1),
    ],
    ids=["plain", "binary", "structured", "batch", "binary_not_json"],
)
def test_the_seldon_puid_header_travels_with_every_event_of_the_request(
    headers: dict[str, str], body: bytes, events: int
) -> None:
    """A label may be joined by it, and the core sees no HTTP headers."""
    decoded = decode_request({**headers, "seldon-puid": "p-1"}, body)
    assert [event.puid for event in decoded] == ["p-1"] * events
    assert all(event.puid is None for event in decode_request(headers, body))


def test_every_kind_of_refusal_has_one_status() -> None:
    assert set(STATUS) == set(ErrorKind)
    assert all(STATUS[kind] >= 500 for kind in ErrorKind if kind.fault)
    assert all(400 <= STATUS[kind] < 500 for kind in ErrorKind if not kind.fault)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RequestError, 400),
        (BadRequest, 400),
        (RequestTimeout, 408),
        (PayloadTooLarge, 413),
        (UnsupportedEncoding, 415),
        (HeadersTooLarge, 431),
        (InternalError, 500),
        (Unavailable, 503),
    ],
)
def test_a_refusal_is_its_status_and_a_json_body(error: type[RequestError], status: int) -> None:
    answer = outcome_answer(error("what went wrong", "a_reason"))
    assert answer == json_error(error("what went wrong", "a_reason"))
    assert (answer.status, answer.headers) == (status, {"Content-Type": "application/json"})
    assert orjson.loads(answer.body) == {"error": "what went wrong", "reason": "a_reason"}


def test_accepted_events_are_an_empty_200_or_the_reply_in_binary_mode() -> None:
    assert outcome_answer(Accepted([True])) == (200, {}, b"")
    incoming = IncomingEvent({"specversion": "1.0", "id": "e 1", "requestid": "r%1"}, {})
    reply: ReplyEvent = reply_event(incoming, "reply.type", "reply/source", b'{"accuracy": 1}')
    status, headers, body = outcome_answer(Accepted([False], reply))
    assert (status, body) == (200, b'{"accuracy": 1}')
    assert headers.pop("ce-time")
    assert headers == {
        "ce-specversion": "1.0",
        "ce-id": "e%201",  # percent-encoded as the HTTP binding asks
        "ce-type": "reply.type",
        "ce-source": "reply/source",
        "ce-requestid": "r%251",
        "content-type": "application/json",
    }
