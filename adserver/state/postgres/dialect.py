"""The SQL of :class:`adserver.state.committer.Dialect` on PostgreSQL, shared by replicas.

The committer's writer thread runs one transaction per group of events on a connection of a
small pool (a broken connection is replaced at the next transaction). Statements whose result
is not needed (upserts, tallies, savepoints, locks, the change row) are queued and sent in one
pipeline with the next statement that needs a result, or with COMMIT: a transaction costs a
round trip per remembered event id and per join read, plus one. A transaction's statistic rows
are merged by key in Python (events of one group touch the same few cells and counters) and
sent at COMMIT as one statement per statistic, the rows as one JSON document
(``json_populate_recordset``): the database's work per group grows with the keys it touches,
not with its events.

Replicas never add to one hot row: a statistic's rows and the tallies are kept per *slot* (a
lease each replica holds, :func:`claim_slot`), and reads sum the slots; a ``last`` statistic is
written to slot 0 only (one row per key: the last commit's value). Dedup, the join and the caps
serialize on the rows or on transaction-scoped advisory locks, so each event counts once across
replicas.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from adserver.catalogue import reasons
from adserver.errors import BadRequest, StartupError
from adserver.state.committer import RowCounts, statistic_rows
from adserver.state.postgres import vectors
from adserver.state.postgres.changes import encode_changes
from adserver.state.postgres.join_tables import PostgresJoinTables
from adserver.state.postgres.schema import (
    KEY_COLUMNS,
    VECTOR_ADD,
    KeyspaceError,
    create_statistic_table,
    keyspace_class,
    keyspace_lock,
    migrate,
    primary_key,
    set_keyspace,
    statistic_columns,
    stored_columns,
)
from adserver.state.sqlite.store import merged
from adserver.state.view import CUSTOM, Delta, series
from cm_models.custom_metrics import MetricType, SeriesKey
from cm_models.statistics import (
    ALL_TIME,
    Row,
    StateKey,
    Statistic,
    add_vectors,
    combined_moments,
    vector_array,
)

log = logging.getLogger(__name__)

LEASE_SECONDS = 30  # a slot's lease; the poller renews it every few seconds
ROW_OFFSET = len(KEY_COLUMNS)  # a statistic table's row: slot, state key, then the statistic's


@dataclass(frozen=True)
class PostgresOptions:
    """The ``--postgres_*`` settings."""

    dsn: str
    keyspace: str
    pool_size: int = 4
    refresh_seconds: float = 0.25
    slots: int = 64
    change_retention_seconds: float = 120.0
    connect_timeout_seconds: float = 2.0

    def connection_kwargs(self) -> dict[str, Any]:
        """libpq options of every connection: autocommit (transactions are explicit), a connect
        timeout, and TCP keepalives so a peer that vanished fails a statement in seconds."""
        return {
            "autocommit": True,
            "connect_timeout": max(2, round(self.connect_timeout_seconds)),
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "application_name": "feedback-metrics-server",
        }

    def pool_arguments(self, name: str) -> dict[str, Any]:
        """What every pool of ours is opened with (opened later, by its owner)."""
        return {
            "conninfo": self.dsn,
            "min_size": 1,
            "kwargs": self.connection_kwargs(),
            "timeout": self.connect_timeout_seconds,
            "name": name,
            "reconnect_timeout": RECONNECT_SECONDS,
            "open": False,
        }

    def configure(self, connection: psycopg.Connection[Any]) -> None:
        """A new pooled connection: the keyspace on its search_path, our binary codecs, and
        limits on waiting (:data:`SESSION_LIMITS`)."""
        set_keyspace(connection, self.keyspace)
        for name, value in SESSION_LIMITS.items():
            connection.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), value))
        vectors.register(connection)

    async def configure_async(self, connection: psycopg.AsyncConnection[Any]) -> None:
        await connection.execute(
            sql.SQL("SET search_path TO {}").format(sql.Identifier(self.keyspace))
        )
        for name, value in SESSION_LIMITS.items():
            await connection.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), value))
        vectors.register(connection)


#: Every connection's limits: a lock held by a replica that vanished mid-transaction (a network
#: partition) is waited for at most ``lock_timeout`` (then 503, retried), the server drops that
#: replica's session after ``idle_in_transaction_session_timeout`` or when its keepalives fail
#: (releasing its locks), and no statement of ours runs longer than ``statement_timeout``.
SESSION_LIMITS = {
    "lock_timeout": sql.Literal("5s"),
    "statement_timeout": sql.Literal("30s"),
    "idle_in_transaction_session_timeout": sql.Literal("30s"),
    "tcp_keepalives_idle": sql.Literal(5),
    "tcp_keepalives_interval": sql.Literal(2),
    "tcp_keepalives_count": sql.Literal(3),
}
#: A pool's attempts to reconnect back off exponentially (1, 2, 4 s...) and give up after this;
#: the next borrower starts again from 1 s: after an outage of any length, the database is
#: found again within a few seconds of its return.
RECONNECT_SECONDS = 4.0
#: A transaction open longer than this makes the replica unready (its events wait behind it).
STUCK_SECONDS = 10.0


def has_nul(*texts: str) -> bool:
    return any("\0" in text for text in texts)


def storable(*texts: str) -> None:
    """PostgreSQL keeps no NUL character in text: such a value is refused (400) in its batch."""
    if has_nul(*texts):
        raise BadRequest(
            "a text value (an event id or source, a request id, a segment value or a metric "
            "tag) holds a NUL character, which the PostgreSQL state cannot store",
            reasons.NUL_CHARACTER,
        )


def writer_id() -> str:
    """This process, as the change log and the slot leases name it (unique per start)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


#: The lowest free (or expired) slot, taken for this writer; skipped if another claims it now.
CLAIM_SLOT = (
    "UPDATE slots SET holder = %(holder)s, lease_until = now() + make_interval(secs => %(lease)s) "
    "WHERE slot = (SELECT slot FROM slots WHERE holder IS NULL OR holder = %(holder)s "
    "OR lease_until < now() ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING slot"
)
#: A held lease, extended; no row if it was lost (expired and claimed by another).
RENEW_SLOT = (
    "UPDATE slots SET lease_until = now() + make_interval(secs => %(lease)s) "
    "WHERE slot = %(slot)s AND holder = %(holder)s RETURNING slot"
)
RELEASE_SLOT = "UPDATE slots SET holder = NULL, lease_until = NULL WHERE slot = %s AND holder = %s"


def claim_slot(connection: psycopg.Connection[Any], holder: str, slots: int) -> int:
    """A slot of this writer's own; when every one is held, one shared by hash (correct, only
    contended: rows of one slot add up whoever writes them)."""
    found = connection.execute(CLAIM_SLOT, {"holder": holder, "lease": LEASE_SECONDS}).fetchone()
    if found is not None:
        return int(found[0])
    shared = shared_slot(holder, slots)
    log.warning("every state slot is leased: sharing one", extra={"slot": shared})
    return shared


def shared_slot(holder: str, slots: int) -> int:
    return zlib.crc32(holder.encode()) % slots


class Pending:
    """A queued statement; its result is fetched (and the queue sent) when first asked for."""

    __slots__ = ("binary", "cursor", "many", "params", "pipe", "query")

    def __init__(
        self, pipe: Pipe, query: str, params: Any, many: bool = False, binary: bool = False
    ) -> None:
        self.pipe, self.query, self.params = pipe, query, params
        self.many, self.binary = many, binary
        self.cursor: psycopg.Cursor[Any] | None = None

    def run(self, connection: psycopg.Connection[Any]) -> None:
        cursor = self.cursor = connection.cursor(binary=self.binary)
        if self.many:
            cursor.executemany(self.query.encode(), self.params)
        else:
            cursor.execute(self.query.encode(), self.params)

    def _result(self) -> psycopg.Cursor[Any]:
        if self.cursor is None:
            self.pipe.flush()
        assert self.cursor is not None
        return self.cursor

    def fetchone(self) -> Any:
        return self._result().fetchone()

    def fetchall(self) -> list[Any]:
        return self._result().fetchall()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._result())


class Pipe:
    """The statements of the open transaction, sent in pipelines: a cursor for the join tables
    too (``execute`` / ``executemany``, results fetched lazily).

    A savepoint is sent only before the first statement after it: most batches of a group send
    none (their remembered ids and rows are kept in Python until COMMIT), so they need none.
    """

    def __init__(self, dialect: PostgresDialect) -> None:
        self.dialect = dialect
        self.queue: list[Pending] = []
        self.round_trips = 0
        self.statements = 0
        self.savepoint: bool | None = None  # None: none open; False: open, not sent yet

    def execute(self, query: str, params: Any = None, binary: bool = False) -> Pending:
        return self._queue(Pending(self, query, params, binary=binary), 1)

    def executemany(self, query: str, params: Sequence[Any]) -> None:
        if params:
            self._queue(Pending(self, query, params, many=True), len(params))

    def _queue(self, pending: Pending, statements: int) -> Pending:
        """Queue a statement, after the open savepoint if it was not sent yet."""
        if self.savepoint is False:
            self.savepoint = True
            self.execute("SAVEPOINT batch")
        self.queue.append(pending)
        self.statements += statements
        return pending

    def flush(self) -> None:
        """Send what is queued and wait once for every result."""
        queue, self.queue = self.queue, []
        if not queue:
            return
        connection = self.dialect.connection()
        self.round_trips += 1
        with connection.pipeline():
            for pending in queue:
                pending.run(connection)

    def end_savepoint(self, statement: str) -> None:
        """ROLLBACK TO or RELEASE the open savepoint, if it was sent."""
        if self.savepoint:
            self.execute(statement)
        self.savepoint = None

    def discard(self) -> None:
        self.queue.clear()
        self.savepoint = None


class PostgresDialect:
    """Every statement of a commit, on the writer's pooled connection."""

    durable = True
    shared = True
    errors: tuple[type[Exception], ...] = (psycopg.Error, PoolTimeout)
    retryable: tuple[type[Exception], ...] = (
        pg_errors.SerializationFailure,
        pg_errors.DeadlockDetected,
    )

    def __init__(self, pool: ConnectionPool, options: PostgresOptions, writer: str) -> None:
        self.pool = pool
        self.options = options
        self.keyspace = options.keyspace
        self.writer = writer
        self.lock_class = keyspace_class(options.keyspace)
        self.statistics: dict[str, Statistic[Any, Any]] = {}
        self._upserts: dict[str, str] = {}
        self._vectors: dict[str, list[int]] = {}  # value positions of a statistic's vectors
        self._texts: dict[str, list[int]] = {}  # key positions of a statistic's texts
        self._connection: psycopg.Connection[Any] | None = None
        self.pipe = Pipe(self)
        # Resources and request ids locked in this transaction, in order; a savepoint rolled
        # back releases those locked after it, and they are forgotten with it.
        self.locked: dict[str, None] = {}
        self._reserved: list[tuple[str, str]] = []  # event keys reserved, in order
        self.began_at: float | None = None  # monotonic time of the open transaction's BEGIN
        self._change: Pending | None = None
        self._rows: list[tuple[str, Row]] = []  # (statistic, stored row) of the transaction
        # What the open savepoint rolls back: lengths of _rows, _seen_journal, _inserts,
        # locked and _reserved when it began.
        self._savepoint = (0, 0, 0, 0, 0)
        self._inserts: list[tuple[str, str, float]] = []  # new remembered ids, sent at COMMIT
        # The transaction's reserved event keys: seen_at, or None if not remembered.
        self._seen: dict[tuple[str, str], float | None] = {}
        self._seen_reads: list[Pending] = []  # their rows, fetched when first needed
        self._seen_journal: list[tuple[tuple[str, str], float | None]] = []  # key, seen_at before
        with pool.connection() as connection:
            self.slot = claim_slot(connection, writer, options.slots)
        #: The readers' connections (the poller's, bucket reads): opened on the IOLoop.
        self.readers: AsyncConnectionPool[Any] = AsyncConnectionPool(
            max_size=options.pool_size,
            configure=options.configure_async,
            **options.pool_arguments("feedback-state-readers"),
        )

    @classmethod
    def open(
        cls,
        options: PostgresOptions,
        model_name: str,
        model_kind: str | None = None,
        kinds: Mapping[str, str] | None = None,
        time_buckets: str | None = None,
    ) -> PostgresDialect:
        """Connect, migrate (or check) the keyspace and lease a slot; unreachable or refused
        is a :class:`StartupError` (exit 2): the orchestrator restarts the pod."""
        pool = ConnectionPool(
            max_size=1,
            configure=options.configure,
            **options.pool_arguments("feedback-state-writer"),
        )
        try:
            pool.open(wait=True, timeout=options.connect_timeout_seconds * 2)
            with pool.connection() as connection:
                migrate(
                    connection,
                    options.keyspace,
                    model_name,
                    model_kind,
                    kinds,
                    time_buckets,
                    options.slots,
                )
            return cls(pool, options, writer_id())
        except (psycopg.Error, PoolTimeout) as exc:
            pool.close()
            raise StartupError(
                f"cannot use the PostgreSQL state (--postgres_dsn, or libpq's PG* variables): {exc}"
            ) from exc
        except KeyspaceError:
            pool.close()
            raise

    def connection(self) -> psycopg.Connection[Any]:
        """The writer's connection, borrowed from the pool until it breaks."""
        if self._connection is not None and self._connection.broken:
            self.pool.putconn(self._connection)  # the pool discards it
            self._connection = None
        if self._connection is None:
            self._connection = self.pool.getconn()
        return self._connection

    def query(self, query: str, params: Any = None, binary: bool = False) -> list[Any]:
        """A statement whose rows are needed now (with whatever is queued)."""
        return self.pipe.execute(query, params, binary).fetchall()

    def prepare(
        self,
        statistics: Iterable[Statistic[Any, Any]],
        owners: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Make (or check) each statistic's table and vector width, under the keyspace's
        migration lock (replicas starting together create a table once)."""
        connection = self.connection()
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (keyspace_lock(self.keyspace),))
            for statistic in statistics:
                self._prepare(connection, statistic, (owners or {}).get(statistic.name, ()))

    def _prepare(
        self,
        connection: psycopg.Connection[Any],
        statistic: Statistic[Any, Any],
        owners: Sequence[str],
    ) -> None:
        name = statistic.name
        columns = statistic_columns(statistic)
        stored = stored_columns(connection, name)
        if not stored:
            connection.execute(create_statistic_table(statistic).encode())
        elif stored != columns:
            raise KeyspaceError(
                f"the database keyspace {self.keyspace!r} has a table {name!r} with columns "
                f"{stored}, but the statistic declares {columns}: rename the statistic, or use "
                "another --postgres_schema"
            )
        if statistic.width:
            width = str(statistic.width)
            connection.execute(
                "INSERT INTO meta VALUES (%s, %s) ON CONFLICT DO NOTHING", (f"width:{name}", width)
            )
            found = connection.execute(
                "SELECT value FROM meta WHERE key = %s", (f"width:{name}",)
            ).fetchone()
            if found is not None and found[0] != width:
                models = ", ".join(repr(m) for m in owners) or "a model"
                raise KeyspaceError(
                    f"model {models} declares the statistic {name!r} with {width} values, but "
                    f"the database keyspace {self.keyspace!r} holds it with {found[0]}: restore "
                    "the setting that sizes it (--score_bins/--error_buckets), or drop the schema"
                )
        self._upserts[name] = upsert(statistic)
        self._texts[name] = [i for i, (_, kind) in enumerate(statistic.keys) if kind == "text"]
        self._vectors[name] = [
            len(statistic.keys) + i
            for i, (_, kind) in enumerate(statistic.values)
            if kind == "vector"
        ]
        self.statistics[name] = statistic

    def load(self, statistic: Statistic[Any, Any]) -> Iterator[tuple[StateKey, list[Row]]]:
        """Every slot's all-time rows, not summed (the view merges them by the statistic's
        merge); vectors as our bytes. Runs in whatever transaction the caller opened."""
        columns = [name for name, _ in (*statistic.keys, *statistic.values)]
        found = self.query(
            f"SELECT model, segment, time_bucket{''.join(', ' + c for c in columns)} "
            f"FROM {statistic.name} WHERE time_bucket = %s ORDER BY model, segment",
            (ALL_TIME,),
            binary=True,
        )
        for stored, rows in itertools.groupby(found, key=lambda row: row[:3]):
            yield StateKey(*stored), [row[3:] for row in rows]

    @contextmanager
    def reading(self) -> Iterator[str]:
        """A REPEATABLE READ, read-only transaction (what :meth:`load` reads in it is one
        snapshot); yields that snapshot (``pg_snapshot`` text)."""
        self.pipe.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield self.query("SELECT pg_current_snapshot()::text")[0][0]
            self.commit()
        except BaseException:
            self.rollback()
            raise

    async def renew_lease(self, connection: psycopg.AsyncConnection[Any]) -> None:
        """The poller's, every few seconds: extend this writer's slot lease, or claim a slot
        again if it was lost (expired while the database was away, and taken)."""
        held = {"holder": self.writer, "lease": LEASE_SECONDS, "slot": self.slot}
        found = await (await connection.execute(RENEW_SLOT, held)).fetchone()
        if found is None:
            found = await (await connection.execute(CLAIM_SLOT, held)).fetchone()
            self.slot = int(found[0]) if found else shared_slot(self.writer, self.options.slots)
            log.warning("the state slot lease was lost: claimed again", extra={"slot": self.slot})

    def classes(self, model: str) -> set[int]:
        found = self.query("SELECT class FROM classes WHERE model = %s", (model,))
        return {int(c) for (c,) in found}

    def segments(self, model: str) -> set[str]:
        found = self.query("SELECT segment FROM segments WHERE model = %s", (model,))
        return {s for (s,) in found}

    def add_segment(self, model: str, segment: str) -> None:
        self.pipe.execute(
            "INSERT INTO segments VALUES (%s, %s) ON CONFLICT DO NOTHING", (model, segment)
        )

    def catalog(self) -> tuple[dict[str, MetricType], set[SeriesKey]]:
        types: dict[str, MetricType] = {}
        found: set[SeriesKey] = set()
        for kind, name in CUSTOM.items():
            for family, tags in self.query(
                f"SELECT DISTINCT family, tags FROM {name} WHERE time_bucket = %s", (ALL_TIME,)
            ):
                types[family] = kind
                found.add(series(family, tags))
        return types, found

    def forget_buckets(self, lo: int, below: int, limit: int) -> int:
        """Like SQLite's: the oldest ``limit`` buckets in [lo, below) of every table, deleted
        by key range in the statement that finds them."""
        buckets: set[int] = set()
        for name in self.statistics:
            found = self.query(
                f"WITH gone AS (SELECT DISTINCT time_bucket FROM {name} WHERE time_bucket >= %s "
                "AND time_bucket < %s ORDER BY time_bucket LIMIT %s), "
                f"deleted AS (DELETE FROM {name} WHERE time_bucket >= %s AND time_bucket <= "
                "(SELECT max(time_bucket) FROM gone)) SELECT time_bucket FROM gone",
                (lo, below, limit, lo),
            )
            buckets.update(bucket for (bucket,) in found)
        return len(buckets)

    def tallies(self) -> dict[str, int]:
        """The global tallies: every slot's changes summed."""
        found = self.query("SELECT name, sum(value)::bigint FROM tallies GROUP BY name")
        return {name: int(value) for name, value in found}

    def begin(self) -> None:
        """A transaction left open by a failure before the committer could roll it back (its
        first round trip) is rolled back first."""
        self.rollback()
        self._change = None
        self.began_at = time.monotonic()
        self.pipe.execute("BEGIN")

    def publish(self, deltas: Sequence[tuple[StateKey, Delta]]) -> None:
        """The change row other replicas' views apply; its xid is the commit's token."""
        if not deltas:
            return
        self._change = self.pipe.execute(
            "INSERT INTO changes (writer, payload) VALUES (%s, %s) RETURNING xid::text::bigint",
            (self.writer, encode_changes(self.statistics, deltas)),
        )

    def commit(self) -> object:
        self._send_inserts()
        self._send_rows()
        self.pipe.execute("COMMIT")
        self.pipe.flush()
        self.began_at = None
        change, self._change = self._change, None
        return None if change is None else int(change.fetchone()[0])

    def rollback(self) -> None:
        self.pipe.discard()
        self._change = None
        self._rows.clear()
        self._inserts.clear()
        self._seen.clear()
        self._seen_reads.clear()
        self._seen_journal.clear()
        self._reserved.clear()
        self.locked.clear()
        self.began_at = None
        connection = self._connection
        if connection is None or connection.broken:
            return
        if connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            connection.execute("ROLLBACK")

    def savepoint(self) -> None:
        self._savepoint = (
            len(self._rows),
            len(self._seen_journal),
            len(self._inserts),
            len(self.locked),
            len(self._reserved),
        )
        self.pipe.savepoint = False

    def rollback_to_savepoint(self) -> None:
        """Rows, ids and decisions of the batch are dropped; so are the locks it took (SQL
        releases them), and the keys it reserved under them, read first so that a late read
        cannot bring them back: a later batch locks them again."""
        rows, remembered, inserts, locked, reserved = self._savepoint
        del self._rows[rows:]
        del self._inserts[inserts:]
        while len(self._seen_journal) > remembered:
            key, before = self._seen_journal.pop()
            self._seen[key] = before
        if len(self._reserved) > reserved:
            self._seen_rows()
            for key in self._reserved[reserved:]:
                del self._seen[key]
            del self._reserved[reserved:]
        for name in list(self.locked)[locked:]:
            del self.locked[name]
        self.pipe.end_savepoint("ROLLBACK TO SAVEPOINT batch")

    def release_savepoint(self) -> None:
        self.pipe.end_savepoint("RELEASE SAVEPOINT batch")

    def lock(self, resource: str) -> None:
        """A transaction lock on a named resource (a request id, ``classes:<model>``...), taken
        once per transaction; queued: the server takes it before the statements after it."""
        storable(resource)
        if resource not in self.locked:
            self.locked[resource] = None
            self.pipe.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (self.lock_class, resource)
            )

    def reserve(self, keys: Sequence[tuple[str, str]]) -> None:
        """Lock the transaction's event keys (sorted: replicas lock them in one order, so these
        locks cannot deadlock) and read which are remembered, queued: the first statement that
        needs a result (the tallies) carries them, so a group of events costs no round trip per
        event. A replica redelivering one of them waits for this commit, then finds it."""
        wanted = sorted({key for key in keys if not has_nul(*key)} - self._seen.keys())
        if not wanted:
            return
        self._reserved += wanted
        locks = sorted({event_lock(self.keyspace, key) for key in wanted})
        self.pipe.execute(
            "SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) k", (locks,)
        )
        self._seen.update(dict.fromkeys(wanted))
        self._seen_reads.append(
            self.pipe.execute(
                "SELECT source, id, seen_at FROM unnest(%s::text[], %s::text[]) "
                "AS k(source, id) JOIN seen USING (source, id)",  # an index probe per key
                ([source for source, _ in wanted], [event_id for _, event_id in wanted]),
            )
        )

    def remember(self, key: tuple[str, str], now: float, forgotten_by: float) -> int:
        """Decided here, from the reserved keys' rows (a key not reserved is reserved now); a new
        id is inserted at COMMIT with the others. Plain INSERT: a conflict would be a broken
        lock, and fails the transaction (503, retried) rather than count an event twice."""
        if key not in self._seen:
            storable(*key)
            self.reserve([key])
        seen = self._seen_rows()
        at = seen[key]
        if at is None:
            self._inserts.append((*key, now))
            found = 2
        elif at <= forgotten_by:  # past its retention: counts again (a sweep may just have
            # deleted the row, ours or another replica's: then it is a new row after all)
            inserted = self.query(
                "INSERT INTO seen AS t VALUES (%s, %s, %s) ON CONFLICT (source, id) "
                "DO UPDATE SET seen_at = excluded.seen_at RETURNING (xmax = 0)",
                (*key, now),
            )
            found = 2 if inserted[0][0] else 1
        else:
            return 0
        self._seen_journal.append((key, at))
        seen[key] = now
        return found

    def _seen_rows(self) -> dict[tuple[str, str], float | None]:
        """The reserved keys' ``seen_at`` (None: not remembered), their reads fetched once."""
        reads, self._seen_reads = self._seen_reads, []
        for read in reads:
            for source, event_id, at in read.fetchall():
                self._seen[(source, event_id)] = at
        return self._seen

    def forget_ids(self, seen_by: float | None, limit: int) -> int:
        where, parameters = ("WHERE seen_at <= %s", (seen_by,)) if seen_by is not None else ("", ())
        found = self.query(
            "WITH gone AS (DELETE FROM seen WHERE (source, id) IN "
            f"(SELECT source, id FROM seen {where} ORDER BY seen_at LIMIT %s) RETURNING 1) "
            "SELECT count(*) FROM gone",
            (*parameters, limit),
        )
        return int(found[0][0])

    def join_tables(self, counts: RowCounts) -> PostgresJoinTables:
        return PostgresJoinTables(self.pipe, counts, self.lock)

    def write(self, keys: Sequence[StateKey], delta: Delta) -> None:
        """Kept until COMMIT (:meth:`_send_rows`); a rolled-back savepoint drops its rows."""
        for name, items in delta.parts.items():
            statistic = self.statistics[name]
            slot = 0 if statistic.merge == "last" else self.slot
            rows = statistic_rows(statistic, items)
            texts = self._texts[name]
            for key in keys:
                storable(key.model, key.segment)
            for row in rows:
                storable(*(row[i] for i in texts))
            self._rows += [(name, (slot, *key, *row)) for key in keys for row in rows]

    def _send_inserts(self) -> None:
        """The transaction's new remembered ids, one statement (plain INSERT: see remember)."""
        if self._inserts:
            sources, ids, times = zip(*self._inserts)
            self._inserts.clear()
            self.pipe.execute(
                "INSERT INTO seen SELECT * FROM unnest(%s::text[], %s::text[], %s::float8[])",
                (list(sources), list(ids), list(times)),
            )

    def _send_rows(self) -> None:
        """The transaction's rows merged by primary key, one upsert per statistic (by name),
        its rows in primary-key order (concurrent upserts in one order cannot deadlock)."""
        merged: dict[str, dict[Row, Row]] = {}
        for name, row in self._rows:
            width = ROW_OFFSET + len(self.statistics[name].keys)
            into = merged.setdefault(name, {})
            key, values = row[:width], row[width:]
            known = into.get(key)
            into[key] = values if known is None else self._merge(name, known, values)
        self._rows.clear()
        for name in sorted(merged):
            statistic = self.statistics[name]
            columns = [column for column, _ in statistic_columns(statistic)]
            vector_at = [ROW_OFFSET + i for i in self._vectors[name]]
            order = sort_key(len(statistic.keys))
            records = [
                dict(zip(columns, json_values((*key, *values), vector_at)))
                for key, values in sorted(merged[name].items(), key=lambda kv: order(kv[0]))
            ]
            self.pipe.execute(
                self._upserts[name],
                (orjson.dumps(records, option=orjson.OPT_SERIALIZE_NUMPY).decode(),),
            )

    def _merge(self, name: str, known: Row, values: Row) -> Row:
        """Two rows of one key by the statistic's merge (as its upsert would add them)."""
        statistic = self.statistics[name]
        if statistic.merge == "last":
            return values
        if statistic.merge == "moments":
            return tuple(combined_moments(known, values))
        kinds = [kind for _, kind in statistic.values]
        return tuple(
            add_vectors(a, b) if kind == "vector" else a + b
            for a, b, kind in zip(known, values, kinds)
        )

    def add_classes(self, model: str, classes: Iterable[int]) -> None:
        self.pipe.executemany(
            "INSERT INTO classes VALUES (%s, %s) ON CONFLICT DO NOTHING",
            [(model, c) for c in sorted(classes)],
        )

    def write_tallies(self, moved: dict[str, tuple[int, int]]) -> None:
        """This slot's row of each tally gets the change (the global value is the sum)."""
        self.pipe.executemany(
            "INSERT INTO tallies AS t VALUES (%s, %s, %s) ON CONFLICT (slot, name) DO UPDATE "
            "SET value = t.value + excluded.value",
            [(self.slot, name, after - before) for name, (before, after) in sorted(moved.items())],
        )

    def stats(self) -> dict[str, int]:
        return {"round_trips": self.pipe.round_trips, "statements": self.pipe.statements}

    def close(self) -> None:
        connection, self._connection = self._connection, None
        try:
            if connection is not None and not connection.broken:
                connection.execute(RELEASE_SLOT, (self.slot, self.writer))
        except psycopg.Error:
            log.warning("the state slot was not released (it expires)", exc_info=True)
        finally:
            if connection is not None:
                self.pool.putconn(connection)
            self.pool.close()


def event_lock(keyspace: str, key: tuple[str, str]) -> int:
    """The advisory lock (int64) of one event key in a keyspace."""
    digest = hashlib.blake2b(
        "\0".join((keyspace, *key)).encode(), digest_size=8, person=b"feedback-seen"
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


def json_values(row: Row, vectors: Sequence[int]) -> Row:
    """A stored row for JSON: its vector values as arrays (dense: the table's float8[])."""
    if not vectors:
        return row
    values = list(row)
    for i in vectors:
        values[i] = vector_array(values[i])
    return tuple(values)


def sort_key(keys: int) -> Callable[[Row], tuple[Any, ...]]:
    """A stored row's primary key, in the table's order (bucket, model, segment, keys, slot)."""
    own = slice(ROW_OFFSET, ROW_OFFSET + keys)
    return lambda row: (row[3], row[1], row[2], *row[own], row[0])


def upsert(statistic: Statistic[Any, Any]) -> str:
    """Add rows to a statistic's table (alias ``t``), merging each value by its merge."""
    return (
        f"INSERT INTO {statistic.name} AS t SELECT * FROM "
        f"json_populate_recordset(NULL::{statistic.name}, %s::json) "
        f"ON CONFLICT ({', '.join(primary_key(statistic))}) DO UPDATE SET "
        + ", ".join(merged(statistic, VECTOR_ADD, "t."))
    )
