"""Late ground truth: labels joined to predictions logged by KServe and Seldon payload loggers.

The logger events are the shapes from KServe's and Seldon's own docs (tests/data/logger/), sent
to a real server; scores are checked against scikit-learn on the joined rows.
"""

from __future__ import annotations

import asyncio
import json
import resource
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from sklearn.metrics import confusion_matrix

from adserver.catalogue.wire import (
    KSERVE_REQUEST_TYPE,
    KSERVE_RESPONSE_TYPE,
    SELDON_REQUEST_TYPE,
    SELDON_RESPONSE_TYPE,
)
from adserver.settings import Settings
from adserver.state.committer import CommitPolicy
from adserver.state.join import Joiner, Label, LoggedRows, as_rows
from adserver.state.sqlite.store import SQLiteDialect, SQLiteStore
from adserver.state.store import Entry
from adserver.state.view import MetricsState
from adserver.wire.tftensor import MAX_FILLED_VALUES
from cm_models import MultiClassNumeric
from cm_models.base import Observation
from tests.support.events import ce_headers, new_id
from tests.support.http import model_doc, post_json, scrape, value
from tests.support.processes import DATA, MULTICLASS_NUMERIC, ONE_HOT, start_server
from tests.support.stores import BUCKETS, scoring
from tests.support.timing import FakeClock

LOGGER = DATA / "logger"


def logged(url: str, name: str, event_type: str, event_id: str, **headers: str) -> None:
    """Deliver a logger event as the KServe agent does (JSON labelled as form data)."""
    body = (LOGGER / name).read_bytes()
    sent = ce_headers(
        event_id,
        source="sklearn-iris-predictor-00001",
        event_type=event_type,
        content_type="application/x-www-form-urlencoded",
        **headers,
    )
    answer = post_json(url, body, sent)
    assert answer.status_code == 200, answer.text
    assert answer.content == b"" and "ce-type" not in answer.headers  # no reply, no loop


def label(url: str, truth: Any, **headers: str) -> None:
    """Feedback carrying only the truth and the id, as a labelling client sends it."""
    answer = post_json(url, {"truth": {"data": {"ndarray": truth}}}, headers)
    assert answer.status_code == 200, answer.text


def outcome(url: str, name: str) -> float:
    return value(scrape(url), "feedback_labels_total", outcome=name)


@pytest.fixture
def numeric(servers):
    return servers("--storage_uri", MULTICLASS_NUMERIC, "--state", "memory")


def test_kserve_iris_join(numeric) -> None:
    """KServe's sklearn-iris example: request and response share ce-id; the label names it."""
    rid = new_id()
    logged(numeric.url, "kserve-iris-request.json", KSERVE_REQUEST_TYPE, rid)
    logged(
        numeric.url,
        "kserve-iris-response.json",
        KSERVE_RESPONSE_TYPE,
        rid,
        time="2021-04-10T00:23:26.080736102Z",
    )
    label(numeric.url, [1, 2], **{"ce-requestid": rid})
    doc = model_doc(numeric.url)
    np.testing.assert_array_equal(
        doc["confusion_matrix"], confusion_matrix([1, 2], [1, 1], labels=doc["classes"])
    )
    assert doc["rows"] == 2
    samples = scrape(numeric.url)
    assert value(samples, "feedback_labels_total", outcome="joined") == 2
    assert value(samples, "feedback_predicted_rows_total") == 2
    assert value(samples, "feedback_label_coverage") == 1.0
    assert value(samples, "feedback_logger_events_total", kind="request") == 1
    # the prediction is from 2021: the delay lands beyond the largest finite bucket
    assert value(samples, "feedback_label_delay_seconds_count") == 2
    assert value(samples, "feedback_label_delay_seconds_bucket", le="2.592e+06") == 0


@pytest.mark.parametrize(
    ("response", "truth", "storage", "predicted"),
    [
        ("kserve-v2-response-flat.json", [1, 0], MULTICLASS_NUMERIC, [1, 2]),
        ("kserve-v2-response-nested.json", [[0, 1, 0], [1, 0, 0]], ONE_HOT, [1, 2]),
    ],
)
def test_v2_outputs_flat_and_nested(servers, response, truth, storage, predicted) -> None:
    server = servers("--storage_uri", storage, "--state", "memory")
    rid = new_id()
    logged(server.url, "kserve-v2-request.json", KSERVE_REQUEST_TYPE, rid)
    logged(server.url, response, KSERVE_RESPONSE_TYPE, rid)
    label(server.url, truth, **{"ce-requestid": rid})
    doc = model_doc(server.url)
    truth_ids = np.argmax(truth, axis=1).tolist() if storage == ONE_HOT else truth
    np.testing.assert_array_equal(
        doc["confusion_matrix"], confusion_matrix(truth_ids, predicted, labels=doc["classes"])
    )


def test_seldon_puid_flow_with_one_row_labels(servers) -> None:
    """Seldon: ids differ per message, the puid joins; each row of a batch labelled alone."""
    server = servers("--storage_uri", ONE_HOT, "--state", "memory")
    puid = new_id()
    for name, kind in (
        ("seldon-request.json", SELDON_REQUEST_TYPE),
        ("seldon-response.json", SELDON_RESPONSE_TYPE),
    ):
        logged(server.url, name, kind, new_id(), requestid=puid, modelid="classifier")
    label(server.url, [[1, 0, 0]], **{"Seldon-Puid": puid, "ce-rowindex": "1"})
    answer = post_json(
        server.url, {"truth": {"data": {"ndarray": [[0, 1, 0]]}, "meta": {"puid": puid}}}
    )
    assert answer.status_code == 200, answer.text
    doc = model_doc(server.url)
    # row 1 predicted class 0 (truth 0), row 0 predicted class 2 (truth 1)
    np.testing.assert_array_equal(
        doc["confusion_matrix"], confusion_matrix([0, 1], [0, 2], labels=doc["classes"])
    )


def test_label_before_prediction_is_parked_then_joined(numeric) -> None:
    rid = new_id()
    label(numeric.url, [3, 3, 1], **{"ce-requestid": rid})
    assert model_doc(numeric.url)["rows"] == 0
    assert outcome(numeric.url, "parked") == 3
    logged(numeric.url, "kserve-iris-response.json", KSERVE_RESPONSE_TYPE, rid)  # 2 rows
    doc = model_doc(numeric.url)
    assert doc["rows"] == 2
    assert outcome(numeric.url, "late") == 2
    np.testing.assert_array_equal(
        doc["confusion_matrix"], confusion_matrix([3, 3], [1, 1], labels=doc["classes"])
    )


def test_duplicate_labels_and_redelivered_logger_events(numeric) -> None:
    rid = new_id()
    logged(numeric.url, "kserve-iris-response.json", KSERVE_RESPONSE_TYPE, rid)
    logged(numeric.url, "kserve-iris-response.json", KSERVE_RESPONSE_TYPE, rid)  # redelivery
    label(numeric.url, [1, 1], **{"ce-requestid": rid})
    label(numeric.url, [1, 1], **{"ce-requestid": rid})  # a second label for the same rows
    samples = scrape(numeric.url)
    assert value(samples, "feedback_predicted_rows_total") == 2
    assert value(samples, "feedback_labels_total", outcome="duplicate") == 2
    assert model_doc(numeric.url)["rows"] == 2


def test_label_that_does_not_fit_the_prediction_is_400(servers) -> None:
    server = servers("--storage_uri", ONE_HOT, "--state", "memory")
    rid = new_id()
    logged(server.url, "seldon-response.json", SELDON_RESPONSE_TYPE, new_id(), requestid=rid)
    answer = post_json(
        server.url, {"truth": {"data": {"ndarray": [[0, 1], [1, 0]]}}}, {"ce-requestid": rid}
    )
    assert answer.status_code == 400
    assert answer.json()["reason"] == "width_mismatch"
    assert model_doc(server.url)["rows"] == 0


def test_unscorable_logger_payloads_are_acknowledged(numeric) -> None:
    bytes_tensor = {"outputs": [{"name": "o", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    for body in (json.dumps(bytes_tensor).encode(), b"\x00binary-tensor-extension"):
        answer = post_json(numeric.url, body, ce_headers(event_type=KSERVE_RESPONSE_TYPE))
        assert answer.status_code == 200, answer.text
    samples = scrape(numeric.url)
    assert value(samples, "feedback_logger_events_total", kind="ignored_bytes_tensor") == 1
    assert value(samples, "feedback_logger_events_total", kind="ignored_not_json") == 1


def test_restart_between_prediction_and_label(tmp_path: Path) -> None:
    args = ("--storage_uri", MULTICLASS_NUMERIC, "--state_dir", str(tmp_path))
    first = start_server(*args)
    rid = new_id()
    try:
        logged(first.url, "kserve-iris-response.json", KSERVE_RESPONSE_TYPE, rid)
        label(first.url, [2], **{"ce-requestid": "other-" + rid})  # parked across the restart
    finally:
        first.stop()
    second = start_server(*args)
    try:
        label(second.url, [1, 0], **{"ce-requestid": rid})
        logged(second.url, "kserve-iris-response.json", KSERVE_RESPONSE_TYPE, "other-" + rid)
        doc = model_doc(second.url)
    finally:
        second.stop()
    np.testing.assert_array_equal(
        doc["confusion_matrix"], confusion_matrix([1, 0, 2], [1, 1, 1], labels=doc["classes"])
    )


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def joining_store(clock: FakeClock, ttl: float, **options: int) -> SQLiteStore:
    """An in-memory store that joins labels for a MultiClassNumeric model."""
    joiner = Joiner({"m": MultiClassNumeric()}, ttl=ttl)
    policy = CommitPolicy(retention=10, max_ids=100, **options)
    return SQLiteStore(
        {"m": MetricsState()},
        SQLiteDialect.open(None, "m"),
        "m",
        policy,
        joiner=joiner,
        clock=clock,
        buckets=BUCKETS,
    )


def test_ttl_expiry_with_clock() -> None:
    """Predictions and parked labels expire after the TTL; what was lost is counted."""
    clock = FakeClock()
    store = joining_store(clock, ttl=100.0)

    def commit(operation) -> None:
        asyncio.run(store.commit([Entry(operation=operation)]))

    commit(LoggedRows("r1", "response", np.array([1, 2]), clock.now))
    commit(Label(("parked",), 0, np.array([1])))
    clock.now += 101  # both past the TTL; the next commit sweeps them
    commit(Label(("r1",), 0, np.array([1])))
    assert store.state.count("rows_accepted") == 0
    assert store.state.count("join_rows_evicted", "prediction_expired") == 2
    assert store.state.count("labels", "expired") == 1
    assert store.state.count("labels", "parked") == 2  # the first, and the one that came late


def test_capacity_bound_evicts_oldest() -> None:
    clock = FakeClock()
    store = joining_store(clock, ttl=1e6, join_max_rows=3)
    for i in range(5):
        clock.now += 61  # each commit runs the sweep
        logged = LoggedRows(f"r{i}", "response", np.array([1]), 0)
        asyncio.run(store.commit([Entry(operation=logged)]))
    clock.now += 61
    asyncio.run(store.commit([Entry()]))  # a sweep with nothing new: exactly the bound is left
    assert store.state.count("join_rows_evicted", "prediction_evicted") == 2
    remaining = store.connection.execute("SELECT request_id FROM predictions").fetchall()
    assert sorted(r[0] for r in remaining) == ["r2", "r3", "r4"]


def test_ignored_logger_event_gets_no_reply_even_with_replies_on(servers) -> None:
    server = servers("--state", "memory", "--event_type", "t.reply", "--event_source", "s")
    answer = post_json(server.url, b"\x00raw", ce_headers(event_type=KSERVE_RESPONSE_TYPE))
    assert answer.status_code == 200 and answer.content == b""
    assert "ce-type" not in answer.headers


def kserve_response(url: str, rows: bytes, request_id: str) -> int:
    """POST a KServe V1 response logger event whose predictions are ``rows`` (JSON, no [])."""
    body = b'{"predictions":[' + rows + b"]}"
    headers = ce_headers(request_id, event_type=KSERVE_RESPONSE_TYPE)
    return post_json(url, body, headers, timeout=60).status_code


def test_largest_bodies_fit_the_manifests_memory_limit(servers) -> None:
    """Under 512 MiB of address space (the manifests' memory limit, and stricter: it counts
    virtual memory), the largest logger events and labels the defaults let in are answered and
    the server lives on. One document per stored row made 150,000 predictions take ~700 MB."""
    server = servers("--storage_uri", MULTICLASS_NUMERIC)
    limit = 512 * 1024 * 1024
    resource.prlimit(server.process.pid, resource.RLIMIT_AS, (limit, limit))
    defaults = Settings()
    rows, body_bytes = defaults.max_event_rows, defaults.max_body_bytes
    # as many predictions as the body holds: more rows than an event may store
    assert kserve_response(server.url, b",".join([b"0"] * (body_bytes // 2 - 16)), new_id()) == 413
    # the most rows an event may store, as wide as the body allows, and one class id a row
    wide = b",".join([b"[1e0,1e0]"] * rows)
    assert len(wide) < body_bytes and kserve_response(server.url, wide, new_id()) == 200
    labelled = new_id()
    assert kserve_response(server.url, b",".join([b"[1e0]"] * rows), labelled) == 200
    truth = b'{"truth":{"data":{"ndarray":[' + b",".join([b"2"] * rows) + b"]}}}"
    answer = post_json(server.url, truth, {"ce-requestid": labelled}, timeout=60)
    assert answer.status_code == 200, answer.text
    # a few bytes of tftensor that fill the most values one value may expand to, parked
    filled = {
        "dtype": "DT_INT64",
        "tensorShape": {"dim": [{"size": str(rows)}, {"size": str(MAX_FILLED_VALUES // rows)}]},
        "int64Val": ["1"],
    }
    answer = post_json(
        server.url, {"truth": {"data": {"tftensor": filled}}}, {"ce-requestid": new_id()}
    )
    assert answer.status_code == 200, answer.text
    samples = scrape(server.url)
    assert value(samples, "feedback_labels_total", outcome="joined") == rows
    assert value(samples, "feedback_labels_total", outcome="parked") == rows
    assert value(samples, "feedback_events_rejected_total", reason="too_many_rows") == 1
    assert model_doc(server.url)["confusion_matrix"] == [[0, 0], [rows, 0]]
    assert server.process.poll() is None


def test_many_largest_bodies_at_once_fit_the_manifests_memory_limit(servers) -> None:
    """Sixteen clients each send the largest logger event the defaults store, all at once: the
    bodies held together stay within --max_body_bytes_in_flight (the others get a 503 to retry),
    so the server's peak RSS, what a pod's memory limit counts, stays well under 512 MiB."""
    server = servers("--storage_uri", MULTICLASS_NUMERIC)
    wide = b",".join([b"[1e0,1e0]"] * Settings().max_event_rows)
    with ThreadPoolExecutor(8) as clients:
        statuses = list(
            clients.map(lambda _: kserve_response(server.url, wide, new_id()), range(8))
        )
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    assert server.process.poll() is None
    assert value(scrape(server.url), "feedback_logger_events_total", kind="response") == (
        statuses.count(200)
    )
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    peak_kib = int(status.split("VmHWM:")[1].split()[0])
    assert peak_kib < 400 * 1024, f"peak RSS {peak_kib // 1024} MiB"


def test_events_and_labels_beyond_max_event_rows_are_413(servers) -> None:
    server = servers(
        "--storage_uri", MULTICLASS_NUMERIC, "--state", "memory", "--max_event_rows", "2"
    )
    assert kserve_response(server.url, b"1,2,3", new_id()) == 413
    answer = post_json(
        server.url, {"truth": {"data": {"ndarray": [1, 2, 3]}}}, {"ce-requestid": "r"}
    )
    assert answer.status_code == 413 and answer.json()["reason"] == "too_many_rows"
    rid = new_id()
    assert kserve_response(server.url, b"1,2", rid) == 200
    label(server.url, [1, 2], **{"ce-requestid": rid})
    samples = scrape(server.url)
    assert value(samples, "feedback_events_rejected_total", reason="too_many_rows") == 2
    assert value(samples, "feedback_labels_total", outcome="joined") == 2


def test_label_joins_by_the_id_that_names_a_prediction(servers) -> None:
    """Seldon's executor gives feedback sent without a Seldon-Puid header a fresh
    ce-requestid; the truth's meta.puid still names the logged prediction, and wins."""
    server = servers("--storage_uri", ONE_HOT, "--state", "memory")
    puid = new_id()
    logged(server.url, "seldon-response.json", SELDON_RESPONSE_TYPE, new_id(), requestid=puid)
    body = {"truth": {"data": {"ndarray": [[0, 1, 0], [1, 0, 0]]}, "meta": {"puid": puid}}}
    answer = post_json(server.url, body, ce_headers(requestid=new_id()))
    assert answer.status_code == 200, answer.text
    assert outcome(server.url, "joined") == 2
    assert outcome(server.url, "parked") == 0
    # nothing names a prediction: the label waits under the preferred id, the ce-requestid
    waiting = new_id()
    body["truth"]["meta"]["puid"] = new_id()
    answer = post_json(server.url, body, ce_headers(requestid=waiting))
    assert answer.status_code == 200, answer.text
    logged(server.url, "seldon-response.json", SELDON_RESPONSE_TYPE, new_id(), requestid=waiting)
    assert outcome(server.url, "late") == 2


def test_eviction_drops_labelled_predictions_first(servers) -> None:
    """At --join_max_rows, the predictions that already have their label go, not those still
    waiting for one: log 100, label 50, log 50 more, label the other 100: none is lost."""
    bounds = ("--join_max_rows", "100", "--dedup_max_ids", "10")  # both bounds hit at once
    server = servers("--storage_uri", MULTICLASS_NUMERIC, "--state", "memory", *bounds)
    first, second = [new_id() for _ in range(100)], [new_id() for _ in range(50)]
    with requests.Session() as session:

        def post(body: bytes, headers: dict[str, str]) -> None:
            answer = session.post(server.url + "/", data=body, headers=headers, timeout=10)
            assert answer.status_code == 200, answer.text

        def log(request_id: str) -> None:
            post(b'{"predictions": [1]}', ce_headers(request_id, event_type=KSERVE_RESPONSE_TYPE))

        def label_one(request_id: str) -> None:
            post(b'{"truth": {"data": {"ndarray": [1]}}}', ce_headers(requestid=request_id))

        for request_id in first:
            log(request_id)
        for request_id in first[:50]:
            label_one(request_id)
        for request_id in second:
            log(request_id)
        for request_id in first[50:] + second:
            label_one(request_id)
    samples = scrape(server.url)
    assert value(samples, "feedback_labels_total", outcome="joined") == 150
    assert value(samples, "feedback_join_rows_evicted_total", reason="prediction_evicted") == 0


def recording_store(scored: list[tuple[Any, Any, Any]]) -> SQLiteStore:
    """An in-memory store whose scorer records what it is handed."""

    def score(truth: Any, response: Any, request: Any) -> Observation:
        scored.append((truth, response, request))
        return Observation()

    policy = CommitPolicy(retention=10, max_ids=100)
    dialect = SQLiteDialect.open(None, "m")
    joiner = Joiner({"m": scoring(score)}, ttl=100)
    return SQLiteStore({"m": MetricsState()}, dialect, "m", policy, joiner=joiner, buckets=BUCKETS)


@pytest.mark.parametrize(
    "values",
    [
        np.arange(20_000, dtype=np.int64) * 3,  # numbers: 8192 rows a block
        [f"row {i}" if i % 2 else {"row": i} for i in range(600)],  # other data: 256 a block
    ],
    ids=["numbers", "json"],
)
def test_labels_read_the_rows_they_name_across_blocks(values: Any) -> None:
    scored: list[tuple[Any, Any, Any]] = []
    store = recording_store(scored)

    def commit(operation: Label | LoggedRows) -> None:
        assert run(store.commit([Entry(operation=operation)])) == [True]

    rows = as_rows(values)
    commit(LoggedRows("r", "request", rows, 0))
    commit(LoggedRows("r", "response", rows, 0))
    boundary = 8192 if isinstance(rows, np.ndarray) else 256
    first = boundary - 3
    commit(Label(("r",), first, as_rows(values[first : first + 6])))
    commit(Label(("r",), first + 4, as_rows(values[first + 4 : first + 8])))  # 2 of 4 again
    assert len(scored) == 2
    for (truth, response, request), rows in zip(
        scored, (range(first, first + 6), range(first + 6, first + 8))
    ):
        expected = [values[i] for i in rows]
        assert list(response) == list(request) == list(truth) == expected
    assert store.state.labelled("labels") == {"joined": 8, "duplicate": 2}


def test_a_label_past_the_prediction_waits_with_its_rows_beyond_it() -> None:
    """Rows with a prediction are scored, the rest park; a response shorter than a parked label
    scores the rows it has and leaves the others parked."""
    store = joining_store(FakeClock(), ttl=100.0)

    def commit(operation: Label | LoggedRows) -> None:
        assert run(store.commit([Entry(operation=operation)])) == [True]

    commit(LoggedRows("a", "response", np.array([1, 2, 3]), 0))
    commit(Label(("a",), 1, np.array([2, 3, 4, 5])))  # rows 1, 2 join; 3, 4 park
    commit(Label(("a",), 0, np.array([1, 2, 3, 4, 5])))  # row 0 joins; the rest are known
    commit(Label(("b",), 0, np.array([1, 1, 1, 1, 1])))  # parked, all five
    commit(LoggedRows("b", "response", np.array([1, 2]), 0))  # two of them score, late
    assert store.state.labelled("labels") == {"joined": 3, "parked": 7, "duplicate": 4, "late": 2}
    assert store.row_counts.parked == 5  # a's rows 3, 4 and b's rows 2 .. 4
    commit(Label(("b",), 1, np.array([1, 1, 1])))  # b's row 1 is labelled, 2 and 3 are parked
    assert store.state.labelled("labels")["duplicate"] == 7
    scored = confusion_matrix([2, 3, 1, 1, 1], [2, 3, 1, 1, 2])  # a's rows 1, 2, 0; b's 0, 1
    np.testing.assert_array_equal(store.state.confusion.matrix(), scored)
