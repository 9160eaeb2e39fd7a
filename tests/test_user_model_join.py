"""A user's model runs on one thread (the IOLoop) and never inside a store transaction, also
when a label is joined to a logged prediction; the joins it scores count as before."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from adserver.app import build_server
from adserver.catalogue.wire import KSERVE_RESPONSE_TYPE
from adserver.errors import Unavailable
from adserver.http.answers import outcome_answer
from adserver.settings import Settings
from adserver.state.committer import CommitPolicy
from adserver.state.join import SCORING_RETRIES, Joiner, Label, LoggedRows, Scorer
from adserver.state.sqlite.store import SQLiteDialect, SQLiteStore
from adserver.state.store import Entry
from adserver.state.view import MetricsState
from cm_models import MultiClassNumeric
from cm_models.base import Observation
from tests.support.events import ce_headers, new_id
from tests.support.http import post_json, scrape, value
from tests.support.processes import DATA, ServerFactory
from tests.support.stores import BUCKETS, scoring
from tests.support.timing import FakeClock

USER_MODELS = str(DATA / "user_models")


class RecordingMetrics:
    """A Seldon-style class that records where each ``transform`` runs."""

    store: ClassVar[SQLiteStore | None] = None
    calls: ClassVar[list[tuple[str, bool, bool]]] = []

    def __init__(self, name: str) -> None:
        self.name = name

    def transform(self, truth: Any, response: Any, request: Any = None) -> list[dict[str, Any]]:
        store = RecordingMetrics.store
        assert store is not None
        # The writer thread is free meanwhile: it could commit other events.
        writer_free = store._writer.submit(lambda: True).result(timeout=5)
        here = threading.current_thread().name
        RecordingMetrics.calls.append((here, store.dialect.connection.in_transaction, writer_free))
        return [{"key": "user_rows", "type": "COUNTER", "value": len(truth)}]


def handle(service: Any, headers: dict[str, str], body: Any) -> int:
    return outcome_answer(asyncio.run(service.receive(headers, json.dumps(body).encode()))).status


def test_a_user_model_scores_joins_on_the_ioloop_outside_any_transaction(
    tmp_path: Path,
) -> None:
    """Durable mode: a label joined at once and a parked label met by its logged response are
    scored on the IOLoop's thread, with no transaction open and the writer thread free."""
    server = build_server(
        Settings(
            storage_uri=f"{__name__}.RecordingMetrics", state="sqlite", state_dir=str(tmp_path)
        )
    )
    service = server.service
    store = service.store
    assert isinstance(store, SQLiteStore) and store.dialect.durable
    RecordingMetrics.store, RecordingMetrics.calls = store, []
    response = {"predictions": [1, 2, 0]}
    truth = {"truth": {"data": {"ndarray": [1, 1, 0]}}}
    try:
        logged, parked = new_id(), new_id()
        response_headers = ce_headers(logged, event_type=KSERVE_RESPONSE_TYPE)
        assert handle(service, response_headers, response) == 200
        assert handle(service, ce_headers(requestid=logged), truth) == 200  # joined
        assert handle(service, ce_headers(requestid=parked), truth) == 200  # parked
        response_headers = ce_headers(parked, event_type=KSERVE_RESPONSE_TYPE)
        assert handle(service, response_headers, response) == 200  # meets its label
    finally:
        asyncio.run(service.close())
    main = threading.main_thread().name  # where asyncio.run turns the loop
    assert RecordingMetrics.calls == [(main, False, True)] * 2
    state = store.state
    assert state.labelled("labels") == {"joined": 3, "parked": 3, "late": 3}
    assert state.custom.counters == {("user_rows", ()): 6}  # each join counted once


def user_store(score: Scorer, clock: FakeClock, *, in_transaction: bool) -> SQLiteStore:
    """A memory store whose joins score like a user's model (outside the transaction) or ours."""
    joiner = Joiner({"m": scoring(score, thread_safe=in_transaction)}, ttl=50.0)
    policy = CommitPolicy(retention=1e6, max_ids=100)
    dialect = SQLiteDialect.open(None, "m")
    return SQLiteStore(
        {"m": MetricsState()}, dialect, "m", policy, joiner=joiner, clock=clock, buckets=BUCKETS
    )


def commit(store: SQLiteStore, *operations: Label | LoggedRows) -> list[bool]:
    return asyncio.run(store.commit([Entry(operation=operation) for operation in operations]))


def commit_meanwhile(store: SQLiteStore, operation: LoggedRows) -> None:
    """Commit another event while a score runs (on the loop, between two attempts): a memory
    store writes on the loop's thread, so the store's own synchronous path stands in."""
    assert store.joiner is not None and not store.dialect.connection.in_transaction
    store._settle(*store._write([([Entry(operation=operation)], store.joiner.scores(1))]))


SCRIPT: list[tuple[Label | LoggedRows, ...]] = [
    # one batch: a prediction, then labels for it, one of them twice
    (
        LoggedRows("a", "response", np.array([1, 2, 3]), 0),
        Label(("a",), 1, np.array([2, 3, 4, 5])),
        Label(("a",), 0, np.array([1, 2, 3, 4, 5])),
    ),
    (Label(("b",), 0, np.array([1, 1, 1, 1, 1])),),
    (LoggedRows("b", "response", np.array([1, 2]), 0), Label(("b",), 1, np.array([1, 1, 1]))),
    (Label(("c",), 0, np.array([7])), Label(("c",), 0, np.array([8]))),
    (LoggedRows("c", "request", np.array([[0.5]]), 0), LoggedRows("c", "response", [[9]], 0)),
]


def test_joins_scored_outside_the_transaction_count_as_inside() -> None:
    """The same events, also batches whose labels depend on an earlier event of the batch, make
    the same counts whether the model scores in the transaction or outside it."""
    states = []
    for in_transaction in (True, False):
        store = user_store(MultiClassNumeric().observe, FakeClock(), in_transaction=in_transaction)
        for batch in SCRIPT:
            assert commit(store, *batch) == [True] * len(batch)
        states.append(store.state)
    inside, outside = states
    assert outside.counters == inside.counters
    assert outside.labelled("labels") == {"joined": 3, "parked": 8, "duplicate": 8, "late": 3}
    np.testing.assert_array_equal(outside.confusion.matrix(), inside.confusion.matrix())


def test_a_label_whose_rows_change_while_it_is_scored_is_scored_again() -> None:
    """An event committed while the IOLoop scores a label (here: the prediction's inputs) is
    read again; the label is scored with what the transaction holds, once more."""
    clock = FakeClock()
    scored: list[Any] = []

    def score(truth: Any, response: Any, request: Any) -> Observation:
        scored.append(request)
        if len(scored) == 1:  # another event commits meanwhile
            commit_meanwhile(store, LoggedRows("r", "request", np.array([[4.0], [5.0]]), 0))
        return Observation()

    store = user_store(score, clock, in_transaction=False)
    commit(store, LoggedRows("r", "response", np.array([1, 2]), 0))
    assert commit(store, Label(("r",), 0, np.array([1, 2]))) == [True]
    assert [None if r is None else r.tolist() for r in scored] == [None, [[4.0], [5.0]]]
    assert store.state.labelled("labels") == {"joined": 2}


def test_a_label_whose_rows_keep_changing_is_a_503_that_changes_nothing() -> None:
    """Each score meets a new prediction under the label's request id: after the bounded
    attempts, 503 ``store_conflict``, and the label is neither counted nor stored."""
    clock = FakeClock()
    scored: list[Any] = []

    def score(truth: Any, response: Any, request: Any) -> Observation:
        scored.append(response)
        clock.now += 100  # past the TTL: this commit expires the prediction and logs a new one
        commit_meanwhile(store, LoggedRows("r", "response", np.array([len(scored)] * 2), 0))
        return Observation()

    store = user_store(score, clock, in_transaction=False)
    commit(store, LoggedRows("r", "response", np.array([0, 0]), 0))
    with pytest.raises(Unavailable) as refused:
        commit(store, Label(("r",), 0, np.array([1, 2])))
    assert refused.value.reason == "store_conflict"
    assert len(scored) == SCORING_RETRIES
    assert "joined" not in store.state.labelled("labels")
    assert store.row_counts.parked == 0


@pytest.mark.parametrize("state", ["sqlite", "memory"])
def test_a_user_model_rejecting_a_joined_label_is_a_400(servers: ServerFactory, state: str) -> None:
    """The label is refused whole (``model_rejected``) and leaves its prediction unlabelled:
    the same label, fixed, still joins."""
    server = servers(
        "--storage_uri", "my_metrics.MyMetrics", "--state", state, env={"PYTHONPATH": USER_MODELS}
    )
    request_id = new_id()
    response = {"predictions": [[0.1, 0.9], [0.8, 0.2]]}
    headers = ce_headers(request_id, event_type=KSERVE_RESPONSE_TYPE)
    assert post_json(server.url, response, headers).status_code == 200
    wrong = {"truth": {"data": {"ndarray": [[0, 1, 0], [1, 0, 0]]}}}  # 3 columns, not 2
    answer = post_json(server.url, wrong, ce_headers(requestid=request_id))
    assert answer.status_code == 400, answer.text
    assert answer.json()["reason"] == "model_rejected"
    right = {"truth": {"data": {"ndarray": [[0, 1], [0, 1]]}}}
    answer = post_json(server.url, right, ce_headers(requestid=request_id))
    assert answer.status_code == 200, answer.text
    samples = scrape(server.url)
    assert value(samples, "feedback_labels_total", outcome="joined") == 2
    assert value(samples, "user_correct_total") == 1
    assert value(samples, "feedback_events_rejected_total", reason="model_rejected") == 1
