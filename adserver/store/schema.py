"""SQLite schema, versioned. Every table holds additive counts keyed by what they count."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 2

# Index i of MIGRATIONS upgrades a file from version i to i + 1 (version 0 = empty file).
MIGRATIONS: list[str] = [
    """
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
    """,
    """
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
    """,
]


class SchemaError(Exception):
    """The file cannot be used as state; the message says how to recover."""


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


def migrate(connection: sqlite3.Connection, model_name: str, model_kind: str | None = None) -> None:
    """Bring the file to :data:`SCHEMA_VERSION` in one transaction, or refuse.

    The file records the model name and the kind of metric model (``model_kind``, see
    :func:`adserver.loader.model_kind`) that wrote it, and refuses another one. A file from
    before ``model_kind`` was recorded takes the current one. None checks nothing (tests).
    """
    version = schema_version(connection)
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the state file has schema version {version}, newer than this server's "
            f"{SCHEMA_VERSION}: upgrade the server or start from a backup"
        )
    # isolation_level=None: no implicit BEGIN, so ``with connection`` alone would not roll back
    connection.execute("BEGIN IMMEDIATE")
    with connection:  # a refusal below rolls back: a refused file is left as it was
        for script in MIGRATIONS[version:]:
            for statement in script.split(";"):
                if statement.strip():
                    connection.execute(statement)
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


def claim(connection: sqlite3.Connection, key: str, value: str, what: str, instead: str) -> None:
    """Record ``value`` under ``key`` if the file has none yet; refuse the file if it differs."""
    connection.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
    stored = connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]
    if stored != value:
        raise SchemaError(
            f"the state file belongs to {what} {stored!r}, not {value!r}: {instead}, or "
            "--reset_state to start from zero"
        )
