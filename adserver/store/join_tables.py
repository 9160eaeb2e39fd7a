"""SQL implementation of :class:`adserver.join.JoinTables`, used inside a store transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from adserver.join import StoredRow


class SQLJoinTables:
    """Rows past their expiry are invisible even before a sweep deletes them."""

    def __init__(self, cursor: sqlite3.Cursor, now: float) -> None:
        self.cursor = cursor
        self.now = now

    def rows(self, request_id: str, indexes: range) -> dict[int, StoredRow]:
        found = self.cursor.execute(
            "SELECT row, prediction, request, predicted_at, labelled FROM logged_rows "
            "WHERE request_id = ? AND expires_at > ? AND row >= ? AND row < ?",
            (request_id, self.now, indexes.start, indexes.stop),
        )
        return {row: StoredRow(p, r, at, bool(done)) for row, p, r, at, done in found}

    def save_rows(self, request_id: str, rows: dict[int, StoredRow], expires_at: float) -> None:
        self.cursor.executemany(
            "INSERT OR REPLACE INTO logged_rows VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    request_id,
                    i,
                    r.prediction,
                    r.request,
                    r.predicted_at,
                    int(r.labelled),
                    expires_at,
                )
                for i, r in rows.items()
            ],
        )

    def parked(self, request_id: str, indexes: range) -> dict[int, tuple[bytes, float]]:
        found = self.cursor.execute(
            "SELECT row, truth, arrived_at FROM parked_labels "
            "WHERE request_id = ? AND expires_at > ? AND row >= ? AND row < ?",
            (request_id, self.now, indexes.start, indexes.stop),
        )
        return {row: (truth, arrived_at) for row, truth, arrived_at in found}

    def park(
        self, request_id: str, rows: dict[int, tuple[bytes, float]], expires_at: float
    ) -> None:
        self.cursor.executemany(
            "INSERT OR REPLACE INTO parked_labels VALUES (?, ?, ?, ?, ?)",
            [(request_id, i, truth, at, expires_at) for i, (truth, at) in rows.items()],
        )

    def unpark(self, request_id: str, indexes: Sequence[int]) -> None:
        self.cursor.executemany(
            "DELETE FROM parked_labels WHERE request_id = ? AND row = ?",
            [(request_id, i) for i in indexes],
        )

    def expire(self, max_rows: int) -> dict[str, int]:
        """Drop rows past their time-to-live, then the oldest beyond ``max_rows`` per table.

        Returns how many were dropped, by what: an unlabelled prediction or a parked label that
        goes is a label that will never count, so each is reported.
        """
        dropped = {}
        for table, what in (("logged_rows", "prediction"), ("parked_labels", "label")):
            dropped[f"{what}_expired"] = self.cursor.execute(
                f"DELETE FROM {table} WHERE expires_at <= ?", (self.now,)
            ).rowcount
            excess = self.cursor.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] - max_rows
            dropped[f"{what}_evicted"] = max(excess, 0)
            if excess > 0:
                self.cursor.execute(
                    f"DELETE FROM {table} WHERE (request_id, row) IN "
                    f"(SELECT request_id, row FROM {table} ORDER BY expires_at LIMIT ?)",
                    (excess,),
                )
        return dropped
