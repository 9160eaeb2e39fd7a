"""Shared views without a database: the change-log codec, snapshots, and exactly-once
application of own commits, polled changes and reloads in any interleaving."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adserver.state.postgres.changes import (
    MAX_EXTRA,
    SharedViews,
    Snapshot,
    decode_changes,
    encode_changes,
)
from adserver.state.view import CUSTOM, Delta, Histogram, KeyedState, MetricsState
from cm_models.confusion import Cells, ConfusionMatrix
from cm_models.custom_metrics import CustomMetric
from cm_models.statistics import Moments, StateKey, Sums, moments_of, vector_bytes

WIDTH = 6
VECTORS = Sums(
    "spread", keys=[("truth", "int")], values=[("rows", "int"), ("v", "vector")], width=WIDTH
)
MOMENTS = Moments("moments", keys=[("truth", "int")])
REALS = Sums("errors", keys=[("label", "text")], values=[("total", "real"), ("rows", "int")])
MODEL = "m"


def prototype() -> MetricsState:
    return MetricsState((0, 1), (VECTORS, MOMENTS, REALS))


def comparable(value: Any) -> Any:
    """A table's content as plain values (arrays as lists), so two states compare with ==."""
    if isinstance(value, ConfusionMatrix):
        return value.classes, value.matrix().tolist()
    if isinstance(value, Histogram):
        return value.buckets.tolist(), value.total, value.count
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if not isinstance(v, int) or v}
    if isinstance(value, tuple):
        return tuple(comparable(v) for v in value)
    return value


def contents(views: KeyedState) -> dict[StateKey, dict[str, Any]]:
    return {
        key: {name: comparable(table) for name, table in view.tables.items()}
        for key, view in views.views.items()
    }


vectors = st.one_of(
    st.lists(st.integers(0, 9), min_size=WIDTH, max_size=WIDTH),  # dense mostly
    st.dictionaries(st.integers(0, WIDTH - 1), st.integers(1, 9), max_size=1).map(
        lambda d: [d.get(i, 0) for i in range(WIDTH)]  # sparse: at most one non-zero
    ),
)
series = st.tuples(st.sampled_from(["a", "b"]), st.sampled_from([(), (("k", "v"),)]))


@st.composite
def deltas(draw: st.DrawFn) -> Delta:
    """One delta of every statistic kind, with values exact in float64 (sums in any order)."""
    cells = draw(
        st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(1, 5)), max_size=3)
    )
    metrics = [
        CustomMetric(family, kind, float(draw(st.integers(1, 500))), tags)
        for kind in CUSTOM
        for family, tags in draw(st.lists(series, max_size=2))
    ]
    truths = draw(st.lists(st.integers(0, 2), max_size=2, unique=True))
    updates: dict[str, list[Any]] = {
        VECTORS.name: [(t, 1, vector_bytes(np.array(draw(vectors), float))) for t in truths],
        MOMENTS.name: [
            (
                t,
                *moments_of(
                    np.array(draw(st.lists(st.integers(0, 8), min_size=1, max_size=3)), float)
                ),
            )
            for t in truths
        ],
        REALS.name: [(draw(st.sampled_from(["x", "y"])), 0.5 * draw(st.integers(0, 8)), 1)],
    }
    truth, prediction, count = zip(*cells) if cells else ((), (), ())
    return Delta(
        Cells(np.array(truth, np.int64), np.array(prediction, np.int64), np.array(count, np.int64)),
        metrics=metrics,
        counters=[("events_accepted", "", draw(st.integers(1, 3))), ("labels", "joined", 2)],
        delays=[(float(draw(st.integers(0, 100_000))), draw(st.integers(1, 4)))],
        updates=updates,
    )


def admitted(delta: Delta) -> Delta:
    return delta.admitted(delta.metrics, 0, "")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["", "a/b"]), deltas()), min_size=1, max_size=4))
def test_decoded_changes_load_as_the_deltas_apply(keyed: list[tuple[str, Delta]]) -> None:
    """Every kind: dense and sparse vectors, moments, reals, cells, counters, delays, custom
    counters, gauges and timers; a payload is orjson, never pickle."""
    applied, loaded = (
        KeyedState({MODEL: prototype()}, MODEL),
        KeyedState({MODEL: prototype()}, MODEL),
    )
    pairs = [(StateKey(MODEL, segment), admitted(d)) for segment, d in keyed]
    statistics = prototype().statistics
    payload = encode_changes(statistics, pairs)
    assert payload.startswith(b"[[")
    for key, delta in pairs:
        applied.apply(key, delta)
    for key, name, rows in decode_changes(statistics, payload):
        loaded.load(key, name, rows)
    assert contents(loaded) == contents(applied)


def test_a_statistic_not_declared_here_is_skipped() -> None:
    """A replica with a newer configuration may write a statistic this one does not know."""
    delta = admitted(
        Delta(counters=[("events_accepted", "", 1)], updates={REALS.name: [("x", 1.0, 1)]})
    )
    payload = encode_changes(prototype().statistics, [(StateKey(MODEL), delta)])
    decoded = decode_changes(MetricsState().statistics, payload)
    assert [(name, rows) for _, name, rows in decoded] == [
        ("counters", [("events_accepted", "", 1)])
    ]


@pytest.mark.parametrize(
    ("text", "visible", "hidden"),
    [
        ("10:20:", [3, 9, 10, 19], [20, 25]),
        ("10:20:12,15", [9, 11, 13, 19], [12, 15, 20]),
        ("7:7:", [6], [7, 8]),
    ],
)
def test_snapshots_see_what_postgresql_sees(
    text: str, visible: list[int], hidden: list[int]
) -> None:
    snapshot = Snapshot.parse(text)
    assert str(snapshot) == text
    assert [snapshot.visible(x) for x in visible] == [True] * len(visible)
    assert [snapshot.visible(x) for x in hidden] == [False] * len(hidden)


class Database:
    """Transactions of several writers as PostgreSQL numbers and shows them: an xid at begin,
    commits in any order, a snapshot listing those in progress."""

    def __init__(self) -> None:
        self.next_xid = 3
        self.running: dict[int, tuple[int, Delta]] = {}
        self.committed: dict[int, tuple[int, Delta]] = {}

    def snapshot(self) -> Snapshot:
        xmin = min(self.running, default=self.next_xid)
        return Snapshot(xmin, self.next_xid, frozenset(self.running))

    def changes(self, since: Snapshot, now: Snapshot) -> list[tuple[int, bytes]]:
        statistics = MetricsState().statistics
        return [
            (xid, encode_changes(statistics, [(StateKey(MODEL, "s"), delta)]))
            for xid, (_, delta) in sorted(self.committed.items())
            if now.visible(xid) and not since.visible(xid)
        ]


# Commits and local applications weigh more: the races need several of them between two reads.
def applying(deltas: list[Delta]) -> Callable[[KeyedState], None]:
    """A reload's loader: the tables' contents as of its snapshot."""

    def load(views: KeyedState) -> None:
        for delta in deltas:
            views.apply(StateKey(MODEL, "s"), delta)

    return load


OPERATIONS = [
    *["begin", "commit", "local"] * 2,
    "abort",
    "take_poll",
    "poll",
    "take_reload",
    "reload",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(OPERATIONS), st.integers(0, 2), st.integers(1, 9)),
        min_size=20,
        max_size=80,
    )
)
def test_every_commit_counts_once_in_any_interleaving(program: list[tuple[str, int, int]]) -> None:
    """Writer 0 is this replica: its commits are applied locally some time after they commit
    (before or after a poll sees them); a poll's or reload's snapshot is taken, then applied
    later, with commits and local applications in between."""
    database = Database()
    views = KeyedState({MODEL: MetricsState()}, MODEL)
    shared = SharedViews(views, MetricsState().statistics)
    unapplied: list[int] = []  # own commits not yet applied locally
    applied_locally: set[int] = set()
    pending_poll: tuple[Snapshot, list[tuple[int, bytes]]] | None = None
    pending_reload: tuple[Snapshot, list[Delta]] | None = None
    for operation, writer, value in program:
        if operation == "begin":
            delta = Delta(counters=[(f"c{value % 3}", "", value)])
            database.running[database.next_xid] = (writer, delta)
            database.next_xid += 1
        elif operation in ("commit", "abort") and database.running:
            xid = sorted(database.running)[value % len(database.running)]
            writer_of, delta = database.running.pop(xid)
            if operation == "commit":
                database.committed[xid] = (writer_of, delta)
                if writer_of == 0:
                    unapplied.append(xid)
        elif operation == "local" and unapplied:
            xid = unapplied.pop(value % len(unapplied))
            shared.local(xid, [(StateKey(MODEL, "s"), database.committed[xid][1])])
            applied_locally.add(xid)
        elif operation == "take_poll" and pending_poll is None and pending_reload is None:
            now = database.snapshot()
            pending_poll = (now, database.changes(shared.base, now))
        elif operation == "poll" and pending_poll is not None:
            shared.poll(*pending_poll)
            pending_poll = None
        elif operation == "take_reload" and pending_poll is None and pending_reload is None:
            now = database.snapshot()
            stored = [d for x, (_, d) in database.committed.items() if now.visible(x)]
            pending_reload = (now, stored)
        elif operation == "reload" and pending_reload is not None:
            now, stored = pending_reload
            shared.reload(now, applying(stored))
            pending_reload = None
        expected: Counter[tuple[str, str]] = Counter()
        for xid, (_, delta) in database.committed.items():
            if shared.base.visible(xid) or xid in applied_locally:
                expected.update({(name, label): n for name, label, n in delta.parts["counters"]})
        assert +views.total(MODEL).counters == expected
        assert +views.at(StateKey(MODEL, "s")).counters == expected


def counted(xid: int, value: int) -> tuple[int, list[tuple[StateKey, Delta]]]:
    return xid, [(StateKey(MODEL), Delta(counters=[("c", "", value)]))]


def test_an_own_commit_after_a_reads_snapshot_survives_it() -> None:
    """Committed after the reload's snapshot, applied before the reload lands: kept, once."""
    views = KeyedState({MODEL: MetricsState()}, MODEL)
    shared = SharedViews(views, MetricsState().statistics)
    taken = Snapshot.parse("5:5:")
    shared.local(*counted(5, 10))
    shared.reload(taken, lambda v: v.apply(StateKey(MODEL), Delta(counters=[("c", "", 1)])))
    assert views.total(MODEL).count("c") == 11
    statistics = MetricsState().statistics
    payload = encode_changes(statistics, counted(5, 10)[1])
    shared.poll(Snapshot.parse("6:6:"), [(5, payload)])  # the poll that sees it: not again
    assert (views.total(MODEL).count("c"), shared.extra) == (11, {})
    shared.local(*counted(5, 10))  # nor a late local application
    assert views.total(MODEL).count("c") == 11


def gauge(xid: int, value: float) -> tuple[int, list[tuple[StateKey, Delta]]]:
    metric = CustomMetric("queue_depth", "GAUGE", value)
    return xid, [(StateKey(MODEL), admitted(Delta(metrics=(metric,))))]


def test_a_gauge_ends_as_the_database_holds_it_whatever_order_commits_arrive() -> None:
    """B commits 2 after A committed 1 (xid 10 < 11), B applies its own at once and polls A's
    later: the poll's re-read of the ``last`` rows puts the database's value (2) back."""
    views = KeyedState({MODEL: MetricsState()}, MODEL)
    statistics = MetricsState().statistics
    shared = SharedViews(views, statistics)
    shared.local(*gauge(11, 2.0))
    assert shared.last_dirty
    a_commit = encode_changes(statistics, gauge(10, 1.0)[1])
    stored = gauge(11, 2.0)[1][0][1]

    def the_database(into: KeyedState) -> None:
        into.apply(StateKey(MODEL), stored)

    shared.poll(Snapshot.parse("12:12:"), [(10, a_commit), (11, b"")], the_database)
    assert views.total(MODEL).custom.gauges == {("queue_depth", ()): 2.0}
    assert not shared.last_dirty


def test_own_commits_kept_beyond_the_bound_make_the_next_refresh_a_reload() -> None:
    views = KeyedState({MODEL: MetricsState()}, MODEL)
    shared = SharedViews(views, MetricsState().statistics)
    for xid in range(10, 10 + MAX_EXTRA + 1):
        shared.local(*counted(xid, 1))
    assert shared.needs_reload and len(shared.extra) == 1
    assert views.total(MODEL).count("c") == MAX_EXTRA + 1
    shared.reload(Snapshot.parse(f"{10 + MAX_EXTRA}:{10 + MAX_EXTRA}:"), lambda v: None)
    # the reload's snapshot shows all but the last commit (they come from the tables); the
    # last is put back once
    assert not shared.needs_reload
    assert views.total(MODEL).count("c") == 1
