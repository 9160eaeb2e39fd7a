"""The change log's payloads, PostgreSQL snapshots, and views that apply each commit once.

Every replica keeps the GLOBAL all-time state in memory (:class:`KeyedState`): its own commits
are applied right after they commit, other replicas' arrive through the ``changes`` table (one
row per committed transaction, its all-time deltas as the rows a dialect writes). A row's
``xid`` and a ``pg_snapshot`` ("xmin:xmax:xip,...") say which commits a read saw, so a commit
is applied exactly once whichever comes first: the local application or a poll that sees it.

The payload is orjson: ``[[model, segment, bucket, [[statistic, rows], ...]], ...]`` with
vector values base64 (a payload is data another process wrote: never pickle).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import orjson

from adserver.state.committer import statistic_rows
from adserver.state.view import Delta, KeyedState
from cm_models.statistics import Row, StateKey, Statistic

Changes = list[tuple[StateKey, str, list[Row]]]
Deltas = Sequence[tuple[StateKey, Delta]]


def vector_columns(statistic: Statistic[Any, Any]) -> list[int]:
    """The positions of a statistic's vector values in its rows."""
    first = len(statistic.keys)
    return [first + i for i, (_, kind) in enumerate(statistic.values) if kind == "vector"]


def encode_changes(statistics: Mapping[str, Statistic[Any, Any]], deltas: Deltas) -> bytes:
    """A transaction's all-time deltas as the rows a table would add (``decode_changes``)."""
    keys = []
    for key, delta in deltas:
        parts = []
        for name, items in delta.parts.items():
            statistic = statistics[name]
            rows = statistic_rows(statistic, items)
            vectors = vector_columns(statistic)
            if vectors:
                rows = [
                    tuple(
                        base64.b64encode(v).decode() if i in vectors else v
                        for i, v in enumerate(row)
                    )
                    for row in rows
                ]
            parts.append((name, rows))
        keys.append((key.model, key.segment, key.bucket, parts))
    return orjson.dumps(keys, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_changes(statistics: Mapping[str, Statistic[Any, Any]], payload: bytes) -> Changes:
    """The rows of a payload by key and statistic; a statistic this server does not declare
    (another replica's newer configuration) is skipped, as ``load_views`` skips its table."""
    found: Changes = []
    for model, segment, bucket, parts in orjson.loads(payload):
        key = StateKey(model, segment, bucket)
        for name, rows in parts:
            statistic = statistics.get(name)
            if statistic is None:
                continue
            vectors = vector_columns(statistic)
            if vectors:
                found.append((key, name, [vector_row(row, vectors) for row in rows]))
            else:
                found.append((key, name, list(map(tuple, rows))))
    return found


def vector_row(row: Sequence[Any], vectors: Sequence[int]) -> Row:
    return tuple(base64.b64decode(v) if i in vectors else v for i, v in enumerate(row))


class Snapshot(NamedTuple):
    """A parsed ``pg_snapshot``: every xid below ``xmin`` is finished, none at or above ``xmax``
    has started, and those in ``xip`` were in progress."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def visible(self, xid: int) -> bool:
        """As ``pg_visible_in_snapshot``: committed before the snapshot was taken (an aborted
        transaction wrote no change row, so "finished" is "committed" here)."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.xip)

    def __str__(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(map(str, sorted(self.xip)))}"


#: Own commits kept for a reload at most (their deltas, while polls fail but commits do not):
#: beyond, they are forgotten and the views must be reloaded whole before the next poll.
MAX_EXTRA = 10_000

#: The snapshot before any transaction: nothing is visible in it.
NOTHING = Snapshot(1, 1, frozenset())


class SharedViews:
    """Applies each committed transaction to ``views`` exactly once.

    Invariant: the views hold every transaction visible in :attr:`base`, plus those in
    :attr:`extra` (applied, not visible in ``base``: own commits a poll has not seen yet),
    and no other. Own commits in ``extra`` keep their deltas, so a reload (which resets the
    views to the tables as of its snapshot) puts back those its snapshot does not show.
    Polls and reloads come from one task, so neither runs while the other is half done.
    """

    def __init__(self, views: KeyedState, statistics: Mapping[str, Statistic[Any, Any]]) -> None:
        self.views = views
        self.statistics = statistics
        self.base = NOTHING
        self.extra: dict[int, Deltas] = {}
        #: An own commit set a ``last`` statistic since the last poll (see :meth:`poll`).
        self.last_dirty = False
        #: The views hold own commits no longer in :attr:`extra`: only a reload may come next.
        self.needs_reload = False
        self._lasts = frozenset(n for n, s in statistics.items() if not s.mergeable)

    def local(self, xid: int | None, deltas: Deltas) -> None:
        """An own commit (``xid`` None: it published no change row, so no poll can see it)."""
        if xid is not None:
            if self.base.visible(xid) or xid in self.extra:
                return  # a poll saw it first
            if len(self.extra) >= MAX_EXTRA:
                self.extra.clear()
                self.needs_reload = True
            self.extra[xid] = deltas
        for key, delta in deltas:
            self.views.apply(key, delta)
            self.last_dirty |= not self._lasts.isdisjoint(delta.parts)

    def poll(
        self,
        snapshot: Snapshot,
        rows: Iterable[tuple[int, bytes]],
        lasts: Callable[[KeyedState], None] | None = None,
    ) -> int:
        """``rows``: (xid, payload) of every change visible in ``snapshot`` but not in
        :attr:`base`; returns how many were applied (not already applied locally). ``lasts``
        loads the ``last`` statistics' rows as of ``snapshot``: their values are the database's
        (the last commit's), whatever order the commits reached this replica in."""
        applied = 0
        for xid, payload in rows:
            if xid in self.extra:
                continue
            for key, name, stored in decode_changes(self.statistics, payload):
                self.views.load(key, name, stored)
            applied += 1
        if lasts is not None:
            lasts(self.views)
            self.last_dirty = False
        self.advance(snapshot)
        return applied

    def reload(self, snapshot: Snapshot, loader: Callable[[KeyedState], None]) -> None:
        """Reset the views to what ``loader`` reads (the tables as of ``snapshot``), then put
        back own commits that snapshot does not show."""
        self.views.reset()
        loader(self.views)
        kept = {xid: d for xid, d in self.extra.items() if not snapshot.visible(xid)}
        self.base, self.extra = snapshot, {}
        self.needs_reload = False
        for xid, deltas in kept.items():
            self.local(xid, deltas)

    def advance(self, snapshot: Snapshot) -> None:
        self.base = snapshot
        self.extra = {x: d for x, d in self.extra.items() if not snapshot.visible(x)}
