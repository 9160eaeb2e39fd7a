"""State in SQLite: the dialect under :class:`adserver.state.committer.Committer`.

Durable mode keeps a WAL file under ``--state_dir``; the committer's writer thread commits
everything that arrived while the previous transaction ran (group commit), so one fsync covers
many events and the IOLoop never waits on disk. Memory mode runs the very same SQL on an
in-memory database on the IOLoop (no I/O), so both modes share one implementation and one
behaviour. The lock on the file makes this process its only writer.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from adserver.errors import StartupError
from adserver.state.committer import PURGE_BATCH, Committer, RowCounts, statistic_rows
from adserver.state.sqlite.functions import VECTOR_ADD, register
from adserver.state.sqlite.join_tables import SQLJoinTables
from adserver.state.sqlite.lock import hold_state_lock
from adserver.state.sqlite.schema import (
    KEY_COLUMNS,
    SchemaError,
    claim,
    claimed,
    create_statistic_table,
    migrate,
    primary_key,
    statistic_columns,
)
from adserver.state.store import Clock
from adserver.state.view import CUSTOM, Delta, series
from cm_models.custom_metrics import MetricType, SeriesKey
from cm_models.statistics import ALL_TIME, Row, StateKey, Statistic

__all__ = [
    "PURGE_BATCH",
    "SQLiteDialect",
    "SQLiteStore",
    "StateFileError",
    "reset_state",
    "state_path",
]

STATE_FILE = "feedback-state.sqlite3"


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
    path: Path | None,
    model_name: str,
    model_kind: str | None = None,
    kinds: Mapping[str, str] | None = None,
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
        connection = register(sqlite3.connect("", isolation_level=None))
        connection.execute("PRAGMA journal_mode=MEMORY")  # nothing to recover after a crash
        connection.execute("PRAGMA synchronous=OFF")
        create_spill_file(connection)
        migrate(connection, model_name, model_kind, kinds)
        return connection
    recovery = (
        f"move it aside with --reset_state (it is kept as {path.name}.reset-<time>) "
        "or restore a backup"
    )
    hold_state_lock(path)
    try:
        if not path.exists():
            create_state_file(path, model_name, model_kind, kinds)
        elif path.stat().st_size == 0:
            raise StateFileError(f"state file {path} is empty (0 bytes): {recovery}")
        connection = connect_durable(path)
        if connection.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise StateFileError(f"state file {path} is corrupt: {recovery}")
        migrate(connection, model_name, model_kind, kinds)
    except (sqlite3.DatabaseError, SchemaError) as exc:
        raise StateFileError(f"cannot use state file {path}: {exc}; {recovery}") from exc
    except OSError as exc:
        raise StateFileError(f"cannot open state file {path}: {exc}") from exc
    return connection


def connect_durable(path: Path) -> sqlite3.Connection:
    connection = register(sqlite3.connect(path, check_same_thread=False, isolation_level=None))
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    return connection


def create_state_file(
    path: Path, model_name: str, model_kind: str | None, kinds: Mapping[str, str] | None
) -> None:
    """A complete, migrated file appears at ``path`` at once, or nothing does."""
    draft = path.with_name(path.name + ".new")
    for suffix in ("", "-wal", "-shm"):  # left by a crash during a previous creation
        Path(f"{draft}{suffix}").unlink(missing_ok=True)
    connection = connect_durable(draft)
    try:
        migrate(connection, model_name, model_kind, kinds)
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


class SQLiteDialect:
    """The SQL of :class:`adserver.state.committer.Dialect` on one SQLite connection."""

    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    shared = False  # the file's lock makes this process its only writer
    retryable: tuple[type[Exception], ...] = ()

    def __init__(self, connection: sqlite3.Connection, durable: bool) -> None:
        self.connection = connection
        self.durable = durable
        self.cursor = connection.cursor()
        self.statistics: dict[str, Statistic[Any, Any]] = {}
        self._upserts: dict[str, str] = {}

    @classmethod
    def open(
        cls,
        state_dir: str | None,
        model_name: str,
        model_kind: str | None = None,
        kinds: Mapping[str, str] | None = None,
        time_buckets: str | None = None,
    ) -> SQLiteDialect:
        """The state file under ``state_dir`` (durable), or a temporary database for None;
        ``kinds``: each configured model's kind, claimed in the file; ``time_buckets``: the
        granularities, claimed too (a bucket is read by them: under others its rows would be
        other times, and never age out)."""
        path = state_path(state_dir) if state_dir is not None else None
        connection = open_connection(path, model_name, model_kind, kinds)
        if time_buckets is not None:
            try:
                claim(
                    connection,
                    "time_buckets",
                    time_buckets,
                    "--time_buckets",
                    "use the same --time_buckets or another --state_dir",
                )
            except SchemaError as exc:
                connection.close()
                raise StateFileError(f"cannot use state file {path}: {exc}") from exc
        return cls(connection, durable=path is not None)

    def prepare(
        self,
        statistics: Iterable[Statistic[Any, Any]],
        owners: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """A declared statistic's table is made the first time; one whose columns (names and
        types) or vector width changed since is refused (its stored rows would not mean what
        the declaration says). ``owners``: the models declaring each statistic, for the
        message."""
        for statistic in statistics:
            columns = statistic_columns(statistic)
            stored = [
                (row[1], row[2])
                for row in self.connection.execute(f"PRAGMA table_info({statistic.name})")
            ]
            if not stored:
                self.connection.execute(create_statistic_table(statistic))
            elif stored != columns:
                raise StateFileError(
                    f"the state file's table {statistic.name!r} has columns {stored}, but the "
                    f"statistic declares {columns}: rename the statistic, or use another "
                    "--state_dir"
                )
            if statistic.width:
                self._claim_width(statistic, (owners or {}).get(statistic.name, ()))
            self._upserts[statistic.name] = upsert(statistic)
            self.statistics[statistic.name] = statistic

    def _claim_width(self, statistic: Statistic[Any, Any], owners: Sequence[str]) -> None:
        """The file records a vector statistic's width: its stored vectors have that many
        values, and adding others to them would be refused at the first event, not here."""
        width = str(statistic.width)
        stored = claimed(self.connection, f"width:{statistic.name}", width)
        if stored != width:
            models = ", ".join(repr(m) for m in owners) or "a model"
            raise StateFileError(
                f"model {models} declares the statistic {statistic.name!r} with {width} values, "
                f"but the state file holds it with {stored}: the statistic changed width; "
                "restore the setting that sizes it (--score_bins/--error_buckets), or "
                "--reset_state to start from zero"
            )

    def load(self, statistic: Statistic[Any, Any]) -> Iterator[tuple[StateKey, list[Row]]]:
        """The all-time rows (a prefix of the primary key); buckets are read on demand."""
        found = self.connection.execute(
            f"SELECT * FROM {statistic.name} WHERE time_bucket = ? ORDER BY model, segment",
            (ALL_TIME,),
        )
        width = len(KEY_COLUMNS)
        for stored, rows in itertools.groupby(found, key=lambda row: row[:width]):
            yield StateKey(*stored), [row[width:] for row in rows]

    def classes(self, model: str) -> set[int]:
        query = "SELECT class FROM classes WHERE model = ?"
        return {c for (c,) in self.connection.execute(query, (model,))}

    def segments(self, model: str) -> set[str]:
        query = "SELECT segment FROM segments WHERE model = ?"
        return {s for (s,) in self.connection.execute(query, (model,))}

    def add_segment(self, model: str, segment: str) -> None:
        self.cursor.execute("INSERT OR IGNORE INTO segments VALUES (?, ?)", (model, segment))

    def forget_buckets(self, lo: int, below: int, limit: int) -> int:
        """Delete the rows of up to ``limit`` buckets in [lo, below) from every statistic table
        (oldest first, each a range of the primary key); returns how many buckets went."""
        buckets: set[int] = set()
        for name in self.statistics:
            found = self.cursor.execute(
                f"SELECT DISTINCT time_bucket FROM {name} WHERE time_bucket >= ? "
                "AND time_bucket < ? ORDER BY time_bucket LIMIT ?",
                (lo, below, limit),
            ).fetchall()
            if found:
                self.cursor.execute(
                    f"DELETE FROM {name} WHERE time_bucket >= ? AND time_bucket <= ?",
                    (lo, found[-1][0]),
                )
                buckets.update(bucket for (bucket,) in found)
        return len(buckets)

    def tallies(self) -> dict[str, int]:
        return dict(self.connection.execute("SELECT name, value FROM tallies"))

    def begin(self) -> None:
        self.cursor.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.cursor.execute("COMMIT")

    def publish(self, deltas: Sequence[tuple[StateKey, Delta]]) -> None:
        """Never called: no other process reads this store's changes."""

    def lock(self, resource: str) -> None:
        """Nothing to lock: the transaction is the only writer (BEGIN IMMEDIATE)."""

    def catalog(self) -> tuple[dict[str, MetricType], set[SeriesKey]]:
        types: dict[str, MetricType] = {}
        found: set[SeriesKey] = set()
        for kind, name in CUSTOM.items():
            for family, tags in self.connection.execute(
                f"SELECT DISTINCT family, tags FROM {name} WHERE time_bucket = ?", (ALL_TIME,)
            ):
                types[family] = kind
                found.add(series(family, tags))
        return types, found

    def rollback(self) -> None:
        if self.connection.in_transaction:  # SQLite may have rolled back already
            self.cursor.execute("ROLLBACK")

    def savepoint(self) -> None:
        self.cursor.execute("SAVEPOINT batch")

    def rollback_to_savepoint(self) -> None:
        self.cursor.execute("ROLLBACK TO batch")

    def release_savepoint(self) -> None:
        self.cursor.execute("RELEASE batch")

    def remember(self, key: tuple[str, str], now: float, forgotten_by: float) -> int:
        cursor = self.cursor
        cursor.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)", (*key, now))
        if cursor.rowcount:
            return 2
        cursor.execute(
            "UPDATE seen SET seen_at = ? WHERE source = ? AND id = ? AND seen_at <= ?",
            (now, *key, forgotten_by),
        )
        return int(cursor.rowcount > 0)

    def forget_ids(self, seen_by: float | None, limit: int) -> int:
        """By the time index: the oldest first."""
        where, parameters = ("WHERE seen_at <= ?", (seen_by,)) if seen_by is not None else ("", ())
        return self.cursor.execute(
            "DELETE FROM seen WHERE (source, id) IN "
            f"(SELECT source, id FROM seen {where} ORDER BY seen_at LIMIT ?)",
            (*parameters, limit),
        ).rowcount

    def join_tables(self, counts: RowCounts) -> SQLJoinTables:
        return SQLJoinTables(self.cursor, counts)

    def write(self, keys: Sequence[StateKey], delta: Delta) -> None:
        for name, items in delta.parts.items():
            rows = statistic_rows(self.statistics[name], items)
            self.cursor.executemany(
                self._upserts[name], [(*key, *row) for key in keys for row in rows]
            )

    def add_classes(self, model: str, classes: Iterable[int]) -> None:
        self.cursor.executemany(
            "INSERT OR IGNORE INTO classes VALUES (?, ?)", [(model, c) for c in classes]
        )

    def write_tallies(self, moved: dict[str, tuple[int, int]]) -> None:
        self.cursor.executemany(
            "INSERT OR REPLACE INTO tallies VALUES (?, ?)",
            [(name, after) for name, (_, after) in moved.items()],
        )

    def close(self) -> None:
        self.connection.close()


def moments_merge(t: str = "") -> tuple[str, ...]:
    """Chan's pairwise update of (count, shift, mean, m2) about the stored row's shift, as
    combined_moments() computes it, operation for operation (shift, mean and m2 are REAL, so no
    division is an integer one); SET reads the old row, named ``t`` + column (PostgreSQL needs
    the table's alias where SQLite takes a bare column)."""
    delta = f"((excluded.shift - {t}shift) + (excluded.mean - {t}mean))"
    return (
        f"count = {t}count + excluded.count",
        f"shift = CASE WHEN {t}count = 0 THEN excluded.shift ELSE {t}shift END",
        f"mean = CASE WHEN {t}count = 0 THEN excluded.mean WHEN excluded.count = 0 THEN {t}mean "
        f"ELSE {t}mean + {delta} * excluded.count / ({t}count + excluded.count) END",
        f"m2 = CASE WHEN {t}count = 0 THEN excluded.m2 WHEN excluded.count = 0 THEN {t}m2 "
        f"ELSE {t}m2 + excluded.m2 + {delta} * {delta} * {t}count "
        f"* excluded.count / ({t}count + excluded.count) END",
    )


MOMENTS_MERGE = moments_merge()


def merged(statistic: Statistic[Any, Any], vector_add: str = VECTOR_ADD, t: str = "") -> list[str]:
    """Each value column's SET clause under the statistic's merge; ``vector_add``: the SQL
    function adding two vectors, ``t``: how the stored row's columns are named."""
    if statistic.merge == "moments":
        return list(moments_merge(t))
    if statistic.merge == "last":
        return [f"{v} = excluded.{v}" for v, _ in statistic.values]
    return [
        (
            f"{v} = {vector_add}({t}{v}, excluded.{v})"
            if kind == "vector"
            else f"{v} = {t}{v} + excluded.{v}"
        )
        for v, kind in statistic.values
    ]


def upsert(statistic: Statistic[Any, Any]) -> str:
    """Add rows to a statistic's table, merging each value by the declared merge."""
    keys = [*KEY_COLUMNS, *(name for name, _ in statistic.keys)]
    values = [name for name, _ in statistic.values]
    conflict = primary_key(statistic)
    return (
        f"INSERT INTO {statistic.name} VALUES ({', '.join('?' * (len(keys) + len(values)))}) "
        f"ON CONFLICT ({', '.join(conflict)}) DO UPDATE SET {', '.join(merged(statistic))}"
    )


class SQLiteStore(Committer[SQLiteDialect]):
    """The committer over SQLite, its connection at hand (for tests and tools)."""

    @property
    def connection(self) -> sqlite3.Connection:
        return self.dialect.connection
