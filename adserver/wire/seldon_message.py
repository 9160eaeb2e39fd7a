"""SeldonMessage payloads: ``data.ndarray``, ``data.tensor``, ``data.tftensor`` (``names`` ignored).

``jsonData``, ``strData`` and ``binData`` are passed through for user models that want them.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from adserver.catalogue import reasons
from adserver.errors import BadRequest
from adserver.wire.shapes import shaped
from adserver.wire.tftensor import decode_tftensor
from cm_models.base import InvalidFeedback, nested_array

PASSTHROUGH = ("jsonData", "strData")


def decode_message(message: Any, what: str) -> Any:
    """The payload of a SeldonMessage: a numpy array for ``data``, raw values otherwise."""
    if not isinstance(message, dict):
        raise BadRequest(f"{what} must be a SeldonMessage object", reasons.INVALID_MESSAGE)
    if "data" in message:
        return decode_data(message["data"], what)
    for key in PASSTHROUGH:
        if key in message:
            return message[key]
    if "binData" in message:
        try:
            return base64.b64decode(message["binData"], validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise BadRequest(f"{what}.binData is not base64", reasons.INVALID_MESSAGE) from exc
    raise BadRequest(f"{what} has no data", reasons.MISSING_DATA)


def decode_data(data: Any, what: str) -> Any:
    if not isinstance(data, dict):
        raise BadRequest(f"{what}.data must be an object", reasons.INVALID_MESSAGE)
    if "ndarray" in data:
        values = data["ndarray"]
        if not isinstance(values, list | np.ndarray):
            raise BadRequest(f"{what}.data.ndarray must be a list", reasons.INVALID_NDARRAY)
        try:
            return nested_array(values, f"{what}.data.ndarray")  # as Seldon hands it to models
        except InvalidFeedback as exc:
            raise BadRequest(str(exc), exc.reason) from exc
    if "tensor" in data:
        return decode_tensor(data["tensor"], what)
    if "tftensor" in data:
        return decode_tftensor(data["tftensor"])
    raise BadRequest(
        f"{what}.data needs one of ndarray, tensor or tftensor", reasons.UNKNOWN_DATA_FORM
    )


def decode_tensor(tensor: Any, what: str) -> np.ndarray:
    if not isinstance(tensor, dict):
        raise BadRequest(f"{what}.data.tensor must be an object", reasons.INVALID_TENSOR)
    # Seldon's proto has `repeated double values`: flat only.
    return shaped(tensor.get("values", []), tensor.get("shape"), f"{what}.data.tensor", flat=True)
