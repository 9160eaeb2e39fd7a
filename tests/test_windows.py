"""Reads of time buckets, range documents and window gauges against scikit-learn.

Bucket rows are written straight into the statistic tables (a row counts in every bucket of its
prediction time still kept, as the committer writes them), then read back through the reader:
every step, total, segment and window must equal scikit-learn on exactly the rows it covers.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from adserver.catalogue import reasons
from adserver.catalogue.families import PREDICTED_ROWS, ROWS_ACCEPTED
from adserver.errors import NotFound, RequestError
from adserver.exposition.windows import MAX_STEPS, RangeDocuments, WindowGauges, parse_windows
from adserver.state.buckets import DEFAULT_BUCKETS, NotKept, TimeBuckets
from adserver.state.reads import IN_CHUNK
from adserver.state.sqlite.reader import SQLiteBucketReader
from adserver.state.sqlite.store import SQLiteDialect
from adserver.state.view import Delta, MetricsState
from cm_models.confusion import Cells
from cm_models.statistics import StateKey

BUCKETS = TimeBuckets.parse(DEFAULT_BUCKETS)
NOW = 1_780_000_000.5
THIS_MINUTE = int(NOW) // 60 * 60
MINUTE, HOUR, DAY = 60, 3600, 86400
CLASSES = {"iris": (0, 1, 2), "other": (0, 1)}
SEGMENTS = {"iris": ("default", "canary"), "other": ("",), "wide": ()}


@dataclass(frozen=True)
class Row:
    model: str
    segment: str
    truth: int
    prediction: int
    time: float
    labelled: bool = True  # False: a logged prediction still waiting for its label


class Views:
    """The all-time views the documents check names against (as ``store.views``)."""

    def __init__(self, models: Mapping[str, MetricsState]) -> None:
        self.states = models

    def models(self) -> list[str]:
        return list(self.states)

    def total(self, model: str) -> MetricsState:
        return self.states[model]

    def segments(self, model: str) -> dict[str, MetricsState]:
        return {s: self.states[model] for s in SEGMENTS[model] if s}


def prototypes() -> dict[str, MetricsState]:
    return {model: MetricsState(classes) for model, classes in CLASSES.items()}


def open_dialect(state_dir: Path | None = None) -> SQLiteDialect:
    dialect = SQLiteDialect.open(str(state_dir) if state_dir else None, "iris")
    dialect.prepare(MetricsState().statistics.values())
    return dialect


def write(dialect: SQLiteDialect, rows: list[Row], now: float = NOW) -> None:
    """Each row in every bucket its prediction counts in (the committer's row part)."""
    for row in rows:
        if row.labelled:
            cells = Cells(np.array([row.truth]), np.array([row.prediction]), np.array([1]))
            delta = Delta(cells, counters=[(ROWS_ACCEPTED, "", 1)], delays=[(30.0, 1)])
        else:
            delta = Delta(counters=[(PREDICTED_ROWS, "", 1)])
        keys = [StateKey(row.model, row.segment, b) for b in BUCKETS.keys(row.time, now)]
        dialect.write(keys, delta)


def expected(rows: list[Row], model: str, segment: str | None, start: float, end: float):
    """scikit-learn's matrix and per-class scores on the labelled rows in [start, end)."""
    chosen = [
        r
        for r in rows
        if r.model == model and (segment is None or r.segment == segment) and start <= r.time < end
    ]
    labelled = [r for r in chosen if r.labelled]
    labels = list(CLASSES[model])
    truth = [r.truth for r in labelled]
    prediction = [r.prediction for r in labelled]
    matrix = confusion_matrix(truth, prediction, labels=labels) if labelled else None
    scores = (
        precision_recall_fscore_support(
            truth, prediction, labels=labels, zero_division=0, average=None
        )
        if labelled
        else None
    )
    return matrix, scores, len(labelled), len(chosen) - len(labelled)


def check_summary(summary: dict[str, Any], rows: list[Row], model: str, segment, start, end):
    matrix, scores, labelled, waiting = expected(rows, model, segment, start, end)
    assert summary["rows"] == labelled
    assert summary["predictions"] == waiting
    known = max(labelled, waiting)  # null for an empty span: nothing known, not unlabelled
    assert summary["label_coverage"] == (labelled / known if known else None)
    assert summary["label_delay"]["count"] == labelled
    assert summary["classes"] == list(CLASSES[model])
    if matrix is None:
        assert np.sum(summary["confusion_matrix"]) == 0
        assert summary["accuracy"] == 0.0
        return
    assert summary["confusion_matrix"] == matrix.tolist()
    assert summary["accuracy"] == pytest.approx(np.trace(matrix) / labelled)
    precision, recall, f1, _ = scores
    for i, label in enumerate(CLASSES[model]):
        values = summary["per_class"][str(label)]
        assert values["precision"] == pytest.approx(precision[i])
        assert values["recall"] == pytest.approx(recall[i])
        assert values["f1"] == pytest.approx(f1[i])


@st.composite
def streams(draw: st.DrawFn) -> list[Row]:
    """Rows of both models and every segment, at any time of the last four days (minutes are
    kept two days), out of order; some only logged, still waiting for a label."""
    rows = []
    for _ in range(draw(st.integers(0, 40))):
        model = draw(st.sampled_from(sorted(CLASSES)))
        classes = st.sampled_from(CLASSES[model])
        age = draw(st.one_of(st.floats(0, 4 * DAY), st.floats(0, 2 * HOUR)))
        rows.append(
            Row(
                model,
                draw(st.sampled_from(SEGMENTS[model])),
                draw(classes),
                draw(classes),
                NOW - age,
                draw(st.booleans()),
            )
        )
    return rows


def document(reader: SQLiteBucketReader, model: str, arguments: dict[str, str]) -> dict[str, Any]:
    documents = RangeDocuments(reader, BUCKETS, Views(reader.models), clock=lambda: NOW)
    return orjson.loads(asyncio.run(documents.document(model, arguments)))


@settings(max_examples=60, deadline=None)
@given(
    rows=streams(),
    model=st.sampled_from(sorted(CLASSES)),
    segment_index=st.integers(-1, 1),
    back=st.integers(0, 4 * DAY // MINUTE),  # from up to four days ago, to up to a day ahead
    length=st.integers(1, 3 * DAY // MINUTE),
    step=st.sampled_from(["", "60", "5m", "1h", "3h", "1d"]),
)
def test_every_step_and_total_equals_scikit_learn(
    rows: list[Row], model: str, segment_index: int, back: int, length: int, step: str
) -> None:
    dialect = open_dialect()
    try:
        write(dialect, rows)
        reader = SQLiteBucketReader.inline(prototypes(), dialect.connection)
        start = THIS_MINUTE - back * MINUTE
        end = start + length * MINUTE
        named = [s for s in SEGMENTS[model] if s]
        segment = named[segment_index] if named and segment_index >= 0 else None
        arguments = {"from": str(start), "to": str(end), "step": step}
        if segment is not None:
            arguments["segment"] = segment
        seconds = {"": end - start, "60": 60, "5m": 300, "1h": HOUR, "3h": 3 * HOUR, "1d": DAY}
        size = seconds[step]
        bounds = [(s, min(s + size, end)) for s in range(start, end, size)]
        if end > NOW + DAY:  # later than any prediction can be
            assert refusal(reader, model, arguments) == reasons.INVALID_RANGE
            return
        if len(bounds) > MAX_STEPS:
            assert refusal(reader, model, arguments) == reasons.TOO_MANY_STEPS
            return
        try:
            for s, e in [*bounds, (start, end)]:
                BUCKETS.cover(s, e, NOW)
        except NotKept:
            assert refusal(reader, model, arguments) == reasons.RANGE_NOT_KEPT
            return
        found = document(reader, model, arguments)
        assert (found["from"], found["to"], found["step"]) == (start, end, size)
        assert found["segment"] == (segment or "")
        assert [(s["from"], s["to"]) for s in found["steps"]] == bounds
        for summary, (s, e) in zip(found["steps"], bounds):
            check_summary(summary, rows, model, segment, s, e)
        check_summary(found["total"], rows, model, segment, start, end)
    finally:
        dialect.close()


def refusal(reader: SQLiteBucketReader, model: str, arguments: dict[str, str]) -> str:
    with pytest.raises(RequestError) as caught:
        document(reader, model, arguments)
    return caught.value.reason


@pytest.fixture
def stored() -> Iterator[tuple[SQLiteBucketReader, list[Row]]]:
    rows = [
        Row("iris", "default", 0, 0, NOW - 30),
        Row("iris", "default", 1, 2, NOW - 90),
        Row("iris", "canary", 2, 2, NOW - 2 * HOUR),
        Row("iris", "canary", 1, 1, NOW - 3 * DAY),
        Row("other", "", 1, 0, NOW - 10 * MINUTE),
        Row("other", "", 0, 0, NOW - 10 * MINUTE, labelled=False),
    ]
    dialect = open_dialect()
    write(dialect, rows)
    yield SQLiteBucketReader.inline(prototypes(), dialect.connection), rows
    dialect.close()


HOUR_AGO = THIS_MINUTE - HOUR


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"from": str(HOUR_AGO)}, reasons.INVALID_RANGE),
        ({"from": str(THIS_MINUTE), "to": str(HOUR_AGO)}, reasons.INVALID_RANGE),
        ({"from": str(HOUR_AGO), "to": str(HOUR_AGO)}, reasons.INVALID_RANGE),
        ({"from": str(HOUR_AGO + 1), "to": str(THIS_MINUTE)}, reasons.INVALID_RANGE),
        ({"from": "yesterday", "to": str(THIS_MINUTE)}, reasons.INVALID_RANGE),
        ({"from": "2026-05-28T00:00:00", "to": str(THIS_MINUTE)}, reasons.INVALID_RANGE),
        ({"from": "-60", "to": str(THIS_MINUTE)}, reasons.INVALID_RANGE),
        ({"from": str(HOUR_AGO), "to": "inf"}, reasons.INVALID_RANGE),
        ({"from": str(HOUR_AGO), "to": "1e300"}, reasons.INVALID_RANGE),
        ({"from": str(HOUR_AGO), "to": str(THIS_MINUTE + DAY + MINUTE)}, reasons.INVALID_RANGE),
        ({"from": str(HOUR_AGO), "to": str(THIS_MINUTE), "step": "90s"}, reasons.INVALID_STEP),
        ({"from": str(HOUR_AGO), "to": str(THIS_MINUTE), "step": "fast"}, reasons.INVALID_STEP),
        ({"from": str(HOUR_AGO), "to": str(THIS_MINUTE), "step": "0"}, reasons.INVALID_STEP),
        (
            {"from": str(THIS_MINUTE - 2 * DAY), "to": str(THIS_MINUTE), "step": "1m"},
            reasons.TOO_MANY_STEPS,
        ),
        (
            {"from": str(THIS_MINUTE - 10 * DAY), "to": str(THIS_MINUTE - 9 * DAY), "step": "1m"},
            reasons.RANGE_NOT_KEPT,
        ),
        (
            {"from": str(THIS_MINUTE - 3 * DAY - MINUTE), "to": str(THIS_MINUTE)},
            reasons.RANGE_NOT_KEPT,
        ),
        (
            {"from": str(HOUR_AGO), "to": str(THIS_MINUTE), "segment": "blue"},
            reasons.UNKNOWN_SEGMENT,
        ),
    ],
)
def test_a_bad_range_is_refused_by_reason(stored, arguments, reason) -> None:
    reader, _ = stored
    assert refusal(reader, "iris", arguments) == reason


def test_an_unknown_model_is_not_found(stored) -> None:
    reader, _ = stored
    with pytest.raises(NotFound) as caught:
        document(reader, "rose", {"from": str(HOUR_AGO), "to": str(THIS_MINUTE)})
    assert caught.value.reason == reasons.UNKNOWN_MODEL


def test_rfc3339_times_and_a_model_without_segments(stored) -> None:
    reader, rows = stored
    found = document(
        reader, "other", {"from": "2026-05-28T20:00:00Z", "to": "2026-05-28T21:00:00 00:00"}
    )
    start = 1_779_998_400  # 2026-05-28T20:00:00Z
    assert (found["from"], found["to"], found["segment"]) == (start, start + HOUR, "")
    check_summary(found["total"], rows, "other", None, start, start + HOUR)
    assert found["total"]["label_coverage"] == 1.0  # rows / max(predictions, rows) = 1 / 1


def test_a_span_of_more_buckets_than_one_statement_takes(stored) -> None:
    """Over IN_CHUNK buckets are read in several statements, and the sum is the same."""
    reader, rows = stored
    minutes = [BUCKETS.encode(0, THIS_MINUTE - i * MINUTE) for i in range(IN_CHUNK + 20)]
    (state,) = asyncio.run(reader.read_range("iris", None, [minutes]))
    matrix, _, labelled, _ = expected(rows, "iris", None, THIS_MINUTE - (IN_CHUNK + 19) * 60, NOW)
    assert state.count(ROWS_ACCEPTED) == labelled
    assert state.confusion.matrix().tolist() == matrix.tolist()


def test_the_durable_reader_sees_commits_only_and_never_waits(tmp_path: Path) -> None:
    """Its own read-only connection: an open write transaction neither blocks it nor shows."""
    dialect = open_dialect(tmp_path)
    committed = [Row("iris", "default", 1, 1, NOW - 30)]
    write(dialect, committed)
    reader = SQLiteBucketReader.durable(prototypes(), tmp_path / "feedback-state.sqlite3")
    span = [list(BUCKETS.window(HOUR, NOW)[1])]

    async def reads() -> list[dict[tuple[str, str], MetricsState]]:
        dialect.begin()
        write(dialect, [Row("iris", "canary", 0, 1, NOW - 30)])  # not committed yet
        try:
            return await asyncio.wait_for(reader.read_windows(span), timeout=5)
        finally:
            dialect.rollback()
            await reader.close()

    (found,) = asyncio.run(reads())
    assert set(found) == {("iris", ""), ("iris", "default")}
    assert found[("iris", "")].confusion.matrix().tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    dialect.close()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def samples(gauges: WindowGauges) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in gauges.collect()
        for s in family.samples
    }


def test_window_gauges_equal_scikit_learn_per_model_segment_and_window(stored) -> None:
    reader, rows = stored
    monotonic = Clock()
    windows = parse_windows("1h,24h,7d", BUCKETS)
    gauges = WindowGauges(
        reader,
        BUCKETS,
        windows,
        lambda: ["iris", "other"],
        15.0,
        clock=lambda: NOW,
        monotonic=monotonic,
    )
    asyncio.run(gauges.refresh())
    found = samples(gauges)
    end = THIS_MINUTE + MINUTE
    keys = {("iris", None), ("iris", "default"), ("iris", "canary"), ("other", None)}
    for window, seconds in windows.items():
        start = BUCKETS.window(seconds, NOW)[0]
        for model, segment in keys:
            labels = {"model": model, "segment": segment or "", "window": window}
            matrix, scores, labelled, waiting = expected(rows, model, segment, start, end)

            def value(name: str, labels: dict[str, str] = labels, **extra: str) -> float | None:
                key = tuple(sorted({**labels, **extra}.items()))
                return found.get((f"feedback_window_{name}", key))

            if not labelled and not waiting:
                assert value("rows") is None  # no rows in the window: no series
                continue
            assert value("rows") == labelled and value("predictions") == waiting
            assert value("label_coverage") == pytest.approx(labelled / max(labelled, waiting))
            if matrix is None:
                assert value("accuracy") is None and value("precision", **{"class": "0"}) is None
                continue
            assert value("accuracy") == pytest.approx(np.trace(matrix) / labelled)
            for i, label in enumerate(CLASSES[model]):
                for name, values in zip(("precision", "recall", "f1"), scores):
                    assert value(name, **{"class": str(label)}) == pytest.approx(values[i])
    # the 3-day-old canary row is in no window; the 2-hour-old one only in 24h and 7d
    assert (
        "feedback_window_rows",
        (("model", "iris"), ("segment", "canary"), ("window", "1h")),
    ) not in found


def test_window_gauges_are_reread_only_when_stale() -> None:
    dialect = open_dialect()
    reader = SQLiteBucketReader.inline(prototypes(), dialect.connection)
    monotonic = Clock()
    gauges = WindowGauges(
        reader, BUCKETS, {"1h": HOUR}, lambda: ["iris"], 15.0,
        clock=lambda: NOW, monotonic=monotonic,
    )  # fmt: skip
    rows_1h = ("feedback_window_rows", (("model", "iris"), ("segment", ""), ("window", "1h")))

    async def scrape() -> dict[Any, float]:
        await asyncio.gather(gauges.refresh(), gauges.refresh())  # concurrent: one read
        return samples(gauges)

    async def scenario() -> None:
        assert await scrape() == {}  # the first read, waited for: nothing in any window
        write(dialect, [Row("iris", "default", 1, 1, NOW - 30)])
        monotonic.now = 14.0
        assert await scrape() == {}  # still fresh: not read again
        monotonic.now = 15.0
        assert await scrape() == {}  # stale: read again in the background, old values served
        for _ in range(500):
            await asyncio.sleep(0.01)
            if samples(gauges):
                break
        assert samples(gauges)[rows_1h] == 1

    asyncio.run(scenario())
    dialect.close()


def test_windows_are_whole_finest_buckets() -> None:
    assert parse_windows("1h, 24h,7d", BUCKETS) == {"1h": HOUR, "24h": DAY, "7d": 7 * DAY}
    assert parse_windows("", BUCKETS) == {}
    for bad in ("30s", "1h,90s", "1x"):
        with pytest.raises(ValueError):
            parse_windows(bad, BUCKETS)
    assert math.isclose(BUCKETS.window(HOUR, NOW)[0], THIS_MINUTE + MINUTE - HOUR)


def test_a_range_of_more_cells_than_the_cap_is_refused() -> None:
    """Every step has its model's dense matrix: steps x classes squared is capped, so one GET
    cannot build gigabytes (1,000 classes: at most 2 steps)."""
    dialect = open_dialect()
    wide = {"wide": MetricsState(range(1000))}
    reader = SQLiteBucketReader.inline(wide, dialect.connection)
    documents = RangeDocuments(reader, BUCKETS, Views(wide), clock=lambda: NOW)
    start = THIS_MINUTE - 3 * HOUR
    arguments = {"from": str(start), "to": str(THIS_MINUTE), "step": "1h"}
    with pytest.raises(RequestError) as refused:
        asyncio.run(documents.document("wide", arguments))
    assert refused.value.reason == reasons.TOO_MANY_STEPS
    two = {**arguments, "from": str(THIS_MINUTE - 2 * HOUR)}
    assert len(orjson.loads(asyncio.run(documents.document("wide", two)))["steps"]) == 2
    dialect.close()
