"""State in SQLite: deltas, seen event ids and logged rows committed in one transaction.

Durable mode keeps a WAL file under ``--state_dir``; a writer thread commits everything that
arrived while the previous transaction ran (group commit), so one fsync covers many events and
the IOLoop never waits on disk. Memory mode runs the very same SQL on an in-memory database on
the IOLoop (no I/O), so both modes share one implementation and one behaviour. An event is
acknowledged only after its transaction committed; a redelivered event finds its id in ``seen``
and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from adserver.catalogue import reasons
from adserver.catalogue.families import (
    EVENTS_DUPLICATE,
    EVICTED,
    EXPIRED,
    LABEL_EVICTED,
    LABEL_EXPIRED,
    LABELS,
    METRICS_REJECTED,
)
from adserver.errors import BadRequest, RequestError, StartupError, Unavailable
from adserver.state.join import Joiner, Scores, Unscored
from adserver.state.view import (
    DELAY_BUCKETS,
    TIMER_BUCKETS,
    Delta,
    Histogram,
    MetricsState,
    bucket_index,
)
from adserver.state.store import Clock, Entry, StateStore
from adserver.state.sqlite.join_tables import RowCounts, SQLJoinTables
from adserver.state.sqlite.lock import hold_state_lock
from adserver.state.sqlite.schema import SchemaError, migrate
from cm_models.base import InvalidFeedback
from cm_models.confusion import Cells
from cm_models.custom_metrics import MetricCatalog, family_name

log = logging.getLogger(__name__)

STATE_FILE = "feedback-state.sqlite3"
PURGE_INTERVAL = 60.0  # seconds between sweeps of expired ids and rows
# Most seen ids, logged requests and parked labels one commit deletes per table: a sweep that
# finds more goes on at the next commit, so no transaction does work that grew with history.
PURGE_BATCH = 1000
# Seen ids are trimmed to this fraction of --dedup_max_ids under the bound (1/1000: 1000 ids at
# the default), so a full table pays one batched delete per thousand events, not one per event.
TRIM_SLACK_DIVISOR = 1000
BatchResult = list[bool] | RequestError  # per batch: applied flags, or why it failed
_Batch = tuple[Sequence[Entry], Scores | None, "asyncio.Future[list[bool]]"]


class StateFileError(StartupError):
    """The state file is unusable; the server refuses to start rather than start empty."""


def state_path(state_dir: str) -> Path:
    return Path(state_dir) / STATE_FILE


def reset_state(state_dir: str, clock: Clock = time.time) -> Path | None:
    """Move the state file (and its WAL) aside; returns where it went.

    Never under a running server: the lock is taken first (and kept, for the server to open).
    """
    path = state_path(state_dir)
    hold_state_lock(path)
    if not path.exists():
        return None
    aside = path.with_name(f"{path.name}.reset-{int(clock())}")
    for suffix in ("", "-wal", "-shm"):
        part = Path(f"{path}{suffix}")
        if part.exists():
            part.rename(f"{aside}{suffix}")
    return aside


def open_connection(
    path: Path | None, model_name: str, model_kind: str | None = None
) -> sqlite3.Connection:
    """A migrated connection to ``path``, or to a private temporary database for None.

    The temporary database (memory mode) keeps at most SQLite's page cache (2 MB) in the
    process and spills the rest to an unlinked file that is gone when the process is: remembered
    event ids (about 75 B each, up to ``--dedup_max_ids``) then do not grow the heap, where
    ``":memory:"`` held every one of them.

    A state file is opened only under the state directory's lock (one server per file). A new
    one is built beside it and renamed into place, so an existing file is never legitimately
    empty: a 0-byte file (truncated, or a failed copy) is refused like any corrupt file, where
    SQLite would take it for a new database and start from zero without a word.
    """
    if path is None:
        connection = sqlite3.connect("", isolation_level=None)
        connection.execute("PRAGMA journal_mode=MEMORY")  # nothing to recover after a crash
        connection.execute("PRAGMA synchronous=OFF")
        create_spill_file(connection)
        migrate(connection, model_name, model_kind)
        return connection
    recovery = (
        f"move it aside with --reset_state (it is kept as {path.name}.reset-<time>) "
        "or restore a backup"
    )
    hold_state_lock(path)
    try:
        if not path.exists():
            create_state_file(path, model_name, model_kind)
        elif path.stat().st_size == 0:
            raise StateFileError(f"state file {path} is empty (0 bytes): {recovery}")
        connection = connect_durable(path)
        if connection.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise StateFileError(f"state file {path} is corrupt: {recovery}")
        migrate(connection, model_name, model_kind)
    except (sqlite3.DatabaseError, SchemaError) as exc:
        raise StateFileError(f"cannot use state file {path}: {exc}; {recovery}") from exc
    except OSError as exc:
        raise StateFileError(f"cannot open state file {path}: {exc}") from exc
    return connection


def connect_durable(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    return connection


def create_state_file(path: Path, model_name: str, model_kind: str | None) -> None:
    """A complete, migrated file appears at ``path`` at once, or nothing does."""
    draft = path.with_name(path.name + ".new")
    for suffix in ("", "-wal", "-shm"):  # left by a crash during a previous creation
        Path(f"{draft}{suffix}").unlink(missing_ok=True)
    connection = connect_durable(draft)
    try:
        migrate(connection, model_name, model_kind)
    finally:
        connection.close()  # the last connection checkpoints the WAL into the file
    os.replace(draft, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def create_spill_file(connection: sqlite3.Connection) -> None:
    """Make SQLite create its temporary file now, so that a missing writable directory fails
    start-up rather than a commit once the cache fills up (hours later, under load)."""
    cache_size = connection.execute("PRAGMA cache_size").fetchone()[0]
    try:
        connection.execute("PRAGMA cache_size=1")
        connection.execute("BEGIN")
        connection.execute("CREATE TABLE spill_probe (b BLOB)")
        connection.executemany("INSERT INTO spill_probe VALUES (?)", [(bytes(4096),)] * 8)
        connection.execute("ROLLBACK")
    except sqlite3.Error as exc:
        connection.close()
        raise StateFileError(
            f"memory mode spills remembered event ids to a temporary file and cannot create one "
            f"({exc}): make SQLITE_TMPDIR, TMPDIR, /var/tmp or /tmp writable"
        ) from exc
    connection.execute(f"PRAGMA cache_size={int(cache_size)}")


def series(key: str, tags: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return key, tuple(tuple(t) for t in json.loads(tags))


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
        custom.types[key] = kind
        (custom.counters if kind == "COUNTER" else custom.gauges)[series(key, tags)] = value
    for key, tags, bucket, count, total in connection.execute(
        "SELECT key, tags, bucket, count, total FROM timer_buckets"
    ):
        custom.types[key] = "TIMER"
        custom.timers.setdefault(series(key, tags), Histogram()).add(bucket, count, total)
    for bucket, count, total in connection.execute("SELECT bucket, count, total FROM label_delay"):
        state.label_delay.add(bucket, count, total)


class SQLiteStore(StateStore):
    def __init__(
        self,
        state: MetricsState,
        state_dir: str | None,
        model_name: str,
        *,
        model_kind: str | None = None,
        retention: float,
        max_ids: int,
        joiner: Joiner | None = None,
        join_max_rows: int = 1_000_000,
        max_classes: int = 1000,
        reserved_prefixes: tuple[str, ...] = (),
        max_custom_series: int | None = None,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(state)
        self.durable = state_dir is not None
        self.retention = retention
        self.max_ids = max_ids
        self.joiner = joiner
        self.join_max_rows = join_max_rows
        self.clock = clock
        self.connection = open_connection(
            state_path(state_dir) if state_dir is not None else None, model_name, model_kind
        )
        load_state(self.connection, state)
        # Owned by whoever writes (the writer thread, or the IOLoop in memory mode), so custom
        # metric types are decided in commit order, identically in the file and in memory.
        self.catalog = MetricCatalog(reserved_prefixes, max_custom_series)
        custom = state.custom
        self.catalog.load(custom.types, [*custom.counters, *custom.gauges, *custom.timers])
        self.classes = set(state.confusion.classes)
        self._class_journal: list[int] = []  # classes in the order they were admitted
        self.max_classes = max_classes
        # Counted once here; from now on every change keeps the counts (never COUNT(*) again).
        self.seen_count = self.connection.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
        self.row_counts = RowCounts.load(self.connection.cursor())
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-writer")
        self._pending: list[_Batch] = []
        self._flushing: asyncio.Task[None] | None = None
        self._closed = False
        self._last_purge = float("-inf")

    async def commit(self, entries: Sequence[Entry]) -> list[bool]:
        """A join whose model may not run in the transaction (a user's) is written once to
        learn what it scores, rolled back, scored here on the IOLoop, and written again."""
        scores = self.joiner.scores(len(entries)) if self.joiner is not None else None
        while True:
            try:
                return await self._commit(entries, scores)
            except Unscored:
                if scores is None or not scores.score():
                    raise

    async def _commit(self, entries: Sequence[Entry], scores: Scores | None) -> list[bool]:
        if self._closed:
            raise Unavailable("the server is shutting down", reasons.SHUTTING_DOWN)
        if not self.durable:
            try:
                written = self._write([(entries, scores)])
            except sqlite3.Error as exc:
                log.exception("state commit failed")
                raise Unavailable("state store unavailable", reasons.STORE_ERROR) from exc
            outcome = self._settle(*written)[0]
            if isinstance(outcome, RequestError):
                raise outcome
            return outcome
        future: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        self._pending.append((entries, scores, future))
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
                    written = await loop.run_in_executor(
                        self._writer,
                        self._write,
                        [(entries, scores) for entries, scores, _ in group],
                    )
                    outcomes = self._settle(*written)
                except Exception:  # never leave a sender hanging: 503, and it retries
                    log.exception("state commit failed")
                    for *_, future in group:
                        future.set_exception(
                            Unavailable("state store unavailable", reasons.STORE_ERROR)
                        )
                    continue
                for (*_, future), outcome in zip(group, outcomes):
                    if isinstance(outcome, RequestError):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._flushing = None

    def _settle(self, outcomes: list[BatchResult], deltas: list[Delta]) -> list[BatchResult]:
        """After commit: apply the committed deltas to the in-memory view, in commit order."""
        for delta in deltas:
            self.state.apply(delta)
        return outcomes

    def _write(
        self, batches: list[tuple[Sequence[Entry], Scores | None]]
    ) -> tuple[list[BatchResult], list[Delta]]:
        """One transaction for all batches; a batch that fails is rolled back alone."""
        now = self.clock()
        cursor = self.connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        start = self._mark()
        outcomes: list[BatchResult] = []
        deltas: list[Delta] = []
        try:
            housekeeping = self._housekeeping(cursor, now)
            if housekeeping is not None:
                self._persist(cursor, housekeeping)
                deltas.append(housekeeping)
            isolate = len(batches) > 1  # a lone batch that fails rolls back the whole transaction
            for entries, scores in batches:
                if isolate:
                    cursor.execute("SAVEPOINT batch")
                mark = self._mark()
                try:
                    # Unscored (scores to compute outside): rolled back like a refused batch
                    with scores.attempt() if scores else contextlib.nullcontext():
                        applied, batch_deltas = self._write_batch(cursor, entries, now, scores)
                except (RequestError, InvalidFeedback) as exc:
                    if not isolate:
                        cursor.execute("ROLLBACK")
                        self._undo(start)
                        return [as_request_error(exc)], []
                    cursor.execute("ROLLBACK TO batch")
                    self._undo(mark)
                    outcomes.append(as_request_error(exc))
                else:
                    outcomes.append(applied)
                    deltas += batch_deltas
                if isolate:
                    cursor.execute("RELEASE batch")
            cursor.execute("COMMIT")
        except BaseException:
            try:
                if self.connection.in_transaction:  # SQLite may have rolled back already
                    cursor.execute("ROLLBACK")
            finally:
                self._undo(start)
            raise
        return outcomes, deltas

    def _mark(self) -> tuple[int, int, int, float, RowCounts]:
        """What the writer keeps beside the database, to put back if a rollback happens."""
        counts = self.row_counts.copy()
        return (
            len(self._class_journal),
            self.catalog.mark(),
            self.seen_count,
            self._last_purge,
            counts,
        )

    def _undo(self, mark: tuple[int, int, int, float, RowCounts]) -> None:
        classes, catalog, self.seen_count, self._last_purge, counts = mark
        self.row_counts = counts.copy()
        while len(self._class_journal) > classes:
            self.classes.discard(self._class_journal.pop())
        self.catalog.rollback(catalog)

    def _write_batch(
        self, cursor: sqlite3.Cursor, entries: Sequence[Entry], now: float, scores: Scores | None
    ) -> tuple[list[bool], list[Delta]]:
        applied, deltas = [], []
        for entry in entries:
            new = entry.event_key is None or self._first_sighting(cursor, entry.event_key, now)
            applied.append(new)
            delta = entry.delta if new else Delta(counters=((EVENTS_DUPLICATE, "", 1),))
            if new and entry.operation is not None:
                if self.joiner is None or scores is None:
                    raise BadRequest("this model cannot join labels", reasons.JOIN_UNSUPPORTED)
                tables = SQLJoinTables(cursor, self.row_counts)
                delta = delta + self.joiner.apply(tables, entry.operation, now, scores)
            if delta.cells is not None:
                self._check_classes(delta.cells)
            delta = self._admit_metrics(delta)
            self._persist(cursor, delta)
            deltas.append(delta)
        return applied, deltas

    def _persist(self, cursor: sqlite3.Cursor, delta: Delta) -> None:
        """Counts go to the file; in memory mode :class:`MetricsState` is their only home (the
        count tables of an in-memory database would only ever be written)."""
        if self.durable:
            write_delta(cursor, delta)

    def _check_classes(self, cells: Cells) -> None:
        """The matrix is dense (classes squared): refuse an event that would grow it too far."""
        new = {*cells.truth.tolist(), *cells.prediction.tolist()} - self.classes
        if len(self.classes) + len(new) > self.max_classes:
            raise BadRequest(
                f"the event would make {len(self.classes) + len(new)} classes; at most "
                f"{self.max_classes} are kept (--max_classes)",
                reasons.TOO_MANY_CLASSES,
            )
        self.classes |= new
        self._class_journal += new

    def _admit_metrics(self, delta: Delta) -> Delta:
        """Drop custom metrics whose family clashes or that exceed the series cap; count them."""
        if not delta.metrics:
            return delta
        kept, refused = self.catalog.admit(delta.metrics)
        if not refused:
            return delta
        counters = (*delta.counters, (METRICS_REJECTED, "", refused))
        return dataclasses.replace(delta, metrics=tuple(kept), counters=counters)

    def _first_sighting(self, cursor: sqlite3.Cursor, key: tuple[str, str], now: float) -> bool:
        """Record the event key; False if it was seen within the retention window.

        Only a new row counts in ``seen_count``: an id back after its retention (not purged
        yet) is new to the counts but keeps its one row.
        """
        cursor.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)", (*key, now))
        if cursor.rowcount:
            self.seen_count += 1
            return True
        cursor.execute(
            "UPDATE seen SET seen_at = ? WHERE source = ? AND id = ? AND seen_at <= ?",
            (now, *key, now - self.retention),
        )
        return cursor.rowcount > 0

    def _housekeeping(self, cursor: sqlite3.Cursor, now: float) -> Delta | None:
        """Before each commit, work bounded by what came since: trim what is over a bound (the
        oldest first); every ``PURGE_INTERVAL``, forget ids and rows past their time to live."""
        dropped: Counter[str] = Counter()
        tables = SQLJoinTables(cursor, self.row_counts)
        if self.seen_count > self.max_ids:
            # Down to a little under the bound: one statement trims for the next many commits.
            excess = self.seen_count - self.max_ids + self.max_ids // TRIM_SLACK_DIVISOR
            self._forget_ids(cursor, "", (), min(excess, PURGE_BATCH))
        if now - self._last_purge >= PURGE_INTERVAL:
            forgotten = self._forget_ids(
                cursor, "WHERE seen_at <= ?", (now - self.retention,), PURGE_BATCH
            )
            if not tables.expire(now, PURGE_BATCH, dropped) and forgotten < PURGE_BATCH:
                self._last_purge = now  # else more is due: the next commit goes on
        tables.evict(self.join_max_rows, PURGE_BATCH, dropped)
        counters = [(EVICTED, reason, n) for reason, n in dropped.items() if n]
        labels_lost = dropped[LABEL_EXPIRED] + dropped[LABEL_EVICTED]
        if labels_lost:
            counters.append((LABELS, EXPIRED, labels_lost))
        return Delta(counters=tuple(counters)) if counters else None

    def _forget_ids(
        self, cursor: sqlite3.Cursor, where: str, parameters: tuple[float, ...], limit: int
    ) -> int:
        """Delete up to ``limit`` of the oldest seen ids (matching ``where``), by the time index."""
        forgotten = cursor.execute(
            "DELETE FROM seen WHERE (source, id) IN "
            f"(SELECT source, id FROM seen {where} ORDER BY seen_at LIMIT ?)",
            (*parameters, limit),
        ).rowcount
        self.seen_count -= forgotten
        return forgotten

    async def close(self) -> None:
        self._closed = True
        if self._flushing is not None:
            await self._flushing
        self._writer.shutdown(wait=True)
        self.connection.close()


def as_request_error(exc: Exception) -> RequestError:
    if isinstance(exc, InvalidFeedback):
        return BadRequest(str(exc), exc.reason)
    assert isinstance(exc, RequestError)
    return exc


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
    if delta.delays:
        cursor.executemany(
            "INSERT INTO label_delay VALUES (?, ?, ?) ON CONFLICT (bucket) "
            "DO UPDATE SET count = count + excluded.count, total = total + excluded.total",
            [
                (bucket_index(DELAY_BUCKETS, seconds), rows, seconds * rows)
                for seconds, rows in delta.delays
            ],
        )
    for metric in delta.metrics:
        family, tags = family_name(metric), json.dumps(metric.tags)
        if metric.type == "TIMER":
            seconds = metric.seconds
            cursor.execute(
                "INSERT INTO timer_buckets VALUES (?, ?, ?, 1, ?) ON CONFLICT (key, tags, bucket) "
                "DO UPDATE SET count = count + 1, total = total + excluded.total",
                (family, tags, bucket_index(TIMER_BUCKETS, seconds), seconds),
            )
        else:
            update = "value + excluded.value" if metric.type == "COUNTER" else "excluded.value"
            cursor.execute(
                "INSERT INTO custom_values VALUES (?, ?, ?, ?) ON CONFLICT (key, tags) "
                f"DO UPDATE SET value = {update}",
                (family, tags, metric.type, metric.value),
            )
