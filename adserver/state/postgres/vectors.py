"""How our values travel to PostgreSQL and back, in binary: a vector as a dense float8[] (one
numpy conversion per value, never a Python float per element) and a numpy block as bytea.

Rows carry a vector as :func:`~cm_models.statistics.vector_bytes` (dense or sparse); a table
stores the dense array (``feedback_vector_add`` adds them); read back, a float8[] is our bytes
again. :func:`register` adds both to a connection's adapters (every pooled connection's).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from psycopg import adapt, postgres
from psycopg.abc import AdaptContext, Buffer
from psycopg.pq import Format

from cm_models.statistics import vector_array, vector_bytes

FLOAT8 = postgres.types["float8"].oid
FLOAT8_ARRAY = postgres.types["float8"].array_oid
BYTEA = postgres.types["bytea"].oid
_HEADER = struct.Struct(">iiIii")  # dimensions, has nulls, element type, length, lower bound
_EMPTY = struct.Struct(">iiI")
#: One element of a binary float8[]: its length (8, or -1 for NULL) and its big-endian value.
_ELEMENT = np.dtype([("length", ">i4"), ("value", ">f8")])


class Dense:
    """A vector value to be sent as float8[] (rows carry bytes, which would go as bytea)."""

    __slots__ = ("values",)

    def __init__(self, stored: bytes) -> None:
        self.values = vector_array(stored)


class DenseDumper(adapt.Dumper):
    format = Format.BINARY
    oid = FLOAT8_ARRAY

    def dump(self, obj: Dense) -> Buffer:
        values = obj.values
        elements = np.empty(len(values), _ELEMENT)
        elements["length"] = 8
        elements["value"] = values
        return _HEADER.pack(1, 0, FLOAT8, len(values), 1) + elements.tobytes()


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
    adapters.register_dumper(Dense, DenseDumper)
    adapters.register_dumper(np.ndarray, BlockDumper)
    adapters.register_loader(FLOAT8_ARRAY, VectorLoader)
