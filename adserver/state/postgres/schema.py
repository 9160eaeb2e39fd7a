"""PostgreSQL schema, versioned: one keyspace (a schema of its own) per ``--model_name``.

Every table lives in the keyspace; the connection's ``search_path`` names it, so the statements
are the same for any keyspace. A statistic's table is keyed like SQLite's, plus the ``slot`` of
the replica that wrote the row: replicas add to their own rows, never to one hot row, and a
read sums the slots. :func:`migrate` runs under a session advisory lock on the keyspace, so
replicas starting together on an empty database create it once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql

from adserver.catalogue.wire import KEYSPACE_PREFIX, SQL_VECTOR_ADD, SQL_VECTOR_SUM
from adserver.errors import StartupError
from cm_models.statistics import ColumnType, Statistic

SCHEMA_VERSION = 1
MAX_IDENTIFIER = 63  # bytes of a PostgreSQL name (NAMEDATALEN - 1)

#: ``feedback_vector_add(a, b)``: the elementwise sum of two float8[] of one length (the
#: upsert's merge of a vector); ``feedback_vector_sum(v)``: the aggregate (a span's read).
VECTOR_ADD = SQL_VECTOR_ADD
VECTOR_SUM = SQL_VECTOR_SUM

SQL_TYPES: dict[ColumnType, str] = {
    "int": "bigint",
    "real": "double precision",
    "text": "text",
    "vector": "double precision[]",  # dense: the width's values
}
KEY_TYPES = (
    ("slot", "smallint"),
    ("model", "text"),
    ("segment", "text"),
    ("time_bucket", "bigint"),
)
KEY_COLUMNS = tuple(name for name, _ in KEY_TYPES)
PRIMARY_PREFIX = ("time_bucket", "model", "segment")

TABLES = f"""
    CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
    CREATE TABLE seen (
        source text NOT NULL, id text NOT NULL, seen_at double precision NOT NULL,
        PRIMARY KEY (source, id)
    );
    CREATE INDEX seen_by_time ON seen (seen_at);
    CREATE TABLE predictions (
        request_id text PRIMARY KEY, request_rows bigint NOT NULL,
        predicted_rows bigint NOT NULL, predicted_at double precision, waiting bigint NOT NULL,
        open boolean NOT NULL, expires_at double precision NOT NULL, segment bytea
    );
    CREATE INDEX predictions_by_eviction ON predictions (open, expires_at);
    CREATE INDEX predictions_by_expiry ON predictions (expires_at);
    CREATE TABLE logged_blocks (
        request_id text NOT NULL, kind text NOT NULL, first_row bigint NOT NULL,
        rows bigint NOT NULL, codec text NOT NULL, shape bytea, labelled bytea,
        data bytea NOT NULL, PRIMARY KEY (request_id, kind, first_row)
    );
    CREATE TABLE parked_blocks (
        request_id text NOT NULL, first_row bigint NOT NULL, rows bigint NOT NULL,
        codec text NOT NULL, shape bytea, data bytea NOT NULL,
        arrived_at double precision NOT NULL, expires_at double precision NOT NULL,
        segment bytea, PRIMARY KEY (request_id, first_row)
    );
    CREATE INDEX parked_blocks_by_expiry ON parked_blocks (expires_at);
    CREATE TABLE classes (model text NOT NULL, class bigint NOT NULL, PRIMARY KEY (model, class));
    CREATE TABLE segments (
        model text NOT NULL, segment text NOT NULL, PRIMARY KEY (model, segment)
    );
    CREATE TABLE tallies (
        slot smallint NOT NULL, name text NOT NULL, value bigint NOT NULL,
        PRIMARY KEY (slot, name)
    );
    CREATE TABLE changes (
        xid xid8 NOT NULL DEFAULT pg_current_xact_id(), writer text NOT NULL,
        at timestamptz NOT NULL DEFAULT clock_timestamp(), payload bytea NOT NULL
    );
    CREATE INDEX changes_by_xid ON changes (xid);
    CREATE INDEX changes_by_time ON changes (at);
    CREATE TABLE slots (slot smallint PRIMARY KEY, holder text, lease_until timestamptz);
    CREATE FUNCTION {VECTOR_ADD}(a float8[], b float8[]) RETURNS float8[]
    LANGUAGE plpgsql STRICT IMMUTABLE PARALLEL SAFE AS $$
    BEGIN
        IF cardinality(a) <> cardinality(b) THEN
            RAISE EXCEPTION 'vectors of % and % values cannot be added',
                cardinality(a), cardinality(b);
        END IF;
        RETURN ARRAY(SELECT x + y FROM unnest(a, b) AS t(x, y));
    END $$;
    CREATE AGGREGATE {VECTOR_SUM}(float8[]) (SFUNC = {VECTOR_ADD}, STYPE = float8[]);
"""


class KeyspaceError(StartupError):
    """The keyspace is unusable by this server; the message says what to do instead."""


def keyspace_name(model_name: str) -> str:
    """``feedback_`` + the model name, lowercased, every other character ``_``; a name past
    PostgreSQL's 63 bytes is cut and given a hash of the whole, so two long names differ."""
    name = KEYSPACE_PREFIX + re.sub(r"[^a-z0-9_]", "_", model_name.lower())
    if len(name) <= MAX_IDENTIFIER:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_IDENTIFIER - 9]}_{digest}"


def keyspace_lock(keyspace: str) -> int:
    """The advisory lock (int64) that serializes migrations of one keyspace."""
    return int.from_bytes(hashlib.sha256(keyspace.encode()).digest()[:8], "big", signed=True)


def keyspace_class(keyspace: str) -> int:
    """The first key (int32) of a keyspace's transaction locks on named resources (the second
    is ``hashtext(resource)``): other keyspaces' locks never collide with them."""
    return keyspace_lock(keyspace) >> 32


def statistic_columns(statistic: Statistic[Any, Any]) -> list[tuple[str, str]]:
    """(name, SQL type) of a statistic's table: slot and state key, its keys, its values."""
    own = [(name, SQL_TYPES[kind]) for name, kind in (*statistic.keys, *statistic.values)]
    return [*KEY_TYPES, *own]


def primary_key(statistic: Statistic[Any, Any]) -> tuple[str, ...]:
    """By time bucket first (reads and retention are key ranges), the slot last."""
    return (*PRIMARY_PREFIX, *(name for name, _ in statistic.keys), "slot")


def create_statistic_table(statistic: Statistic[Any, Any]) -> str:
    typed = ", ".join(f"{column} {kind} NOT NULL" for column, kind in statistic_columns(statistic))
    key = ", ".join(primary_key(statistic))
    return f"CREATE TABLE {statistic.name} ({typed}, PRIMARY KEY ({key}))"


def stored_columns(connection: psycopg.Connection[Any], table: str) -> list[tuple[str, str]]:
    """(name, SQL type) of a keyspace table, in order; empty if there is none."""
    return [
        (name, kind)
        for name, kind in connection.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped "
            "ORDER BY attnum",
            (table,),
        )
    ]


def set_keyspace(connection: psycopg.Connection[Any], keyspace: str) -> None:
    connection.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(keyspace)))


def migrate(
    connection: psycopg.Connection[Any],
    keyspace: str,
    model_name: str,
    model_kind: str | None = None,
    kinds: Mapping[str, str] | None = None,
    time_buckets: str | None = None,
    slots: int = 64,
) -> None:
    """Create the keyspace, or check it, in one transaction under the keyspace's advisory lock
    (held for the session, released after); claims what it belongs to like SQLite's file does.
    ``connection`` is in autocommit mode; its search_path names the keyspace."""
    lock = keyspace_lock(keyspace)
    connection.execute("SELECT pg_advisory_lock(%s)", (lock,))
    try:
        with connection.transaction():
            _migrate(connection, keyspace, model_name, model_kind, kinds, time_buckets, slots)
    finally:
        connection.execute("SELECT pg_advisory_unlock(%s)", (lock,))


def _migrate(
    connection: psycopg.Connection[Any],
    keyspace: str,
    model_name: str,
    model_kind: str | None,
    kinds: Mapping[str, str] | None,
    time_buckets: str | None,
    slots: int,
) -> None:
    connection.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(keyspace)))
    if not stored_columns(connection, "meta"):
        connection.execute(TABLES.encode())  # a script: no parameters, many statements
        connection.execute(
            "INSERT INTO meta VALUES ('schema_version', %s), ('created_at', now()::text)",
            (str(SCHEMA_VERSION),),
        )
    version = int(claimed(connection, "schema_version", str(SCHEMA_VERSION)))
    if version > SCHEMA_VERSION:
        raise KeyspaceError(
            f"the database keyspace {keyspace!r} has schema version {version}, newer than this "
            f"server's {SCHEMA_VERSION}: upgrade the server"
        )
    connection.execute(
        "INSERT INTO slots SELECT generate_series(0, %s - 1) ON CONFLICT DO NOTHING", (slots,)
    )
    other = "use another --postgres_schema"
    claim(connection, keyspace, "model_name", model_name, "model", other)
    if model_kind is not None:
        claim(
            connection,
            keyspace,
            "model_kind",
            model_kind,
            "--storage_uri",
            f"{other} (the stored families would mix or clash with the new model's)",
        )
    for name, kind in (kinds or {}).items():
        key = "model_kind" if name == model_name else f"model_kind:{name}"
        claim(
            connection,
            keyspace,
            key,
            kind,
            f"model {name!r}'s storage_uri",
            f"rename the model or {other}",
        )
    if time_buckets is not None:
        claim(
            connection,
            keyspace,
            "time_buckets",
            time_buckets,
            "--time_buckets",
            f"use the same --time_buckets or {other}",
        )


def claimed(connection: psycopg.Connection[Any], key: str, value: str) -> str:
    """Record ``value`` under ``key`` if the keyspace has none yet; the value it holds."""
    connection.execute("INSERT INTO meta VALUES (%s, %s) ON CONFLICT DO NOTHING", (key, value))
    found = connection.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
    assert found is not None
    return str(found[0])


def claim(
    connection: psycopg.Connection[Any],
    keyspace: str,
    key: str,
    value: str,
    what: str,
    instead: str,
) -> None:
    """Record ``value`` under ``key`` if the keyspace has none yet; refuse it if it differs."""
    stored = claimed(connection, key, value)
    if stored != value:
        raise KeyspaceError(
            f"the database keyspace {keyspace!r} belongs to {what} {stored!r}, not {value!r}: "
            f"{instead}, or drop the schema to start from zero"
        )
