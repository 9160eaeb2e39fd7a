"""Late ground truth: join labels to logged predictions by (request id, row).

Payload loggers send every prediction as a CloudEvent; we keep each row's prediction (and
input) for a while. A label that names the request id is scored against the stored rows; a label
that arrives first is parked and scored when its prediction comes. The logic here is pure: it
reads and writes through :class:`JoinTables`, which a store implements inside its transaction,
so a join and the counts it produces commit together, exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from adserver.constants import METRICS_REJECTED, ROWS_ACCEPTED
from adserver.state import Delta
from cm_models.base import InvalidFeedback, Observation

# Counter names (exported as feedback_<name>_total) and the outcomes of a label row.
LABELS = "labels"
PREDICTED_ROWS = "predicted_rows"
LOGGER_EVENTS = "logger_events"
EVICTED = "join_rows_evicted"
JOINED, LATE, PARKED, DUPLICATE, EXPIRED, FAILED = (
    "joined",
    "late",
    "parked",
    "duplicate",
    "expired",
    "failed",
)

Scorer = Callable[[list[Any], list[Any], list[Any] | None], Observation]


@dataclass(frozen=True)
class LoggedRows:
    """A logger event: one JSON document per row of the model's input or prediction."""

    request_id: str
    kind: Literal["request", "response"]
    rows: tuple[bytes, ...]
    time: float


@dataclass(frozen=True)
class Label:
    """Truth for rows ``first_row ..`` of the request ``request_id``, one JSON document a row."""

    request_id: str
    first_row: int
    truth_rows: tuple[bytes, ...]
    extra: Delta = field(default_factory=Delta)


@dataclass
class StoredRow:
    prediction: bytes | None = None
    request: bytes | None = None
    predicted_at: float | None = None
    labelled: bool = False


class JoinTables(Protocol):
    """Row storage inside the store's current transaction."""

    def rows(self, request_id: str, indexes: range) -> dict[int, StoredRow]: ...

    def save_rows(self, request_id: str, rows: dict[int, StoredRow], expires_at: float) -> None: ...

    def parked(self, request_id: str, indexes: range) -> dict[int, tuple[bytes, float]]: ...

    def park(
        self, request_id: str, rows: dict[int, tuple[bytes, float]], expires_at: float
    ) -> None: ...

    def unpark(self, request_id: str, indexes: Sequence[int]) -> None: ...


def label_counts(outcomes: dict[str, int]) -> tuple[tuple[str, str, int], ...]:
    return tuple((LABELS, outcome, n) for outcome, n in outcomes.items() if n)


class Joiner:
    def __init__(self, score: Scorer, ttl: float) -> None:
        self.score = score
        self.ttl = ttl

    def apply(self, tables: JoinTables, operation: LoggedRows | Label, now: float) -> Delta:
        if isinstance(operation, Label):
            return self.label(tables, operation, now)
        return self.record(tables, operation, now)

    def record(self, tables: JoinTables, logged: LoggedRows, now: float) -> Delta:
        """Store a request's inputs or predictions; score labels that were waiting for them."""
        indexes = range(len(logged.rows))
        stored = tables.rows(logged.request_id, indexes)
        changed: dict[int, StoredRow] = {}
        for index, payload in zip(indexes, logged.rows):
            row = stored.get(index, StoredRow())
            if logged.kind == "request" and row.request is None:
                row.request = payload
                changed[index] = row
            elif logged.kind == "response" and row.prediction is None:
                row.prediction, row.predicted_at = payload, logged.time
                changed[index] = row
        counters = [(LOGGER_EVENTS, logged.kind, 1)]
        delta = Delta()
        if logged.kind == "response":
            counters.append((PREDICTED_ROWS, "", len(changed)))
            waiting = {
                i: parked
                for i, parked in tables.parked(logged.request_id, indexes).items()
                if i in changed
            }
            if waiting:
                delta = self.score_parked(changed, waiting, now)
                tables.unpark(logged.request_id, list(waiting))
        tables.save_rows(logged.request_id, changed, now + self.ttl)
        return delta + Delta(counters=tuple(counters))

    def score_parked(
        self, rows: dict[int, StoredRow], waiting: dict[int, tuple[bytes, float]], now: float
    ) -> Delta:
        """Parked labels meet their prediction. A label that no longer fits is dropped, counted."""
        order = sorted(waiting)
        try:
            delta = self.observe(
                [waiting[i][0] for i in order],
                [rows[i] for i in order],
                [waiting[i][1] for i in order],
            )
        except InvalidFeedback:
            return Delta(counters=label_counts({FAILED: len(order)}))
        for i in order:
            rows[i].labelled = True
        return delta + Delta(counters=label_counts({LATE: len(order)}))

    def label(self, tables: JoinTables, label: Label, now: float) -> Delta:
        """Score the label's rows that have a prediction; park the others."""
        indexes = range(label.first_row, label.first_row + len(label.truth_rows))
        truth = dict(zip(indexes, label.truth_rows))
        stored = tables.rows(label.request_id, indexes)
        already_parked = tables.parked(label.request_id, indexes)
        duplicate = already_parked.keys() | {i for i, row in stored.items() if row.labelled}
        predicted = {i for i, row in stored.items() if row.prediction is not None}
        ready = sorted(predicted - duplicate)
        waiting = [i for i in indexes if i not in duplicate and i not in predicted]
        delta = label.extra
        if ready:
            try:
                delta = delta + self.observe(
                    [truth[i] for i in ready], [stored[i] for i in ready], [now] * len(ready)
                )
            except InvalidFeedback as exc:
                raise InvalidFeedback(
                    f"label does not fit the logged prediction: {exc}", exc.reason
                ) from exc
            for i in ready:
                stored[i].labelled = True
            tables.save_rows(label.request_id, {i: stored[i] for i in ready}, now + self.ttl)
        if waiting:
            tables.park(label.request_id, {i: (truth[i], now) for i in waiting}, now + self.ttl)
        outcomes = {JOINED: len(ready), PARKED: len(waiting), DUPLICATE: len(duplicate)}
        return delta + Delta(counters=label_counts(outcomes))

    def observe(self, truth: list[bytes], rows: list[StoredRow], arrivals: list[float]) -> Delta:
        requests = [r.request for r in rows]
        observation = self.score(
            [orjson.loads(t) for t in truth],
            [orjson.loads(r.prediction) for r in rows],
            None if None in requests else [orjson.loads(r) for r in requests],
        )
        delays = tuple(
            max(0.0, arrival - row.predicted_at)
            for arrival, row in zip(arrivals, rows)
            if row.predicted_at is not None
        )
        counters = [(ROWS_ACCEPTED, "", observation.rows)]
        if observation.metric_problems:
            counters.append((METRICS_REJECTED, "", len(observation.metric_problems)))
        return Delta(
            cells=observation.cells,
            metrics=tuple(observation.metrics),
            counters=tuple(counters),
            delays=delays,
        )
