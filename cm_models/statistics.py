"""Declared statistics: additive tables that a store persists, loads and merges generically.

In the manner of torchmetrics' ``add_state(name, default, dist_reduce_fx="sum")``, a
:class:`Statistic` declares a name, key columns, value columns and how two values of one key
merge (``sum``, or ``last`` for Seldon's gauges). That is all a store needs: it makes the table,
writes a delta's rows with that merge, and loads them back; merging replicas or windows is loading
more rows. Every statistic is kept per :class:`StateKey` (model, segment, time bucket).

This module imports nothing from the models, so a user's model can declare its own statistics.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, Generic, Literal, NamedTuple, TypeVar

Merge = Literal["sum", "last"]
ColumnType = Literal["int", "real", "text"]
Column = tuple[str, ColumnType]
Row = tuple[Any, ...]  # key columns, then value columns (ints, floats, strings)

Item = TypeVar("Item")  # what a delta carries for the statistic
Acc = TypeVar("Acc")  # the in-memory accumulator it is applied to

#: The bucket that starts at the beginning of time: all-time counts (the only one in use yet).
ALL_TIME = -(2**63)
#: The segment of every count until segments are routed (all of a model's traffic).
DEFAULT_SEGMENT = ""

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")


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
    ) -> None:
        for column in (name, *(c for c, _ in (*keys, *values))):
            if not _IDENTIFIER.match(column):
                raise ValueError(f"statistic {name!r}: {column!r} is not a lower-case identifier")
        if not values:
            raise ValueError(f"statistic {name!r} declares no values")
        self.name = name
        self.keys = tuple(keys)
        self.values = tuple(values)
        self.merge = merge

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


class Sums(Statistic[Row, dict[Row, Row]]):
    """The plain declared statistic: items are rows, kept as ``{key: values}``.

    ``Sums("squared_error", keys=[("truth", "int")], values=[("sum", "real"), ("rows", "int")])``
    """

    def empty(self) -> dict[Row, Row]:
        return {}

    def rows(self, items: Sequence[Row]) -> Iterable[Row]:
        return items

    def load(self, acc: dict[Row, Row], rows: Iterable[Row]) -> None:
        width = len(self.keys)
        for row in rows:
            key, values = row[:width], row[width:]
            old = acc.get(key)
            if old is not None and self.merge == "sum":
                values = tuple(a + b for a, b in zip(old, values))
            acc[key] = values
