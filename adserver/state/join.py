"""Late ground truth: join labels to logged predictions by (request id, row).

Payload loggers send every prediction as a CloudEvent; we keep each event's rows (and inputs)
for a while. A label that names the request id is scored against the stored rows; a label that
arrives first is parked and scored when its prediction comes. The logic here is pure: it reads
and writes through :class:`JoinTables`, which a store implements inside its transaction, so a
join and the counts it produces commit together, exactly once.

Scoring goes through :class:`Scores`. Our own models score inside the transaction. A user's
model never does (it runs on the IOLoop only): the same join runs in the transaction, asks for
the scores it needs, and is rolled back; the IOLoop scores them; the join runs again and uses
each score whose inputs it reads again unchanged (else it asks anew, a bounded number of times).

Rows travel as one batch, never as an object per row: a numpy array for numbers (the first axis
is rows), or one list of rows for a user model's other data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from adserver.catalogue import reasons
from adserver.catalogue.families import (
    DUPLICATE,
    FAILED,
    JOINED,
    LABELS,
    LATE,
    LOGGER_EVENTS,
    METRICS_REJECTED,
    PARKED,
    PREDICTED_ROWS,
    ROWS_ACCEPTED,
)
from adserver.errors import RequestError, Unavailable
from adserver.state.view import Delta
from cm_models.base import InvalidFeedback, Observation, first_axis_rows

Scorer = Callable[[object, object, object], Observation]  # truth, prediction, request
#: Attempts of one commit that a user model's joins may take, beyond one per entry (each
#: attempt scores what the previous one read; rows changed by other events cost one more).
SCORING_RETRIES = 3
Score = Observation | InvalidFeedback  # a model's verdict on one task
Rows = Any  # np.ndarray (numbers, first axis = rows) or list (one entry a row)
Kind = Literal["request", "response"]


@dataclass(frozen=True)
class LoggedRows:
    """A logger event: the rows of the model's input or prediction, as one batch."""

    request_id: str
    kind: Kind
    rows: Rows
    time: float
    segment: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class Label:
    """Truth for rows ``first_row ..`` of one request.

    ``request_ids`` are the ids the label may name its prediction by, most preferred first: the
    first one that names a stored prediction is used (the preferred one if none does).
    """

    request_ids: tuple[str, ...]
    first_row: int
    truth: Rows
    extra: Delta = field(default_factory=Delta)
    segment: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class Logged:
    """What is stored for one request id: how many input rows and prediction rows."""

    request_rows: int = 0
    predicted_rows: int = 0
    predicted_at: float | None = None


@dataclass(frozen=True)
class Parked:
    """A label's rows waiting for their prediction."""

    first_row: int
    truth: Rows
    arrived_at: float
    expires_at: float


@dataclass(frozen=True)
class Task:
    """The inputs of one score: rows of truth, their predictions and stored inputs (if any)."""

    truth: Rows
    prediction: Rows
    request: Rows | None

    def same(self, other: Task) -> bool:
        return (
            same_rows(self.truth, other.truth)
            and same_rows(self.prediction, other.prediction)
            and same_rows(self.request, other.request)
        )


def same_rows(a: Rows | None, b: Rows | None) -> bool:
    """Whether two batches hold the same rows (numbers bit for bit, so NaN equals itself)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and (a.dtype, a.shape) == (b.dtype, b.shape)
            and a.tobytes() == b.tobytes()
        )
    try:
        return bool(a == b)  # lists of JSON values: read again, or the label's own objects
    except ValueError:  # arrays inside rows that are not the same objects: numpy refuses
        return False  # changed, for all we know: scored again


class Unscored(Unavailable):
    """The join needs scores that the model gives only outside the transaction: the batch is
    rolled back, scored and written again; a 503 once the attempts are spent."""

    def __init__(self) -> None:
        super().__init__(
            "the logged rows a label joins kept changing while it was scored",
            reasons.STORE_CONFLICT,
        )


class Scores:
    """The scores the joins of one commit ask for, in the order they ask.

    ``in_transaction`` (our own models): each is computed when asked. Otherwise an attempt gets
    the score computed after the previous attempt if that one asked for the same inputs at the
    same position; else an empty observation, and the attempt must be rolled back.
    """

    def __init__(self, score: Scorer, *, in_transaction: bool, entries: int) -> None:
        self._score = score
        self._in_transaction = in_transaction
        self._attempts = entries + SCORING_RETRIES
        self._known: list[tuple[Task, Score]] = []
        self._asked: list[tuple[Task, Score | None]] = []  # None: not known yet
        self._missing = False

    def __call__(self, task: Task) -> Observation:
        if self._in_transaction:
            return self._score(task.truth, task.prediction, task.request)
        position, result = len(self._asked), None
        if position < len(self._known) and self._known[position][0].same(task):
            result = self._known[position][1]
        self._asked.append((task, result))
        if result is None:
            self._missing = True
            return Observation()
        if isinstance(result, InvalidFeedback):
            raise result
        return result

    @contextlib.contextmanager
    def attempt(self) -> Iterator[None]:
        """Around one batch's writes: raises :class:`Unscored` if it asked for a missing score
        (its refusal, too, may come from a state that missing score would have changed)."""
        self._asked, self._missing = [], False
        try:
            yield
        except (RequestError, InvalidFeedback) as exc:
            if self._missing:
                raise Unscored() from exc
            raise
        if self._missing:
            raise Unscored()

    def score(self) -> bool:
        """After an :class:`Unscored` attempt, outside any transaction: score what it asked for
        (the user's model runs here). False once the attempts are spent."""
        self._attempts -= 1
        if self._attempts <= 0:
            return False
        self._known = [
            (task, self._try(task) if result is None else result) for task, result in self._asked
        ]
        return True

    def _try(self, task: Task) -> Score:
        try:
            return self._score(task.truth, task.prediction, task.request)
        except InvalidFeedback as exc:
            return exc


class JoinTables(Protocol):
    """Row storage inside the store's current transaction."""

    def find(self, request_ids: Sequence[str]) -> tuple[str, Logged] | None:
        """The first id with a logged request or response, and what is logged for it."""

    def read(self, request_id: str, kind: Kind, rows: range) -> Rows:
        """Stored rows ``rows`` of one kind (all of them exist)."""

    def store(
        self, request_id: str, stored: Logged, kind: Kind, rows: Rows, at: float, expires_at: float
    ) -> Logged:
        """Add the rows of one kind to what is ``stored``; returns what is stored now."""

    def predictions(self, request_id: str, rows: range) -> tuple[Rows, np.ndarray]:
        """Stored predictions ``rows`` (all exist), and which already have a label."""

    def mark_labelled(self, request_id: str, rows: np.ndarray) -> None:
        """Record labels for these predicted rows (sorted, none labelled before)."""

    def parked(self, request_id: str, rows: range) -> np.ndarray:
        """Which of these rows have a parked label (a bool per row)."""

    def park(
        self, request_id: str, first_row: int, truth: Rows, arrived_at: float, expires_at: float
    ) -> None: ...

    def unpark(self, request_id: str, rows: range) -> list[Parked]:
        """Remove and return the parked labels that overlap ``rows`` (whole)."""


def label_counts(outcomes: dict[str, int]) -> tuple[tuple[str, str, int], ...]:
    return tuple((LABELS, outcome, n) for outcome, n in outcomes.items() if n)


def as_rows(values: Any) -> Rows:
    """A batch as one array when it is numbers, else as one list of rows (the first axis)."""
    array = values
    if not isinstance(values, np.ndarray):
        with contextlib.suppress(ValueError, TypeError, OverflowError):  # e.g. ragged rows
            array = np.asarray(values)
    if isinstance(array, np.ndarray) and array.dtype.kind in "biuf":
        return array.reshape(1) if array.ndim == 0 else array
    return first_axis_rows(values)


def take(rows: Rows, indexes: np.ndarray) -> Rows:
    """The rows at ``indexes`` (positions in ``rows``)."""
    if isinstance(rows, np.ndarray):
        return rows[indexes]
    return [rows[i] for i in indexes.tolist()]


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    return [(int(start), int(stop)) for start, stop in edges.reshape(-1, 2)]


class Joiner:
    """Joins labels to logged rows; ``in_transaction``: the scorer may run inside the store's
    transaction, on its thread (our own models; never a user's)."""

    def __init__(self, score: Scorer, ttl: float, *, in_transaction: bool = False) -> None:
        self.score = score
        self.ttl = ttl
        self.in_transaction = in_transaction

    def scores(self, entries: int) -> Scores:
        """What one commit of ``entries`` scores through."""
        return Scores(self.score, in_transaction=self.in_transaction, entries=entries)

    def apply(
        self, tables: JoinTables, operation: LoggedRows | Label, now: float, scores: Scores
    ) -> Delta:
        if isinstance(operation, Label):
            return self.label(tables, operation, now, scores)
        return self.record(tables, operation, now, scores)

    def record(self, tables: JoinTables, logged: LoggedRows, now: float, scores: Scores) -> Delta:
        """Store a request's inputs or predictions; score labels that were waiting for them.

        The first event of a kind stands: a redelivered or repeated one changes nothing.
        """
        counters: list[tuple[str, str, int]] = [(LOGGER_EVENTS, logged.kind, 1)]
        found = tables.find((logged.request_id,))
        stored = found[1] if found else Logged()
        had = stored.predicted_rows if logged.kind == "response" else stored.request_rows
        if had or not len(logged.rows):
            return Delta(counters=tuple(counters))
        stored = tables.store(
            logged.request_id, stored, logged.kind, logged.rows, logged.time, now + self.ttl
        )
        delta = Delta()
        if logged.kind == "response":
            counters.append((PREDICTED_ROWS, "", len(logged.rows)))
            delta = self.score_parked(tables, logged.request_id, stored, scores)
        return delta + Delta(counters=tuple(counters))

    def score_parked(
        self, tables: JoinTables, request_id: str, stored: Logged, scores: Scores
    ) -> Delta:
        """Parked labels meet their prediction, each label as one batch. A label that does not
        fit is dropped, counted; its rows past the prediction stay parked."""
        delta = Delta()
        predicted = stored.predicted_rows
        for parked in tables.unpark(request_id, range(predicted)):
            count = min(len(parked.truth), predicted - parked.first_row)
            span = range(parked.first_row, parked.first_row + count)
            prediction, _ = tables.predictions(request_id, span)
            rows = np.arange(span.start, span.stop)
            try:
                scored = self.observe(
                    tables,
                    request_id,
                    stored,
                    rows,
                    parked.truth[:count],
                    prediction,
                    parked.arrived_at,
                    scores,
                )
            except InvalidFeedback:
                delta = delta + Delta(counters=label_counts({FAILED: count}))
            else:
                tables.mark_labelled(request_id, rows)
                delta = delta + scored + Delta(counters=label_counts({LATE: count}))
            if count < len(parked.truth):
                tables.park(
                    request_id,
                    parked.first_row + count,
                    parked.truth[count:],
                    parked.arrived_at,
                    parked.expires_at,
                )
        return delta

    def label(self, tables: JoinTables, label: Label, now: float, scores: Scores) -> Delta:
        """Score the label's rows that have a prediction; park the others."""
        request_id, stored = tables.find(label.request_ids) or (label.request_ids[0], Logged())
        first, size = label.first_row, len(label.truth)
        # rows first .. split have a prediction, split .. first + size do not (yet)
        split = min(max(stored.predicted_rows, first), first + size) - first
        duplicate = tables.parked(request_id, range(first, first + size))
        prediction = None
        if split:
            prediction, labelled = tables.predictions(request_id, range(first, first + split))
            duplicate[:split] |= labelled
        ready = np.flatnonzero(~duplicate[:split])
        waiting = ~duplicate
        waiting[:split] = False
        delta = label.extra
        if ready.size:
            rows = ready + first
            try:
                delta = delta + self.observe(
                    tables,
                    request_id,
                    stored,
                    rows,
                    take(label.truth, ready),
                    take(prediction, ready),
                    now,
                    scores,
                )
            except InvalidFeedback as exc:
                raise InvalidFeedback(
                    f"label does not fit the logged prediction: {exc}", exc.reason
                ) from exc
            tables.mark_labelled(request_id, rows)
        parked = int(np.count_nonzero(waiting))  # an int: numpy's would be stored as a blob
        for start, stop in runs(waiting) if parked else ():
            tables.park(request_id, first + start, label.truth[start:stop], now, now + self.ttl)
        outcomes = {
            JOINED: int(ready.size),
            PARKED: parked,
            DUPLICATE: size - ready.size - parked,
        }
        return delta + Delta(counters=label_counts(outcomes))

    def observe(
        self,
        tables: JoinTables,
        request_id: str,
        stored: Logged,
        rows: np.ndarray,
        truth: Rows,
        prediction: Rows,
        arrived_at: float,
        scores: Scores,
    ) -> Delta:
        """Score ``truth`` against the predictions (and stored inputs) of ``rows`` (sorted).

        The rows share one prediction time, so their label delay is one value, ``len(rows)`` times.
        """
        span = range(int(rows[0]), int(rows[-1]) + 1)
        request = None
        if stored.request_rows >= span.stop:
            request = take(tables.read(request_id, "request", span), rows - span.start)
        observation = scores(Task(truth, prediction, request))
        counters = [(ROWS_ACCEPTED, "", observation.rows)]
        if observation.metric_problems:
            counters.append((METRICS_REJECTED, "", len(observation.metric_problems)))
        delays: tuple[tuple[float, int], ...] = ()
        if stored.predicted_at is not None:
            delays = ((max(0.0, arrived_at - stored.predicted_at), len(rows)),)
        return Delta(
            cells=observation.cells,
            metrics=tuple(observation.metrics),
            counters=tuple(counters),
            delays=delays,
            updates=observation.updates,
        )
