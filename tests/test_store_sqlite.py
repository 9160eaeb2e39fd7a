"""What only the SQLite store has: its file (bounds, housekeeping, spill, upgrades, refusal of
bad files); what every store keeps is in test_store_contract.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adserver.errors import RequestError
from adserver.http.answers import json_error
from adserver.state.committer import CommitPolicy
from adserver.state.join import Joiner, Label, LoggedRows
from adserver.state.sqlite.schema import MIGRATIONS, SCHEMA_VERSION
from adserver.state.sqlite.store import (
    PURGE_BATCH,
    SQLiteDialect,
    SQLiteStore,
    StateFileError,
    create_spill_file,
    reset_state,
    state_path,
)
from adserver.state.store import Entry
from adserver.state.view import MetricsState
from cm_models import MultiClassNumeric
from cm_models.statistics import ALL_TIME, DEFAULT_SEGMENT
from tests.data.state_v3 import build as version_3
from tests.support.stores import BUCKETS, event
from tests.support.timing import FakeClock


def open_sqlite(tmp_path: Path, clock=None, joiner=None, states=None, **kwargs) -> SQLiteStore:
    policy = CommitPolicy(**{"retention": 3600.0, "max_ids": 1000, **kwargs})
    dialect = SQLiteDialect.open(str(tmp_path), "m")
    clock = time.time if clock is None else clock
    states = {"m": MetricsState()} if states is None else states
    return SQLiteStore(states, dialect, "m", policy, joiner=joiner, clock=clock, buckets=BUCKETS)


def memory_store(clock: FakeClock, **kwargs: Any) -> SQLiteStore:
    policy = CommitPolicy(**kwargs)
    dialect = SQLiteDialect.open(None, "m")
    return SQLiteStore({"m": MetricsState()}, dialect, "m", policy, clock=clock, buckets=BUCKETS)


def run(coroutine):
    return asyncio.run(coroutine)


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
        store = memory_store(FakeClock(), retention=1e9, max_ids=10**6)
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
        SQLiteDialect.open(str(tmp_path), "other")
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
        assert json_error(caught.value).status == 503  # as HTTP answers it
        await store.close()
        return store

    store = run(scenario())
    assert store.state.count("rows_accepted") == 0


def full_store(bound: int, clock: FakeClock) -> SQLiteStore:
    """A memory store whose seen ids and logged rows are both at their bound."""
    joiner = Joiner({"m": MultiClassNumeric()}, ttl=1e9)
    store = SQLiteStore(
        {"m": MetricsState()},
        SQLiteDialect.open(None, "m"),
        "m",
        CommitPolicy(retention=1e9, max_ids=bound, join_max_rows=bound),
        joiner=joiner,
        clock=clock,
        buckets=BUCKETS,
    )
    fill = [
        Entry(
            event_key=("src", f"fill-{i}"),
            operation=LoggedRows(f"r{i}", "response", np.array([1]), 0),
        )
        for i in range(bound)
    ]
    run(store.commit(fill))
    return store


def work_of_commits(store: SQLiteStore, clock: FakeClock, commits: int) -> tuple[list[str], int]:
    """SQL statements, and SQLite virtual-machine steps (in hundreds), of ``commits`` commits
    that each add an event id and a logged row; one of them falls due for the minute's sweep."""
    statements: list[str] = []
    steps = [0]

    def step() -> int:
        steps[0] += 1
        return 0

    store.connection.set_trace_callback(statements.append)
    store.connection.set_progress_handler(step, 100)
    for i in range(commits):
        clock.now += 61 if i == commits // 2 else 1
        logged = LoggedRows(f"new-{i}", "response", np.array([1]), clock.now)
        assert run(store.commit([Entry(event_key=("src", f"new-{i}"), operation=logged)])) == [True]
    store.connection.set_trace_callback(None)
    store.connection.set_progress_handler(None, 100)
    return statements, steps[0]


def test_housekeeping_work_does_not_grow_with_full_tables() -> None:
    """Once the seen ids and the join tables are full, every commit trims what it added: the
    same statements whatever the bound, none counting a table, the same work give or take."""
    small_clock, large_clock = FakeClock(), FakeClock()
    small = full_store(100, small_clock)
    large = full_store(20_000, large_clock)
    small_statements, small_steps = work_of_commits(small, small_clock, 20)
    large_statements, large_steps = work_of_commits(large, large_clock, 20)
    assert not [s for s in large_statements if "COUNT(" in s.upper()]
    assert len(large_statements) <= len(small_statements)
    assert large_steps < 2 * small_steps + 20
    # what the last commit added waits for the next one to be trimmed; seen ids are trimmed a
    # little under their bound (20 here), for the next commits
    assert 20_000 - 20 <= large.seen_count <= 20_001
    assert large.row_counts.logged == 20_001
    assert large.connection.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 20_001
    assert large.state.count("join_rows_evicted", "prediction_evicted") == 19


def test_expired_backlog_is_deleted_in_bounded_batches() -> None:
    """Ids that expire together are forgotten PURGE_BATCH per commit, over the next commits."""
    clock = FakeClock()
    store = memory_store(clock, retention=100.0, max_ids=10**6)
    run(store.commit([Entry(event_key=("src", str(i))) for i in range(2 * PURGE_BATCH + 10)]))
    clock.now += 101
    left = []
    for _ in range(4):
        run(store.commit([Entry()]))
        left.append(store.seen_count)
    assert left == [PURGE_BATCH + 10, 10, 0, 0]


def version_2_file(tmp_path: Path, now: float) -> None:
    """A state file as version 2 left it: a JSON document per logged row and parked label."""
    connection = sqlite3.connect(state_path(str(tmp_path)))
    for script in MIGRATIONS[:2]:
        connection.executescript(script)
    connection.executemany(
        "INSERT INTO meta VALUES (?, ?)", [("schema_version", "2"), ("model_name", "m")]
    )
    expires = now + 1000
    connection.executemany(
        "INSERT INTO logged_rows VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            # r1: three rows with inputs, the middle one labelled already
            ("r1", 0, b"1", b"[5.1]", now - 10, 0, expires),
            ("r1", 1, b"2", b"[4.9]", now - 10, 1, expires),
            ("r1", 2, b"0", b"[6.2]", now - 10, 0, expires),
            # r2: row 1 was evicted on its own
            ("r2", 0, b"1", None, now - 5, 0, expires),
            ("r2", 2, b"1", None, now - 5, 0, expires),
        ],
    )
    connection.executemany(
        "INSERT INTO parked_labels VALUES (?, ?, ?, ?, ?)",
        [
            ("p1", 0, b"2", now - 3, expires),  # one label of two rows
            ("p1", 1, b"0", now - 3, expires),
            ("p1", 5, b"1", now - 2, expires),  # and another, past the prediction to come
        ],
    )
    connection.commit()
    connection.close()


def test_version_2_file_keeps_joining_after_the_upgrade(tmp_path: Path) -> None:
    clock = FakeClock()
    version_2_file(tmp_path, clock.now)
    joiner = Joiner({"m": MultiClassNumeric()}, ttl=1000)
    store = open_sqlite(tmp_path, clock, joiner=joiner)
    assert (store.row_counts.logged, store.row_counts.parked) == (6, 3)

    def commit(operation: Label | LoggedRows) -> None:
        assert run(store.commit([Entry(operation=operation)])) == [True]

    commit(Label(("r1",), 0, np.array([1, 1, 0])))
    commit(Label(("r2",), 0, np.array([2, 2, 2])))
    commit(LoggedRows("p1", "response", np.array([2, 1, 1]), clock.now))
    state = store.state
    assert state.labelled("labels") == {"joined": 4, "duplicate": 2, "late": 2}
    # truth 1 -> 1, 0 -> 0 (r1); 2 -> 1 twice (r2); 2 -> 2, 0 -> 1 (p1, late)
    matrix = state.confusion.matrix().tolist()
    assert state.confusion.classes == [0, 1, 2]
    assert matrix == [[1, 1, 0], [0, 1, 0], [0, 2, 1]]
    assert (store.row_counts.logged, store.row_counts.parked) == (9, 1)  # p1 row 5 waits on
    tables = {row[0] for row in store.connection.execute("SELECT name FROM sqlite_master")}
    assert not {"logged_rows", "parked_labels"} & tables
    assert store.connection.execute(
        "SELECT value FROM meta WHERE key = 'schema_version'"
    ).fetchone() == (str(SCHEMA_VERSION),)


VERSION_3 = Path(__file__).parent / "data" / "state_v3"


def test_version_3_file_keeps_every_count(tmp_path: Path) -> None:
    """A file the schema-3 server wrote (``data/state_v3/build.py``) opens with every count,
    keyed by its model, and goes on deduplicating and joining."""
    connection = sqlite3.connect(state_path(str(tmp_path)))
    connection.executescript((VERSION_3 / "state.sql").read_text())
    version = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'")
    assert version.fetchone() == ("3",)
    connection.close()
    clock = FakeClock(1_700_000_000.0 + 1)
    joiner = Joiner({"m": MultiClassNumeric()}, ttl=10_000)
    store = open_sqlite(tmp_path, clock, retention=10_000, joiner=joiner)
    before = json.loads((VERSION_3 / "view.json").read_text())
    after = json.loads(json.dumps(version_3.view(store)))
    # The summary has gained keys since version 3 (derived from the same counters, compared too)
    after["summary"] = {key: after["summary"][key] for key in before["summary"]}
    assert after == before
    keys = store.connection.execute("SELECT DISTINCT model, segment, time_bucket FROM cells")
    assert keys.fetchall() == [("m", DEFAULT_SEGMENT, ALL_TIME)]
    # The old event ids are still remembered; the parked label meets its prediction.
    assert run(store.commit([event("1", [0], [0])])) == [False]
    logged = LoggedRows("p1", "response", np.array([3, 2]), clock.now)
    assert run(store.commit([Entry(operation=logged)])) == [True]
    assert store.state.count("labels", "late") == 2
    assert store.connection.execute(
        "SELECT value FROM meta WHERE key = 'schema_version'"
    ).fetchone() == (str(SCHEMA_VERSION),)


def test_classes_and_tallies_are_stored_with_the_counts(tmp_path: Path) -> None:
    """What replicas will share is in the file: admitted classes and the tallies of ids and
    rows, written in the transaction (a refused batch leaves neither), read back at start."""
    joiner = Joiner({"m": MultiClassNumeric()}, ttl=1e9)

    async def scenario() -> None:
        store = open_sqlite(tmp_path, max_classes=3, joiner=joiner)
        assert await store.commit([event("a", [0, 1], [1, 1])]) == [True]
        logged = LoggedRows("r", "response", np.array([1, 1, 1]), 0.0)
        assert await store.commit([Entry(event_key=("src", "r"), operation=logged)]) == [True]
        with pytest.raises(RequestError):  # two classes more than --max_classes allows
            await store.commit([event("b", [2, 3], [2, 3]), event("c", [1], [1])])
        await store.close()

    run(scenario())
    connection = sqlite3.connect(state_path(str(tmp_path)))
    assert connection.execute("SELECT model, class FROM classes").fetchall() == [("m", 0), ("m", 1)]
    tallies = dict(connection.execute("SELECT name, value FROM tallies"))
    connection.close()
    assert tallies == {"seen_ids": 2, "logged_rows": 3, "parked_rows": 0}
    reopened = open_sqlite(tmp_path, max_classes=3)
    assert (reopened.seen_count, reopened.row_counts.logged) == (2, 3)
    assert reopened.classes == {"m": {0, 1}}
