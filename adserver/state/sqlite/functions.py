"""The SQL functions a statistic table's vector values need: SQLite has no arrays, so a vector
(little-endian float64, :data:`~cm_models.statistics.VECTOR_DTYPE`) is a BLOB that these add
element by element, in the upsert (:data:`VECTOR_ADD`) and in a span's read (:data:`VECTOR_SUM`).

Every connection that writes or reads statistic tables registers them (:func:`register`): the
writer's, the reader thread's read-only one, a new file's while it is migrated. Two vectors of
different lengths are refused (the statement fails), never added as far as the shorter goes.
"""

from __future__ import annotations

import sqlite3

import numpy as np

from cm_models.statistics import VECTOR_DTYPE

#: ``vector_add(a, b)``: the elementwise sum of two vectors (the upsert's merge of a vector).
VECTOR_ADD = "vector_add"
#: ``vector_sum(v)``: the aggregate elementwise sum of a column's vectors (a span's read).
VECTOR_SUM = "vector_sum"


def as_vector(value: bytes) -> np.ndarray:
    if not isinstance(value, bytes) or len(value) % VECTOR_DTYPE.itemsize:
        raise ValueError(f"not a vector of float64: {value!r:.40}")
    return np.frombuffer(value, dtype=VECTOR_DTYPE)


def same_length(first: np.ndarray, second: np.ndarray) -> None:
    if len(first) != len(second):
        raise ValueError(f"vectors of {len(first)} and {len(second)} values cannot be added")


def vector_add(first: bytes, second: bytes) -> bytes:
    a, b = as_vector(first), as_vector(second)
    same_length(a, b)
    return (a + b).tobytes()


class VectorSum:
    """The aggregate: one float64 array, added to in place by each row."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None

    def step(self, value: bytes) -> None:
        vector = as_vector(value)
        if self.total is None:
            self.total = vector.copy()
        else:
            same_length(self.total, vector)
            self.total += vector

    def finalize(self) -> bytes | None:
        return None if self.total is None else self.total.tobytes()


def register(connection: sqlite3.Connection) -> sqlite3.Connection:
    """Make the vector functions known to ``connection`` (returned, for chaining)."""
    connection.create_function(VECTOR_ADD, 2, vector_add, deterministic=True)
    # typeshed's aggregate protocol takes and returns ints only; SQLite passes any value
    connection.create_aggregate(VECTOR_SUM, 1, VectorSum)  # type: ignore[arg-type]
    return connection
