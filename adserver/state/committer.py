"""The backend-neutral committer: every policy of a commit, over a backend's :class:`Dialect`.

Dedup (an event key counts once within the retention), caps (classes, custom series), catalog
admission, the join, housekeeping (trim and expire, in bounded batches, on a schedule), group
commit and the bookkeeping a rollback puts back all live here, once. A dialect supplies only the
statements: a transaction and its savepoints, remembered ids, join tables, and the rows of
declared statistics keyed by :class:`StateKey`.

What replicas share is state, kept in the store: the classes (``classes``), the segments, the
custom catalog (the custom statistics' own keys) and the counts of remembered ids and rows
(tallies). A dialect that is its store's only writer (SQLite holds a lock on its file) has them
read once at start-up, kept in memory and written through in each transaction. A shared dialect
(PostgreSQL, many replicas) has the tallies read inside every transaction, and the classes,
segments and catalog re-read under a lock whenever a cap decision depends on them; its commits
are published (``publish``) for the other replicas' views, and a transaction the database
aborts for concurrency (a deadlock, a serialization failure) is run again whole.

An event is acknowledged only after its transaction committed; a redelivered event finds its
key remembered and changes nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from adserver.catalogue import reasons
from adserver.catalogue.families import (
    EVENTS_DUPLICATE,
    EVICTED,
    EXPIRED,
    LABEL_EVICTED,
    LABEL_EXPIRED,
    LABELS,
    METRICS_REJECTED,
    SEGMENT_OVERFLOW,
)
from adserver.errors import BadRequest, InternalError, RequestError, StartupError, Unavailable
from adserver.state.buckets import TimeBuckets
from adserver.state.join import Joiner, JoinTables, Piece, Scores, Unscored
from adserver.state.store import Clock, Entry, StateStore
from adserver.state.view import (
    OVERFLOW_SEGMENT,
    Delta,
    KeyedState,
    MetricsState,
    Placement,
    segment_name,
)
from cm_models.base import InvalidFeedback
from cm_models.custom_metrics import (
    CustomMetric,
    MetricCatalog,
    MetricType,
    SeriesKey,
    family_name,
)
from cm_models.statistics import (
    ALL_TIME,
    DEFAULT_SEGMENT,
    Row,
    StateKey,
    Statistic,
    vector_width,
)

log = logging.getLogger(__name__)

PURGE_INTERVAL = 60.0  # seconds between sweeps of expired ids and rows
# Most seen ids, logged requests and parked labels one commit deletes per table: a sweep that
# finds more goes on at the next commit, so no transaction does work that grew with history.
PURGE_BATCH = 1000
# Seen ids are trimmed to this fraction of --dedup_max_ids under the bound (1/1000: 1000 ids at
# the default), so a full table pays one batched delete per thousand events, not one per event.
TRIM_SLACK_DIVISOR = 1000
# Buckets of one granularity a sweep deletes per statistic table: the rest go at the next commit.
BUCKET_BATCH = 4
# The tallies a store keeps (a row each): remembered event ids, and rows the join holds.
SEEN_IDS, LOGGED_ROWS, PARKED_ROWS = "seen_ids", "logged_rows", "parked_rows"
TALLIES = (SEEN_IDS, LOGGED_ROWS, PARKED_ROWS)
# A transaction a shared database aborted for concurrency is run this many times at most, after
# a jittered pause of up to RETRY_PAUSE * 2**attempt seconds; then its events get 503.
MAX_ATTEMPTS = 5
RETRY_PAUSE = 0.005
# Upper bounds of the events-per-transaction histogram (group commit's batch sizes).
TRANSACTION_EVENTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Series a shared store's catalog remembers refusing, at most (then it forgets them all).
REFUSED_SERIES = 10_000
# SQLSTATEs of the aborts worth a retry, by the reason they are counted under.
RETRY_REASONS = {"40P01": "deadlock", "40001": "serialization"}

BatchResult = list[bool] | RequestError  # per batch: applied flags, or why it failed
# One transaction's outcomes, all-time deltas (for the views) and the dialect's commit token.
Written = tuple[list[BatchResult], list[tuple[StateKey, Delta]], object]
_Batch = tuple[Sequence[Entry], Scores | None, "asyncio.Future[list[bool]]"]


@dataclass
class RowCounts:
    """Rows the join tables hold, kept with every change (never counted), so bounds are checked
    for free; restored with the database on rollback."""

    logged: int = 0  # row slots of logged requests (input and prediction of a row share one)
    parked: int = 0

    def copy(self) -> RowCounts:
        return RowCounts(self.logged, self.parked)


class StoredJoinTables(JoinTables, Protocol):
    """A dialect's join tables, with the housekeeping the committer schedules."""

    def expire(self, now: float, batch: int, dropped: Counter[str]) -> bool:
        """Drop up to ``batch`` requests and labels past their time; True if more are due."""

    def evict(self, max_rows: int, batch: int, dropped: Counter[str]) -> None:
        """Above ``max_rows``, drop up to ``batch`` requests and labels, in eviction order."""


class Dialect(Protocol):
    """The statements of one backend. Calls between :meth:`begin` and :meth:`commit` (or
    :meth:`rollback`) run in one transaction, on one thread."""

    #: Commits reach a disk (they run on the writer thread, counts are written); False is an
    #: in-process database, run inline, whose counts live only in the view.
    durable: bool
    #: The exceptions that mean a transient fault (the client retries on 503).
    errors: tuple[type[Exception], ...]
    #: Other processes write the same store (replicas): see the module's docstring.
    shared: bool
    #: The exceptions after which the whole transaction is run again (deadlocks, serialization
    #: failures of a shared database); they abort the transaction, so nothing of it is kept.
    retryable: tuple[type[Exception], ...]

    def prepare(
        self,
        statistics: Iterable[Statistic[Any, Any]],
        owners: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Make (or check) each statistic's table, and the width of its vectors; ``owners``:
        the models that declare each statistic (by name), which a refusal names."""

    def load(self, statistic: Statistic[Any, Any]) -> Iterator[tuple[StateKey, list[Row]]]:
        """Every stored row of a statistic, by key."""

    def classes(self, model: str) -> set[int]:
        """The classes a model's counts have admitted."""

    def segments(self, model: str) -> set[str]:
        """The segments a model's counts have admitted (those the cap counts)."""

    def add_segment(self, model: str, segment: str) -> None: ...

    def forget_buckets(self, lo: int, below: int, limit: int) -> int:
        """Delete the rows of up to ``limit`` buckets in [lo, below) of each statistic (the
        oldest first); returns how many buckets went."""

    def tallies(self) -> dict[str, int]: ...

    def begin(self) -> None: ...

    def commit(self) -> object:
        """Commit; a token naming the commit for the views (None where no one else reads it)."""

    def publish(self, deltas: Sequence[tuple[StateKey, Delta]]) -> None:
        """Shared only, just before :meth:`commit`: the transaction's all-time deltas, for the
        other replicas' views."""

    def lock(self, resource: str) -> None:
        """Hold ``resource`` (e.g. ``classes:<model>``) exclusively until the transaction ends:
        shared only (one writer needs no lock)."""

    def catalog(self) -> tuple[dict[str, MetricType], set[SeriesKey]]:
        """The custom families (with their types) and series the store holds."""

    def rollback(self) -> None:
        """Undo the open transaction, if SQL has not already."""

    def savepoint(self) -> None: ...

    def rollback_to_savepoint(self) -> None: ...

    def release_savepoint(self) -> None: ...

    def reserve(self, keys: Sequence[tuple[str, str]]) -> None:
        """Right after :meth:`begin`: the event keys the transaction will :meth:`remember` (a
        shared dialect locks and reads them all at once)."""

    def remember(self, key: tuple[str, str], now: float, forgotten_by: float) -> int:
        """Record an event key at ``now``: 2 for a new row, 1 for a known key last seen at or
        before ``forgotten_by`` (it counts again), 0 for a duplicate."""

    def forget_ids(self, seen_by: float | None, limit: int) -> int:
        """Delete up to ``limit`` of the oldest remembered ids (of those last seen at or before
        ``seen_by``, if given); returns how many went."""

    def join_tables(self, counts: RowCounts) -> StoredJoinTables: ...

    def write(self, keys: Sequence[StateKey], delta: Delta) -> None:
        """Add a delta's rows under each key to its statistics' tables, by their merge."""

    def add_classes(self, model: str, classes: Iterable[int]) -> None: ...

    def write_tallies(self, moved: dict[str, tuple[int, int]]) -> None:
        """The tallies that moved in this transaction: name -> (before, after)."""

    def close(self) -> None: ...


class Mark(NamedTuple):
    """What the committer keeps beside the database, put back when a transaction rolls back."""

    classes: int  # admitted classes journalled so far
    segments: int  # admitted segments journalled so far
    catalog: int  # the custom-metric catalog's own mark
    seen_count: int
    last_purge: float
    row_counts: RowCounts

    @property
    def tallies(self) -> tuple[int, int, int]:
        return tallies(self.seen_count, self.row_counts)


def tallies(seen_count: int, counts: RowCounts) -> tuple[int, int, int]:
    """The stored tallies' values, in :data:`TALLIES` order."""
    return (seen_count, counts.logged, counts.parked)


@dataclass(frozen=True)
class CommitPolicy:
    """What every commit enforces, whatever the backend: the same for SQLite and the next."""

    retention: float  # seconds an event key counts once
    max_ids: int  # event keys remembered at most
    join_max_rows: int = 1_000_000
    max_classes: int = 1000  # per model
    reserved_prefixes: tuple[str, ...] = ()  # custom families a model may not name
    max_custom_series: int | None = None
    max_segments: int = 100  # per model, unless segment_caps names it
    segment_caps: Mapping[str, int] = field(default_factory=dict)

    def segment_cap(self, model: str) -> int:
        return self.segment_caps.get(model, self.max_segments)


@dataclass
class Writes:
    """One batch's deltas grouped by the keys they go to (all-time keys alone, a row part's
    buckets together), so each statistic is one statement per group."""

    groups: dict[tuple[StateKey, ...], Delta] = field(default_factory=dict)

    def add(self, keys: tuple[StateKey, ...], delta: Delta) -> None:
        if delta.parts:
            known = self.groups.get(keys)
            self.groups[keys] = delta if known is None else known + delta

    def all_time(self) -> list[tuple[StateKey, Delta]]:
        """What the in-memory views apply, in the order it came."""
        return [(keys[0], d) for keys, d in self.groups.items() if keys[0].bucket == ALL_TIME]


@dataclass
class CommitStats:
    """What the transactions were like: how many, how many events each held (group commit),
    and the retries by reason."""

    transactions: int = 0
    events: int = 0
    sizes: list[int] = field(default_factory=lambda: [0] * len(TRANSACTION_EVENTS))
    retries: Counter[str] = field(default_factory=Counter)

    def committed(self, events: int) -> None:
        self.transactions += 1
        self.events += events
        for i, bound in enumerate(TRANSACTION_EVENTS):
            if events <= bound:
                self.sizes[i] += 1
                break


D = TypeVar("D", bound=Dialect)


class Committer(StateStore, Generic[D]):
    """``states``: each model's empty prototype (classes and declared statistics), the server's
    own (``server_model``) among them; :attr:`state` is the server model's totals."""

    def __init__(
        self,
        states: Mapping[str, MetricsState],
        dialect: D,
        server_model: str,
        policy: CommitPolicy,
        *,
        joiner: Joiner | None = None,
        buckets: TimeBuckets,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(states[server_model])
        self.dialect = dialect
        self.policy = policy
        self.joiner = joiner
        self.buckets = buckets
        self.clock = clock
        self.server_model = server_model
        self.views = KeyedState(states, server_model)
        self._declared = {m: frozenset(state.statistics) for m, state in states.items()}
        # Only mergeable statistics count in time buckets (a window merges its buckets).
        self._summed = {
            m: frozenset(n for n, st in state.statistics.items() if st.mergeable)
            for m, state in states.items()
        }
        dialect.prepare(every_statistic(states), owners(states))
        self._load_views()
        # Shared state, cached: the writer (the writer thread, or the IOLoop in memory mode)
        # decides custom metric types and classes in commit order, identically in any mode.
        self.catalog = MetricCatalog(policy.reserved_prefixes, policy.max_custom_series)
        # Shared: series the catalog refused after a re-read (a type clash, a reserved name):
        # refused again without one (types never change); forgotten on rollback, and when full.
        self._refused_series: set[SeriesKey] = set()
        for view in self.views.views.values():
            custom = view.custom
            self.catalog.load(custom.types, [*custom.counters, *custom.gauges, *custom.timers])
        # Admitted classes and segments by model (each model has its own caps).
        self.classes = {
            m: dialect.classes(m) | set(state.confusion.classes) for m, state in states.items()
        }
        self._class_journal: list[tuple[str, int]] = []  # (model, class) in admission order
        self.segments = {m: dialect.segments(m) for m in states}
        self._segment_journal: list[tuple[str, str]] = []
        stored = dialect.tallies()
        self.seen_count = stored.get(SEEN_IDS, 0)
        self.row_counts = RowCounts(stored.get(LOGGED_ROWS, 0), stored.get(PARKED_ROWS, 0))
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-writer")
        self._pending: list[_Batch] = []
        self._flushing: asyncio.Task[None] | None = None
        self._closed = False
        self._last_purge = float("-inf")
        self.stats = CommitStats()

    def _load_views(self) -> None:
        """Fill the views from the store at start-up."""
        load_views(self.dialect, self.views)

    def _apply_committed(self, token: object, deltas: list[tuple[StateKey, Delta]]) -> None:
        """After commit: the committed all-time deltas to the in-memory views, in commit order
        (``token``: the dialect's name of the commit)."""
        for key, delta in deltas:
            self.views.apply(key, delta)

    async def commit(self, entries: Sequence[Entry]) -> list[bool]:
        """A join whose model may not run in the transaction (a user's) is written once to
        learn what it scores, rolled back, scored here on the IOLoop, and written again."""
        scores = None
        if self.joiner is not None:
            for entry in entries:  # most commits join nothing: no scores to keep
                if entry.operation is not None:
                    scores = self.joiner.scores(len(entries))
                    break
        while True:
            try:
                return await self._commit(entries, scores)
            except Unscored:
                if scores is None or not scores.score():
                    raise

    async def _commit(self, entries: Sequence[Entry], scores: Scores | None) -> list[bool]:
        if self._closed:
            raise Unavailable("the server is shutting down", reasons.SHUTTING_DOWN)
        if not self.dialect.durable:
            try:
                written = self._write([(entries, scores)])
            except self.dialect.errors as exc:
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
                        self._write_retrying,
                        [(entries, scores) for entries, scores, _ in group],
                    )
                    outcomes = self._settle(*written)
                    self.stats.committed(sum(len(entries) for entries, *_ in group))
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

    def _settle(
        self, outcomes: list[BatchResult], deltas: list[tuple[StateKey, Delta]], token: object
    ) -> list[BatchResult]:
        self._apply_committed(token, deltas)
        return outcomes

    def _write_retrying(self, batches: list[tuple[Sequence[Entry], Scores | None]]) -> Written:
        """:meth:`_write`, run again after an abort the dialect calls retryable (its effects
        were rolled back and undone), after a short jittered pause."""
        for attempt in itertools.count(1):
            try:
                return self._write(batches)
            except self.dialect.retryable as exc:
                if attempt >= MAX_ATTEMPTS:
                    raise
                reason = RETRY_REASONS.get(getattr(exc, "sqlstate", None) or "", "other")
                self.stats.retries[reason] += 1
                log.info("transaction retried", extra={"reason": reason, "attempt": attempt})
                time.sleep(random.uniform(0, RETRY_PAUSE * 2**attempt))
        raise AssertionError("unreachable")

    def _write(self, batches: list[tuple[Sequence[Entry], Scores | None]]) -> Written:
        """One transaction for all batches; a batch that fails is rolled back alone."""
        now = self.clock()
        dialect = self.dialect
        dialect.begin()
        dialect.reserve(
            [e.event_key for entries, _ in batches for e in entries if e.event_key is not None]
        )
        if dialect.shared:  # what the other replicas changed since: bounds are global
            stored = dialect.tallies()
            self.seen_count = stored.get(SEEN_IDS, 0)
            self.row_counts = RowCounts(stored.get(LOGGED_ROWS, 0), stored.get(PARKED_ROWS, 0))
        start = self._mark()
        outcomes: list[BatchResult] = []
        deltas: list[tuple[StateKey, Delta]] = []
        try:
            housekeeping = self._housekeeping(now)
            if housekeeping is not None:
                writes = Writes()
                writes.add((StateKey(self.server_model),), housekeeping)
                deltas += self._persist(writes)
            isolate = len(batches) > 1  # a lone batch that fails rolls back the whole transaction
            for entries, scores in batches:
                if isolate:
                    dialect.savepoint()
                mark = self._mark() if isolate else start
                try:
                    applied, batch_deltas = self._attempt(entries, now, scores)
                except (RequestError, InvalidFeedback) as exc:
                    if not isolate:
                        dialect.rollback()
                        self._undo(start)
                        return [as_request_error(exc)], [], None
                    dialect.rollback_to_savepoint()
                    self._undo(mark)
                    outcomes.append(as_request_error(exc))
                else:
                    outcomes.append(applied)
                    deltas += batch_deltas
                if isolate:
                    dialect.release_savepoint()
            self._write_tallies(start)
            if dialect.shared:
                dialect.publish(deltas)
            token = dialect.commit()
        except BaseException:
            try:
                dialect.rollback()
            finally:
                self._undo(start)
            raise
        return outcomes, deltas, token

    def _mark(self) -> Mark:
        return Mark(
            len(self._class_journal),
            len(self._segment_journal),
            self.catalog.mark(),
            self.seen_count,
            self._last_purge,
            self.row_counts.copy(),
        )

    def _undo(self, mark: Mark) -> None:
        self.seen_count, self._last_purge = mark.seen_count, mark.last_purge
        self._refused_series.clear()  # a refusal may have rested on what is rolled back
        self.row_counts = mark.row_counts.copy()
        while len(self._class_journal) > mark.classes:
            model, admitted = self._class_journal.pop()
            self.classes[model].discard(admitted)
        while len(self._segment_journal) > mark.segments:
            model, segment = self._segment_journal.pop()
            self.segments[model].discard(segment)
        self.catalog.rollback(mark.catalog)

    def _attempt(
        self, entries: Sequence[Entry], now: float, scores: Scores | None
    ) -> tuple[list[bool], list[tuple[StateKey, Delta]]]:
        """One batch's writes; with joins, an attempt that raises :class:`Unscored` if it needs
        scores computed outside (rolled back like a refused batch)."""
        if scores is None:
            return self._write_batch(entries, now, None)
        with scores.attempt():
            return self._write_batch(entries, now, scores)

    def _write_batch(
        self, entries: Sequence[Entry], now: float, scores: Scores | None
    ) -> tuple[list[bool], list[tuple[StateKey, Delta]]]:
        applied = []
        writes = Writes()
        for entry in entries:
            model = entry.model or self.server_model
            declared = self._declared.get(model)
            if declared is None:
                raise InternalError(
                    f"no model {model!r} is configured", reasons.INTERNAL_SERVER_ERROR
                )
            new = entry.event_key is None or self._first_sighting(entry.event_key, now)
            applied.append(new)
            delta = entry.delta if new else Delta(counters=((EVENTS_DUPLICATE, "", 1),))
            pieces: list[Piece] = [(entry.placement, delta)]
            if new and entry.operation is not None:
                if self.joiner is None or scores is None:
                    raise BadRequest("this model cannot join labels", reasons.JOIN_UNSUPPORTED)
                tables = self.dialect.join_tables(self.row_counts)
                pieces += self.joiner.apply(tables, entry.operation, now, scores, model)
            for placement, piece in pieces:
                if not piece.parts.keys() <= declared:
                    unknown = sorted(piece.parts.keys() - declared)
                    log.error("a model's observation names undeclared statistics: %s", unknown)
                    raise InternalError(
                        f"the model's observation names statistics it does not declare: {unknown}",
                        reasons.INTERNAL_SERVER_ERROR,
                    )
                self._place(model, placement, piece, now, writes)
        return applied, self._persist(writes)

    def _place(
        self, model: str, placement: Placement, delta: Delta, now: float, writes: Writes
    ) -> None:
        """The event part under the model; the row part under its segment, all time and in
        each kept bucket of its prediction time."""
        rows, event = delta.split()
        self._check_classes(model, rows)
        if rows.parts:
            segment, overflow = self._segment(model, placement.segment, rows)
            if overflow:
                event = event + Delta(counters=((SEGMENT_OVERFLOW, "", overflow),))
            writes.add((StateKey(model, segment),), rows)
            buckets = self.buckets.keys(placement.time, now) if placement.time is not None else ()
            summed = rows.only(self._summed[model]) if buckets else Delta()
            writes.add(tuple(StateKey(model, segment, b) for b in buckets), summed)
        writes.add((StateKey(model),), self._admit_metrics(event))

    def _segment(self, model: str, values: tuple[str | None, ...], rows: Delta) -> tuple[str, int]:
        """The segment a row part counts in, and its rows if that is the overflow: a new
        segment beyond the model's cap (or a name no one can read) counts as ``__overflow__``."""
        if not values:
            return DEFAULT_SEGMENT, 0
        name = segment_name(values)
        known = self.segments[model]
        if name in known:
            return name, 0
        cap = self.policy.segment_cap(model)
        if self.dialect.shared and name != OVERFLOW_SEGMENT and len(known) < cap:
            # Another replica may have admitted it, or others up to the cap (at the cap, the
            # cached set is the whole set: no segment is admitted anywhere any more).
            self.dialect.lock(f"segments:{model}")
            known |= self.dialect.segments(model)
            if name in known:
                return name, 0
        if name == OVERFLOW_SEGMENT or len(known) >= cap:
            return OVERFLOW_SEGMENT, rows.row_count
        known.add(name)
        self._segment_journal.append((model, name))
        if self.dialect.durable:
            self.dialect.add_segment(model, name)
        return name, 0

    def _persist(self, writes: Writes) -> list[tuple[StateKey, Delta]]:
        """Bucket rows go to the database in either mode (windows read them there); all-time
        counts only to a durable store: in memory mode :class:`MetricsState` is their only home
        (the count tables of an in-memory database would only ever be written)."""
        for keys, delta in writes.groups.items():
            if self.dialect.durable or keys[0].bucket != ALL_TIME:
                self.dialect.write(keys, delta)
        return writes.all_time()

    def _write_tallies(self, start: Mark) -> None:
        """The tallies that moved in this transaction, written once at its end."""
        if not self.dialect.durable:
            return
        now = tallies(self.seen_count, self.row_counts)
        if now == start.tallies:
            return
        moved = zip(TALLIES, start.tallies, now)
        self.dialect.write_tallies(
            {name: (then, value) for name, then, value in moved if then != value}
        )

    def _check_classes(self, model: str, delta: Delta) -> None:
        """The matrix is dense (classes squared): refuse an event that would grow a model's too
        far."""
        new: set[int] = set()
        for cells in delta.cells:
            new.update(cells.truth.tolist(), cells.prediction.tolist())
        if not new:
            return
        known = self.classes.get(model)
        if known is None:
            known = self.classes[model] = self.dialect.classes(model)
        new -= known
        if not new:
            return
        if self.dialect.shared:  # admitted by another replica since, or the cap reached there
            self.dialect.lock(f"classes:{model}")
            known |= self.dialect.classes(model)
            new -= known
            if not new:
                return
        if len(known) + len(new) > self.policy.max_classes:
            raise BadRequest(
                f"the event would make {len(known) + len(new)} classes; at most "
                f"{self.policy.max_classes} are kept (--max_classes)",
                reasons.TOO_MANY_CLASSES,
            )
        known |= new
        self._class_journal += [(model, c) for c in new]
        if self.dialect.durable:
            self.dialect.add_classes(model, new)

    def _admit_metrics(self, delta: Delta) -> Delta:
        """Custom metrics become statistics, but those whose family clashes or that exceed the
        series cap, which are dropped and counted."""
        if not delta.metrics:
            return delta
        if self.dialect.shared:
            self._refresh_catalog(delta.metrics)
        kept, refused = self.catalog.admit(delta.metrics)
        if refused and self.dialect.shared:
            if len(self._refused_series) >= REFUSED_SERIES:
                self._refused_series.clear()
            admitted = {id(m) for m in kept}
            self._refused_series.update(
                (family_name(m), m.tags) for m in delta.metrics if id(m) not in admitted
            )
        return delta.admitted(kept, refused, METRICS_REJECTED)

    def _refresh_catalog(self, metrics: Sequence[CustomMetric]) -> None:
        """Series this replica has not seen may have been admitted by another (or families of
        other types): read the catalog again, under its lock. At the series cap the cached
        catalog is the whole catalog (no series is admitted anywhere any more)."""
        catalog = self.catalog
        if catalog.max_series is not None and len(catalog.series) >= catalog.max_series:
            return
        known = catalog.series.__contains__
        refused = self._refused_series.__contains__
        if any(
            not known(s) and not refused(s) for s in ((family_name(m), m.tags) for m in metrics)
        ):
            self.dialect.lock("catalog")
            catalog.refresh(*self.dialect.catalog())

    def _first_sighting(self, key: tuple[str, str], now: float) -> bool:
        """Record the event key; False if it was seen within the retention window.

        Only a new row counts in ``seen_count``: an id back after its retention (not purged
        yet) is new to the counts but keeps its one row.
        """
        found = self.dialect.remember(key, now, now - self.policy.retention)
        self.seen_count += found == 2
        return found > 0

    def _housekeeping(self, now: float) -> Delta | None:
        """Before each commit, work bounded by what came since: trim what is over a bound (the
        oldest first); every ``PURGE_INTERVAL``, forget ids and rows past their time to live."""
        dropped: Counter[str] = Counter()
        tables = self.dialect.join_tables(self.row_counts)
        max_ids = self.policy.max_ids
        if self.seen_count > max_ids:
            # Down to a little under the bound: one statement trims for the next many commits.
            excess = self.seen_count - max_ids + max_ids // TRIM_SLACK_DIVISOR
            self.seen_count -= self.dialect.forget_ids(None, min(excess, PURGE_BATCH))
        if now - self._last_purge >= PURGE_INTERVAL:
            forgotten = self.dialect.forget_ids(now - self.policy.retention, PURGE_BATCH)
            self.seen_count -= forgotten
            more = tables.expire(now, PURGE_BATCH, dropped) or forgotten == PURGE_BATCH
            if not self._age_buckets(now) and not more:
                self._last_purge = now  # else more is due: the next commit goes on
        tables.evict(self.policy.join_max_rows, PURGE_BATCH, dropped)
        counters = [(EVICTED, reason, n) for reason, n in dropped.items() if n]
        labels_lost = dropped[LABEL_EXPIRED] + dropped[LABEL_EVICTED]
        if labels_lost:
            counters.append((LABELS, EXPIRED, labels_lost))
        return Delta(counters=tuple(counters)) if counters else None

    def _age_buckets(self, now: float) -> bool:
        """Per granularity, delete a few of the buckets past its retention; True if more may be
        left (each level's buckets are one key range, the oldest first)."""
        more = False
        for level in range(len(self.buckets.levels)):
            lo, _ = self.buckets.level_range(level)
            below = self.buckets.first_kept(level, now)
            more |= self.dialect.forget_buckets(lo, below, BUCKET_BATCH) >= BUCKET_BATCH
        return more

    async def close(self) -> None:
        self._closed = True
        if self._flushing is not None:
            await self._flushing
        self._writer.shutdown(wait=True)
        self.dialect.close()


def every_statistic(states: Mapping[str, MetricsState]) -> list[Statistic[Any, Any]]:
    """The statistics of every model, once each; two models may share a name only for the same
    declaration (they share its table)."""
    found: dict[str, Statistic[Any, Any]] = {}
    for model, state in states.items():
        for name, statistic in state.statistics.items():
            known = found.setdefault(name, statistic)
            if (known.keys, known.values, known.merge, known.width) != (
                statistic.keys,
                statistic.values,
                statistic.merge,
                statistic.width,
            ):
                raise StartupError(
                    f"model {model!r} declares a statistic {name!r} unlike another model's of "
                    "that name: rename one of them"
                )
    return list(found.values())


def owners(states: Mapping[str, MetricsState]) -> dict[str, list[str]]:
    """The models that declare each statistic, by its name."""
    found: dict[str, list[str]] = {}
    for model, state in states.items():
        for name in state.statistics:
            found.setdefault(name, []).append(model)
    return found


def statistic_rows(statistic: Statistic[Any, Any], items: Sequence[Any]) -> list[Row]:
    """A delta's rows of a statistic for a dialect to write, every vector value checked to be
    bytes of ``width`` values (dense or sparse, :func:`vector_bytes`): a table adds vectors
    element by element, so one of another width (a model's bug) would fail its statement, or be
    stored and fail every read after. Only lengths and headers are read, not the values."""
    rows = list(statistic.rows(items))
    first = len(statistic.keys)
    vectors = [first + i for i, (_, kind) in enumerate(statistic.values) if kind == "vector"]
    if not vectors:
        return rows
    faults = (vector_fault(row[i], statistic.width) for row in rows for i in vectors)
    fault = next((found for found in faults if found is not None), None)
    if fault is not None:
        log.error("a model's observation has %s for %r", fault, statistic.name)
        raise InternalError(
            f"the model's statistic {statistic.name!r} has vectors of {statistic.width} float64, "
            f"but its observation has {fault}",
            reasons.INTERNAL_SERVER_ERROR,
        )
    return rows


def vector_fault(value: Any, width: int) -> str | None:
    """What is wrong with a row's vector value, if anything."""
    if not isinstance(value, bytes):
        return f"a {type(value).__name__}, not bytes"
    try:
        found = vector_width(value)
    except ValueError:
        return f"{len(value)} bytes that are not a vector"
    return None if found == width else f"a vector of {found}"


def load_views(dialect: Dialect, views: KeyedState) -> None:
    """Merge everything a store holds into ``views``: at start-up, or another replica's (counts
    add by each statistic's merge). Rows of a model no longer configured stay in the store,
    unread."""
    for statistic in every_statistic(views.prototypes):
        for key, rows in dialect.load(statistic):
            prototype = views.prototypes.get(key.model)
            if prototype is not None and statistic.name in prototype.statistics:
                views.load(key, statistic.name, rows)


def as_request_error(exc: Exception) -> RequestError:
    if isinstance(exc, InvalidFeedback):
        return BadRequest(str(exc), exc.reason)
    assert isinstance(exc, RequestError)
    return exc
