"""The join tables in PostgreSQL: SQLite's logic and statements (:class:`SQLJoinTables`),
restated in PostgreSQL's SQL, with one rule more for replicas: a request id is locked (a
transaction lock) before its rows are first read or written, so a prediction logged through one
replica and its label through another are joined exactly once (under READ COMMITTED, the lock's
holder sees the other's commit once it is granted)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from adserver.state.committer import RowCounts
from adserver.state.join import Kind, Logged, LoggedRows, Parked, Rows
from adserver.state.sqlite.join_tables import SQLJoinTables

STATEMENTS = (
    "FIND",
    "READ_BLOCKS",
    "INSERT_BLOCK",
    "UPSERT_PREDICTION",
    "MARK_BLOCK",
    "MARK_PREDICTION",
    "PARKED",
    "PARK",
    "UNPARK",
    "DELETE_PARKED",
    "EXPIRED_LOGGED",
    "EXPIRED_PARKED",
    "EVICTED_LOGGED",
    "EVICTED_PARKED",
    "DELETE_BLOCKS",
    "DELETE_PREDICTION",
)


def translate(query: str) -> str:
    """A join-table statement of SQLite in PostgreSQL: placeholders, and ``MAX(a, b)``."""
    query = re.sub(r":(\w+)", r"%(\1)s", query.replace("?", "%s"))
    return query.replace("MAX(", "GREATEST(")


class PostgresJoinTables(SQLJoinTables):
    """``cursor``: the dialect's pipe (statements queued until a result is read); ``lock``:
    the dialect's transaction lock on a named resource (once per transaction)."""

    def __init__(self, cursor: Any, counts: RowCounts, lock: Callable[[str], None]) -> None:
        super().__init__(cursor, counts)
        self.lock = lock

    def find(self, request_ids: Sequence[str]) -> tuple[str, Logged] | None:
        for request_id in request_ids:
            self.lock(request_id)
        return super().find(request_ids)

    def read(self, request_id: str, kind: Kind, rows: range) -> Rows:
        self.lock(request_id)
        return super().read(request_id, kind, rows)

    def predictions(self, request_id: str, rows: range) -> tuple[Rows, np.ndarray]:
        self.lock(request_id)
        return super().predictions(request_id, rows)

    def store(
        self, request_id: str, stored: Logged, logged: LoggedRows, expires_at: float
    ) -> Logged:
        self.lock(request_id)
        return super().store(request_id, stored, logged, expires_at)

    def mark_labelled(self, request_id: str, rows: np.ndarray) -> None:
        self.lock(request_id)
        super().mark_labelled(request_id, rows)

    def parked(self, request_id: str, rows: range) -> np.ndarray:
        self.lock(request_id)
        return super().parked(request_id, rows)

    def park(self, request_id: str, first_row: int, truth: Rows, parked: Parked) -> None:
        self.lock(request_id)
        super().park(request_id, first_row, truth, parked)

    def unpark(self, request_id: str, rows: range) -> list[Parked]:
        self.lock(request_id)
        return super().unpark(request_id, rows)

    def _drop_logged(
        self, found: list[tuple[str, int, int]], reason: str, dropped: Counter[str]
    ) -> None:
        """Only what this transaction deleted counts: another replica may have dropped (or
        joined) some of ``found`` since it was read, so the requests are locked first and the
        rows counted are those the delete returns."""
        ids = sorted({request_id for request_id, _, _ in found})
        for request_id in ids:
            self.lock(request_id)
        gone = self.cursor.execute(CLAIM_LOGGED, (ids,)).fetchall()
        super()._drop_logged(gone, reason, dropped)

    def _drop_parked(
        self, found: list[tuple[str, int, int]], reason: str, dropped: Counter[str]
    ) -> None:
        for request_id in sorted({request_id for request_id, _, _ in found}):
            self.lock(request_id)
        ids, firsts = [r for r, _, _ in found], [first for _, first, _ in found]
        gone = self.cursor.execute(CLAIM_PARKED, (ids, firsts)).fetchall()
        super()._drop_parked(gone, reason, dropped)


#: Delete requests (by id) and return what went, as the drops count it.
CLAIM_LOGGED = (
    "DELETE FROM predictions WHERE request_id = ANY(%s) "
    "RETURNING request_id, waiting, GREATEST(request_rows, predicted_rows)"
)
CLAIM_PARKED = (
    "DELETE FROM parked_blocks WHERE (request_id, first_row) IN "
    "(SELECT * FROM unnest(%s::text[], %s::bigint[])) RETURNING request_id, first_row, rows"
)

for _name in STATEMENTS:
    setattr(PostgresJoinTables, _name, translate(getattr(SQLJoinTables, _name)))
