"""One contract every state store keeps, whatever its backend: a SQLite file, the in-memory
database, PostgreSQL.

Stores are opened the way the server opens them (``adserver.app.open_store`` and
``open_reader`` over ``Settings``), with the test's clock. Random streams of feedback events,
redeliveries, logged predictions and labels (either order) are checked after every commit
against scikit-learn; caps, dedup retention, time-bucket sums and a restart (close, reopen)
are checked on each backend alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adserver.app import open_reader, open_store
from adserver.catalogue.families import (
    EVENTS_DUPLICATE,
    EVICTED,
    LABELS,
    LOGGER_EVENTS,
    PREDICTED_ROWS,
    ROWS_ACCEPTED,
)
from adserver.errors import RequestError
from adserver.exposition.summary import model_summary
from adserver.settings import Settings
from adserver.state.committer import Committer
from adserver.state.join import Joiner, Label, LoggedRows
from adserver.state.store import Entry
from adserver.state.view import MetricsState, Placement
from cm_models import MultiClassNumeric
from cm_models.custom_metrics import CustomMetric
from tests.support.oracle import Counted, assert_matches, one_matrix, sklearn_summary
from tests.support.postgres import fresh_database
from tests.support.stores import BUCKETS, event
from tests.support.timing import FakeClock

MODEL = "m"
HOUR = 3600
# The clock of every test: half past an hour, so the hour before is a whole kept bucket.
NOW = 1_750_000_000 - 1_750_000_000 % HOUR + HOUR // 2
LONG = 1e9  # a retention or time-to-live that never passes in a test
POSTGRES = (pytest.mark.postgres, pytest.mark.e2e)
BACKENDS = [
    pytest.param("sqlite"),
    pytest.param("memory"),
    pytest.param("postgres", marks=POSTGRES),
]
DURABLE = [param for param in BACKENDS if param.values[0] != "memory"]
SUMMARY_KEYS = ("classes", "confusion_matrix", "accuracy", "per_class", "macro", "weighted")


@dataclass
class Place:
    """Where one backend keeps a state: each ``open`` after a ``close`` reopens the same one."""

    settings: Settings
    opened: list[Committer[Any]] = field(default_factory=list)

    def open(
        self,
        clock: Callable[[], float] | None = None,
        states: dict[str, MetricsState] | None = None,
        ttl: float = LONG,
        **policy: Any,
    ) -> Committer[Any]:
        """A store as ``--state`` opens it; ``policy``: Settings fields (``dedup_max_ids``...)."""
        states = {MODEL: MetricsState()} if states is None else states
        joiner = Joiner({name: MultiClassNumeric() for name in states}, ttl=ttl)
        policy = {"dedup_retention_seconds": LONG, "join_ttl_seconds": ttl, **policy}
        configured = dataclasses.replace(self.settings, **policy)
        store = open_store(configured, states, joiner)
        store.clock = clock or FakeClock(NOW)  # the server's is time.time
        self.opened.append(store)
        return store

    async def serving(self, store: Committer[Any]) -> None:
        """What the server does once its IOLoop runs: a shared store opens its readers' pool
        and starts polling the other replicas' commits."""
        if self.settings.state == "postgres":
            await store.start()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Close what a failing test left open (a closed store's close does nothing)."""
        for store in self.opened:
            asyncio.run(store.close())


class Places:
    """Fresh places of one backend (a hypothesis example needs one each)."""

    def __init__(self, backend: str, root: Path, request: pytest.FixtureRequest) -> None:
        self.backend = backend
        self.root = root
        self.request = request
        self.made: list[Place] = []

    def __call__(self) -> Place:
        base = Settings(state=self.backend, model_name=MODEL)
        if self.backend == "sqlite":
            base = dataclasses.replace(base, state_dir=tempfile.mkdtemp(dir=self.root))
        elif self.backend == "postgres":
            # a database per place: a hypothesis example must not see the one before
            server = self.request.getfixturevalue("postgres_server")
            base = dataclasses.replace(base, postgres_dsn=fresh_database(server))
        place = Place(base)
        self.made.append(place)
        return place


def make_places(request: pytest.FixtureRequest, root: Path) -> Iterator[Places]:
    places = Places(request.param, root, request)
    yield places
    for place in places.made:
        place.close()


@pytest.fixture(params=BACKENDS)
def places(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Places]:
    yield from make_places(request, tmp_path)


@pytest.fixture(params=DURABLE)
def durable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Places]:
    yield from make_places(request, tmp_path)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# ---- the reference ---------------------------------------------------------------------------


@dataclass
class Reference:
    """What a store must hold after each commit, replayed from what was sent (in order)."""

    seen: set[str] = field(default_factory=set)
    rows: list[tuple[int, int, float]] = field(default_factory=list)  # truth, predicted, time
    counters: Counter[tuple[str, str]] = field(default_factory=Counter)
    predicted: dict[str, tuple[list[int], float]] = field(default_factory=dict)
    labelled: dict[str, set[int]] = field(default_factory=dict)
    parked: dict[str, dict[int, int]] = field(default_factory=dict)  # request -> row -> truth

    def apply(self, key: str, operation: Operation) -> bool:
        if key in self.seen:
            self.counters[EVENTS_DUPLICATE, ""] += 1
            return False
        self.seen.add(key)
        operation.replay(self)
        return True

    def label_outcome(self, outcome: str, rows: int = 1) -> None:
        self.counters[LABELS, outcome] += rows

    def score(self, truth: int, predicted: int, time: float) -> None:
        self.rows.append((truth, predicted, time))
        self.counters[ROWS_ACCEPTED, ""] += 1

    def classes(self) -> list[int]:
        return sorted({c for t, p, _ in self.rows for c in (t, p)})

    def summary(self, start: float = float("-inf"), end: float = float("inf")) -> dict[str, Any]:
        """scikit-learn's summary of the rows predicted in [start, end), over every class."""
        inside = [(t, p) for t, p, time in self.rows if start <= time < end]
        part = Counted(MODEL, "", 0, 0, tuple(t for t, _ in inside), tuple(p for _, p in inside))
        expected = sklearn_summary([part], self.classes())
        return {key: expected[key] for key in SUMMARY_KEYS}


@dataclass(frozen=True)
class Feedback:
    truth: tuple[int, ...]
    predicted: tuple[int, ...]
    minutes_ago: int

    def entry(self, key: str) -> Entry:
        placement = Placement(time=NOW - 60.0 * self.minutes_ago)
        return dataclasses.replace(event(key, self.truth, self.predicted), placement=placement)

    def replay(self, reference: Reference) -> None:
        for truth, predicted in zip(self.truth, self.predicted, strict=True):
            reference.score(truth, predicted, NOW - 60.0 * self.minutes_ago)


@dataclass(frozen=True)
class Logged:
    request: str
    predicted: tuple[int, ...]
    minutes_ago: int

    def entry(self, key: str) -> Entry:
        logged = LoggedRows(
            self.request, "response", np.array(self.predicted), NOW - 60.0 * self.minutes_ago
        )
        return Entry(event_key=("src", key), operation=logged)

    def replay(self, reference: Reference) -> None:
        """The first prediction of a request stands; it meets the labels parked for it."""
        reference.counters[LOGGER_EVENTS, "response"] += 1
        if self.request in reference.predicted:
            return
        time = NOW - 60.0 * self.minutes_ago
        reference.predicted[self.request] = (list(self.predicted), time)
        reference.counters[PREDICTED_ROWS, ""] += len(self.predicted)
        parked = reference.parked.get(self.request, {})
        labelled = reference.labelled.setdefault(self.request, set())
        for row in sorted(r for r in parked if r < len(self.predicted)):
            reference.score(parked.pop(row), self.predicted[row], time)
            labelled.add(row)
            reference.label_outcome("late")


@dataclass(frozen=True)
class Labels:
    request: str
    first_row: int
    truth: tuple[int, ...]

    def entry(self, key: str) -> Entry:
        label = Label((self.request,), self.first_row, np.array(self.truth))
        return Entry(event_key=("src", key), operation=label)

    def replay(self, reference: Reference) -> None:
        """Rows with a prediction join (once); the others park (once) until it comes."""
        predicted, time = reference.predicted.get(self.request, ([], 0.0))
        labelled = reference.labelled.setdefault(self.request, set())
        parked = reference.parked.setdefault(self.request, {})
        for offset, truth in enumerate(self.truth):
            row = self.first_row + offset
            if row in labelled or row in parked:
                reference.label_outcome("duplicate")
            elif row < len(predicted):
                reference.score(truth, predicted[row], time)
                labelled.add(row)
                reference.label_outcome("joined")
            else:
                parked[row] = truth
                reference.label_outcome("parked")


Operation = Feedback | Logged | Labels

classes = st.integers(0, 3)
minutes = st.integers(0, 150)
requests = st.sampled_from(["r0", "r1", "r2", "r3"])


@st.composite
def feedbacks(draw: st.DrawFn) -> Feedback:
    truth = draw(st.lists(classes, min_size=1, max_size=3))
    predicted = draw(st.lists(classes, min_size=len(truth), max_size=len(truth)))
    return Feedback(tuple(truth), tuple(predicted), draw(minutes))


operations = st.one_of(
    feedbacks(),
    st.builds(Logged, requests, st.lists(classes, min_size=1, max_size=4).map(tuple), minutes),
    st.builds(
        Labels, requests, st.integers(0, 4), st.lists(classes, min_size=1, max_size=3).map(tuple)
    ),
)
# Each commit: (operation or the index of an earlier one to redeliver) of one to three events.
commits = st.lists(
    st.lists(st.one_of(operations, st.integers(0, 1000)), min_size=1, max_size=3),
    min_size=1,
    max_size=12,
)


def assert_holds(store: Committer[Any], reference: Reference) -> None:
    """The store's all-time view equals the reference, its summary equals scikit-learn's."""
    state = store.state
    assert_matches(reference.summary(), model_summary(state))
    for (name, label), value in reference.counters.items():
        assert state.count(name, label) == value, (name, label)
    assert state.labelled(LABELS) == {
        k: v for (n, k), v in reference.counters.items() if n == LABELS and v
    }


def stream_holds(place: Place, batches: list[list[Operation | int]]) -> Reference:
    """Commit each batch; after each, the store holds what the reference does."""
    reference = Reference()
    sent: list[tuple[str, Operation]] = []
    store = place.open()

    async def scenario() -> None:
        for batch in batches:
            entries, keys = [], []
            for item in batch:
                if isinstance(item, int):
                    if not sent:
                        continue
                    key, operation = sent[item % len(sent)]  # a redelivery
                else:
                    key, operation = f"e{len(sent)}", item
                    sent.append((key, operation))
                entries.append(operation.entry(key))
                keys.append((key, operation))
            if not entries:
                continue
            applied = await store.commit(entries)
            assert applied == [reference.apply(key, op) for key, op in keys]
            assert_holds(store, reference)
        await store.close()

    run(scenario())
    return reference


# ---- the contract ----------------------------------------------------------------------------


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=commits)
def test_random_streams_match_scikit_learn(places: Places, batches: list[list[Any]]) -> None:
    stream_holds(places(), batches)


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=commits)
def test_a_reopened_store_keeps_everything_and_joins_on(
    durable: Places, batches: list[list[Any]]
) -> None:
    """After close and reopen: the same view, every event key still known, parked labels
    still waiting for their prediction, and time buckets summing as scikit-learn says."""
    place = durable()
    reference = stream_holds(place, batches)
    store = place.open()
    assert_holds(store, reference)
    late = [
        Logged(request, (1, 2, 3, 0, 1, 2, 3), 5)
        for request, rows in sorted(reference.parked.items())
        if rows and request not in reference.predicted
    ]
    keys = [f"late-{i}" for i in range(len(late))]

    async def scenario() -> None:
        known = await store.commit(
            [Feedback((0,), (0,), 0).entry(key) for key in sorted(reference.seen)]
        )
        assert not any(known)
        reference.counters[EVENTS_DUPLICATE, ""] += len(reference.seen)
        if late:
            assert await store.commit([op.entry(k) for k, op in zip(keys, late)]) == [True] * len(
                late
            )
            for key, op in zip(keys, late):
                reference.apply(key, op)
        assert_holds(store, reference)
        await bucket_sums_hold(place, store, reference)
        await store.close()

    run(scenario())


async def bucket_sums_hold(place: Place, store: Committer[Any], reference: Reference) -> None:
    """Ranges of prediction time read from the buckets equal scikit-learn over their rows."""
    hour = NOW - NOW % HOUR
    ranges = [(hour - HOUR, hour), (hour - 3 * HOUR, hour + 25 * 60), (hour - 40 * 60, hour + 60)]
    await place.serving(store)
    reader = open_reader(place.settings, store)
    try:
        spans = [BUCKETS.cover(start, end, NOW) for start, end in ranges]
        states = await reader.read_range(MODEL, None, spans)
    finally:
        await reader.close()
    for (start, end), state in zip(ranges, states, strict=True):
        expected = reference.summary(start, end)
        assert_matches(expected, model_summary(state), f"[{start}, {end})")


def test_duplicates_change_nothing(places: Places) -> None:
    async def scenario() -> Committer[Any]:
        store = places().open()
        assert await store.commit([event("a", [1, 2], [1, 1])]) == [True]
        applied = await store.commit([event("a", [1, 2], [1, 1]), event("b", [0], [0])])
        assert applied == [False, True]
        await store.close()
        return store

    store = run(scenario())
    assert store.state.count(ROWS_ACCEPTED) == 3
    assert store.state.count(EVENTS_DUPLICATE) == 1
    assert store.state.confusion.matrix().tolist() == one_matrix([1, 2, 0], [1, 1, 0], [0, 1, 2])


def test_concurrent_redeliveries_count_once(places: Places) -> None:
    """Twenty copies of one event arriving together land in one group: one counts."""

    async def scenario() -> list[list[bool]]:
        store = places().open()
        results = await asyncio.gather(*(store.commit([event("x", [1], [1])]) for _ in range(20)))
        await store.close()
        return results

    assert sum(r[0] for r in run(scenario())) == 1


def test_an_event_key_counts_once_within_the_retention(places: Places) -> None:
    clock = FakeClock(NOW)

    async def scenario() -> list[bool]:
        store = places().open(clock, dedup_retention_seconds=100.0)
        first = await store.commit([event("a", [1], [1]), event("a", [1], [1])])
        clock.now += 99
        within = await store.commit([event("a", [1], [1])])
        clock.now += 2
        after = await store.commit([event("a", [1], [1])])
        await store.close()
        return first + within + after

    assert run(scenario()) == [True, False, False, True]


def test_remembered_ids_are_bounded_oldest_forgotten_first(places: Places) -> None:
    clock = FakeClock(NOW)

    async def scenario() -> tuple[list[bool], list[bool], int]:
        store = places().open(clock, dedup_max_ids=5)
        for i in range(12):
            clock.now += 1
            assert await store.commit([event(str(i), [1], [1])]) == [True]
        await store.commit([Entry()])  # the bound is enforced by the sweep before each commit
        remembered = await store.commit([event(str(i), [1], [1]) for i in range(7, 12)])
        forgotten = await store.commit([event("0", [1], [1])])
        await store.close()
        return remembered, forgotten, store.state.count(ROWS_ACCEPTED)

    remembered, forgotten, rows = run(scenario())
    assert remembered == [False] * 5 and forgotten == [True]
    assert rows == 13


def test_too_many_classes_refuse_the_batch_and_change_nothing(places: Places) -> None:
    async def scenario() -> Committer[Any]:
        store = places().open(max_classes=3)
        assert await store.commit([event("a", [0, 1], [1, 1])]) == [True]
        with pytest.raises(RequestError):  # two classes more than --max_classes allows
            await store.commit([event("b", [2, 3], [2, 3]), event("c", [1], [1])])
        assert await store.commit([event("c", [1], [1])]) == [True]  # c was not remembered
        await store.close()
        return store

    store = run(scenario())
    assert store.classes == {MODEL: {0, 1}}
    assert store.state.confusion.matrix().tolist() == [[0, 1], [0, 2]]


def test_logged_rows_beyond_the_bound_are_evicted_oldest_first(places: Places) -> None:
    """Past --join_max_rows the oldest prediction goes (counted): its label parks instead."""

    async def scenario() -> Committer[Any]:
        store = places().open(join_max_rows=3)
        for i in range(6):
            logged = LoggedRows(f"r{i}", "response", np.array([1]), NOW)
            assert await store.commit([Entry(operation=logged)]) == [True]
        await store.commit([Entry()])  # the sweep before a commit trims what the last added
        for request in ("r0", "r5"):
            label = Label((request,), 0, np.array([1]))
            assert await store.commit([Entry(operation=label)]) == [True]
        await store.close()
        return store

    state = run(scenario()).state
    assert state.count(EVICTED, "prediction_evicted") == 3
    assert state.labelled(LABELS) == {"joined": 1, "parked": 1}


def test_restart_restores_everything(durable: Places) -> None:
    metrics = (
        CustomMetric("c", "COUNTER", 2.0, (("a", "b"),)),
        CustomMetric("g", "GAUGE", 7.0),
        CustomMetric("t", "TIMER", 15.0),
    )
    place = durable()

    async def write() -> dict[str, Any]:
        store = place.open()
        await store.commit([event("1", [0, 1, 1], [0, 1, 0], metrics=metrics)])
        await store.commit([event("2", [2], [1], metrics=metrics[1:])])
        await store.close()
        return model_summary(store.state)

    before = run(write())
    reopened = place.open()
    assert model_summary(reopened.state) == before
    custom = reopened.state.custom
    assert custom.counters == {("c", (("a", "b"),)): 2.0}
    assert custom.gauges == {("g", ()): 7.0}
    timer = custom.timers[("t", ())]
    assert (timer.count, timer.total) == (2, pytest.approx(0.03))
    assert run(reopened.commit([event("1", [0], [0])])) == [False]


def test_an_entry_counts_under_its_own_model_and_segment_across_a_restart(durable: Places) -> None:
    """State is addressed by (model, segment, bucket): an entry's segment keeps its counts apart
    from the others' (and counts in its model's totals), stored too; each model's classes
    have their own cap."""
    canary = Placement(("canary",))
    place = durable()

    def states() -> dict[str, MetricsState]:
        return {MODEL: MetricsState(), "other": MetricsState()}

    async def scenario() -> None:
        store = place.open(states=states(), max_classes=2)
        keyed = dataclasses.replace(event("a", [1, 1], [1, 0]), placement=canary)
        assert await store.commit([keyed, event("b", [0], [0])]) == [True, True]
        # "m" holds classes 0 and 1: a third is refused for it, not for another model
        with pytest.raises(RequestError):
            await store.commit([dataclasses.replace(event("c", [2], [2]), placement=canary)])
        other = dataclasses.replace(event("d", [2], [3]), model="other")
        assert await store.commit([other]) == [True]
        await store.close()

    run(scenario())
    reopened = place.open(states=states(), max_classes=2)
    views = reopened.views
    assert views.segments(MODEL)["canary"].confusion.matrix().tolist() == [[0, 0], [1, 1]]
    assert views.total(MODEL).confusion.matrix().tolist() == [[1, 0], [1, 1]]  # with segment ""
    assert views.total("other").confusion.classes == [2, 3]
    assert reopened.classes == {MODEL: {0, 1}, "other": {2, 3}}
    assert reopened.dialect.classes("other") == {2, 3}
    run(reopened.close())
