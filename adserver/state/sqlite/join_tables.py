"""SQL implementation of :class:`adserver.state.join.JoinTables`, used inside a store transaction.

A logged event's rows are kept as a few blocks of consecutive rows (about ``BLOCK_BYTES`` each):
numbers as the raw bytes of a numpy array with its dtype and row shape, anything else as one JSON
array. A label reads and rewrites only the blocks its rows fall in, and each response block
carries one bit per row saying whether that row has its label. Parked labels are blocks too, one
per label (or per run of its rows that waits). Blocks of one request never overlap, so the
blocks a range of rows touches are found by one index range.

Row counts are kept in :class:`RowCounts`, updated with every change (never counted in SQL),
so bounds are checked for free and trimming deletes by an indexed order in bounded batches.
The counts are stored too, as tallies (see :mod:`adserver.state.committer`).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import orjson

from adserver.catalogue.families import (
    LABEL_EVICTED,
    LABEL_EXPIRED,
    PREDICTION_EVICTED,
    PREDICTION_EXPIRED,
)
from adserver.state.committer import RowCounts
from adserver.state.join import Kind, Logged, LoggedRows, Parked, Rows, Segment
from adserver.state.view import merge_segments

BLOCK_BYTES = 1 << 16  # rows per block of numbers: as many as fit (at least one)
JSON_BLOCK_ROWS = 256  # rows per block of other data
JSON = "json"  # the codec of blocks that are not numbers

# The columns every block has, and how to find the blocks of one request that overlap rows
# start .. stop (the last block starting at or before start, and those starting before stop).
BLOCK = "first_row, rows, codec, shape"


def overlapping(table: str, key: str) -> str:
    return (
        f"WHERE {key} AND first_row < :stop AND first_row + rows > :start AND first_row >= "
        f"COALESCE((SELECT first_row FROM {table} WHERE {key} AND first_row <= :start "
        "ORDER BY first_row DESC LIMIT 1), :start) ORDER BY first_row"
    )


LOGGED_KEY = "request_id = :request_id AND kind = :kind"
IN_LOGGED = overlapping("logged_blocks", LOGGED_KEY)
IN_PARKED = overlapping("parked_blocks", "request_id = :request_id")


def encode(rows: Rows) -> tuple[str, bytes | None, object]:
    """(codec, row shape, data) of a block: an array's own buffer, or one JSON document (whose
    rows may hold arrays: a large body's tensors are parsed into numpy, inside objects too)."""
    if isinstance(rows, np.ndarray):
        return rows.dtype.str, orjson.dumps(rows.shape[1:]), np.ascontiguousarray(rows)
    return JSON, None, orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY)


def decode(rows: int, codec: str, shape: bytes | None, data: bytes) -> Rows:
    if codec == JSON:
        return orjson.loads(data)
    return np.frombuffer(data, dtype=codec).reshape(rows, *orjson.loads(shape or b"[]"))


def blocks(rows: Rows) -> Iterator[tuple[int, Rows]]:
    """(first row, rows) of consecutive blocks covering ``rows``."""
    if isinstance(rows, np.ndarray):
        size = max(1, BLOCK_BYTES // max(rows.nbytes // max(len(rows), 1), 1))
    else:
        size = JSON_BLOCK_ROWS
    for start in range(0, len(rows), size):
        yield start, rows[start : start + size]


def logged_block(request_id: str, kind: Kind, first: int, rows: Rows) -> tuple[object, ...]:
    """A row of ``logged_blocks``; a response's rows start without labels."""
    codec, shape, data = encode(rows)
    labelled = bytes(-(-len(rows) // 8)) if kind == "response" else None  # all bits 0
    return (request_id, kind, first, len(rows), codec, shape, labelled, data)


def concat(parts: list[Rows]) -> Rows:
    if parts and isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [row for part in parts for row in part]


def encode_segment(segment: Segment) -> bytes | None:
    """A stored segment: its values as one JSON array (NULL for none)."""
    return orjson.dumps(segment) if segment else None


def decode_segment(data: bytes | str | None) -> Segment:
    return tuple(orjson.loads(data)) if data else ()


def bits(mask: np.ndarray) -> bytes:
    return np.packbits(mask, bitorder="little").tobytes()


def unbits(data: bytes, rows: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, np.uint8), count=rows, bitorder="little").astype(bool)


class SQLJoinTables:
    """The join tables in one transaction. The statements are class attributes (SQLite's
    dialect of SQL) so that another backend's subclass states only how its SQL differs."""

    FIND = (
        "SELECT request_rows, predicted_rows, predicted_at, segment FROM predictions "
        "WHERE request_id = ?"
    )
    READ_BLOCKS = f"SELECT {BLOCK}, labelled, data FROM logged_blocks {IN_LOGGED}"
    INSERT_BLOCK = "INSERT INTO logged_blocks VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    UPSERT_PREDICTION = (
        "INSERT INTO predictions (request_id, request_rows, predicted_rows, predicted_at, "
        "waiting, open, expires_at, segment) VALUES (:id, :request_rows, :predicted_rows, "
        ":at, :predicted_rows, TRUE, :expires_at, :segment) ON CONFLICT (request_id) DO UPDATE "
        "SET request_rows = :request_rows, predicted_rows = :predicted_rows, "
        "predicted_at = :at, waiting = predictions.waiting + :predicted_rows - "
        "predictions.predicted_rows, expires_at = :expires_at, segment = :segment"
    )
    MARK_BLOCK = (
        "UPDATE logged_blocks SET labelled = ? "
        "WHERE request_id = ? AND kind = 'response' AND first_row = ?"
    )
    MARK_PREDICTION = (
        "UPDATE predictions SET waiting = waiting - :n, open = waiting - :n > 0 "
        "WHERE request_id = :id"
    )
    PARKED = f"SELECT first_row, rows FROM parked_blocks {IN_PARKED}"
    PARK = (
        "INSERT INTO parked_blocks (request_id, first_row, rows, codec, shape, data, "
        "arrived_at, expires_at, segment) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    UNPARK = f"SELECT {BLOCK}, data, arrived_at, expires_at, segment FROM parked_blocks {IN_PARKED}"
    DELETE_PARKED = "DELETE FROM parked_blocks WHERE request_id = ? AND first_row = ?"
    EXPIRED_LOGGED = (
        "SELECT request_id, waiting, MAX(request_rows, predicted_rows) FROM predictions "
        "WHERE expires_at <= ? ORDER BY expires_at LIMIT ?"
    )
    EXPIRED_PARKED = (
        "SELECT request_id, first_row, rows FROM parked_blocks WHERE expires_at <= ? "
        "ORDER BY expires_at LIMIT ?"
    )
    EVICTED_LOGGED = (
        "SELECT request_id, waiting, MAX(request_rows, predicted_rows) FROM predictions "
        "ORDER BY open, expires_at LIMIT ?"
    )
    EVICTED_PARKED = (
        "SELECT request_id, first_row, rows FROM parked_blocks ORDER BY expires_at LIMIT ?"
    )
    DELETE_BLOCKS = "DELETE FROM logged_blocks WHERE request_id = ?"
    DELETE_PREDICTION = "DELETE FROM predictions WHERE request_id = ?"

    def __init__(self, cursor: sqlite3.Cursor, counts: RowCounts) -> None:
        self.cursor = cursor
        self.counts = counts
        self._read: tuple[str, range, list[tuple[int, int, bytes]]] = ("", range(0), [])

    def find(self, request_ids: Sequence[str]) -> tuple[str, Logged] | None:
        for request_id in request_ids:
            found = self.cursor.execute(self.FIND, (request_id,)).fetchone()
            if found is not None:
                request_rows, predicted_rows, predicted_at, segment = found
                return request_id, Logged(
                    request_rows, predicted_rows, predicted_at, decode_segment(segment)
                )
        return None

    def read(self, request_id: str, kind: Kind, rows: range) -> Rows:
        return self._read_blocks(request_id, kind, rows)[0]

    def predictions(self, request_id: str, rows: range) -> tuple[Rows, np.ndarray]:
        values, found = self._read_blocks(request_id, "response", rows)
        self._read = (request_id, rows, found)  # the blocks mark_labelled then rewrites
        mask = np.concatenate([unbits(bits, count) for _, count, bits in found])
        start = rows.start - found[0][0]
        return values, mask[start : start + len(rows)]

    def _read_blocks(
        self, request_id: str, kind: Kind, rows: range
    ) -> tuple[Rows, list[tuple[int, int, bytes]]]:
        """Rows ``rows`` of one kind, and (first row, rows, labelled bits) of their blocks."""
        key = {"request_id": request_id, "kind": kind, "start": rows.start, "stop": rows.stop}
        found = self.cursor.execute(self.READ_BLOCKS, key).fetchall()
        values = concat(
            [decode(count, codec, shape, data) for _, count, codec, shape, _, data in found]
        )
        start = rows.start - found[0][0]
        blocks = [(first, count, bits) for first, count, _, _, bits, _ in found]
        return values[start : start + len(rows)], blocks

    def store(
        self, request_id: str, stored: Logged, logged: LoggedRows, expires_at: float
    ) -> Logged:
        kind, rows = logged.kind, logged.rows
        self.cursor.executemany(
            self.INSERT_BLOCK,
            [logged_block(request_id, kind, first, block) for first, block in blocks(rows)],
        )
        before = stored
        after = (
            Logged(
                before.request_rows,
                len(rows),
                logged.time,
                merge_segments(logged.segment, before.segment),
            )
            if kind == "response"
            else Logged(
                len(rows),
                before.predicted_rows,
                before.predicted_at,
                merge_segments(before.segment, logged.segment),
            )
        )
        self.cursor.execute(
            self.UPSERT_PREDICTION,
            {
                "id": request_id,
                "request_rows": after.request_rows,
                "predicted_rows": after.predicted_rows,
                "at": after.predicted_at,
                "expires_at": expires_at,
                "segment": encode_segment(after.segment),
            },
        )
        self.counts.logged += max(after.request_rows, after.predicted_rows) - max(
            before.request_rows, before.predicted_rows
        )
        return after

    def mark_labelled(self, request_id: str, rows: np.ndarray) -> None:
        span = range(int(rows[0]), int(rows[-1]) + 1)
        read_id, read_rows, found = self._read
        if read_id != request_id or span.start < read_rows.start or span.stop > read_rows.stop:
            found = self._read_blocks(request_id, "response", span)[1]
        updates = []
        for first, count, data in found:
            mask = unbits(data, count)
            lo, hi = np.searchsorted(rows, (first, first + count))
            mask[rows[lo:hi] - first] = True
            updates.append((bits(mask), request_id, first))
        self.cursor.executemany(self.MARK_BLOCK, updates)
        self.cursor.execute(self.MARK_PREDICTION, {"n": len(rows), "id": request_id})

    def parked(self, request_id: str, rows: range) -> np.ndarray:
        mask = np.zeros(len(rows), bool)
        key = {"request_id": request_id, "start": rows.start, "stop": rows.stop}
        for first, count in self.cursor.execute(self.PARKED, key):
            mask[max(first - rows.start, 0) : first + count - rows.start] = True
        return mask

    def park(self, request_id: str, first_row: int, truth: Rows, parked: Parked) -> None:
        self.cursor.execute(
            self.PARK,
            (
                request_id,
                first_row,
                len(truth),
                *encode(truth),
                parked.arrived_at,
                parked.expires_at,
                encode_segment(parked.segment),
            ),
        )
        self.counts.parked += len(truth)

    def unpark(self, request_id: str, rows: range) -> list[Parked]:
        key = {"request_id": request_id, "start": rows.start, "stop": rows.stop}
        found = self.cursor.execute(self.UNPARK, key).fetchall()
        if not found:
            return []
        self.cursor.executemany(self.DELETE_PARKED, [(request_id, first) for first, *_ in found])
        self.counts.parked -= sum(count for _, count, *_ in found)
        return [
            Parked(first, decode(count, codec, shape, data), arrived, expires, decode_segment(seg))
            for first, count, codec, shape, data, arrived, expires, seg in found
        ]

    def expire(self, now: float, batch: int, dropped: Counter[str]) -> bool:
        """Drop up to ``batch`` logged requests and parked labels past their time to live.

        Returns whether a batch was full (more may be left). What goes is added to ``dropped``:
        a prediction row still waiting for its label, or a parked label, is a label that will
        never count.
        """
        logged = self.cursor.execute(self.EXPIRED_LOGGED, (now, batch)).fetchall()
        self._drop_logged(logged, PREDICTION_EXPIRED, dropped)
        parked = self.cursor.execute(self.EXPIRED_PARKED, (now, batch)).fetchall()
        self._drop_parked(parked, LABEL_EXPIRED, dropped)
        return len(logged) == batch or len(parked) == batch

    def evict(self, max_rows: int, batch: int, dropped: Counter[str]) -> None:
        """Above ``max_rows``, drop whole logged requests, those whose rows all have their label
        first, then the oldest; and the oldest parked labels. At most ``batch`` of each."""
        if self.counts.logged > max_rows:
            chosen = self._covering(self.EVICTED_LOGGED, batch, self.counts.logged - max_rows)
            self._drop_logged(chosen, PREDICTION_EVICTED, dropped)
        if self.counts.parked > max_rows:
            chosen = self._covering(self.EVICTED_PARKED, batch, self.counts.parked - max_rows)
            self._drop_parked(chosen, LABEL_EVICTED, dropped)

    def _covering(self, query: str, batch: int, excess: int) -> list[tuple[str, int, int]]:
        """The first of ``query``'s (at most ``batch``) rows whose row counts (the last column)
        add up to ``excess``: what to drop to get back to the bound."""
        chosen = []
        for found in self.cursor.execute(query, (batch,)):
            chosen.append(found)
            excess -= found[2]
            if excess <= 0:
                break
        return chosen

    def _drop_logged(
        self, found: list[tuple[str, int, int]], reason: str, dropped: Counter[str]
    ) -> None:
        ids = [(request_id,) for request_id, _, _ in found]
        self.cursor.executemany(self.DELETE_BLOCKS, ids)
        self.cursor.executemany(self.DELETE_PREDICTION, ids)
        self.counts.logged -= sum(rows for _, _, rows in found)
        dropped[reason] += sum(waiting for _, waiting, _ in found)

    def _drop_parked(
        self, found: list[tuple[str, int, int]], reason: str, dropped: Counter[str]
    ) -> None:
        self.cursor.executemany(
            self.DELETE_PARKED, [(request_id, first) for request_id, first, _ in found]
        )
        rows = sum(rows for _, _, rows in found)
        self.counts.parked -= rows
        dropped[reason] += rows
