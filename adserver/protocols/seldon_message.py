"""SeldonMessage payloads: ``data.ndarray``, ``data.tensor``, ``data.tftensor`` (``names`` ignored).

``jsonData``, ``strData`` and ``binData`` are passed through for user models that want them.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from adserver.errors import BadRequest
from adserver.protocols.shapes import shaped
from adserver.protocols.tftensor import decode_tftensor

PASSTHROUGH = ("jsonData", "strData")


def decode_message(message: Any, what: str) -> Any:
    """The payload of a SeldonMessage: a numpy array for ``data``, raw values otherwise."""
    if not isinstance(message, dict):
        raise BadRequest(f"{what} must be a SeldonMessage object", "invalid_message")
    if "data" in message:
        return decode_data(message["data"], what)
    for key in PASSTHROUGH:
        if key in message:
            return message[key]
    if "binData" in message:
        try:
            return base64.b64decode(message["binData"], validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise BadRequest(f"{what}.binData is not base64", "invalid_message") from exc
    raise BadRequest(f"{what} has no data", "missing_data")


def decode_data(data: Any, what: str) -> Any:
    if not isinstance(data, dict):
        raise BadRequest(f"{what}.data must be an object", "invalid_message")
    if "ndarray" in data:
        values = data["ndarray"]
        if not isinstance(values, list | np.ndarray):
            raise BadRequest(f"{what}.data.ndarray must be a list", "invalid_ndarray")
        try:
            return np.asarray(values)  # as Seldon hands it to models
        except ValueError as exc:
            raise BadRequest(f"{what}: rows have different lengths", "ragged_rows") from exc
    if "tensor" in data:
        return decode_tensor(data["tensor"], what)
    if "tftensor" in data:
        return decode_tftensor(data["tftensor"])
    raise BadRequest(f"{what}.data needs one of ndarray, tensor or tftensor", "unknown_data_form")


def decode_tensor(tensor: Any, what: str) -> np.ndarray:
    if not isinstance(tensor, dict):
        raise BadRequest(f"{what}.data.tensor must be an object", "invalid_tensor")
    # Seldon's proto has `repeated double values`: flat only.
    return shaped(tensor.get("values", []), tensor.get("shape"), f"{what}.data.tensor", flat=True)
