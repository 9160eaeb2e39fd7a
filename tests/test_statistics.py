"""Declared statistics: a model's own table is persisted, reloaded and merged, generically."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adserver.errors import RequestError
from adserver.state.committer import CommitPolicy, load_views
from adserver.state.join import Joiner, Label, LoggedRows
from adserver.state.sqlite.store import SQLiteDialect, SQLiteStore, StateFileError
from adserver.state.store import Entry
from adserver.state.view import Delta, KeyedState, MetricsState
from cm_models import MultiClassNumeric
from cm_models.base import Observation
from cm_models.statistics import StateKey, Sums
from tests.support.stores import BUCKETS

ABS_ERROR = Sums("abs_error", keys=[("truth", "int")], values=[("total", "real"), ("rows", "int")])


class ErrorSums(MultiClassNumeric):
    """Keeps, per true class, the sum of |prediction - truth| and its rows (a regression sum)."""

    statistics = (ABS_ERROR,)

    def observe(self, truth: Any, response: Any, request: Any = None) -> Observation:
        observation = super().observe(truth, response, request)
        return dataclasses.replace(
            observation, updates={ABS_ERROR.name: error_rows(truth, response)}
        )


def error_rows(truth: Any, response: Any) -> tuple[tuple[int, float, int], ...]:
    t, p = np.ravel(truth), np.ravel(response)
    return tuple(
        (int(c), float(np.abs(p[t == c] - c).sum()), int((t == c).sum())) for c in np.unique(t)
    )


def expected(*pairs: tuple[list[int], list[int]]) -> dict[tuple[int], tuple[float, int]]:
    """The table summed directly over all the rows (not through any store)."""
    truth = np.concatenate([t for t, _ in pairs])
    predicted = np.concatenate([p for _, p in pairs])
    return {(c,): (total, rows) for c, total, rows in error_rows(truth, predicted)}


def store(directory: Path, **options: Any) -> SQLiteStore:
    model = ErrorSums()
    return SQLiteStore(
        {"m": MetricsState(statistics=model.statistics)},
        SQLiteDialect.open(str(directory), "m"),
        "m",
        CommitPolicy(retention=1e9, max_ids=100),
        joiner=Joiner({"m": model}, ttl=1e9),
        buckets=BUCKETS,
        **options,
    )


def write(
    directory: Path, joined: tuple[list[int], list[int]], direct: tuple[list[int], list[int]]
) -> None:
    """One label joined to its logged prediction, one feedback with its response."""

    async def scenario() -> None:
        writer = store(directory)
        truth, predicted = joined
        logged = LoggedRows("r", "response", np.array(predicted), 0.0)
        assert await writer.commit([Entry(operation=logged, event_key=("src", "p"))]) == [True]
        label = Label(("r",), 0, np.array(truth))
        assert await writer.commit([Entry(operation=label, event_key=("src", "l"))]) == [True]
        observation = ErrorSums().observe(*direct)
        delta = Delta(cells=observation.cells, updates=observation.updates)
        assert await writer.commit([Entry(delta, ("src", "f"))]) == [True]
        await writer.close()

    asyncio.run(scenario())


def test_declared_statistic_is_persisted_reloaded_and_merged(tmp_path: Path) -> None:
    a = ([0, 1, 1, 2], [0, 2, 1, 0]), ([2, 2], [1, 2])
    b = ([1, 0], [3, 0]), ([0, 2, 2], [1, 1, 2])
    write(tmp_path / "a", *a)
    write(tmp_path / "b", *b)
    reopened = [store(tmp_path / "a"), store(tmp_path / "b")]
    assert reopened[0].state.tables[ABS_ERROR.name] == pytest.approx(expected(*a))
    assert reopened[1].state.tables[ABS_ERROR.name] == pytest.approx(expected(*b))
    # Two replicas' stores merge into one view: every statistic adds by its declared merge.
    merged = KeyedState({"m": MetricsState(statistics=ErrorSums.statistics)}, "m")
    for replica in reopened:
        load_views(replica.dialect, merged)
    view = merged.at(StateKey("m"))
    assert view.tables[ABS_ERROR.name] == pytest.approx(expected(*a, *b))
    three_classes, four_classes = (r.state.confusion.matrix() for r in reopened)
    assert view.confusion.classes == [0, 1, 2, 3]
    summed = np.pad(three_classes, (0, 1)) + four_classes
    assert view.confusion.matrix().tolist() == summed.tolist()
    assert view.count("labels", "joined") == 4 + 2


def test_a_declaration_that_changed_its_columns_is_refused(tmp_path: Path) -> None:
    write(tmp_path, ([1], [1]), ([0], [0]))
    changed = Sums(ABS_ERROR.name, keys=[("truth", "int")], values=[("total", "real")])
    with pytest.raises(StateFileError, match="abs_error"):
        dialect = SQLiteDialect.open(str(tmp_path), "m")
        state = MetricsState(statistics=[changed])
        SQLiteStore(
            {"m": state}, dialect, "m", CommitPolicy(retention=1, max_ids=1), buckets=BUCKETS
        )


@pytest.mark.parametrize("durable", [True, False])
def test_an_undeclared_statistic_changes_nothing(tmp_path: Path, durable: bool) -> None:
    """A model's bug (updates for a statistic it does not declare) is refused inside the
    transaction: its event id is not remembered and no count moves, in either mode."""
    directory = tmp_path if durable else None
    stray = Delta(counters=(("rows_accepted", "", 1),), updates={"undeclared": [(1, 1.0, 1)]})

    async def scenario() -> None:
        s = SQLiteStore(
            {"m": MetricsState()},
            SQLiteDialect.open(str(directory) if directory else None, "m"),
            "m",
            CommitPolicy(retention=1e9, max_ids=100),
            buckets=BUCKETS,
        )
        with pytest.raises(RequestError) as refused:
            await s.commit([Entry(stray, ("src", "a"))])
        assert refused.value.kind.fault
        assert s.state.counters == {} and s.seen_count == 0
        assert await s.commit([Entry(Delta(counters=(("rows_accepted", "", 1),)), ("src", "a"))])
        await s.close()

    asyncio.run(scenario())
