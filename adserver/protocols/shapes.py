"""Values plus a declared shape, as Seldon tensors and V2 tensors carry them, checked alike."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from adserver.errors import BadRequest


def shaped(values: Any, shape: Any, what: str, *, flat: bool = False) -> np.ndarray:
    """``values`` (nested row-major, or only flat if ``flat``) reshaped to ``shape``, or a 400."""
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadRequest(f"{what}.shape must be a list of sizes", "invalid_tensor")
    if not isinstance(values, list | np.ndarray):
        raise BadRequest(f"{what} values must be a list", "invalid_tensor")
    try:
        array = np.asarray(values)
    except ValueError as exc:  # ragged nesting
        raise BadRequest(f"{what} values are ragged", "invalid_tensor") from exc
    if flat and array.ndim > 1:
        raise BadRequest(f"{what} values must be a flat list", "invalid_tensor")
    if array.size != math.prod(shape):
        raise BadRequest(
            f"{what} has {array.size} values for shape {shape}", "tensor_shape_mismatch"
        )
    return array.reshape(shape)
