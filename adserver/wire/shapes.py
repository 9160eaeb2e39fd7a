"""Values plus a declared shape, as Seldon tensors and V2 tensors carry them, checked alike."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from adserver.catalogue import reasons
from adserver.errors import BadRequest

#: Most positions an empty tensor may declare before its first zero dimension: ``[n, 0]`` is n
#: empty rows, which cost the server a row each and the sender a few digits.
MAX_EMPTY_POSITIONS = 1 << 16


def shaped(values: Any, shape: Any, what: str, *, flat: bool = False) -> np.ndarray:
    """``values`` (nested row-major, or only flat if ``flat``) reshaped to ``shape``, or a 400."""
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadRequest(f"{what}.shape must be a list of sizes", reasons.INVALID_TENSOR)
    if not isinstance(values, list | np.ndarray):
        raise BadRequest(f"{what} values must be a list", reasons.INVALID_TENSOR)
    try:
        array = np.asarray(values)
    except ValueError as exc:  # ragged nesting
        raise BadRequest(f"{what} values are ragged", reasons.INVALID_TENSOR) from exc
    if flat and array.ndim > 1:
        raise BadRequest(f"{what} values must be a flat list", reasons.INVALID_TENSOR)
    if array.size != math.prod(shape):
        raise BadRequest(
            f"{what} has {array.size} values for shape {shape}", reasons.TENSOR_SHAPE_MISMATCH
        )
    bounded_if_empty(shape, what)
    try:
        return array.reshape(shape)
    except ValueError as exc:  # over 64 dimensions, or an empty one too large to represent
        raise BadRequest(f"{what}.shape {shape} is invalid: {exc}", reasons.INVALID_TENSOR) from exc


def bounded_if_empty(shape: list[int], what: str) -> None:
    """An empty tensor's rows are bounded by :data:`MAX_EMPTY_POSITIONS`, not by its values."""
    if 0 in shape and math.prod(shape[: shape.index(0)]) > MAX_EMPTY_POSITIONS:
        raise BadRequest(
            f"{what}.shape {shape} declares more than {MAX_EMPTY_POSITIONS} empty rows",
            reasons.TENSOR_TOO_LARGE,
        )
