"""The SQLite store: exactly-once commits, retention, restart and refusal of bad files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adserver.state import Delta, MetricsState
from adserver.store.base import Entry
from adserver.store.schema import SCHEMA_VERSION
from adserver.store.sqlite import (
    SQLiteStore,
    StateFileError,
    create_spill_file,
    reset_state,
    state_path,
)
from adserver.summary import model_summary
from cm_models.confusion import Cells
from cm_models.custom_metrics import CustomMetric
from tests.helpers import FakeClock


def event(event_id: str, truth: list[int], predicted: list[int], **extra) -> Entry:
    cells = Cells.from_labels(np.array(truth), np.array(predicted))
    delta = Delta(cells=cells, counters=(("rows_accepted", "", len(truth)),), **extra)
    return Entry(delta, ("src", event_id))


def open_sqlite(tmp_path: Path, clock=None, **kwargs) -> SQLiteStore:
    options = {"retention": 3600.0, "max_ids": 1000, **kwargs}
    if clock is not None:
        options["clock"] = clock
    return SQLiteStore(MetricsState(), str(tmp_path), "m", **options)


def run(coroutine):
    return asyncio.run(coroutine)


def test_duplicates_change_nothing(tmp_path: Path) -> None:
    async def scenario() -> SQLiteStore:
        store = open_sqlite(tmp_path)
        assert await store.commit([event("a", [1, 2], [1, 1])]) == [True]
        assert await store.commit([event("a", [1, 2], [1, 1]), event("b", [0], [0])]) == [
            False,
            True,
        ]
        await store.close()
        return store

    store = run(scenario())
    assert store.state.count("rows_accepted") == 3
    assert store.state.confusion.matrix().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]


def test_concurrent_redeliveries_count_once(tmp_path: Path) -> None:
    """Twenty copies of one event arriving together land in one group: one counts."""

    async def scenario() -> list[list[bool]]:
        store = open_sqlite(tmp_path)
        results = await asyncio.gather(*(store.commit([event("x", [1], [1])]) for _ in range(20)))
        await store.close()
        return results

    results = run(scenario())
    assert sum(r[0] for r in results) == 1


def test_restart_restores_everything(tmp_path: Path) -> None:
    metrics = (
        CustomMetric("c", "COUNTER", 2.0, (("a", "b"),)),
        CustomMetric("g", "GAUGE", 7.0),
        CustomMetric("t", "TIMER", 15.0),
    )

    async def write() -> dict:
        store = open_sqlite(tmp_path)
        await store.commit([event("1", [0, 1, 1], [0, 1, 0], metrics=metrics)])
        await store.commit([event("2", [2], [1], metrics=metrics[1:])])
        await store.close()
        return model_summary(store.state)

    before = run(write())
    reopened = open_sqlite(tmp_path)
    assert model_summary(reopened.state) == before
    custom = reopened.state.custom
    assert custom.counters == {("c", (("a", "b"),)): 2.0}
    assert custom.gauges == {("g", ()): 7.0}
    timer = custom.timers[("t", ())]
    assert (timer.count, timer.total) == (2, pytest.approx(0.03))
    assert run(reopened.commit([event("1", [0], [0])])) == [False]


def test_retention_expiry_with_clock(tmp_path: Path) -> None:
    clock = FakeClock()

    async def scenario() -> list[bool]:
        store = open_sqlite(tmp_path, clock, retention=100.0)
        first = await store.commit([event("a", [1], [1])])
        clock.now += 99
        within = await store.commit([event("a", [1], [1])])
        clock.now += 2
        after = await store.commit([event("a", [1], [1])])
        await store.close()
        return first + within + after

    assert run(scenario()) == [True, False, True]


def test_seen_ids_are_bounded(tmp_path: Path) -> None:
    clock = FakeClock()

    async def scenario() -> SQLiteStore:
        store = open_sqlite(tmp_path, clock, max_ids=5)
        for i in range(12):
            clock.now += 1
            await store.commit([event(str(i), [1], [1])])
        await store.commit([Entry()])  # the bound is enforced by the sweep before each commit
        await store.close()
        return store

    store = run(scenario())
    rows = sqlite3.connect(state_path(str(tmp_path))).execute("SELECT id FROM seen").fetchall()
    assert sorted(int(r[0]) for r in rows) == [7, 8, 9, 10, 11]
    assert store.state.count("rows_accepted") == 12


def test_memory_store_has_the_same_semantics() -> None:
    clock = FakeClock()

    async def scenario() -> list[bool]:
        store = SQLiteStore(MetricsState(), None, "m", retention=10.0, max_ids=100, clock=clock)
        out = await store.commit([event("a", [1], [1]), event("a", [1], [1])])
        clock.now += 11
        return out + await store.commit([event("a", [1], [1])])

    assert run(scenario()) == [True, False, True]


def spill_files() -> set[str]:
    """SQLite's unlinked temporary files held open by this process."""
    fd_dir = Path("/proc/self/fd")
    targets = set()
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            targets.add(os.readlink(fd))
    return {t for t in targets if "etilqs_" in t and t.endswith("(deleted)")}


def test_memory_store_keeps_ids_beyond_its_cache_in_an_unlinked_file() -> None:
    """The heap does not grow with remembered ids: past SQLite's page cache they spill to a
    temporary file that no one else can see and that goes away with the connection."""
    before = spill_files()
    ours: set[str] = set()

    async def scenario() -> tuple[list[bool], list[bool]]:
        store = SQLiteStore(
            MetricsState(), None, "m", retention=1e9, max_ids=10**6, clock=FakeClock()
        )
        ours.update(spill_files() - before)
        assert ours, "the spill file exists from the start"
        first = [await store.commit([event(f"{n:040d}", [1], [1])]) for n in range(40_000)]
        pages = store.connection.execute("PRAGMA page_count").fetchone()[0]
        cache = -store.connection.execute("PRAGMA cache_size").fetchone()[0] * 1024
        assert pages * 4096 > 2 * cache  # the ids outgrew the cache
        again = [await store.commit([event(f"{n:040d}", [1], [1])]) for n in (0, 39_999)]
        await store.close()
        return [f for [f] in first], [f for [f] in again]

    first, again = run(scenario())
    assert all(first) and again == [False, False]  # spilled ids still deduplicate
    assert not ours & spill_files()  # closed with the store


def test_memory_mode_without_a_temporary_directory_refuses_to_start() -> None:
    class NoTemporaryFile(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql.startswith("CREATE TABLE spill_probe"):
                raise sqlite3.OperationalError("unable to open database file")
            return super().execute(sql, *args)

    connection = sqlite3.connect("", factory=NoTemporaryFile)
    with pytest.raises(StateFileError, match="SQLITE_TMPDIR"):
        create_spill_file(connection)
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        connection.execute("SELECT 1")


def test_corrupt_file_refuses_to_start_and_reset_moves_it_aside(tmp_path: Path) -> None:
    path = state_path(str(tmp_path))
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateFileError, match="--reset_state"):
        open_sqlite(tmp_path)
    assert path.read_bytes().startswith(b"this is not")  # never silently replaced
    moved = reset_state(str(tmp_path))
    assert moved is not None and moved.exists() and not path.exists()
    assert open_sqlite(tmp_path).state.count("rows_accepted") == 0


def test_newer_schema_and_foreign_model_are_refused(tmp_path: Path) -> None:
    run(open_sqlite(tmp_path).close())
    with pytest.raises(StateFileError, match="belongs to model"):
        SQLiteStore(MetricsState(), str(tmp_path), "other", retention=1, max_ids=1)
    connection = sqlite3.connect(state_path(str(tmp_path)))
    with connection:
        connection.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    connection.close()
    with pytest.raises(StateFileError, match="newer than this server"):
        open_sqlite(tmp_path)


def test_store_error_is_transient_503(tmp_path: Path) -> None:
    """A failing write answers 503 (retry later) and leaves the in-memory state untouched."""

    async def scenario() -> SQLiteStore:
        store = open_sqlite(tmp_path)
        store.connection.execute("DROP TABLE cells")
        with pytest.raises(Exception) as caught:
            await store.commit([event("a", [1], [1])])
        assert getattr(caught.value, "status", None) == 503
        await store.close()
        return store

    store = run(scenario())
    assert store.state.count("rows_accepted") == 0
