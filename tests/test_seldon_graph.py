"""Seldon graphs: the executor logs one feedback per graph node that has a logger.

Each copy carries the prediction's ``requestid`` but its own ``ce-id`` and ``modelid``
(protocols.md 1.5); a feedback must count once per (request id, first row), whatever the node.
"""

from __future__ import annotations

import pytest

from adserver.catalogue.wire import SELDON_RESPONSE_TYPE
from tests.support.events import ce_headers, feedback, new_id
from tests.support.http import model_doc, post_json, scrape, value
from tests.support.processes import DATA, ONE_HOT

EXECUTOR = "http://multiclass-model-default-0-classifier-7d9f-xk2p:8000/"
NODES = ("transformer", "classifier", "combiner")


def from_every_node(url: str, body: object, request_id: str, **extensions: str) -> None:
    """What the executor sends for one feedback through a graph of three logged nodes."""
    for node in NODES:
        headers = ce_headers(
            new_id(), source=EXECUTOR, requestid=request_id, modelid=node, **extensions
        )
        answer = post_json(url, body, headers)
        assert answer.status_code == 200, answer.text


@pytest.fixture
def server(servers):
    return servers("--storage_uri", ONE_HOT, "--state", "memory")


def test_feedback_with_response_counts_once_per_request(server) -> None:
    body = feedback([[0, 0, 1], [1, 0, 0]], [[0.1, 0.2, 0.7], [0.1, 0.8, 0.1]])
    from_every_node(server.url, body, new_id())
    doc = model_doc(server.url)
    assert (doc["events"], doc["rows"]) == (1, 2)
    assert value(scrape(server.url), "feedback_events_duplicate_total") == len(NODES) - 1
    from_every_node(server.url, body, new_id())  # another prediction's feedback counts
    assert model_doc(server.url)["rows"] == 4


def test_label_counts_once_per_request_and_row(server) -> None:
    """The late-label flow: one logged prediction, its label logged by every node."""
    request_id = new_id()
    logged = (DATA / "logger" / "seldon-response.json").read_bytes()
    headers = ce_headers(
        new_id(), source=EXECUTOR, event_type=SELDON_RESPONSE_TYPE, requestid=request_id
    )
    assert post_json(server.url, logged, headers).status_code == 200
    from_every_node(server.url, {"truth": {"data": {"ndarray": [[0, 0, 1]]}}}, request_id)
    from_every_node(
        server.url, {"truth": {"data": {"ndarray": [[1, 0, 0]]}}}, request_id, rowindex="1"
    )
    samples = scrape(server.url)
    assert value(samples, "feedback_labels_total", outcome="joined") == 2
    assert value(samples, "feedback_labels_total", outcome="duplicate") == 0
    assert value(samples, "feedback_events_accepted_total") == 2
    assert model_doc(server.url)["rows"] == 2


def test_feedback_without_request_id_is_keyed_by_its_own_id(server) -> None:
    """Plain CloudEvents keep (source, id): two events with their own ids are two feedbacks."""
    body = feedback([[0, 0, 1]], [[0.1, 0.2, 0.7]])
    for _ in range(2):
        assert post_json(server.url, body, ce_headers(new_id(), source=EXECUTOR)).ok
    event_id = new_id()
    for _ in range(2):  # a redelivery of one of them
        assert post_json(server.url, body, ce_headers(event_id, source=EXECUTOR)).ok
    assert model_doc(server.url)["events"] == 3


def test_the_row_index_is_read_as_a_number(server) -> None:
    """``ce-rowindex: 0``, ``00`` and no row index all name the first row."""
    body = feedback([[0, 0, 1]], [[0.1, 0.2, 0.7]])
    request_id = new_id()
    for extra in ({}, {"rowindex": "0"}, {"rowindex": "00"}):
        headers = ce_headers(new_id(), source=EXECUTOR, requestid=request_id, **extra)
        assert post_json(server.url, body, headers).status_code == 200
    assert model_doc(server.url)["events"] == 1
