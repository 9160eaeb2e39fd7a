"""Counts keyed by (model, segment, time bucket): what the committer writes where.

Streams of entries with random models, segments and prediction times go through a memory and a
durable store; every all-time view, every model's totals and every bucket row (read back with
plain SQL) must equal the sum of the entries that belong there, also after a restart.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adserver.catalogue.families import SEGMENT_OVERFLOW
from adserver.errors import RequestError
from adserver.state.buckets import TimeBuckets
from adserver.state.committer import BUCKET_BATCH, PURGE_INTERVAL, CommitPolicy
from adserver.state.join import Joiner, Label, LoggedRows
from adserver.state.sqlite.schema import MIGRATIONS, create_keyed_table
from adserver.state.sqlite.store import SQLiteDialect, SQLiteStore, StateFileError, state_path
from adserver.state.store import Entry
from adserver.state.view import (
    MISSING_SEGMENT,
    OVERFLOW_SEGMENT,
    Delta,
    MetricsState,
    Placement,
    segment_name,
)
from cm_models import MultiClassNumeric
from cm_models.confusion import Cells, ConfusionMatrix
from cm_models.statistics import ALL_TIME, StateKey, Sums
from tests.support.stores import BUCKETS, scoring
from tests.support.timing import FakeClock

NOW = 1_700_000_000.0
VERSION_3 = Path(__file__).parent / "data" / "state_v3"
DAY = 86400


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def cells_of(matrix: ConfusionMatrix) -> Counter[tuple[int, int]]:
    """The non-zero cells of a matrix, by (truth, prediction)."""
    counts = matrix.matrix()
    return Counter(
        {
            (t, p): int(counts[i, j])
            for i, t in enumerate(matrix.classes)
            for j, p in enumerate(matrix.classes)
            if counts[i, j]
        }
    )


def open_store(
    directory: str | None,
    states: dict[str, MetricsState],
    clock: FakeClock,
    *,
    joiner: Joiner | None = None,
    buckets: TimeBuckets = BUCKETS,
    server: str = "server",
    **policy: Any,
) -> SQLiteStore:
    dialect = SQLiteDialect.open(directory, server)
    options = {"retention": 1e9, "max_ids": 10_000, **policy}
    return SQLiteStore(
        states,
        dialect,
        server,
        CommitPolicy(**options),
        joiner=joiner,
        buckets=buckets,
        clock=clock,
    )


def prototypes() -> dict[str, MetricsState]:
    return {"seg": MetricsState(), "flat": MetricsState(), "server": MetricsState()}


def scored(truth: list[int], predicted: list[int]) -> Delta:
    cells = Cells.from_labels(np.array(truth), np.array(predicted))
    counters = (("rows_accepted", "", len(truth)), ("events_accepted", "", 1))
    return Delta(cells=cells, counters=counters)


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    model = draw(st.sampled_from(["seg", "flat", None]))
    segment = (draw(st.sampled_from(["x", "y", "", None])),) if model == "seg" else ()
    offset = draw(st.none() | st.integers(0, 4 * DAY))
    size = draw(st.integers(1, 3))
    truth = draw(st.lists(st.integers(0, 2), min_size=size, max_size=size))
    predicted = draw(st.lists(st.integers(0, 2), min_size=size, max_size=size))
    time = None if offset is None else NOW - offset
    return Entry(scored(truth, predicted), model=model, placement=Placement(segment, time))


class Expected:
    """The sums the entries make, computed apart from the committer."""

    def __init__(self, buckets: TimeBuckets) -> None:
        self.levels = buckets.levels
        self.views: dict[tuple[str, str], Counter[tuple[int, int]]] = {}
        self.rows: Counter[tuple[str, str]] = Counter()
        self.events: Counter[str] = Counter()
        self.buckets: dict[tuple[str, str, int, int], Counter[tuple[int, int]]] = {}

    def add(self, entry: Entry, now: float) -> None:
        model = entry.model or "server"
        segment = segment_name(entry.placement.segment)
        counts = Counter(
            {(int(t), int(p)): int(n) for t, p, n in next(iter(entry.delta.cells)).items()}
        )
        rows = sum(counts.values())
        self.events[model] += 1
        for key in {(model, segment), (model, "")}:
            self.views.setdefault(key, Counter()).update(counts)
            self.rows[key] += rows
        time = entry.placement.time
        for level, granularity in enumerate(self.levels):
            if time is None:
                break
            start = int(time // granularity.seconds) * granularity.seconds
            if start + granularity.seconds > now - granularity.retention:
                self.buckets.setdefault((model, segment, level, start), Counter()).update(counts)

    def check(self, store: SQLiteStore) -> None:
        views = store.views
        for (model, segment), counts in self.views.items():
            view = views.total(model) if segment == "" else views.segments(model)[segment]
            assert cells_of(view.confusion) == counts, (model, segment)
            assert view.count("rows_accepted") == self.rows[model, segment]
            events = self.events[model] if segment == "" else 0
            assert view.count("events_accepted") == events  # an event counts under its model
        for model in ("seg", "flat", "server"):
            segments = {s for m, s in self.views if m == model and s}
            assert set(views.segments(model)) == (segments if model == "seg" else set())
        stored: dict[tuple[str, str, int, int], Counter[tuple[int, int]]] = {}
        found = store.connection.execute(
            "SELECT model, segment, time_bucket, truth, prediction, count FROM cells "
            "WHERE time_bucket != ?",
            (ALL_TIME,),
        )
        for model, segment, bucket, truth, prediction, count in found:
            level, start = store.buckets.decode(bucket)
            stored.setdefault((model, segment, level, start), Counter())[truth, prediction] = count
        assert stored == self.buckets
        rows = store.connection.execute(
            "SELECT COUNT(*) FROM counters WHERE time_bucket != ? AND name = 'events_accepted'",
            (ALL_TIME,),
        )
        assert rows.fetchone() == (0,)  # the event part never counts in a bucket


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(entries(), min_size=1, max_size=4), min_size=1, max_size=6),
    durable=st.booleans(),
)
def test_every_view_and_bucket_is_the_sum_of_its_entries(
    batches: list[list[Entry]], durable: bool
) -> None:
    expected = Expected(BUCKETS)
    clock = FakeClock(NOW)
    with tempfile.TemporaryDirectory() as directory:
        store = open_store(directory if durable else None, prototypes(), clock)
        for batch in batches:
            assert run(store.commit(batch)) == [True] * len(batch)
            for entry in batch:
                expected.add(entry, clock.now)
            expected.check(store)
        run(store.close())
        if durable:
            reopened = open_store(directory, prototypes(), clock)
            expected.check(reopened)
            run(reopened.close())


def test_segment_names() -> None:
    assert segment_name(()) == ""
    assert segment_name(("a", None, "")) == f"a/{MISSING_SEGMENT}/{MISSING_SEGMENT}"
    assert segment_name(("a", "x" * 65)) == OVERFLOW_SEGMENT
    assert segment_name(("a\nb",)) == OVERFLOW_SEGMENT
    assert segment_name(("x" * 64,)) == "x" * 64


def test_segments_beyond_the_cap_count_in_the_overflow(tmp_path: Path) -> None:
    """A model's cap (its override of the default) admits that many segments; a new one beyond
    it counts as __overflow__, its rows counted; a refused batch gives its segments back; the
    admitted ones are stored."""
    clock = FakeClock(NOW)
    caps = {"max_segments": 1, "segment_caps": {"seg": 3}, "max_classes": 2}

    def entry(segment: str, truth: list[int]) -> Entry:
        return Entry(scored(truth, truth), model="seg", placement=Placement((segment,), NOW))

    store = open_store(str(tmp_path), prototypes(), clock, **caps)
    assert run(store.commit([entry("a", [0]), entry("b", [1, 1])])) == [True, True]
    with pytest.raises(RequestError):  # the new segment came with a third class: refused
        run(store.commit([entry("c", [0]), entry("d", [3])]))
    assert store.segments["seg"] == {"a", "b"}
    assert run(store.commit([entry("d", [0, 1]), entry("e", [1])])) == [True, True]
    segments = store.views.segments("seg")
    assert set(segments) == {"a", "b", "d", OVERFLOW_SEGMENT}
    assert segments[OVERFLOW_SEGMENT].count("rows_accepted") == 1
    assert store.views.total("seg").count(SEGMENT_OVERFLOW) == 1
    assert store.views.total("seg").count("rows_accepted") == 6
    run(store.close())
    reopened = open_store(str(tmp_path), prototypes(), clock, **caps)
    assert reopened.segments["seg"] == {"a", "b", "d"}
    assert run(reopened.commit([entry("f", [1]), entry("a", [0])])) == [True, True]
    assert reopened.views.segments("seg")[OVERFLOW_SEGMENT].count("rows_accepted") == 2
    assert reopened.views.total("seg").count(SEGMENT_OVERFLOW) == 2
    assert reopened.views.segments("seg")["a"].count("rows_accepted") == 2
    run(reopened.close())


def two_dimensions() -> dict[str, MetricsState]:
    return {"m": MetricsState(), "server": MetricsState()}


def bucket_cells(store: SQLiteStore) -> dict[tuple[str, int], int]:
    """Rows per (segment, bucket start) of the finest buckets, read with plain SQL."""
    lo, hi = store.buckets.level_range(0)
    found = store.connection.execute(
        "SELECT segment, time_bucket, SUM(count) FROM cells WHERE time_bucket >= ? "
        "AND time_bucket < ? GROUP BY segment, time_bucket",
        (lo, hi),
    )
    return {(s, store.buckets.decode(b)[1]): n for s, b, n in found}


@pytest.mark.parametrize("label_first", [False, True])
def test_a_label_counts_under_its_predictions_segment_and_time(label_first: bool) -> None:
    """Joined or parked, a label's rows count in the prediction's segment (the label's values
    fill what the prediction did not name) and in the buckets of the prediction's time, not of
    the label's arrival; the prediction's rows count there too."""
    clock = FakeClock(NOW)
    joiner = Joiner({"m": MultiClassNumeric()}, ttl=DAY)
    store = open_store(None, two_dimensions(), clock, joiner=joiner)
    predicted_at = NOW - 3600
    logged = LoggedRows("m/r", "response", np.array([1, 2, 2]), predicted_at, ("ep", None))
    label = Label(("m/r",), 0, np.array([1, 2, 0]), segment=(None, "tag"))
    first, second = (label, logged) if label_first else (logged, label)
    assert run(store.commit([Entry(operation=first, model="m")])) == [True]
    clock.now += 600
    assert run(store.commit([Entry(operation=second, model="m")])) == [True]
    segments = store.views.segments("m")
    assert set(segments) == {"ep/tag", f"ep/{MISSING_SEGMENT}"}
    assert cells_of(segments["ep/tag"].confusion) == {(1, 1): 1, (2, 2): 1, (0, 2): 1}
    assert segments[f"ep/{MISSING_SEGMENT}"].count("predicted_rows") == 3  # where it named
    minute = int(predicted_at // 60) * 60
    assert bucket_cells(store) == {("ep/tag", minute): 3}
    total = store.views.total("m")
    assert total.count("rows_accepted") == 3 and total.count("predicted_rows") == 3
    assert total.labelled("labels") == ({"parked": 3, "late": 3} if label_first else {"joined": 3})


def test_each_model_joins_with_its_own_scorer() -> None:
    """Two models' predictions under one request id are kept apart by their namespaced ids;
    each label is scored by its model (one in the transaction, one outside it, as a user's)."""
    calls: list[tuple[str, bool]] = []
    store: SQLiteStore

    def recording(name: str, model: MultiClassNumeric) -> Any:
        def score(truth: Any, response: Any, request: Any) -> Any:
            calls.append((name, store.connection.in_transaction))
            return model.observe(truth, response, request)

        return score

    models = {
        "a": scoring(recording("a", MultiClassNumeric()), thread_safe=True),
        "b": scoring(recording("b", MultiClassNumeric()), thread_safe=False),
    }
    states = {"a": MetricsState((0, 1, 2)), "b": MetricsState((5, 6)), "server": MetricsState()}
    store = open_store(None, states, FakeClock(NOW), joiner=Joiner(models, ttl=DAY))
    operations = [
        ("a", LoggedRows("a/r1", "response", np.array([0, 1]), NOW)),
        ("b", LoggedRows("b/r1", "response", np.array([5]), NOW)),
        ("b", Label(("b/r1",), 0, np.array([6]))),
        ("a", Label(("a/r1",), 0, np.array([0, 2]))),
    ]
    entries = [Entry(operation=operation, model=model) for model, operation in operations]
    assert run(store.commit(entries)) == [True] * 4
    assert cells_of(store.views.total("a").confusion) == {(0, 0): 1, (2, 1): 1}
    assert cells_of(store.views.total("b").confusion) == {(6, 5): 1}
    assert store.views.total("a").confusion.classes == [0, 1, 2]
    assert store.views.total("b").confusion.classes == [5, 6]
    assert ("a", True) in calls and ("b", False) in calls
    assert ("a", False) not in calls and ("b", True) not in calls
    assert store.views.models() == ["a", "b", "server"]


def test_old_buckets_go_in_bounded_sweeps_and_the_coarser_stay(tmp_path: Path) -> None:
    """Past its retention a granularity's buckets are deleted, a few per sweep and table, the
    coarser ones kept; at every level the rows add up to the same."""
    buckets = TimeBuckets.parse("1m=2h,1h=2d,1d=30d")
    clock = FakeClock(NOW - NOW % DAY + 3600)  # an hour into a day
    store = open_store(str(tmp_path), {"server": MetricsState()}, clock, buckets=buckets)
    for minute in range(20):  # 20 minutes of one hour, two rows each
        entry = Entry(scored([1, 0], [1, 1]), placement=Placement((), clock.now + 60 * minute))
        assert run(store.commit([entry])) == [True]

    def per_level() -> list[tuple[int, int]]:
        """(buckets, rows) of cells at each level."""
        found = []
        for level in range(3):
            lo, hi = buckets.level_range(level)
            found.append(
                store.connection.execute(
                    "SELECT COUNT(DISTINCT time_bucket), TOTAL(count) FROM cells "
                    "WHERE time_bucket >= ? AND time_bucket < ?",
                    (lo, hi),
                ).fetchone()
            )
        return [(int(b), int(r)) for b, r in found]

    assert per_level() == [(20, 40), (1, 40), (1, 40)]
    clock.now += 3 * 3600  # the minutes are past their two hours; the hour and day are kept
    left = [per_level()[0][0]]
    while left[-1]:
        clock.now += PURGE_INTERVAL
        assert run(store.commit([Entry()])) == [True]
        left.append(per_level()[0][0])
    assert all(0 < a - b <= BUCKET_BATCH for a, b in itertools.pairwise(left))
    assert per_level() == [(0, 0), (1, 40), (1, 40)]
    assert store.state.count("rows_accepted") == 40  # all-time counts never age
    run(store.close())


ERRORS = Sums("errors", keys=[("truth", "int")], values=[("total", "real")])


def test_a_version_4_file_is_keyed_by_time_and_keeps_everything(tmp_path: Path) -> None:
    """A v4 file's statistic tables, a model's own too, get the primary key (time_bucket,
    model, segment, own keys) with every row kept; stored predictions and parked labels gain
    their segment, and the file goes on joining."""
    path = state_path(str(tmp_path))
    connection = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:3]:  # a version 3 file, as that server wrote it
        if isinstance(migration, str):
            for statement in migration.split(";"):
                if statement.strip():
                    connection.execute(statement)
        else:
            migration(connection)
    for table in ("predictions", "parked_blocks"):
        connection.execute(f"ALTER TABLE {table} DROP COLUMN segment")
    connection.execute("INSERT INTO predictions VALUES ('r', 0, 0, NULL, 0, 1, 1e12)")
    connection.execute(
        "INSERT INTO parked_blocks VALUES ('r', 0, 1, ?, ?, ?, ?, 1e12)",
        (np.dtype(np.int64).str, b"[]", np.array([1]).tobytes(), NOW - 60),
    )
    MIGRATIONS[3](connection)  # type: ignore[operator]
    connection.executemany(
        "INSERT INTO meta VALUES (?, ?)", [("schema_version", "4"), ("model_name", "server")]
    )
    columns = [("model", "TEXT"), ("segment", "TEXT"), ("time_bucket", "INTEGER")]
    columns += [("truth", "INTEGER"), ("total", "REAL")]
    connection.execute(
        create_keyed_table("errors", columns, ("model", "segment", "time_bucket", "truth"))
    )
    connection.execute("INSERT INTO errors VALUES ('server', '', ?, 1, 2.5)", (ALL_TIME,))
    connection.execute("INSERT INTO cells VALUES ('server', '', ?, 1, 1, 4)", (ALL_TIME,))
    connection.close()
    clock = FakeClock(NOW)
    joiner = Joiner({"server": MultiClassNumeric()}, ttl=DAY)
    states = {"server": MetricsState(statistics=[ERRORS])}
    store = open_store(str(tmp_path), states, clock, joiner=joiner)
    for table in ("errors", "cells", "counters", "custom_timers"):
        assert primary_keys(store.connection, table)[:3] == ["time_bucket", "model", "segment"]
    assert primary_keys(store.connection, "errors") == ["time_bucket", "model", "segment", "truth"]
    assert store.state.tables["errors"] == {(1,): (2.5,)}
    assert cells_of(store.state.confusion) == {(1, 1): 4}
    logged = LoggedRows("r", "response", np.array([1]), NOW - 30)
    assert run(store.commit([Entry(operation=logged)])) == [True]
    assert store.state.count("labels", "late") == 1
    assert cells_of(store.state.confusion) == {(1, 1): 5}
    run(store.close())


def primary_keys(connection: sqlite3.Connection, table: str) -> list[str]:
    info = connection.execute(f"PRAGMA table_info({table})").fetchall()
    return [name for _, name in sorted((row[5], row[1]) for row in info if row[5])]


def test_the_version_3_fixture_ends_keyed_by_time(tmp_path: Path) -> None:
    """The v3 file (tests/data/state_v3) goes through v4 to v5: time-first keys, a segments
    table, segment columns where the join keeps its rows."""
    connection = sqlite3.connect(state_path(str(tmp_path)))
    connection.executescript((VERSION_3 / "state.sql").read_text())
    connection.close()
    store = open_store(str(tmp_path), {"m": MetricsState()}, FakeClock(NOW), server="m")
    for table in ("cells", "counters", "label_delay", "custom_counters", "custom_timers"):
        assert primary_keys(store.connection, table)[:3] == ["time_bucket", "model", "segment"]
    assert primary_keys(store.connection, "segments") == ["model", "segment"]
    for table in ("predictions", "parked_blocks"):
        assert "segment" in [
            row[1] for row in store.connection.execute(f"PRAGMA table_info({table})")
        ]
    assert store.state.count("rows_accepted") > 0
    run(store.close())


def test_a_models_kind_is_claimed_per_model(tmp_path: Path) -> None:
    SQLiteDialect.open(str(tmp_path), "server", "k0", {"a": "k1", "b": "k2"}).close()
    SQLiteDialect.open(str(tmp_path), "server", "k0", {"a": "k1", "c": "k3"}).close()
    with pytest.raises(StateFileError, match="'a'"):
        SQLiteDialect.open(str(tmp_path), "server", "k0", {"a": "k9"})


def test_the_time_buckets_of_an_entry(tmp_path: Path) -> None:
    """Keys for a fresh prediction: one per granularity; an all-time entry has none."""
    clock = FakeClock(NOW)
    store = open_store(None, {"server": MetricsState()}, clock)
    run(store.commit([Entry(scored([1], [1]), placement=Placement((), NOW))]))
    run(store.commit([Entry(scored([1], [1]))]))
    found = store.connection.execute("SELECT DISTINCT time_bucket FROM cells").fetchall()
    assert sorted(b for (b,) in found) == sorted(BUCKETS.keys(NOW, NOW))
    assert store.views.at(StateKey("server")).count("rows_accepted") == 2
