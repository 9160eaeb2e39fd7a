"""Declared statistics: additive tables that a store persists, loads and merges generically.

In the manner of torchmetrics' ``add_state(name, default, dist_reduce_fx="sum")``, a
:class:`Statistic` declares a name, key columns, value columns and how two values of one key
merge (``sum``, or ``last`` for Seldon's gauges). That is all a store needs: it makes the table,
writes a delta's rows with that merge, and loads them back; merging replicas or windows is loading
more rows. Every statistic is kept per :class:`StateKey` (model, segment, time bucket).

Two value kinds go beyond plain numbers: a ``vector`` column is a fixed-width array of float64
(a histogram's counts, say) that merges element by element, so one row holds what would be
hundreds (stored dense or sparse, whichever is smaller: :func:`vector_bytes`, so a histogram
of one row costs its non-zero bins, not its width); and the ``moments`` merge keeps (count,
shift, mean, M2) of a quantity, merged by Chan's formula about a shift taken from the data,
where sums of squares of raw values would cancel catastrophically (values around 1e9).
Both combine two spans into their union exactly as ``sum`` does, so they count in time buckets,
segments and replicas (:attr:`Statistic.mergeable`).

This module imports nothing from the models, so a user's model can declare its own statistics.
"""

from __future__ import annotations

import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import numpy as np

Merge = Literal["sum", "last", "moments"]
ColumnType = Literal["int", "real", "text", "vector"]
Column = tuple[str, ColumnType]
Row = tuple[Any, ...]  # key columns, then value columns (ints, floats, strings)

Item = TypeVar("Item")  # what a delta carries for the statistic
Acc = TypeVar("Acc")  # the in-memory accumulator it is applied to

#: The bucket that starts at the beginning of time: all-time counts (the only one in use yet).
ALL_TIME = -(2**63)
#: The segment of every count until segments are routed (all of a model's traffic).
DEFAULT_SEGMENT = ""

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")

#: Merges under which two spans' values combine into their union's: such a statistic counts in
#: time buckets (a window sums its buckets) and across replicas; ``last`` (a gauge) does not.
MERGEABLE: frozenset[Merge] = frozenset(("sum", "moments"))
#: The values of a ``moments`` statistic, in this order (:class:`MomentsRow`).
MOMENT_VALUES: tuple[Column, ...] = (
    ("count", "int"),
    ("shift", "real"),
    ("mean", "real"),
    ("m2", "real"),
)
#: How a vector value's elements are stored: little-endian float64.
VECTOR_DTYPE = np.dtype("<f8")
_INDEX = np.dtype("<u4")
#: The first byte of a sparse vector's bytes, then its width (see :func:`vector_bytes`).
_SPARSE = struct.Struct("<BI")
_MAGIC = 0x53  # "S"
#: Bytes of one stored element of a sparse vector: a uint32 index and a float64 value.
_ELEMENT = 12


def vector_bytes(values: np.ndarray) -> bytes:
    """A vector value as rows carry it and tables store it, in the smaller of two encodings:

    - dense: the ``width`` values as little-endian float64 (``8 x width`` bytes);
    - sparse: one byte ``S``, the width as a little-endian uint32, then the ``n`` non-zero
      elements' indices (uint32, strictly increasing) and values (float64): ``5 + 12 x n``
      bytes, chosen when that is smaller (a 200-bin histogram of one row: 17 bytes, not 1600).

    A sparse length is never a multiple of 8 and a dense one always is, so the length alone tells
    them apart: dense bytes stored before sparse ones existed read as they did. Counts up to
    2**53 are exact in float64; -0.0 is stored as 0.0.
    """
    dense = np.ascontiguousarray(values, dtype=VECTOR_DTYPE).reshape(-1)
    if _SPARSE.size + _ELEMENT * np.count_nonzero(dense) >= dense.nbytes:
        return dense.tobytes()
    (indices,) = dense.nonzero()
    return b"".join(
        (
            _SPARSE.pack(_MAGIC, dense.size),
            indices.astype(_INDEX).tobytes(),
            dense[indices].tobytes(),
        )
    )


def vector_width(stored: bytes) -> int:
    """The width of a vector's bytes in either encoding, from their length and header only;
    ``ValueError`` for bytes that are neither (:func:`vector_array` checks the rest)."""
    if not isinstance(stored, bytes):
        raise ValueError(f"a vector is bytes, not {type(stored).__name__}")
    if len(stored) % VECTOR_DTYPE.itemsize == 0:
        return len(stored) // VECTOR_DTYPE.itemsize
    if len(stored) < _SPARSE.size or (len(stored) - _SPARSE.size) % _ELEMENT:
        raise ValueError(f"neither a dense nor a sparse vector: {stored!r:.40}")
    magic, width = _SPARSE.unpack_from(stored)
    if magic != _MAGIC:
        raise ValueError(f"neither a dense nor a sparse vector: {stored!r:.40}")
    return int(width)


def vector_array(stored: bytes | np.ndarray) -> np.ndarray:
    """A vector value of a row (bytes, either encoding) or of an accumulator (already an array),
    as an array; ``ValueError`` for malformed bytes (an index out of order or past the width)."""
    if isinstance(stored, np.ndarray):
        return stored
    width = vector_width(stored)
    if len(stored) == width * VECTOR_DTYPE.itemsize:
        return np.frombuffer(stored, dtype=VECTOR_DTYPE)
    dense = np.zeros(width, dtype=VECTOR_DTYPE)
    indices, values = sparse_arrays(stored, width)
    dense[indices] = values
    return dense


def sparse_arrays(stored: bytes, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A sparse vector's indices and values as arrays; ``ValueError`` for indices out of order
    or past ``width`` (its header's, checked by :func:`vector_width`)."""
    count = (len(stored) - _SPARSE.size) // _ELEMENT
    indices = np.frombuffer(stored, _INDEX, count, _SPARSE.size)
    out_of_order = count > 1 and bool((indices[1:] <= indices[:-1]).any())
    if out_of_order or (count and indices[-1] >= width):
        raise ValueError(f"a sparse vector of width {width} with indices {indices[:8]}...")
    return indices, np.frombuffer(stored, VECTOR_DTYPE, count, _SPARSE.size + 4 * count)


#: Sparse vectors of at most this many non-zero elements each are added in Python (struct and a
#: dict): numpy's per-call overhead is what costs at a few elements.
SMALL_SPARSE = 64
_SMALL_BYTES = _SPARSE.size + _ELEMENT * SMALL_SPARSE


def sparse_elements(stored: bytes, width: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """:func:`sparse_arrays` as tuples, for a few elements: one struct call, no numpy."""
    count = (len(stored) - _SPARSE.size) // _ELEMENT
    both = struct.unpack_from(f"<{count}I{count}d", stored, _SPARSE.size)
    indices = both[:count]
    if count and (indices[-1] >= width or any(a >= b for a, b in pairwise(indices))):
        raise ValueError(f"a sparse vector of width {width} with indices {indices[:8]}...")
    return indices, both[count:]


def add_vectors(first: bytes, second: bytes) -> bytes:
    """The elementwise sum of two vectors' bytes: :func:`vector_bytes` of the numpy sum, byte
    for byte; ``ValueError`` for widths that differ or malformed bytes. A few sparse elements
    are added by index in Python (numpy's cost per call is what counts at that size): into a
    copy of the other vector if it is dense, else merged with its elements in a dict."""
    width, other = vector_width(first), vector_width(second)
    if width != other:
        raise ValueError(f"vectors of {width} and {other} values cannot be added")
    dense = width * VECTOR_DTYPE.itemsize
    if len(first) == dense == len(second):
        return vector_bytes(vector_array(first) + vector_array(second))
    if len(first) == dense:
        first, second = second, first  # float addition commutes: the sparse one first
    if len(first) > _SMALL_BYTES or (len(second) != dense and len(second) > _SMALL_BYTES):
        total = vector_array(second)  # a new array if sparse
        if len(second) == dense:
            total = total + 0.0  # a copy whose -0.0 are 0.0, as numpy's sum's
        add_into(total, first)
        return vector_bytes(total)
    if len(second) == dense:
        total = np.frombuffer(second, dtype=VECTOR_DTYPE) + 0.0
        for index, value in zip(*sparse_elements(first, width)):
            total[index] += value
        return vector_bytes(total)
    indices, values = sparse_elements(second, width)
    merged = dict(zip(indices, values))
    for index, value in zip(*sparse_elements(first, width)):
        merged[index] = merged.get(index, 0.0) + value
    return elements_bytes(width, merged)


def elements_bytes(width: int, elements: Mapping[int, float]) -> bytes:
    """:func:`vector_bytes` of the vector of ``width`` zeros but ``{index: value}``, without
    numpy (for a few elements; a zero value, -0.0 too, is left out as a zero)."""
    kept = sorted(i for i, v in elements.items() if v != 0.0)
    values = [elements[i] for i in kept]
    if _SPARSE.size + _ELEMENT * len(kept) >= width * VECTOR_DTYPE.itemsize:
        dense = [0.0] * width
        for index, value in zip(kept, values):
            dense[index] = value
        return struct.pack(f"<{width}d", *dense)
    return _SPARSE.pack(_MAGIC, width) + struct.pack(f"<{len(kept)}I{len(kept)}d", *kept, *values)


def add_into(total: np.ndarray, stored: bytes) -> None:
    """Add a vector's bytes to ``total`` in place (a sparse one by index, without a dense copy:
    its zeros are not added, so a -0.0 of ``total`` stays one); ``ValueError`` for another
    width or malformed bytes."""
    width = vector_width(stored)
    if width != total.size:
        raise ValueError(f"vectors of {total.size} and {width} values cannot be added")
    if len(stored) == width * VECTOR_DTYPE.itemsize:
        total += np.frombuffer(stored, dtype=VECTOR_DTYPE)
    else:
        indices, values = sparse_arrays(stored, width)
        total[indices] += values


class StateKey(NamedTuple):
    """What a count belongs to: a model, a segment of its traffic, a bucket of prediction time."""

    model: str
    segment: str = DEFAULT_SEGMENT
    bucket: int = ALL_TIME


class Statistic(ABC, Generic[Item, Acc]):
    """A table of values addressed by ``keys``; a delta's items become its rows.

    Subclasses say how items become rows (:meth:`rows`), what holds them in memory
    (:meth:`empty`) and how stored rows fold into it (:meth:`load`, with the declared merge).
    """

    def __init__(
        self,
        name: str,
        keys: Sequence[Column],
        values: Sequence[Column],
        merge: Merge = "sum",
        *,
        width: int = 0,
    ) -> None:
        """``width``: the length of every ``vector`` value column (and only for those)."""
        for column in (name, *(c for c, _ in (*keys, *values))):
            if not _IDENTIFIER.match(column):
                raise ValueError(f"statistic {name!r}: {column!r} is not a lower-case identifier")
        if not values:
            raise ValueError(f"statistic {name!r} declares no values")
        if any(kind == "vector" for _, kind in keys):
            raise ValueError(f"statistic {name!r}: a key cannot be a vector")
        vectors = any(kind == "vector" for _, kind in values)
        if vectors != (width > 0):
            raise ValueError(f"statistic {name!r}: vector values need a width > 0, others none")
        if vectors and merge != "sum":
            raise ValueError(f"statistic {name!r}: vectors merge by sum")
        if merge == "moments" and tuple(values) != MOMENT_VALUES:
            raise ValueError(f"statistic {name!r}: moments' values are {MOMENT_VALUES}")
        self.name = name
        self.keys = tuple(keys)
        self.values = tuple(values)
        self.merge = merge
        self.width = width

    @property
    def mergeable(self) -> bool:
        """Two spans' values combine into their union's (see :data:`MERGEABLE`)."""
        return self.merge in MERGEABLE

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @abstractmethod
    def empty(self) -> Acc:
        """A new, empty accumulator."""

    @abstractmethod
    def rows(self, items: Sequence[Item]) -> Iterable[Row]:
        """The rows (key columns, then values) that ``items`` add."""

    @abstractmethod
    def load(self, acc: Acc, rows: Iterable[Row]) -> None:
        """Fold stored rows into ``acc`` by the declared merge (also how replicas merge)."""

    def apply(self, acc: Acc, items: Sequence[Item]) -> None:
        """A committed delta's items; override when the accumulator takes them directly."""
        self.load(acc, self.rows(items))


class KeyedRows(Statistic[Row, dict[Row, Row]]):
    """Items are rows (key columns, then values), kept as ``{key: values}``; subclasses merge."""

    def empty(self) -> dict[Row, Row]:
        return {}

    def rows(self, items: Sequence[Row]) -> Iterable[Row]:
        return items


class Sums(KeyedRows):
    """The plain declared statistic: items are rows, kept as ``{key: values}``.

    ``Sums("squared_error", keys=[("truth", "int")], values=[("sum", "real"), ("rows", "int")])``

    A ``vector`` value is ``bytes`` in rows (:func:`vector_bytes`) and a float64 array in the
    accumulator.
    """

    def load(self, acc: dict[Row, Row], rows: Iterable[Row]) -> None:
        width = len(self.keys)
        vectors = [i for i, (_, kind) in enumerate(self.values) if kind == "vector"]
        for row in rows:
            key, values = row[:width], row[width:]
            if vectors:
                values = tuple(
                    vector_array(v) if i in vectors else v for i, v in enumerate(values)
                )
            old = acc.get(key)
            if old is not None and self.merge == "sum":
                values = tuple(a + b for a, b in zip(old, values))
            acc[key] = values


class MomentsRow(NamedTuple):
    """A span's moments: ``mean`` is the mean of ``value - shift`` and ``m2`` the sum of squared
    deviations from the mean. ``shift`` is a value of the data, so ``mean`` is of the order of
    the spread, and rounding it costs eps x spread, not eps x |value| (1e9 +- 1 stays exact)."""

    n: int  # the ``count`` column (a tuple's own ``count`` cannot be a field name)
    shift: float
    mean: float
    m2: float

    @property
    def center(self) -> float:
        """The span's mean."""
        return self.shift + self.mean


def moments_of(values: np.ndarray) -> MomentsRow:
    """The moments of a batch, shifted by its first value."""
    shift = float(values.flat[0])
    deviations = values - shift
    mean = float(deviations.mean())
    return MomentsRow(int(values.size), shift, mean, float(np.square(deviations - mean).sum()))


def combined_moments(first: Row, second: Row) -> MomentsRow:
    """Chan, Golub and LeVeque's pairwise update, about ``first``'s shift: the moments of the two
    spans' union. The shifts' difference is exact for nearby data (Sterbenz), so the difference
    of the means ``delta`` keeps the spread's precision."""
    a, b = MomentsRow(*first), MomentsRow(*second)
    if not a.n:
        return b
    if not b.n:
        return a
    n = a.n + b.n
    delta = (b.shift - a.shift) + (b.mean - a.mean)
    return MomentsRow(
        n,
        a.shift,
        a.mean + delta * b.n / n,
        a.m2 + b.m2 + delta * delta * a.n * b.n / n,
    )


class Moments(KeyedRows):
    """:class:`MomentsRow` per key, merged by :func:`combined_moments`: a variance that stays
    exact when the values sit far from zero (a store merges the same way, in its own SQL).

    ``Moments("truth_moments")``; items are rows of the keys then :func:`moments_of`.
    """

    def __init__(self, name: str, keys: Sequence[Column] = ()) -> None:
        super().__init__(name, keys, MOMENT_VALUES, "moments")

    def load(self, acc: dict[Row, Row], rows: Iterable[Row]) -> None:
        width = len(self.keys)
        for row in rows:
            key, values = row[:width], row[width:]
            old = acc.get(key)
            acc[key] = MomentsRow(*values) if old is None else combined_moments(old, values)
