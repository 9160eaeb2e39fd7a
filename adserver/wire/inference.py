"""Payloads of logged inference requests and responses (KServe V1/V2, Seldon).

Only the part a metric model needs is extracted: the prediction (or input) tensor, whose first
axis is the batch. V2 tensors are reshaped by their ``shape``; ``BYTES`` tensors, Seldon
``binData`` and bodies that are not JSON (the binary tensor extension) have no rows to store
and are reported as such.
"""

from __future__ import annotations

from typing import Any

from adserver.catalogue import reasons
from adserver.errors import BadRequest
from adserver.wire.seldon_message import decode_message
from adserver.wire.shapes import shaped


class Unscorable(Exception):
    """A valid payload the server cannot use (e.g. strings); acknowledged and counted, not 4xx."""


def v2_tensor(tensors: Any, what: str) -> Any:
    """The first tensor of a V2 ``inputs``/``outputs`` list, shaped as declared."""
    if not isinstance(tensors, list) or not tensors or not isinstance(tensors[0], dict):
        raise BadRequest(f"{what} must be a non-empty list of tensors", reasons.INVALID_V2)
    tensor = tensors[0]
    if tensor.get("datatype") == "BYTES":
        raise Unscorable(reasons.BYTES_TENSOR)
    return shaped(tensor.get("data"), tensor.get("shape"), f"{what}[0]")


def prediction_payload(body: Any) -> Any:
    """The prediction in a KServe V1 (``predictions``), V2 (``outputs``) or Seldon response."""
    return payload(body, v1="predictions", v2="outputs", what="response")


def request_payload(body: Any) -> Any:
    """The model input in a KServe V1 (``instances``), V2 (``inputs``) or Seldon request."""
    return payload(body, v1="instances", v2="inputs", what="request")


def payload(body: Any, *, v1: str, v2: str, what: str) -> Any:
    if not isinstance(body, dict):
        raise BadRequest(f"a logged {what} must be a JSON object", reasons.INVALID_BODY)
    if v1 in body:
        return body[v1]
    if v2 in body:
        return v2_tensor(body[v2], v2)
    values = decode_message(body, what)
    if isinstance(values, bytes):  # binData (e.g. an image model's input): no rows to store
        raise Unscorable(reasons.BIN_DATA)
    return values
