"""Decode the JSON form of a TensorFlow ``TensorProto`` without TensorFlow.

Accepts camelCase and snake_case keys, typed value lists (int64 as strings) and base64
``tensorContent``, as protobuf's JSON mapping produces them.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any

import numpy as np

from adserver.catalogue import reasons
from adserver.errors import BadRequest
from adserver.wire.shapes import bounded_if_empty

DTYPES: dict[str, str] = {
    "DT_FLOAT": "<f4",
    "DT_DOUBLE": "<f8",
    "DT_HALF": "<f2",
    "DT_INT8": "<i1",
    "DT_INT16": "<i2",
    "DT_INT32": "<i4",
    "DT_INT64": "<i8",
    "DT_UINT8": "<u1",
    "DT_UINT16": "<u2",
    "DT_UINT32": "<u4",
    "DT_UINT64": "<u8",
    "DT_BOOL": "?",
}
# Most elements a single repeated value may expand to (about what the default body limit holds).
MAX_FILLED_VALUES = 1 << 22
VALUE_FIELDS = (
    "float_val",
    "double_val",
    "int_val",
    "int64_val",
    "bool_val",
    "uint32_val",
    "uint64_val",
    "half_val",
)


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def decode_tftensor(proto: Any) -> np.ndarray:
    if not isinstance(proto, dict):
        raise BadRequest("tftensor must be an object", reasons.INVALID_TFTENSOR)
    fields = {snake_case(k): v for k, v in proto.items()}
    dtype = DTYPES.get(str(fields.get("dtype", "")))
    if dtype is None:
        raise BadRequest(
            f"tftensor dtype {fields.get('dtype')!r} is not numeric", reasons.INVALID_TFTENSOR
        )
    shape = tensor_shape(fields.get("tensor_shape") or {})
    try:
        if "tensor_content" in fields:
            values = np.frombuffer(base64.b64decode(fields["tensor_content"]), dtype=dtype)
        else:
            listed: Any = next((fields[f] for f in VALUE_FIELDS if f in fields), [])
            if dtype == "<f2" and "half_val" in fields:
                values = np.asarray(listed, dtype=np.uint16).view(np.float16)
            else:
                with np.errstate(over="raise"):  # 1e300 as DT_FLOAT is an error, not infinity
                    values = np.asarray(listed, dtype=dtype)
                exactly(listed, values)
    except (binascii.Error, ValueError, TypeError, OverflowError, FloatingPointError) as exc:
        raise BadRequest(
            f"tftensor values do not match dtype: {exc}", reasons.INVALID_TFTENSOR
        ) from exc
    size = math.prod(shape)
    if values.size == 1 and size > 1:  # TensorFlow repeats a single value to fill the shape
        if size > MAX_FILLED_VALUES:  # a few bytes must not make the server allocate gigabytes
            raise BadRequest(
                f"tftensor shape {shape} is too large to fill from one value",
                reasons.TENSOR_TOO_LARGE,
            )
        values = np.full(size, values[0], dtype=values.dtype)
    if values.size != size:
        raise BadRequest(
            f"tftensor has {values.size} values for shape {shape}", reasons.TENSOR_SHAPE_MISMATCH
        )
    bounded_if_empty(shape, "tftensor")
    try:
        return values.reshape(shape)
    except ValueError as exc:  # e.g. an empty tensor with a dimension numpy cannot represent
        raise BadRequest(
            f"tftensor shape {shape} is invalid: {exc}", reasons.INVALID_TFTENSOR
        ) from exc


def exactly(listed: Any, values: np.ndarray) -> None:
    """An integer or boolean dtype holds the numbers sent, or ValueError: 1.7 is no DT_INT32.

    protobuf's parser refuses such values; numpy's cast would truncate them (a label of 1.7
    counted as class 1). Strings (int64 as text) are parsed strictly by the cast already.
    """
    if values.dtype.kind in "biu":
        sent = np.asarray(listed)
        if sent.dtype.kind in "biuf" and not np.array_equal(sent, values):
            raise ValueError(f"values are not all exactly {values.dtype.name}")


def tensor_shape(shape: Any) -> list[int]:
    dims = shape.get("dim", []) if isinstance(shape, dict) else None
    if not isinstance(dims, list):
        raise BadRequest("tftensor tensorShape.dim must be a list", reasons.INVALID_TFTENSOR)
    try:
        sizes = [dimension_size(d.get("size", 0)) for d in dims]
    except (AttributeError, TypeError, ValueError) as exc:
        raise BadRequest(
            "tftensor dimension sizes must be integers", reasons.INVALID_TFTENSOR
        ) from exc
    if any(s < 0 for s in sizes):
        raise BadRequest("tftensor dimension sizes must be >= 0", reasons.INVALID_TFTENSOR)
    return sizes


def dimension_size(size: Any) -> int:
    """An int64 as protobuf's JSON parser reads one: a number or a string, never 1.5 or true."""
    if isinstance(size, bool) or (isinstance(size, float) and not size.is_integer()):
        raise ValueError(f"{size!r} is not an integer")
    return int(size)
