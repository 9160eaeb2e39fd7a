"""The poller that keeps a replica's views equal to the shared database, on the IOLoop.

Every ``--postgres_refresh_seconds`` it reads, in one REPEATABLE READ transaction, the current
snapshot and the change rows committed since the previous one (:class:`SharedViews` applies
each once). When its last successful poll is older than half of
``--postgres_change_retention_seconds`` (an outage), change rows it never saw may have been
trimmed, so it reloads the views whole from the tables instead. Every few seconds it renews the
replica's slot lease (the store's statement) and trims the change log past its retention, a
bounded batch at a time (every replica does: two deleting the same rows skip each other's).

While the database is unreachable the views keep the last state read; :meth:`StateSync.healthy`
turns False within a few seconds (readiness fails on every replica, idle ones too) and
:meth:`StateSync.staleness` grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from adserver.state.committer import every_statistic
from adserver.state.postgres.changes import SharedViews, Snapshot
from adserver.state.postgres.reader import READ_STATEMENT_SECONDS, postgres_sql, snapshot_read
from adserver.state.reads import key_of
from adserver.state.view import KeyedState
from cm_models.statistics import ALL_TIME, Row, StateKey, Statistic

log = logging.getLogger(__name__)

#: A poll older than this (or two refresh periods, if longer) makes the replica unready.
HEALTHY_SECONDS = 3.0
#: Seconds between two renewals of the slot lease and two trims of the change log.
HOUSEKEEPING_SECONDS = 5.0
#: Change rows one trim deletes at most; a full batch trims again at the next poll.
TRIM_BATCH = 1000

SNAPSHOT = "SELECT pg_current_snapshot()::text"
#: The changes visible now but not in the previous snapshot (``%s`` twice: its text).
CHANGES_SINCE = (
    "SELECT xid::text::bigint, payload FROM changes "
    "WHERE xid >= pg_snapshot_xmin(%s::pg_snapshot) "
    "AND NOT pg_visible_in_snapshot(xid, %s::pg_snapshot) ORDER BY xid"
)
TRIM = (
    "DELETE FROM changes WHERE ctid = ANY(ARRAY("
    "SELECT ctid FROM changes WHERE at < now() - make_interval(secs => %s) LIMIT %s))"
)
Renew = Callable[[psycopg.AsyncConnection[Any]], Awaitable[object]]


class StateSync:
    """``shared``: the views, loaded at start-up (the snapshot they hold is its base);
    ``vector_sum``: the keyspace's aggregate of vectors (a reload sums every slot's rows);
    ``renew``: the store's renewal of its slot lease on a pooled connection (None: no lease).
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        shared: SharedViews,
        vector_sum: str,
        *,
        refresh_seconds: float = 0.25,
        retention_seconds: float = 120.0,
        timeout: float = 2.0,
        renew: Renew | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.shared = shared
        self.sql = postgres_sql(vector_sum)
        self.refresh_seconds = refresh_seconds
        self.retention_seconds = retention_seconds
        self.timeout = timeout
        self.renew = renew
        self.clock = clock
        self.synced = clock()  # when the views last matched the database (the start-up load)
        self._housekept = float("-inf")
        self._trim_more = False
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # ``last`` statistics (gauges): commits apply in the order they reach this replica,
        # not the database's, so each poll that moved anything re-reads their rows.
        self._lasts = [s for s in every_statistic(shared.views.prototypes) if not s.mergeable]
        self.polls = 0
        self.reloads = 0

    def start(self) -> None:
        """Poll until :meth:`close` (on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop polling. The loop also checks :attr:`_closing`: a cancellation that lands in
        the driver may come back as one of its errors, which the loop would take for an
        outage and go on."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def healthy(self) -> bool:
        return self.clock() - self.synced <= max(HEALTHY_SECONDS, 2 * self.refresh_seconds)

    def staleness(self) -> float:
        """Seconds since the snapshot the views last matched (about a poll's time when up)."""
        return max(0.0, self.clock() - self.synced)

    async def _run(self) -> None:
        while not self._closing:
            try:
                async with asyncio.timeout(self._limit()):
                    await self.refresh()
            except Exception as exc:  # an outage: keep the last state, try again
                if not self._failing:
                    log.warning("state sync failed: %s", exc or type(exc).__name__)
                self._failing = True
            else:
                if self._failing:
                    log.warning("state sync recovered")
                self._failing = False
            await asyncio.sleep(self.refresh_seconds)

    def _reloading(self, now: float) -> bool:
        """Change rows this replica has not seen may be trimmed soon: read the tables instead."""
        return now - self.synced > self.retention_seconds / 2

    def _limit(self) -> float:
        """Seconds a round may take: a poll's statements and the wait for a connection, or a
        reload's (which reads every table)."""
        if self._reloading(self.clock()) or self.shared.needs_reload:
            return self.timeout + READ_STATEMENT_SECONDS
        return 2 * self.timeout

    async def refresh(self) -> None:
        """One round: a poll (or a reload after an outage), then the lease and the trim when
        they are due."""
        started = self.clock()
        if self._reloading(started) or self.shared.needs_reload:
            await self.reload()
        else:
            await self.poll()
        self.synced = started
        due = started - self._housekept >= HOUSEKEEPING_SECONDS
        if due or self._trim_more:
            await self._housekeeping(renew=due)
            if due:
                self._housekept = started

    async def poll(self) -> int:
        """The changes committed since the views' snapshot; returns how many were applied."""
        base = str(self.shared.base)
        async with snapshot_read(self.pool, self.timeout, self.timeout) as connection:
            snapshot = await scalar(connection, SNAPSHOT)
            cursor = await connection.execute(CHANGES_SINCE, (base, base), binary=True)
            rows = await cursor.fetchall()
            lasts = None
            if rows or self.shared.last_dirty:
                lasts = await self._read(connection, self._lasts)
        self.polls += 1
        return self.shared.poll(
            Snapshot.parse(snapshot), rows, None if lasts is None else partial(fold, stored=lasts)
        )

    async def reload(self) -> None:
        """The views reset to the tables' all-time rows, all read at one snapshot; folded in one
        go (a half-folded view would be read by scrapes), bounded by the caps."""
        async with snapshot_read(self.pool, self.timeout) as connection:
            snapshot = await scalar(connection, SNAPSHOT)
            stored = await self._read(connection, every_statistic(self.shared.views.prototypes))
        self.reloads += 1
        self.shared.reload(Snapshot.parse(snapshot), partial(fold, stored=stored))

    async def _read(
        self, connection: psycopg.AsyncConnection[Any], statistics: list[Statistic[Any, Any]]
    ) -> list[tuple[str, list[Row]]]:
        """The all-time rows of ``statistics``, every slot's summed (``last``: one row per key,
        slot 0's, listed)."""
        stored = []
        for statistic in statistics:
            grouped = ("model", "segment")
            if statistic.mergeable:
                query = self.sql.spanned(statistic, grouped, "time_bucket = %s")
            else:
                query = self.sql.listed(statistic, grouped, "time_bucket = %s")
            cursor = await connection.execute(query, (ALL_TIME,), binary=True)
            stored.append((statistic.name, await cursor.fetchall()))
        return stored

    async def _housekeeping(self, renew: bool) -> None:
        async with self.pool.connection(timeout=self.timeout) as connection:
            if renew and self.renew is not None:
                await self.renew(connection)
            cursor = await connection.execute(TRIM, (self.retention_seconds, TRIM_BATCH))
            self._trim_more = cursor.rowcount >= TRIM_BATCH


def fold(views: KeyedState, *, stored: list[tuple[str, list[Row]]]) -> None:
    """Rows of each statistic by (model, segment) into the views (as ``load_views``: a model
    not configured, or a statistic it does not declare, stays in the tables, unread)."""
    for name, rows in stored:
        for (model, segment), group in itertools.groupby(rows, key=key_of):
            prototype = views.prototypes.get(model)
            if prototype is not None and name in prototype.statistics:
                views.load(StateKey(model, segment), name, [row[2:] for row in group])


async def scalar(connection: psycopg.AsyncConnection[Any], query: str) -> Any:
    cursor = await connection.execute(query)
    row = await cursor.fetchone()
    assert row is not None
    return row[0]
