"""Where the pieces meet: stored rows holding parsed tensors, incremental id counts."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from adserver.catalogue.wire import KSERVE_REQUEST_TYPE, KSERVE_RESPONSE_TYPE
from adserver.state.committer import CommitPolicy
from adserver.state.sqlite.store import SQLiteDialect, SQLiteStore
from adserver.state.store import Entry
from adserver.state.view import Delta, MetricsState
from tests.support.events import STRUCTURED_TYPE, ce_headers, new_id, structured
from tests.support.http import post_json, scrape, value
from tests.support.processes import MULTICLASS_NUMERIC, ServerFactory
from tests.support.stores import BUCKETS
from tests.support.timing import FakeClock
from tests.test_http_limits import exchange, moved, parse, rejections, request


@pytest.mark.parametrize("state", ["memory", "sqlite"])
def test_logged_rows_of_objects_with_tensor_keys_are_stored(
    servers: ServerFactory, state: str
) -> None:
    """A large body's tensors under "data", "values"... are parsed into numpy arrays, also
    inside objects; rows holding such objects are stored as JSON all the same (not 500/503)."""
    server = servers("--storage_uri", MULTICLASS_NUMERIC, "--state", state)
    request_id = new_id()
    instances = [{"data": [i, i + 1, i + 2], "name": f"row {i}"} for i in range(100)]
    body = json.dumps({"instances": instances}).encode()
    assert len(body) > 1024
    headers = ce_headers(request_id, event_type=KSERVE_REQUEST_TYPE)
    answer = post_json(server.url, body, headers)
    assert answer.status_code == 200, answer.text
    # And the label still joins to the prediction logged afterwards.
    response = {"predictions": list(range(100))}
    answer = post_json(
        server.url, response, ce_headers(request_id, event_type=KSERVE_RESPONSE_TYPE)
    )
    assert answer.status_code == 200, answer.text
    truth = {"truth": {"data": {"ndarray": list(range(100))}}}
    answer = post_json(server.url, truth, {"ce-requestid": request_id})
    assert answer.status_code == 200, answer.text
    assert value(scrape(server.url), "feedback_labels_total", outcome="joined") == 100


def test_seen_count_matches_the_table_after_an_expired_id_returns(tmp_path: Path) -> None:
    """An id seen again after its retention (not yet purged) is counted new, but the table
    holds one row for it: the kept count must not grow, or trimming starts early."""
    clock = FakeClock()
    dialect = SQLiteDialect.open(str(tmp_path), "m")
    policy = CommitPolicy(retention=10.0, max_ids=1000)
    store = SQLiteStore({"m": MetricsState()}, dialect, "m", policy, clock=clock, buckets=BUCKETS)

    async def scenario() -> None:
        entry = Entry(Delta(counters=(("events_accepted", "", 1),)), ("src", "a"))
        assert await store.commit([entry]) == [True]
        clock.now += 20  # past the retention, before the next purge (every 60 s)
        assert await store.commit([entry]) == [True]
        clock.now += 1
        assert await store.commit([entry]) == [False]
        await store.close()

    asyncio.run(scenario())
    rows = store.seen_count
    with sqlite3.connect(tmp_path / "feedback-state.sqlite3") as connection:
        assert connection.execute("SELECT COUNT(*) FROM seen").fetchone()[0] == rows == 1


def test_unsupported_encoding_of_a_too_large_body_is_refused_once(servers: ServerFactory) -> None:
    """A 415 answered from the head: Tornado must not go on to refuse the declared length as
    well (a bare 400 that the listener would count as a second, malformed, request)."""
    server = servers("--state", "memory", "--max_body_bytes", "1000")
    before = rejections(server.url)
    head = "POST / HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Encoding: br\n"
    answer = parse(exchange(server.url, request(head + "Content-Length: 5000\n")))
    assert answer.status == 415
    assert answer.body["reason"] == "unsupported_content_encoding"
    assert moved(before, rejections(server.url)) == {"unsupported_content_encoding": 1}


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_logged_prediction_at_the_start_of_time_is_kept(servers: ServerFactory, mode: str) -> None:
    """A ``time`` that parses but has no epoch seconds here (year 1, no offset) is no 500."""
    server = servers("--storage_uri", MULTICLASS_NUMERIC, "--state", "memory")
    request_id, when = new_id(), "0001-01-01T00:00:00"
    response = {"predictions": [1, 2]}
    if mode == "binary":
        headers = ce_headers(request_id, event_type=KSERVE_RESPONSE_TYPE, time=when)
        answer = post_json(server.url, response, headers)
    else:
        event = structured(response, request_id, type=KSERVE_RESPONSE_TYPE, time=when)
        answer = post_json(server.url, event, {"Content-Type": STRUCTURED_TYPE})
    assert answer.status_code == 200, answer.text
    answer = post_json(
        server.url, {"truth": {"data": {"ndarray": [1, 2]}}}, {"ce-requestid": request_id}
    )
    assert answer.status_code == 200, answer.text
    assert value(scrape(server.url), "feedback_labels_total", outcome="joined") == 2


def test_label_outcome_counts_survive_a_restart(servers: ServerFactory, tmp_path: Path) -> None:
    """Parked and duplicate label rows are counted as integers in the file (numpy's would be
    stored as blobs, read back as bytes or summed to 0)."""
    env = {"STATE_DIR": str(tmp_path)}
    flags = ("--storage_uri", MULTICLASS_NUMERIC)

    def outcomes(url: str) -> dict[str, float]:
        samples = scrape(url)
        return {o: value(samples, "feedback_labels_total", outcome=o) for o in OUTCOMES}

    first = servers(*flags, env=env)
    request_id = new_id()
    for _ in range(2):  # parked, then the same rows again: duplicate
        label = {"truth": {"data": {"ndarray": [1, 2, 3]}}}
        answer = post_json(first.url, label, {"ce-requestid": request_id})
        assert answer.status_code == 200, answer.text
    before = outcomes(first.url)
    assert before == {"parked": 3, "duplicate": 3, "late": 0}
    assert first.stop() == 0
    second = servers(*flags, env=env)
    assert outcomes(second.url) == before
    response = {"predictions": [1, 2, 3]}
    answer = post_json(
        second.url, response, ce_headers(request_id, event_type=KSERVE_RESPONSE_TYPE)
    )
    assert answer.status_code == 200, answer.text
    label = {"truth": {"data": {"ndarray": [1]}}}
    answer = post_json(second.url, label, {"ce-requestid": new_id()})  # parked again
    assert answer.status_code == 200, answer.text
    assert outcomes(second.url) == {"parked": 4, "duplicate": 3, "late": 3}


OUTCOMES = ("parked", "duplicate", "late")
