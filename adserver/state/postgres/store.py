"""The committer over PostgreSQL: every replica's views hold the global state.

A replica's own commits are applied to its views right after they commit (as with SQLite);
the other replicas' arrive through the change log, which the poller (:class:`StateSync`)
reads every ``--postgres_refresh_seconds``. :class:`SharedViews` applies each committed
transaction exactly once, whichever way it came first. At start-up the views are loaded whole
from one REPEATABLE READ snapshot.
"""

from __future__ import annotations

import time
from typing import Any

from psycopg_pool import AsyncConnectionPool

from adserver.state.committer import Committer, load_views
from adserver.state.postgres.changes import SharedViews, Snapshot
from adserver.state.postgres.dialect import STUCK_SECONDS, PostgresDialect, PostgresOptions
from adserver.state.postgres.schema import VECTOR_SUM
from adserver.state.postgres.sync import StateSync
from adserver.state.view import Delta, KeyedState
from cm_models.statistics import StateKey


class PostgresStore(Committer[PostgresDialect]):
    """The committer over one keyspace; :meth:`start` starts its poller once serving."""

    sync: StateSync | None = None

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The readers' connections (poller, bucket reads), opened with the IOLoop."""
        return self.dialect.readers

    @property
    def options(self) -> PostgresOptions:
        return self.dialect.options

    def _load_views(self) -> None:
        """The snapshot and every table's all-time rows, in one REPEATABLE READ transaction."""
        self.shared = SharedViews(self.views, self.dialect.statistics)
        with self.dialect.reading() as snapshot:
            self.shared.reload(Snapshot.parse(snapshot), self._loader)

    def _loader(self, views: KeyedState) -> None:
        load_views(self.dialect, views)

    def _apply_committed(self, token: object, deltas: list[tuple[StateKey, Delta]]) -> None:
        assert token is None or isinstance(token, int)
        self.shared.local(token, deltas)

    async def start(self) -> None:
        """With the IOLoop running: open the readers' pool and start polling."""
        await self.pool.open(wait=False)
        options = self.options
        self.sync = StateSync(
            self.pool,
            self.shared,
            VECTOR_SUM,
            refresh_seconds=options.refresh_seconds,
            retention_seconds=options.change_retention_seconds,
            timeout=options.connect_timeout_seconds,
            renew=self.dialect.renew_lease,
        )
        self.sync.start()

    @property
    def keyspace(self) -> str:
        return self.dialect.keyspace

    def round_trips(self) -> int:
        return self.dialect.pipe.round_trips

    def staleness(self) -> float:
        """Seconds since the views last matched the database (0 before polling: just loaded)."""
        return 0.0 if self.sync is None else self.sync.staleness()

    def healthy(self) -> bool:
        """Readiness: the poller reaches the database (the views are current) and no commit
        has been stuck for :data:`STUCK_SECONDS` (behind a lock, say: events wait behind it)."""
        began = self.dialect.began_at
        stuck = began is not None and time.monotonic() - began > STUCK_SECONDS
        return self.sync is not None and self.sync.healthy() and not stuck

    async def close(self) -> None:
        if self.sync is not None:
            await self.sync.close()
        await super().close()
        await self.dialect.readers.close()
