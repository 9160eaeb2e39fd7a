"""SQLite schema, versioned. Every table holds additive counts keyed by what they count, or
what a join waits for.

From version 4 on, a statistic's table is named after it and keyed by :data:`KEY_COLUMNS` (the
:class:`~cm_models.statistics.StateKey`), then by its own keys; a statistic that a model
declares gets its table from its declaration (:func:`create_statistic_table`), not from here.
From version 5 on, its primary key starts with the time bucket (:data:`PRIMARY_PREFIX`): reading
buckets is a seek, retention a range delete and the all-time load a prefix scan.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import orjson

from adserver.state.committer import LOGGED_ROWS, PARKED_ROWS, SEEN_IDS, RowCounts
from adserver.state.join import Logged, LoggedRows, Parked, as_rows
from adserver.state.sqlite.join_tables import SQLJoinTables
from cm_models.statistics import ALL_TIME, DEFAULT_SEGMENT, ColumnType, Statistic

SCHEMA_VERSION = 5

Migration = str | Callable[[sqlite3.Connection], None]  # a SQL script, or a function

# Version 1: counts and seen event ids.
COUNT_TABLES = """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE cells (
        truth INTEGER NOT NULL, prediction INTEGER NOT NULL, count INTEGER NOT NULL,
        PRIMARY KEY (truth, prediction)
    ) WITHOUT ROWID;
    CREATE TABLE counters (
        name TEXT NOT NULL, label TEXT NOT NULL, value INTEGER NOT NULL,
        PRIMARY KEY (name, label)
    ) WITHOUT ROWID;
    CREATE TABLE custom_values (
        key TEXT NOT NULL, tags TEXT NOT NULL, type TEXT NOT NULL, value REAL NOT NULL,
        PRIMARY KEY (key, tags)
    ) WITHOUT ROWID;
    CREATE TABLE timer_buckets (
        key TEXT NOT NULL, tags TEXT NOT NULL, bucket INTEGER NOT NULL,
        count INTEGER NOT NULL, total REAL NOT NULL,
        PRIMARY KEY (key, tags, bucket)
    ) WITHOUT ROWID;
    CREATE TABLE seen (
        source TEXT NOT NULL, id TEXT NOT NULL, seen_at REAL NOT NULL,
        PRIMARY KEY (source, id)
    ) WITHOUT ROWID;
    CREATE INDEX seen_by_time ON seen (seen_at);
"""

# Version 2: logged rows and parked labels, a JSON document per row (converted by version 3),
# and the label-delay histogram.
ROW_TABLES = """
    CREATE TABLE logged_rows (
        request_id TEXT NOT NULL, row INTEGER NOT NULL, prediction BLOB, request BLOB,
        predicted_at REAL, labelled INTEGER NOT NULL, expires_at REAL NOT NULL,
        PRIMARY KEY (request_id, row)
    ) WITHOUT ROWID;
    CREATE INDEX logged_rows_by_expiry ON logged_rows (expires_at);
    CREATE TABLE parked_labels (
        request_id TEXT NOT NULL, row INTEGER NOT NULL, truth BLOB NOT NULL,
        arrived_at REAL NOT NULL, expires_at REAL NOT NULL,
        PRIMARY KEY (request_id, row)
    ) WITHOUT ROWID;
    CREATE INDEX parked_labels_by_expiry ON parked_labels (expires_at);
    CREATE TABLE label_delay (
        bucket INTEGER PRIMARY KEY, count INTEGER NOT NULL, total REAL NOT NULL
    );
"""

# Version 3: logged events and parked labels as blocks of rows (see join_tables.py), and per
# request what an eviction needs: rows still waiting for a label, and whether any still are.
BLOCK_TABLES = """
    CREATE TABLE predictions (
        request_id TEXT PRIMARY KEY, request_rows INTEGER NOT NULL,
        predicted_rows INTEGER NOT NULL, predicted_at REAL, waiting INTEGER NOT NULL,
        open INTEGER NOT NULL, expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX predictions_by_eviction ON predictions (open, expires_at);
    CREATE INDEX predictions_by_expiry ON predictions (expires_at);
    CREATE TABLE logged_blocks (
        request_id TEXT NOT NULL, kind TEXT NOT NULL, first_row INTEGER NOT NULL,
        rows INTEGER NOT NULL, codec TEXT NOT NULL, shape BLOB, labelled BLOB,
        data BLOB NOT NULL, PRIMARY KEY (request_id, kind, first_row)
    );
    CREATE TABLE parked_blocks (
        request_id TEXT NOT NULL, first_row INTEGER NOT NULL, rows INTEGER NOT NULL,
        codec TEXT NOT NULL, shape BLOB, data BLOB NOT NULL, arrived_at REAL NOT NULL,
        expires_at REAL NOT NULL, PRIMARY KEY (request_id, first_row)
    );
    CREATE INDEX parked_blocks_by_expiry ON parked_blocks (expires_at);
"""


def run_script(connection: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            connection.execute(statement)


def blocks_from_rows(connection: sqlite3.Connection) -> None:
    """Version 2 kept a JSON document per row: store each request's rows as blocks instead.

    Runs once, at start-up, over what the file holds (at most ``--join_max_rows`` rows). A row
    lost from a request's middle (evicted one by one before) becomes a copy of a kept row that
    counts as labelled, so it can never be scored.
    """
    run_script(connection, BLOCK_TABLES)
    add_segment_columns(connection)  # what the join tables write today
    tables = SQLJoinTables(connection.cursor(), RowCounts())
    logged = connection.execute(
        "SELECT request_id, row, prediction, request, predicted_at, labelled, expires_at "
        "FROM logged_rows ORDER BY request_id, row"
    )
    for request_id, group in itertools.groupby(logged, key=lambda row: row[0]):
        rows = list(group)
        expires_at = max(row[6] for row in rows)
        stored = Logged()
        requests = [row[3] for row in rows if row[3] is not None]
        if requests and len(requests) == rows[-1][1] + 1 == len(rows):  # complete, from row 0
            values = as_rows([orjson.loads(r) for r in requests])
            request = LoggedRows(request_id, "request", values, 0.0)
            stored = tables.store(request_id, stored, request, expires_at)
        predicted = {row[1]: row for row in rows if row[2] is not None}
        if not predicted:
            continue
        kept = next(iter(predicted.values()))
        full = [predicted.get(i, kept) for i in range(max(predicted) + 1)]
        values = as_rows([orjson.loads(row[2]) for row in full])
        tables.store(
            request_id, stored, LoggedRows(request_id, "response", values, kept[4]), expires_at
        )
        done = [i for i, row in enumerate(full) if row[5] or i not in predicted]
        if done:
            tables.mark_labelled(request_id, np.array(done))
    parked = connection.execute(
        "SELECT request_id, row, truth, arrived_at, expires_at FROM parked_labels "
        "ORDER BY request_id, arrived_at, expires_at, row"
    )

    def one_label(item: tuple[int, tuple[str, int, bytes, float, float]]) -> tuple[object, ...]:
        """Rows parked by one label share id and times, and their row numbers run on."""
        position, (request_id, row, _, arrived_at, expires_at) = item
        return request_id, arrived_at, expires_at, row - position

    for _, group in itertools.groupby(enumerate(parked), key=one_label):
        rows = [row for _, row in group]
        values = as_rows([orjson.loads(row[2]) for row in rows])
        tables.park(
            rows[0][0], rows[0][1], values, Parked(rows[0][1], values, rows[0][3], rows[0][4])
        )
    connection.execute("DROP TABLE logged_rows")
    connection.execute("DROP TABLE parked_labels")


# Version 4: every count keyed by (model, segment, time bucket); custom values split by type, so
# each table has one merge; the classes a model admitted, and the tallies kept with every change.
KEY_TYPES = (("model", "TEXT"), ("segment", "TEXT"), ("time_bucket", "INTEGER"))
KEY_COLUMNS = tuple(name for name, _ in KEY_TYPES)
KEYED = "model TEXT NOT NULL, segment TEXT NOT NULL, time_bucket INTEGER NOT NULL"
KEYED_TABLES = f"""
    CREATE TABLE cells (
        {KEYED}, truth INTEGER NOT NULL, prediction INTEGER NOT NULL, count INTEGER NOT NULL,
        PRIMARY KEY (model, segment, time_bucket, truth, prediction)
    ) WITHOUT ROWID;
    CREATE TABLE counters (
        {KEYED}, name TEXT NOT NULL, label TEXT NOT NULL, value INTEGER NOT NULL,
        PRIMARY KEY (model, segment, time_bucket, name, label)
    ) WITHOUT ROWID;
    CREATE TABLE label_delay (
        {KEYED}, bucket INTEGER NOT NULL, count INTEGER NOT NULL, total REAL NOT NULL,
        PRIMARY KEY (model, segment, time_bucket, bucket)
    ) WITHOUT ROWID;
    CREATE TABLE custom_counters (
        {KEYED}, family TEXT NOT NULL, tags TEXT NOT NULL, value REAL NOT NULL,
        PRIMARY KEY (model, segment, time_bucket, family, tags)
    ) WITHOUT ROWID;
    CREATE TABLE custom_gauges (
        {KEYED}, family TEXT NOT NULL, tags TEXT NOT NULL, value REAL NOT NULL,
        PRIMARY KEY (model, segment, time_bucket, family, tags)
    ) WITHOUT ROWID;
    CREATE TABLE custom_timers (
        {KEYED}, family TEXT NOT NULL, tags TEXT NOT NULL, bucket INTEGER NOT NULL,
        count INTEGER NOT NULL, total REAL NOT NULL,
        PRIMARY KEY (model, segment, time_bucket, family, tags, bucket)
    ) WITHOUT ROWID;
    CREATE TABLE classes (
        model TEXT NOT NULL, class INTEGER NOT NULL, PRIMARY KEY (model, class)
    ) WITHOUT ROWID;
    CREATE TABLE tallies (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""
# Version 3's count tables, and where version 4 keeps their rows (under the file's model).
KEYED_COPIES = {
    "cells": ("cells", "truth, prediction, count", ""),
    "counters": ("counters", "name, label, value", ""),
    "label_delay": ("label_delay", "bucket, count, total", ""),
    "custom_counters": ("custom_values", "key, tags, value", "WHERE type = 'COUNTER'"),
    "custom_gauges": ("custom_values", "key, tags, value", "WHERE type = 'GAUGE'"),
    "custom_timers": ("timer_buckets", "key, tags, bucket, count, total", ""),
}


def keyed_counts(connection: sqlite3.Connection) -> None:
    """Version 3 kept one model's counts unkeyed: key them by the model the file belongs to.

    The tallies are counted here, once; from now on every change keeps them.
    """
    found = connection.execute("SELECT value FROM meta WHERE key = 'model_name'").fetchone()
    model = found[0] if found else ""  # a new file: nothing to copy yet
    old = {"cells", "counters", "label_delay", "custom_values", "timer_buckets"}
    for table in old:
        connection.execute(f"ALTER TABLE {table} RENAME TO v3_{table}")
    run_script(connection, KEYED_TABLES)
    key = (model, DEFAULT_SEGMENT, ALL_TIME)
    for table, (source, columns, where) in KEYED_COPIES.items():
        connection.execute(
            f"INSERT INTO {table} SELECT ?, ?, ?, {columns} FROM v3_{source} {where}", key
        )
    connection.execute(
        "INSERT INTO classes SELECT ?, truth FROM v3_cells "
        "UNION SELECT ?, prediction FROM v3_cells",
        (model, model),
    )
    tallies = {
        SEEN_IDS: "SELECT COUNT(*) FROM seen",
        LOGGED_ROWS: "SELECT TOTAL(MAX(request_rows, predicted_rows)) FROM predictions",
        PARKED_ROWS: "SELECT TOTAL(rows) FROM parked_blocks",
    }
    for name, query in tallies.items():
        value = int(connection.execute(query).fetchone()[0])
        connection.execute("INSERT INTO tallies VALUES (?, ?)", (name, value))
    for table in old:
        connection.execute(f"DROP TABLE v3_{table}")


SQL_TYPES: dict[ColumnType, str] = {
    "int": "INTEGER",
    "real": "REAL",
    "text": "TEXT",
    "vector": "BLOB",  # float64 values, added by functions.py's SQL functions
}


def statistic_columns(statistic: Statistic[Any, Any]) -> list[tuple[str, str]]:
    """(name, SQL type) of a statistic's table: the state key, its keys, its values."""
    own = [(name, SQL_TYPES[kind]) for name, kind in (*statistic.keys, *statistic.values)]
    return [*KEY_TYPES, *own]


#: How a statistic table's primary key starts (version 5): by time bucket, then the key's rest.
PRIMARY_PREFIX = ("time_bucket", "model", "segment")


def primary_key(statistic: Statistic[Any, Any]) -> tuple[str, ...]:
    return (*PRIMARY_PREFIX, *(name for name, _ in statistic.keys))


def create_statistic_table(statistic: Statistic[Any, Any]) -> str:
    return create_keyed_table(statistic.name, statistic_columns(statistic), primary_key(statistic))


def create_keyed_table(name: str, columns: list[tuple[str, str]], key: tuple[str, ...]) -> str:
    typed = ", ".join(f"{column} {kind} NOT NULL" for column, kind in columns)
    return f"CREATE TABLE {name} ({typed}, PRIMARY KEY ({', '.join(key)})) WITHOUT ROWID"


def add_segment_columns(connection: sqlite3.Connection) -> None:
    """A stored prediction and a parked label keep their segment's values (version 5)."""
    for table in ("predictions", "parked_blocks"):
        columns = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
        if "segment" not in columns:
            connection.execute(f"ALTER TABLE {table} ADD COLUMN segment BLOB")


def keyed_by_time(connection: sqlite3.Connection) -> None:
    """Version 5: every statistic table (ours, and any a model declared) keyed by time bucket
    first; the segments each model admitted; segments of stored predictions and parked labels.

    Any table whose columns start with the state key is a statistic's: it is copied into a table
    of the same columns under the new key (its own keys stay in their order).
    """
    tables = [
        row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    ]
    for table in tables:
        info = connection.execute(f"PRAGMA table_info({table})").fetchall()
        if tuple(row[1] for row in info[:3]) != KEY_COLUMNS:
            continue
        columns = [(row[1], row[2]) for row in info]
        own = [row[1] for row in sorted(info, key=lambda row: row[5]) if row[5] > 3]
        connection.execute(f"ALTER TABLE {table} RENAME TO v4_{table}")
        connection.execute(create_keyed_table(table, columns, (*PRIMARY_PREFIX, *own)))
        connection.execute(f"INSERT INTO {table} SELECT * FROM v4_{table}")
        connection.execute(f"DROP TABLE v4_{table}")
    connection.execute(
        "CREATE TABLE segments (model TEXT NOT NULL, segment TEXT NOT NULL, "
        "PRIMARY KEY (model, segment)) WITHOUT ROWID"
    )
    add_segment_columns(connection)


class SchemaError(Exception):
    """The file cannot be used as state; the message says how to recover."""


# Index i of MIGRATIONS upgrades a file from version i to i + 1 (version 0 = empty file).
MIGRATIONS: list[Migration] = [
    COUNT_TABLES,
    ROW_TABLES,
    blocks_from_rows,
    keyed_counts,
    keyed_by_time,
]


def schema_version(connection: sqlite3.Connection) -> int:
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    if "meta" not in tables:
        if tables:
            raise SchemaError("the file is a SQLite database but not a feedback-metrics state")
        return 0
    row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        raise SchemaError("the state file has no schema version")
    return int(row[0])


def migrate(
    connection: sqlite3.Connection,
    model_name: str,
    model_kind: str | None = None,
    kinds: Mapping[str, str] | None = None,
) -> None:
    """Bring the file to :data:`SCHEMA_VERSION` in one transaction, or refuse.

    The file records the model name and the kind of metric model (``model_kind``, see
    :func:`adserver.loader.model_kind`) that wrote it, and refuses another one; ``kinds`` are
    the configured models' (each claimed under ``model_kind:<name>``), so a model whose
    ``storage_uri`` changed is refused too. A file from before ``model_kind`` was recorded takes
    the current one. None checks nothing (tests).
    """
    version = schema_version(connection)
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the state file has schema version {version}, newer than this server's "
            f"{SCHEMA_VERSION}: upgrade the server or start from a backup"
        )
    with connection:  # commits, or rolls back every step
        connection.execute("BEGIN IMMEDIATE")
        for migration in MIGRATIONS[version:]:
            if isinstance(migration, str):
                run_script(connection, migration)
            else:
                migration(connection)
        connection.execute(
            "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        claim(connection, "model_name", model_name, "model", "use another --state_dir")
        if model_kind is not None:
            claim(
                connection,
                "model_kind",
                model_kind,
                "--storage_uri",
                "use another --state_dir (the stored families would mix or clash with the new "
                "model's)",
            )
        for name, kind in (kinds or {}).items():
            key = "model_kind" if name == model_name else f"model_kind:{name}"
            claim(
                connection,
                key,
                kind,
                f"model {name!r}'s storage_uri",
                "rename the model or use another --state_dir",
            )


def claimed(connection: sqlite3.Connection, key: str, value: str) -> str:
    """Record ``value`` under ``key`` if the file has none yet; the value the file holds."""
    connection.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
    return str(connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])


def claim(connection: sqlite3.Connection, key: str, value: str, what: str, instead: str) -> None:
    """Record ``value`` under ``key`` if the file has none yet; refuse the file if it differs."""
    stored = claimed(connection, key, value)
    if stored != value:
        raise SchemaError(
            f"the state file belongs to {what} {stored!r}, not {value!r}: {instead}, or "
            "--reset_state to start from zero"
        )
