"""How our values come back from PostgreSQL, and a numpy block goes to it, in binary.

Rows carry a vector as :func:`~cm_models.statistics.vector_bytes` (dense or sparse); a table
stores the dense float8[] (written as a JSON array, ``feedback_vector_add`` adds them); read
back, a binary float8[] is our bytes again in one numpy conversion, never a Python float per
element. A join table's numpy block goes as bytea without a copy. :func:`register` adds both to
a connection's adapters (every pooled connection's).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from psycopg import adapt, postgres
from psycopg.abc import AdaptContext, Buffer
from psycopg.pq import Format

from cm_models.statistics import vector_bytes

FLOAT8_ARRAY = postgres.types["float8"].array_oid
BYTEA = postgres.types["bytea"].oid
_HEADER = struct.Struct(">iiIii")  # dimensions, has nulls, element type, length, lower bound
_EMPTY = struct.Struct(">iiI")
#: One element of a binary float8[]: its length (8, or -1 for NULL) and its big-endian value.
_ELEMENT = np.dtype([("length", ">i4"), ("value", ">f8")])


class VectorLoader(adapt.Loader):
    """A binary float8[] as our vector bytes; NULL elements or other shapes are refused."""

    format = Format.BINARY

    def load(self, data: Buffer) -> bytes:
        dimensions, _, _ = _EMPTY.unpack_from(data)
        if dimensions == 0:
            return vector_bytes(np.empty(0))
        if dimensions != 1:
            raise ValueError(f"a vector has one dimension, not {dimensions}")
        length = _HEADER.unpack_from(data)[3]
        elements = np.frombuffer(data, _ELEMENT, length, _HEADER.size)
        if (elements["length"] != 8).any():
            raise ValueError("a vector holds NULL values")
        return vector_bytes(elements["value"].astype(np.float64))


class BlockDumper(adapt.Dumper):
    """A numpy block of a join table (:func:`adserver.state.sqlite.join_tables.encode`): its
    buffer as bytea, without a copy."""

    format = Format.BINARY
    oid = BYTEA

    def dump(self, obj: np.ndarray) -> Buffer:
        return obj.data.cast("B")


def register(context: AdaptContext) -> None:
    adapters: Any = context.adapters
    adapters.register_dumper(np.ndarray, BlockDumper)
    adapters.register_loader(FLOAT8_ARRAY, VectorLoader)
