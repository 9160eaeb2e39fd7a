"""Reply headers are encoded by hand (hot path): they must still be what the SDK reads back."""

from __future__ import annotations

from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from hypothesis import given, settings
from hypothesis import strategies as st

from adserver.wire.cloudevents import IncomingEvent
from tests.support.events import reply_message


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40).filter(lambda s: s.strip() == s and s))
def test_any_extension_value_round_trips_through_the_sdk(value: str) -> None:
    incoming = IncomingEvent({"specversion": "1.0", "id": "e1", "requestid": value}, {})
    message = reply_message(incoming, "reply.type", "reply/source", b'{"accuracy": 1.0}')
    assert all("\r" not in v and "\n" not in v for v in message.headers.values())
    event = from_http_event(HTTPMessage(headers=message.headers, body=message.body))
    assert event.get_extension("requestid") == value
    assert (event.get_id(), event.get_type(), event.get_source()) == (
        "e1",
        "reply.type",
        "reply/source",
    )
    assert event.get_data() == {"accuracy": 1.0}


def test_boolean_extensions_use_the_cloudevents_spelling() -> None:
    incoming = IncomingEvent({"specversion": "1.0", "id": "e1", "endpoint": True}, {})
    message = reply_message(incoming, "t", "s", b"{}")
    assert message.headers["ce-endpoint"] == "true"
