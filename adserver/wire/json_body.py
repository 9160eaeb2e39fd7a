"""JSON bodies, with large numeric tensors decoded straight into numpy arrays.

A 1000-row one-hot batch carries two arrays of 3000 numbers. A general parser makes a Python
object of every number and numpy then copies them one at a time, together more than the whole
request costs a bare Tornado server (figures: bench/RESULTS.md). simdjson hands over such an
array as one flat machine buffer instead.

Only arrays under :data:`TENSOR_KEYS` are converted, and only when they are exactly a 1-D or 2-D
block of numbers (int64 if every number is an integer, else float64, as ``np.asarray`` infers);
everything else comes out as orjson would build it. orjson also parses small bodies (faster
there) and anything simdjson refuses, so it stays the one judge of invalid JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sized
from typing import Any, cast

import numpy as np
import orjson
import simdjson

from adserver.catalogue.wire import TENSOR_KEYS

#: Below this size orjson alone is faster than simdjson plus the conversion.
SMALL_BODY_BYTES = 1024
#: How orjson's message for valid JSON nested deeper than it parses (1024 levels) begins.
DEPTH_LIMIT_ERROR = "depth limit exceeded"


class NotFast(ValueError):
    """The document is valid JSON for all we know, but must take orjson's path."""


def loads(body: bytes | str) -> Any:
    """Like ``orjson.loads``, except that tensors may be numpy arrays instead of lists.

    Raises ``orjson.JSONDecodeError`` for invalid JSON.
    """
    raw = body.encode() if isinstance(body, str) else body
    # A \\u escape could spell a "[" that the raw text does not show (see Converted.brackets).
    if len(raw) >= SMALL_BODY_BYTES and b"\\u" not in raw:
        try:
            converted = Converted()
            document = converted.value(simdjson.Parser().parse(raw))
            if raw.count(b"[") == converted.brackets:
                return document
        except (ValueError, TypeError, RuntimeError):  # RecursionError is a RuntimeError
            pass
    return orjson.loads(body)


class Converted:
    """One conversion, and the ``[`` it accounts for.

    Every ``[`` of a JSON text opens an array or sits in a string. A tensor is accepted as 1-D or
    2-D on its first element, its row lengths and its count of numbers; only a ``[`` count that
    matches the whole text proves no row hides a nested array (``[[[1], 2], [3, 4]]``).
    """

    def __init__(self) -> None:
        self.brackets = 0

    def value(self, value: Any) -> Any:
        if isinstance(value, simdjson.Object):
            keys = list(value.keys())  # items() would convert the members before we see them
            if len(set(keys)) != len(keys):
                raise NotFast("duplicate keys: orjson keeps the last one, simdjson the first")
            return {key: self.member(key, value[key]) for key in keys}
        if isinstance(value, simdjson.Array):
            if len(value) and isinstance(value[0], simdjson.Object):  # e.g. a CloudEvents batch
                self.brackets += 1
                return [self.value(item) for item in value]
            listed = value.as_list()
            self.brackets += count_brackets(listed)
            return listed
        self.brackets += count_brackets(value)
        return value

    def member(self, key: str, member: Any) -> Any:
        self.brackets += key.count("[")
        if key in TENSOR_KEYS and isinstance(member, simdjson.Array):
            tensor = numeric_block(member)
            if tensor is not None:
                self.brackets += 1 + (tensor.shape[0] if tensor.ndim == 2 else 0)
                return tensor
        return self.value(member)


def count_brackets(value: Any) -> int:
    if isinstance(value, str):
        return value.count("[")
    if isinstance(value, list):
        return 1 + sum(count_brackets(item) for item in value)
    if isinstance(value, dict):
        return sum(count_brackets(k) + count_brackets(v) for k, v in value.items())
    return 0


def numeric_block(array: simdjson.Array) -> np.ndarray | None:
    """``array`` as numpy if it looks like a 1-D or 2-D block of numbers, else None.

    "Looks like": nested arrays inside rows are only excluded by the caller's ``[`` count.
    """
    rows = len(array)
    if rows == 0:
        return None
    first = array[0]
    if isinstance(first, simdjson.Array):
        shape: tuple[int, ...] = (rows, len(first))
        if not shape[1]:
            return None
    elif isinstance(first, int | float) and not isinstance(first, bool):
        shape = (rows,)
    else:
        return None
    flat = flat_numbers(array)
    if flat is None or flat.size != math.prod(shape):
        return None
    if len(shape) == 2:
        try:
            if set(map(len, cast(Iterable[Sized], array))) != {shape[1]}:  # ragged rows
                return None
        except TypeError:  # a number among the rows
            return None
    return flat.reshape(shape)


def flat_numbers(array: simdjson.Array) -> np.ndarray | None:
    """Every number of ``array`` (nesting flattened): int64 if all are integers, else float64."""
    try:
        return np.frombuffer(array.as_buffer(of_type="i"), dtype=np.int64)
    except TypeError:  # not all integers
        pass
    except (ValueError, RuntimeError):  # an integer outside int64: leave it to Python
        return None
    try:
        return np.frombuffer(array.as_buffer(of_type="d"), dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):  # not all numbers
        return None
