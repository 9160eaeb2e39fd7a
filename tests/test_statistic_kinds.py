"""Vector and moments statistics in the store: persisted, reloaded, merged, and read by span.

A test-only model declares a keyed vector (counts by bin) and keyed moments of values around
1e9 (where sums of squares would cancel); everything goes through the committer, and what comes
back (reloaded, merged from two stores, or read over buckets) must equal numpy on exactly the
values written: vectors to the count, moments within 1e-9.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adserver.errors import RequestError, StartupError
from adserver.state.committer import CommitPolicy, load_views
from adserver.state.sqlite.reader import SQLiteBucketReader
from adserver.state.sqlite.store import SQLiteDialect, SQLiteStore, StateFileError, state_path
from adserver.state.store import Entry
from adserver.state.view import Delta, KeyedState, MetricsState, Placement
from cm_models.statistics import Moments, StateKey, Statistic, Sums, moments_of, vector_bytes
from tests.support.events import feedback
from tests.support.http import scrape, send_event, value
from tests.support.processes import ServerFactory
from tests.support.statistic_models import SPREAD
from tests.support.stores import BUCKETS
from tests.support.timing import FakeClock

WIDTH = 5
MOMENTS = Moments("kind_moments", keys=[("part", "int")])
NOW = 1_780_000_000.5
END = (int(NOW) // 60 + 1) * 60  # the end of the current minute: where windows end
HOUR, DAY = 3600, 86400
CENTRE = 1e9
SPREAD_OF_VALUES = 1e3


def vectors(width: int = WIDTH) -> Sums:
    return Sums(
        "kind_vectors",
        keys=[("part", "int")],
        values=[("rows", "int"), ("counts", "vector")],
        width=width,
    )


VECTORS = vectors()


@dataclass(frozen=True)
class Batch:
    """One event's values, of one group, predicted at ``time``, in ``segment`` ("" = none)."""

    group: int
    values: tuple[float, ...]
    time: float = NOW
    segment: str = ""


def bins(values: np.ndarray) -> np.ndarray:
    return (np.floor(values).astype(np.int64) % WIDTH).astype(np.intp)


def delta_of(batch: Batch, statistic: Sums = VECTORS) -> Delta:
    values = np.array(batch.values)
    counts = np.bincount(bins(values), minlength=statistic.width)
    return Delta(
        updates={
            statistic.name: [(batch.group, values.size, vector_bytes(counts))],
            MOMENTS.name: [(batch.group, *moments_of(values))],
        }
    )


def open_store(
    directory: Path | None, *statistics: Statistic[Any, Any], model: str = "m"
) -> SQLiteStore:
    return SQLiteStore(
        {model: MetricsState(statistics=statistics or (VECTORS, MOMENTS))},
        SQLiteDialect.open(str(directory) if directory else None, model),
        model,
        CommitPolicy(retention=1e9, max_ids=10**6),
        buckets=BUCKETS,
        clock=FakeClock(NOW),
    )


def entries(batches: Sequence[Batch], first: int = 0) -> list[Entry]:
    return [
        Entry(
            delta_of(batch),
            ("src", str(first + i)),
            placement=Placement((batch.segment,) if batch.segment else (), batch.time),
        )
        for i, batch in enumerate(batches)
    ]


def commit(store: SQLiteStore, batches: Sequence[Batch], first: int = 0) -> None:
    async def scenario() -> None:
        for entry in entries(batches, first):
            assert await store.commit([entry]) == [True]

    asyncio.run(scenario())


def check(tables: dict[str, Any], batches: Sequence[Batch]) -> None:
    """The tables equal numpy over the batches: counts exactly, moments within 1e-9."""
    groups = sorted({b.group for b in batches})
    assert sorted(tables[VECTORS.name]) == sorted(tables[MOMENTS.name]) == [(g,) for g in groups]
    for group in groups:
        values = np.concatenate([b.values for b in batches if b.group == group])
        rows, counts = tables[VECTORS.name][(group,)]
        assert rows == values.size
        assert counts.tolist() == np.bincount(bins(values), minlength=WIDTH).tolist()
        count, shift, mean, m2 = tables[MOMENTS.name][(group,)]
        assert count == values.size
        assert shift + mean == pytest.approx(values.mean(), rel=1e-12)
        assert m2 == pytest.approx(values.var() * values.size, rel=1e-9, abs=1e-9)


def stream(rng: np.random.Generator, size: int, times: Sequence[float] = (NOW,)) -> list[Batch]:
    """Batches of 1..20 values around 1e9, in groups 0..2, segments "", "a", "b"."""
    return [
        Batch(
            int(rng.integers(3)),
            tuple(CENTRE + rng.uniform(-SPREAD_OF_VALUES, SPREAD_OF_VALUES, rng.integers(1, 20))),
            float(rng.choice(times)),
            str(rng.choice(["", "a", "b"])),
        )
        for _ in range(size)
    ]


def test_persisted_and_reloaded_equal(tmp_path: Path) -> None:
    """The table's SQL merges (vector_add, Chan's update) give what the view's merges gave,
    bit for bit (one key, so the reload folds nothing differently)."""
    batches = [Batch(1, tuple(v)) for v in np.random.default_rng(1).uniform(0, 1e9, (40, 7))]
    store = open_store(tmp_path)
    commit(store, batches)
    before = store.state.tables
    asyncio.run(store.close())
    reopened = open_store(tmp_path)
    after = reopened.state.tables
    assert after[MOMENTS.name] == before[MOMENTS.name]
    assert after[VECTORS.name][(1,)][0] == before[VECTORS.name][(1,)][0] == 280
    assert after[VECTORS.name][(1,)][1].tolist() == before[VECTORS.name][(1,)][1].tolist()
    check(after, batches)
    asyncio.run(reopened.close())


def test_segments_reload_into_their_totals(tmp_path: Path) -> None:
    batches = stream(np.random.default_rng(2), 60)
    store = open_store(tmp_path)
    commit(store, batches)
    asyncio.run(store.close())
    reopened = open_store(tmp_path)
    check(reopened.state.tables, batches)
    for segment in ("a", "b"):
        view = reopened.views.segments("m")[segment]
        check(view.tables, [b for b in batches if b.segment == segment])
    asyncio.run(reopened.close())


offsets = st.lists(
    st.floats(-SPREAD_OF_VALUES, SPREAD_OF_VALUES, allow_nan=False), min_size=1, max_size=8
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 2), offsets), min_size=1, max_size=12),
    st.integers(0, 12),
)
def test_two_halves_merged_equal_the_whole(parts: list[tuple[int, list[float]]], cut: int) -> None:
    """Two stores' files merged into one view (as replicas will) equal one store of it all."""
    anchor = [Batch(0, (CENTRE - SPREAD_OF_VALUES, CENTRE + SPREAD_OF_VALUES))]  # a spread
    batches = anchor + [Batch(g, tuple(CENTRE + np.array(v))) for g, v in parts]
    halves = batches[: cut + 1], batches[cut + 1 :]
    with tempfile.TemporaryDirectory() as directory:
        merged = KeyedState({"m": MetricsState(statistics=(VECTORS, MOMENTS))}, "m")
        for i, half in enumerate(halves):
            store = open_store(Path(directory) / str(i))
            commit(store, half)
            load_views(store.dialect, merged)
            asyncio.run(store.close())
    check(merged.at(StateKey("m")).tables, batches)


TIMES = [NOW - s for s in (5, 50, 70, 1000, 3500, 3700, 2 * HOUR, 20 * HOUR, 3 * DAY, 40 * DAY)]


@pytest.fixture(params=["durable", "memory"])
def reading(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[SQLiteBucketReader, list[Batch]]]:
    """A store of batches at many prediction times, and a reader of its buckets."""
    durable = request.param == "durable"
    store = open_store(tmp_path if durable else None)
    batches = stream(np.random.default_rng(3), 150, TIMES)
    commit(store, batches)
    models = {"m": store.views.total("m")}
    if durable:
        reader = SQLiteBucketReader.durable(models, state_path(str(tmp_path)))
    else:
        reader = SQLiteBucketReader.inline(models, store.connection)
    yield reader, batches
    asyncio.run(reader.close())
    asyncio.run(store.close())


def within(batches: Sequence[Batch], start: float, end: float, segment: str | None = None):
    return [
        b for b in batches if start <= b.time < end and (segment is None or b.segment == segment)
    ]


@pytest.mark.parametrize("hours", [1, 3, 48])
def test_window_reads_equal_what_was_written_in_them(reading, hours: int) -> None:
    reader, batches = reading
    start, buckets = BUCKETS.window(hours * HOUR, NOW)
    (found,) = asyncio.run(reader.read_windows([buckets]))
    check(found[("m", "")].tables, within(batches, start, END))
    for segment in ("a", "b"):
        check(found[("m", segment)].tables, within(batches, start, END, segment))


def test_range_reads_equal_what_was_written_in_each_step(reading) -> None:
    reader, batches = reading
    steps = [(END - (i + 1) * HOUR, END - i * HOUR) for i in range(4)]
    spans = [BUCKETS.cover(a, b, NOW) for a, b in steps]
    totals = asyncio.run(reader.read_range("m", None, spans))
    in_a = asyncio.run(reader.read_range("m", "a", spans))
    for (a, b), total, segment in zip(steps, totals, in_a):
        check(total.tables, within(batches, a, b))  # an empty step: empty tables
        check(segment.tables, within(batches, a, b, "a"))


def test_a_changed_width_is_refused_at_start_up(tmp_path: Path) -> None:
    store = open_store(tmp_path, VECTORS, MOMENTS, model="iris")
    commit(store, [Batch(0, (1.0,))])
    asyncio.run(store.close())
    with pytest.raises(StateFileError) as refused:
        open_store(tmp_path, vectors(WIDTH + 1), MOMENTS, model="iris")
    message = str(refused.value)
    for part in ("'iris'", "'kind_vectors'", f"{WIDTH + 1} values", f"holds it with {WIDTH}"):
        assert part in message
    assert "--score_bins/--error_buckets" in message and "--reset_state" in message
    reopened = open_store(tmp_path, VECTORS, MOMENTS, model="iris")  # the same width still opens
    check(reopened.state.tables, [Batch(0, (1.0,))])
    asyncio.run(reopened.close())


def test_two_models_may_not_share_a_statistic_of_other_widths() -> None:
    states = {
        "a": MetricsState(statistics=(VECTORS,)),
        "b": MetricsState(statistics=(vectors(WIDTH + 1),)),
    }
    with pytest.raises(StartupError, match="kind_vectors"):
        SQLiteStore(
            states,
            SQLiteDialect.open(None, "a"),
            "a",
            CommitPolicy(retention=1, max_ids=1),
            buckets=BUCKETS,
        )


@pytest.mark.parametrize("durable", [True, False])
def test_a_vector_of_another_length_is_an_error(tmp_path: Path, durable: bool) -> None:
    """A model's bug, refused inside the transaction: nothing counts, the event is not seen."""
    store = open_store(tmp_path if durable else None)
    commit(store, [Batch(0, (1.0, 2.0), NOW - 30)])
    short = Delta(updates={VECTORS.name: [(0, 1, vector_bytes(np.ones(WIDTH - 1)))]})
    wrong = Delta(updates={VECTORS.name: [(0, 1, np.ones(WIDTH))]})  # an array, not bytes
    sparse = Delta(updates={VECTORS.name: [(0, 1, vector_bytes(np.eye(WIDTH + 1)[0]))]})
    torn = Delta(updates={VECTORS.name: [(0, 1, b"S\x05\x00")]})  # neither encoding
    for delta in (short, wrong, sparse, torn):
        entry = Entry(delta, ("src", "bad"), placement=Placement(time=NOW - 30))
        with pytest.raises(RequestError, match="kind_vectors") as refused:
            asyncio.run(store.commit([entry]))
        assert refused.value.kind.fault
    assert store.seen_count == 1
    check(store.state.tables, [Batch(0, (1.0, 2.0), NOW - 30)])
    asyncio.run(store.close())


def test_the_sql_functions_refuse_vectors_of_other_lengths() -> None:
    """Under the committer's check, SQL itself never adds a shorter vector to a longer one."""
    connection = SQLiteDialect.open(None, "m").connection
    one, two = vector_bytes(np.ones(2)), vector_bytes(np.ones(3))
    assert connection.execute("SELECT vector_add(?, ?)", (one, one)).fetchone()[0] == (
        vector_bytes(np.full(2, 2.0))
    )
    with pytest.raises(sqlite3.OperationalError):
        connection.execute("SELECT vector_add(?, ?)", (one, two)).fetchone()
    with pytest.raises(sqlite3.OperationalError):
        connection.execute("SELECT vector_add(?, ?)", (one, b"\x00" * 3)).fetchone()
    connection.execute("CREATE TABLE v (x BLOB)")
    connection.executemany("INSERT INTO v VALUES (?)", [(one,), (two,)])
    with pytest.raises(sqlite3.OperationalError):
        connection.execute("SELECT vector_sum(x) FROM v").fetchone()
    connection.close()


@pytest.mark.parametrize("state", ["sqlite", "memory"])
def test_windows_and_ranges_of_a_model_with_vectors_and_moments(
    servers: ServerFactory, tmp_path: Path, state: str
) -> None:
    """A real server with such a model: feedback counts in its range and window (the durable
    reader's own connection sums vectors too), and a restart keeps the counts."""
    args = ["--storage_uri", SPREAD, "--state", state, "--window_refresh_seconds", "1"]
    env = {"STATE_DIR": str(tmp_path)}
    url = servers(*args, env=env).url
    send_event(url, feedback([[1], [2], [1]], [[1], [0], [5]]))
    send_event(url, feedback([[0]], [[0]]))
    end = (int(time.time()) // 60 + 1) * 60
    query = {"from": str(end - HOUR), "to": str(end), "step": "30m"}

    def ranged(at: str) -> dict[str, Any]:
        answer = requests.get(f"{at}/v1/models/model/metrics", params=query, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()  # type: ignore[no-any-return]

    document = ranged(url)
    assert document["total"]["rows"] == 4 and document["total"]["accuracy"] == 0.5
    samples = scrape(url)
    assert value(samples, "feedback_window_rows", model="model", segment="", window="1h") == 4
    if state == "sqlite":
        servers.started[-1].stop()
        assert ranged(servers(*args, env=env).url) == document
