"""Durable state in a SQLite file: deltas and seen event ids committed in one transaction.

A writer thread commits everything that arrived while the previous transaction ran (group
commit), so one fsync covers many events and the IOLoop never blocks on disk. An event is
acknowledged only after its transaction committed; a redelivered event finds its id in ``seen``
and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from adserver.errors import StartupError, Unavailable
from adserver.state import TIMER_BUCKETS, CustomMetricsState, Delta, Histogram, MetricsState
from adserver.store.base import Clock, Entry, StateStore
from adserver.store.schema import SchemaError, migrate
from cm_models.confusion import Cells

log = logging.getLogger(__name__)

STATE_FILE = "feedback-state.sqlite3"
PURGE_INTERVAL = 60.0  # seconds between sweeps of expired event ids
_Batch = tuple[Sequence[Entry], "asyncio.Future[list[bool]]"]


class StateFileError(StartupError):
    """The state file is unusable; the server refuses to start rather than start empty."""


def state_path(state_dir: str) -> Path:
    return Path(state_dir) / STATE_FILE


def reset_state(state_dir: str, clock: Clock = time.time) -> Path | None:
    """Move the state file (and its WAL) aside; returns where it went."""
    path = state_path(state_dir)
    if not path.exists():
        return None
    aside = path.with_name(f"{path.name}.reset-{int(clock())}")
    for suffix in ("", "-wal", "-shm"):
        part = Path(f"{path}{suffix}")
        if part.exists():
            part.rename(f"{aside}{suffix}")
    return aside


def open_connection(path: Path, model_name: str) -> sqlite3.Connection:
    recovery = (
        f"move it aside with --reset_state (it is kept as {path.name}.reset-<time>) "
        "or restore a backup"
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        if connection.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise StateFileError(f"state file {path} is corrupt: {recovery}")
        migrate(connection, model_name)
    except (sqlite3.DatabaseError, SchemaError) as exc:
        raise StateFileError(f"cannot use state file {path}: {exc}; {recovery}") from exc
    except OSError as exc:
        raise StateFileError(f"cannot open state file {path}: {exc}") from exc
    return connection


def load_state(connection: sqlite3.Connection, state: MetricsState) -> None:
    """Rebuild the in-memory view, so /v1/metrics continues where it stopped."""
    cells = np.array(
        connection.execute("SELECT truth, prediction, count FROM cells").fetchall(), dtype=np.int64
    ).reshape(-1, 3)
    if len(cells):
        state.confusion.add(Cells(cells[:, 0], cells[:, 1], cells[:, 2]))
    for name, label, value in connection.execute("SELECT name, label, value FROM counters"):
        state.counters[(name, label)] = value
    custom = state.custom
    for key, tags, kind, value in connection.execute(
        "SELECT key, tags, type, value FROM custom_values"
    ):
        series = (key, tuple(tuple(t) for t in json.loads(tags)))
        custom.types[key] = kind
        (custom.counters if kind == "COUNTER" else custom.gauges)[series] = value
    for key, tags, bucket, count, total in connection.execute(
        "SELECT key, tags, bucket, count, total FROM timer_buckets"
    ):
        series = (key, tuple(tuple(t) for t in json.loads(tags)))
        custom.types[key] = "TIMER"
        histogram = custom.timers.setdefault(series, Histogram())
        histogram.buckets[bucket:] += count
        histogram.count += count
        histogram.total += total


class SQLiteStore(StateStore):
    def __init__(
        self,
        state: MetricsState,
        state_dir: str,
        model_name: str,
        *,
        retention: float,
        max_ids: int,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(state)
        self.path = state_path(state_dir)
        self.retention = retention
        self.max_ids = max_ids
        self.clock = clock
        self.connection = open_connection(self.path, model_name)
        load_state(self.connection, state)
        self.seen_count = self.connection.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-writer")
        self._pending: list[_Batch] = []
        self._flushing: asyncio.Task[None] | None = None
        self._closed = False
        self._last_purge = float("-inf")

    async def commit(self, entries: Sequence[Entry]) -> list[bool]:
        if self._closed:
            raise Unavailable("the server is shutting down", "shutting_down")
        future: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        self._pending.append((entries, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        """Commit groups until nothing is pending; each group is one transaction."""
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                group, self._pending = self._pending, []
                try:
                    results = await loop.run_in_executor(self._writer, self._write, group)
                except sqlite3.Error as exc:
                    log.error("state commit failed", extra={"error": str(exc)})
                    for _, future in group:
                        future.set_exception(Unavailable("state store unavailable", "store_error"))
                    continue
                for (entries, future), applied in zip(group, results):
                    for entry, new in zip(entries, applied):
                        if new:
                            self.state.apply(entry.delta)
                    future.set_result(applied)
        finally:
            self._flushing = None

    def _write(self, group: list[_Batch]) -> list[list[bool]]:
        """Runs on the writer thread: one transaction for the whole group."""
        now = self.clock()
        cursor = self.connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            results = [
                [self._write_entry(cursor, entry, now) for entry in entries] for entries, _ in group
            ]
            self._bound_seen(cursor, now)
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        return results

    def _write_entry(self, cursor: sqlite3.Cursor, entry: Entry, now: float) -> bool:
        if entry.event_key is not None:
            cursor.execute(
                "INSERT INTO seen VALUES (?, ?, ?) ON CONFLICT (source, id) "
                "DO UPDATE SET seen_at = excluded.seen_at WHERE seen.seen_at <= ?",
                (*entry.event_key, now, now - self.retention),
            )
            if cursor.rowcount == 0:
                return False
            self.seen_count += 1
        write_delta(cursor, entry.delta)
        return True

    def _bound_seen(self, cursor: sqlite3.Cursor, now: float) -> None:
        """Forget ids past retention, and the oldest beyond ``max_ids``."""
        if self.seen_count <= self.max_ids and now - self._last_purge < PURGE_INTERVAL:
            return
        self._last_purge = now
        cursor.execute("DELETE FROM seen WHERE seen_at <= ?", (now - self.retention,))
        self.seen_count = cursor.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
        excess = self.seen_count - self.max_ids
        if excess > 0:
            cursor.execute(
                "DELETE FROM seen WHERE (source, id) IN "
                "(SELECT source, id FROM seen ORDER BY seen_at LIMIT ?)",
                (excess,),
            )
            self.seen_count -= excess

    async def close(self) -> None:
        self._closed = True
        if self._flushing is not None:
            await self._flushing
        self._writer.shutdown(wait=True)
        self.connection.close()


def write_delta(cursor: sqlite3.Cursor, delta: Delta) -> None:
    if delta.cells is not None:
        cursor.executemany(
            "INSERT INTO cells VALUES (?, ?, ?) ON CONFLICT (truth, prediction) "
            "DO UPDATE SET count = count + excluded.count",
            delta.cells.items(),
        )
    cursor.executemany(
        "INSERT INTO counters VALUES (?, ?, ?) ON CONFLICT (name, label) "
        "DO UPDATE SET value = value + excluded.value",
        delta.counters,
    )
    for metric in delta.metrics:
        family, tags = CustomMetricsState.family(metric.key), json.dumps(metric.tags)
        if metric.type == "TIMER":
            seconds = metric.value / 1000.0
            cursor.execute(
                "INSERT INTO timer_buckets VALUES (?, ?, ?, 1, ?) ON CONFLICT (key, tags, bucket) "
                "DO UPDATE SET count = count + 1, total = total + excluded.total",
                (family, tags, int(np.searchsorted(TIMER_BUCKETS, seconds)), seconds),
            )
        else:
            update = "value + excluded.value" if metric.type == "COUNTER" else "excluded.value"
            cursor.execute(
                "INSERT INTO custom_values VALUES (?, ?, ?, ?) ON CONFLICT (key, tags) "
                f"DO UPDATE SET value = {update}",
                (family, tags, metric.type, metric.value),
            )
