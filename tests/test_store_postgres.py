"""The PostgreSQL store on a real server: migration, and exactly-once commits across replicas
(stores on one database), each replica's own slot adding up to one stream's counts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import requests

from adserver.catalogue import reasons
from adserver.catalogue.families import EVICTED, PREDICTION_EXPIRED
from adserver.errors import BadRequest, Unavailable
from adserver.state.committer import CommitPolicy
from adserver.state.join import Joiner, Label, LoggedRows
from adserver.state.postgres.dialect import PostgresDialect, PostgresOptions, event_lock
from adserver.state.postgres.schema import KeyspaceError, keyspace_name
from adserver.state.postgres.store import PostgresStore
from adserver.state.store import Entry
from adserver.state.view import Delta, MetricsState
from cm_models import MultiClassNumeric
from cm_models.confusion import Cells
from cm_models.statistics import moments_of, vector_array
from tests.support.events import feedback
from tests.support.http import model_doc, scrape, send_event
from tests.support.processes import MULTICLASS_NUMERIC, ServerFactory, free_port
from tests.support.statistic_models import HISTOGRAM, MOMENTS, Spread, spread_rows
from tests.support.stores import BUCKETS
from tests.support.timing import FakeClock
from tests.test_startup import refused
from tests.test_store_sqlite import event

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]


MODEL = "m"


def options(dsn: str, model: str = MODEL) -> PostgresOptions:
    return PostgresOptions(dsn, keyspace_name(model))


def open_dialect(dsn: str, model: str = MODEL, **claims: Any) -> PostgresDialect:
    return PostgresDialect.open(options(dsn, model), model, **claims)


def open_store(
    dsn: str,
    states: dict[str, MetricsState] | None = None,
    joiner: Joiner | None = None,
    dialect: PostgresDialect | None = None,
    clock: Any = time.time,
    **policy: Any,
) -> PostgresStore:
    return PostgresStore(
        {MODEL: MetricsState()} if states is None else states,
        open_dialect(dsn) if dialect is None else dialect,
        MODEL,
        CommitPolicy(**{"retention": 3600.0, "max_ids": 1000, **policy}),
        joiner=joiner,
        buckets=BUCKETS,
        clock=clock,
    )


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def commit(store: PostgresStore, *entries: Entry) -> list[bool]:
    return run(store.commit(list(entries)))


@pytest.fixture
def stores(postgres_dsn: str) -> Iterator[list[PostgresStore]]:
    """Stores to close after the test (each one a replica)."""
    opened: list[PostgresStore] = []
    yield opened
    for store in opened:
        run(store.close())


def test_a_keyspace_is_made_once_and_claimed(postgres_dsn: str) -> None:
    claims = {"model_kind": "kind-a", "time_buckets": "1m:1h"}
    open_dialect(postgres_dsn, **claims).close()
    open_dialect(postgres_dsn, **claims).close()  # idempotent
    with pytest.raises(KeyspaceError, match="belongs to --storage_uri 'kind-a', not 'kind-b'"):
        open_dialect(postgres_dsn, **{**claims, "model_kind": "kind-b"})
    with pytest.raises(KeyspaceError, match="--time_buckets"):
        open_dialect(postgres_dsn, **{**claims, "time_buckets": "1h:1d"})
    foreign = PostgresOptions(postgres_dsn, keyspace_name(MODEL))
    with pytest.raises(KeyspaceError, match="belongs to model 'm', not 'other'"):
        PostgresDialect.open(foreign, "other")
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute("UPDATE feedback_m.meta SET value = '2' WHERE key = 'schema_version'")
    with pytest.raises(KeyspaceError, match="schema version 2, newer"):
        open_dialect(postgres_dsn, **claims)


def test_five_replicas_starting_together_on_an_empty_database(postgres_dsn: str) -> None:
    statistics = MetricsState.for_model(Spread()).statistics.values()

    def start(_: int) -> int:
        dialect = open_dialect(postgres_dsn)
        dialect.prepare(statistics)
        slot = dialect.slot
        dialect.close()
        return slot

    with ThreadPoolExecutor(5) as pool:
        slots = list(pool.map(start, range(5)))
    assert len(set(slots)) == 5  # each its own lease while they ran together
    with psycopg.connect(postgres_dsn) as connection:
        tables = connection.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'feedback_m'"
        ).fetchone()
        assert tables is not None and tables[0] == 10 + len(statistics)
        held = connection.execute("SELECT count(*) FROM feedback_m.slots WHERE holder IS NOT NULL")
        assert held.fetchone() == (0,)  # released on close


def test_an_event_counts_once_across_replicas(postgres_dsn: str, stores: list) -> None:
    a, b = open_store(postgres_dsn), open_store(postgres_dsn)
    stores += [a, b]
    assert commit(a, event("e1", [1, 2], [1, 1])) == [True]
    assert commit(b, event("e1", [1, 2], [1, 1])) == [False]

    async def together() -> list[list[bool]]:
        same = [event(f"e{i}", [0], [0]) for i in range(2, 12)]
        return await asyncio.gather(*(s.commit([e]) for e in same for s in (a, b)))

    outcomes = run(together())
    assert sum(flags == [True] for flags in outcomes) == 10  # each key once, whichever replica
    fresh = open_store(postgres_dsn)
    stores.append(fresh)
    assert fresh.state.count("rows_accepted") == 2 + 10
    assert fresh.state.count("events_duplicate") == 1 + 10
    assert fresh.seen_count == 11  # the slots' tallies add up


def joining(dsn: str, stores: list) -> list[PostgresStore]:
    joiner = Joiner({MODEL: MultiClassNumeric()}, ttl=1000)
    opened = [open_store(dsn, joiner=joiner) for _ in range(2)]
    stores += opened
    return opened


def test_a_prediction_through_one_replica_joins_a_label_through_another(
    postgres_dsn: str, stores: list
) -> None:
    a, b = joining(postgres_dsn, stores)
    now = time.time()
    assert commit(a, Entry(operation=LoggedRows("r1", "response", np.array([1, 2, 0]), now)))
    assert commit(b, Entry(operation=Label(("r1",), 0, np.array([1, 1, 0]))))
    assert commit(a, Entry(operation=Label(("r1",), 0, np.array([1, 1, 0]))))  # again: duplicate
    # a label first, parked by one replica, joined when the other logs its prediction
    assert commit(b, Entry(operation=Label(("r2",), 0, np.array([2, 2]))))
    assert commit(a, Entry(operation=LoggedRows("r2", "response", np.array([2, 0]), now)))
    fresh = open_store(postgres_dsn)
    stores.append(fresh)
    state = fresh.state
    assert state.labelled("labels") == {"joined": 3, "duplicate": 3, "parked": 2, "late": 2}
    assert state.confusion.classes == [0, 1, 2]
    assert state.confusion.matrix().tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 1]]
    assert (fresh.row_counts.logged, fresh.row_counts.parked) == (5, 0)  # global tallies


def test_expired_predictions_count_once_when_replicas_sweep_together(postgres_dsn: str) -> None:
    clock = FakeClock()
    joiner = Joiner({MODEL: MultiClassNumeric()}, ttl=10)
    opened = [open_store(postgres_dsn, joiner=joiner, clock=clock) for _ in range(3)]
    rows = [
        Entry(operation=LoggedRows(f"r{i}", "response", np.array([1, 2]), 0)) for i in range(50)
    ]
    assert commit(opened[0], *rows) == [True] * 50
    clock.now += 100  # every replica's sweep is due, and every logged request expired

    async def sweep() -> None:
        await asyncio.gather(*(s.commit([event(f"e{i}", [1], [1])]) for i, s in enumerate(opened)))
        for store in opened:
            await store.close()

    run(sweep())
    fresh = open_store(postgres_dsn)
    assert fresh.state.count(EVICTED, PREDICTION_EXPIRED) == 100  # each waiting row once
    assert fresh.row_counts.logged == 0
    run(fresh.close())


def test_the_class_cap_is_global(postgres_dsn: str, stores: list) -> None:
    a, b = open_store(postgres_dsn, max_classes=3), open_store(postgres_dsn, max_classes=3)
    stores += [a, b]
    assert commit(a, event("e1", [0, 1], [0, 1])) == [True]
    assert commit(b, event("e2", [2], [2])) == [True]
    with pytest.raises(BadRequest) as refused:
        commit(a, event("e3", [3], [3]))  # a knew two classes; b admitted the third
    assert refused.value.reason == reasons.TOO_MANY_CLASSES
    assert commit(a, event("e4", [2], [1])) == [True]  # known across replicas


def spread_entry(event_id: str, truth: list[int], predicted: list[int]) -> Entry:
    t, p = np.array(truth), np.array(predicted)
    delta = Delta(
        cells=Cells.from_labels(t, p),
        counters=(("rows_accepted", "", len(t)),),
        updates=spread_rows(t, p),
    )
    return Entry(delta, ("src", event_id))


def test_vectors_and_moments_merge_across_slots_as_one_stream(
    postgres_dsn: str, stores: list
) -> None:
    states = {MODEL: MetricsState.for_model(Spread())}
    a, b = open_store(postgres_dsn, states), open_store(postgres_dsn, states)
    stores += [a, b]
    assert a.dialect.slot != b.dialect.slot
    streams = [([0, 1, 1, 2], [0, 2, 1, 3]), ([1, 1], [1, 0]), ([0, 2, 2], [3, 2, 2])]
    for i, (truth, predicted) in enumerate(streams):
        assert commit((a, b)[i % 2], spread_entry(f"e{i}", truth, predicted)) == [True]
    fresh = open_store(postgres_dsn, states)
    stores.append(fresh)
    truth = np.concatenate([np.array(t) for t, _ in streams])
    predicted = np.concatenate([np.array(p) for _, p in streams])
    histogram = fresh.state.tables[HISTOGRAM.name]
    moments = fresh.state.tables[MOMENTS.name]
    for label in (0, 1, 2):
        chosen = predicted[truth == label]
        rows, vector = histogram[(label,)]
        assert rows == chosen.size
        assert vector_array(vector).tolist() == np.bincount(chosen, minlength=4).tolist()
        stored, stream = moments[(label,)], moments_of(chosen.astype(np.float64))
        assert stored.n == stream.n
        assert stored.center == pytest.approx(stream.center)
        assert stored.m2 == pytest.approx(stream.m2)


def test_a_deadlocked_transaction_is_run_again(postgres_dsn: str, stores: list) -> None:
    """The store's first transaction locks r1 then waits for r2, which another session holds
    and that session then waits for r1: PostgreSQL aborts the store's (it waited first)."""
    other = psycopg.connect(postgres_dsn, autocommit=True)
    holding = threading.Event()

    class Deadlocking(PostgresDialect):
        force = True

        def remember(self, key: tuple[str, str], now: float, forgotten_by: float) -> int:
            if self.force:
                self.force = False
                self.lock("r1")
                self.query("SELECT 1")
                holding.set()
                self.lock("r2")
                self.query("SELECT 1")
            return super().remember(key, now, forgotten_by)

    dialect = Deadlocking.open(options(postgres_dsn), MODEL)
    key = dialect.lock_class
    lock = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
    other.execute("BEGIN")
    other.execute(lock, (key, "r2"))

    def close_the_cycle() -> None:
        holding.wait(10)
        time.sleep(0.2)
        other.execute(lock, (key, "r1"))  # granted once the store's transaction is aborted
        other.execute("COMMIT")

    closer = threading.Thread(target=close_the_cycle)
    closer.start()
    store = open_store(postgres_dsn, dialect=dialect)
    stores.append(store)
    assert commit(store, event("e1", [1], [1])) == [True]
    closer.join(10)
    other.close()
    assert store.stats.retries == {"deadlock": 1}
    assert store.state.count("rows_accepted") == 1
    fresh = open_store(postgres_dsn)
    stores.append(fresh)
    assert fresh.state.count("rows_accepted") == 1


def test_start_up_refusals_of_the_postgres_state(tmp_path: Path) -> None:
    assert "drop the schema yourself" in refused("--state", "postgres", "--reset_state")
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    stderr = refused("--state", "postgres", "--postgres_dsn", nowhere)
    assert "cannot use the PostgreSQL state" in stderr and "password" not in stderr
    without = tmp_path / "psycopg"
    without.mkdir()
    (without / "__init__.py").write_text("raise ImportError('no psycopg here')\n")
    stderr = refused("--state", "postgres", env={"PYTHONPATH": str(tmp_path)})
    assert "pip install '.[postgres]'" in stderr


def eventually(check: Any, timeout: float = 5.0) -> None:
    """``check()`` true within ``timeout`` (a replica's view follows the others' commits)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the views did not converge"
        time.sleep(0.05)


def test_two_server_replicas_share_one_state(servers: ServerFactory, postgres_dsn: str) -> None:
    """Over HTTP: an event id is new once across replicas, and each replica's views show the
    other's events within a poll."""
    env = {"POSTGRES_DSN": postgres_dsn}
    args = ("--state", "postgres", "--storage_uri", MULTICLASS_NUMERIC)
    a, b = servers(*args, env=env), servers(*args, env=env)
    send_event(a.url, feedback([1, 2], [1, 1]), "e1")
    send_event(b.url, feedback([1, 2], [1, 1]), "e1")  # a redelivery through the other replica
    send_event(b.url, feedback([0], [0]), "e2")
    for replica in (a, b):
        eventually(lambda url=replica.url: model_doc(url)["events"] == 2)
    assert requests.get(a.url + "/health/ready", timeout=5).status_code == 200
    samples = scrape(b.url)
    info = {"model": "model", "backend": "postgres", "keyspace": "feedback_model"}
    model = frozenset({"model": "model"}.items())
    assert samples[("feedback_state_info", frozenset(info.items()))] == 1
    assert samples[("feedback_state_transactions_total", model)] == 2  # e1 and e2 through b
    assert samples[("feedback_state_round_trips_total", model)] >= 2
    assert a.stop() == 0 and b.stop() == 0


def test_the_writer_reconnects_after_the_database_restarts(private_postgres: Any) -> None:
    """The events of a commit that met the restart get 503 (their sender retries); the next
    transaction runs on a new connection, and nothing counts twice."""
    store = open_store(private_postgres.create_database("restarts"))
    assert commit(store, event("e1", [1], [1])) == [True]
    private_postgres.restart()
    outcomes = []
    for _ in range(2):  # the first may meet the broken connection
        try:
            outcomes.append(commit(store, event("e2", [1], [1])))
        except Unavailable as exc:
            assert exc.reason == reasons.STORE_ERROR
            outcomes.append(None)
    assert outcomes in ([None, [True]], [[True], [False]])  # counted once either way
    assert commit(store, event("e1", [1], [1])) == [False]  # remembered before the restart
    assert store.state.count("rows_accepted") == 2
    run(store.close())


def held_elsewhere(dsn: str, dialect: PostgresDialect, resource: str) -> bool:
    """Whether another session finds ``resource``'s transaction lock taken."""
    with psycopg.connect(dsn, autocommit=True) as other:
        found = other.execute(
            "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (dialect.lock_class, resource)
        ).fetchone()
        return not (found and found[0])


def test_a_savepoint_rolled_back_releases_its_locks_and_they_are_taken_again(
    postgres_dsn: str,
) -> None:
    """ROLLBACK TO SAVEPOINT releases the locks taken after it: a later batch of the same
    transaction must lock the request again (else another replica joins it unlocked)."""
    dialect = open_dialect(postgres_dsn)
    try:
        dialect.begin()
        dialect.tallies()
        dialect.savepoint()
        dialect.lock("r")
        dialect.query("SELECT 1")
        assert held_elsewhere(postgres_dsn, dialect, "r")
        dialect.rollback_to_savepoint()
        dialect.query("SELECT 1")
        assert not held_elsewhere(postgres_dsn, dialect, "r")
        dialect.savepoint()
        dialect.lock("r")
        dialect.query("SELECT 1")
        assert held_elsewhere(postgres_dsn, dialect, "r")
        dialect.release_savepoint()
        dialect.commit()
        assert not held_elsewhere(postgres_dsn, dialect, "r")
    finally:
        dialect.close()


def test_a_nul_in_an_id_is_refused_alone_and_the_group_commits(
    postgres_dsn: str, stores: list
) -> None:
    """PostgreSQL keeps no NUL in text: that event's batch is a 400, its neighbours count."""
    store = open_store(postgres_dsn)
    stores.append(store)
    outcomes, _, _ = store._write_retrying(
        [([event("bad\0id", [1], [1])], None), ([event("good", [2], [2])], None)]
    )
    assert isinstance(outcomes[0], BadRequest) and outcomes[0].reason == reasons.NUL_CHARACTER
    assert outcomes[1] == [True]
    fresh = open_store(postgres_dsn)
    stores.append(fresh)
    assert fresh.state.count("rows_accepted") == 1
    assert fresh.seen_count == 1


def test_a_lock_held_by_a_vanished_replica_is_a_503_not_a_hang(
    postgres_dsn: str, stores: list
) -> None:
    """Another session holds the event key's lock and never ends (a partitioned replica): the
    commit gives up after lock_timeout with a 503 the sender retries."""
    store = open_store(postgres_dsn)
    stores.append(store)
    other = psycopg.connect(postgres_dsn, autocommit=True)
    try:
        other.execute("BEGIN")
        other.execute(
            "SELECT pg_advisory_xact_lock(%s)", (event_lock(store.keyspace, ("src", "e1")),)
        )
        started = time.monotonic()
        with pytest.raises(Unavailable):
            commit(store, event("e1", [1], [1]))
        assert time.monotonic() - started < 15
    finally:
        other.close()
    assert commit(store, event("e1", [1], [1])) == [True]  # the retry, once the lock is gone
