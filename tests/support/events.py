"""Event bodies and CloudEvent headers, as Seldon, KServe and a Knative Broker send them."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from cloudevents.core.bindings.http import HTTPMessage

from adserver.wire.cloudevents import IncomingEvent, reply_event

FEEDBACK_TYPE = "io.seldon.serving.feedback"
REPLY_TYPE = "io.seldon.serving.feedback.metrics"
REPLY_SOURCE = "io.seldon.serving.feedback"
STRUCTURED_TYPE = "application/cloudevents+json"
BATCH_TYPE = "application/cloudevents-batch+json"


def new_id() -> str:
    return uuid.uuid4().hex


def lower(headers: Mapping[str, str]) -> dict[str, str]:
    """Header names as a server reads them (HTTP names are case-insensitive)."""
    return {name.lower(): value for name, value in headers.items()}


def ndarray(values: Any) -> dict[str, Any]:
    """A SeldonMessage with ``data.ndarray``."""
    return {"data": {"ndarray": values}}


def tensor(shape: list[int], values: list[float]) -> dict[str, Any]:
    return {"data": {"tensor": {"shape": shape, "values": values}}}


def tftensor_content(array: np.ndarray, dtype: str = "DT_FLOAT") -> dict[str, Any]:
    """A TensorProto in protobuf JSON with base64 ``tensorContent``, as Seldon's encoder makes."""
    little = {"DT_FLOAT": "<f4", "DT_DOUBLE": "<f8", "DT_INT64": "<i8"}[dtype]
    content = base64.b64encode(np.asarray(array, dtype=little).tobytes()).decode()
    dims = [{"size": str(size)} for size in np.shape(array)]
    proto = {"dtype": dtype, "tensorShape": {"dim": dims}, "tensorContent": content}
    return {"data": {"tftensor": proto}}


def feedback(truth: Any, response: Any, **extra: Any) -> dict[str, Any]:
    """A Seldon Feedback body from ndarray values (or ready-made SeldonMessages)."""
    body = {
        "truth": truth if isinstance(truth, dict) else ndarray(truth),
        "response": response if isinstance(response, dict) else ndarray(response),
    }
    body.update(extra)
    return body


def ce_headers(
    event_id: str | None = None,
    *,
    source: str = "tests",
    event_type: str = FEEDBACK_TYPE,
    content_type: str = "application/json",
    **extensions: str,
) -> dict[str, str]:
    """Binary-mode CloudEvent headers as a Knative Broker would deliver them."""
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event_id or new_id(),
        "ce-source": source,
        "ce-type": event_type,
        "Content-Type": content_type,
    }
    headers.update({f"ce-{name}": value for name, value in extensions.items()})
    return headers


def structured(data: Any, event_id: str | None = None, **attributes: Any) -> dict[str, Any]:
    """A structured-mode CloudEvent document carrying ``data``."""
    event = {
        "specversion": "1.0",
        "id": event_id or new_id(),
        "source": "tests",
        "type": FEEDBACK_TYPE,
        "datacontenttype": "application/json",
        "data": data,
    }
    event.update(attributes)
    return event


def reply_message(
    incoming: IncomingEvent, event_type: str, source: str, data: bytes
) -> HTTPMessage:
    """The reply as HTTP sends it: binary-mode headers, JSON data as the body."""
    reply = reply_event(incoming, event_type, source, data)
    return HTTPMessage(headers=reply.binary_headers, body=reply.data)
