"""The SQL functions a statistic table's vector values need: SQLite has no arrays, so a vector
is a BLOB (dense or sparse, :func:`~cm_models.statistics.vector_bytes`) that these add element by
element, in the upsert (:data:`VECTOR_ADD`) and in a span's read (:data:`VECTOR_SUM`), storing the
smaller encoding of the result.

Every connection that writes or reads statistic tables registers them (:func:`register`): the
writer's, the reader thread's read-only one, a new file's while it is migrated. Two vectors of
different widths, or bytes in neither encoding, are refused (the statement fails), never added
as far as the shorter goes.
"""

from __future__ import annotations

import sqlite3

import numpy as np

from cm_models.statistics import add_into, add_vectors, vector_array, vector_bytes

#: ``vector_add(a, b)``: the elementwise sum of two vectors (the upsert's merge of a vector).
VECTOR_ADD = "vector_add"
#: ``vector_sum(v)``: the aggregate elementwise sum of a column's vectors (a span's read).
VECTOR_SUM = "vector_sum"


def vector_add(first: bytes, second: bytes) -> bytes:
    """The upsert's merge, ``vector_add(stored, incoming)``: a few sparse elements are added
    without numpy (:func:`~cm_models.statistics.add_vectors`)."""
    return add_vectors(first, second)


class VectorSum:
    """The aggregate: one float64 array, added to in place by each row."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None

    def step(self, value: bytes) -> None:
        if self.total is None:
            self.total = vector_array(value).copy()
        else:
            add_into(self.total, value)

    def finalize(self) -> bytes | None:
        return None if self.total is None else vector_bytes(self.total)


def register(connection: sqlite3.Connection) -> sqlite3.Connection:
    """Make the vector functions known to ``connection`` (returned, for chaining)."""
    connection.create_function(VECTOR_ADD, 2, vector_add, deterministic=True)
    # typeshed's aggregate protocol takes and returns ints only; SQLite passes any value
    connection.create_aggregate(VECTOR_SUM, 1, VectorSum)  # type: ignore[arg-type]
    return connection
