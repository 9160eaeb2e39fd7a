"""Reply CloudEvents: in the HTTP response and, asynchronously, to a real sink on loopback.

Knative treats a non-empty response that is not a valid CloudEvent as a failure and redelivers,
and the reference blocked (and double counted) on a slow or failing reply sink.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import pytest
import requests
from cloudevents.core.bindings.http import HTTPMessage, from_http_event

from tests.support.events import (
    BATCH_TYPE,
    REPLY_SOURCE,
    REPLY_TYPE,
    STRUCTURED_TYPE,
    ce_headers,
    feedback,
    lower,
    new_id,
    structured,
)
from tests.support.http import model_doc, post_json, reply_data, scrape, value
from tests.support.processes import REPLY_FLAGS, ServerFactory, free_port
from tests.support.sink import Sink
from tests.support.timing import wait_until

ROW = feedback([[0, 1, 0]], [[0.2, 0.7, 0.1]])
CORRELATION = {
    "requestid": "f8b21985-8687-4bb8-a94c-4fac362eb34c",
    "inferenceservicename": "multiclass-model",
    "namespace": "seldon",
    "endpoint": "default",
    "modelid": "classifier",
}
# Extensions Knative and the Seldon executor add that a reply must not carry.
NOT_COPIED = {
    "knativearrivaltime": "2021-02-22T18:09:51.58Z",
    "knativebrokerttl": "255",
    "knativehistory": "default-kne-trigger-kn-channel.seldon.svc.cluster.local",
    "protocol": "seldon",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
}


def ce_attributes(headers: Mapping[str, str]) -> dict[str, str]:
    return {k[3:]: v for k, v in lower(headers).items() if k.startswith("ce-")}


def assert_valid_reply(headers: Mapping[str, str], body: bytes, event_id: str) -> None:
    """A binary-mode CloudEvent a Broker would ingest, correlated with the incoming event."""
    attributes = ce_attributes(headers)
    assert attributes["specversion"] == "1.0"
    assert attributes["id"] == event_id
    assert attributes["type"] == REPLY_TYPE
    assert attributes["source"] == REPLY_SOURCE
    assert lower(headers)["content-type"] == "application/json"
    assert "datacontenttype" not in attributes  # binary mode: Content-Type carries it
    for name, expected in CORRELATION.items():
        assert attributes[name] == expected
    assert not set(NOT_COPIED) & set(attributes), attributes
    event = from_http_event(HTTPMessage(headers=lower(headers), body=body))
    assert event.get_id() == event_id
    assert event.get_type() == REPLY_TYPE


def reply_stats(url: str) -> dict[str, float]:
    samples = scrape(url)
    return {
        kind: value(samples, f"feedback_reply_{kind}_total")
        for kind in ("sent", "failed", "dropped", "retries")
    }


@pytest.fixture(scope="module")
def replying(module_servers: ServerFactory) -> str:
    return module_servers(*REPLY_FLAGS).url


def test_response_is_a_binary_cloudevent_with_the_metrics(replying: str) -> None:
    event_id = new_id()
    headers = ce_headers(event_id, **CORRELATION, **NOT_COPIED)
    answer = post_json(replying, ROW, {**headers, "Prefer": "reply"})
    assert answer.status_code == 200, answer.text
    assert_valid_reply(answer.headers, answer.content, event_id)
    assert answer.json() == reply_data(model_doc(replying))
    assert answer.json()["events"] >= 1


def test_duplicate_gets_the_same_kind_of_reply(replying: str) -> None:
    """A redelivery is acknowledged like the first delivery (Knative must stop retrying)."""
    event_id = new_id()
    headers = ce_headers(event_id, **CORRELATION)
    first = post_json(replying, ROW, headers)
    second = post_json(replying, ROW, headers)
    assert (first.status_code, second.status_code) == (200, 200)
    assert_valid_reply(second.headers, second.content, event_id)
    assert second.json()["events"] == first.json()["events"]


def test_structured_event_gets_a_binary_reply(replying: str) -> None:
    event = structured(ROW, **CORRELATION)
    answer = post_json(replying, event, {"Content-Type": STRUCTURED_TYPE})
    assert answer.status_code == 200, answer.text
    assert_valid_reply(answer.headers, answer.content, event["id"])


def test_percent_encoded_id_round_trips(replying: str) -> None:
    """Header values are percent-encoded; the reply's id decodes to the incoming id."""
    encoded = "id%20with%20space%C3%A9"
    answer = post_json(replying, ROW, {**ce_headers(), "ce-id": encoded})
    assert answer.status_code == 200
    event = from_http_event(HTTPMessage(headers=lower(answer.headers), body=answer.content))
    assert event.get_id() == "id with space\u00e9"
    assert answer.headers["ce-id"] == encoded


def test_batch_gets_an_empty_200(replying: str) -> None:
    answer = post_json(replying, [structured(ROW), structured(ROW)], {"Content-Type": BATCH_TYPE})
    assert answer.status_code == 200
    assert answer.content == b""
    assert not ce_attributes(answer.headers)


def test_plain_post_gets_an_empty_body_or_a_valid_event(replying: str) -> None:
    """Never a bare JSON body: a Broker would answer 502 and redeliver."""
    answer = post_json(replying, ROW)
    assert answer.status_code == 200
    if answer.content:
        attributes = ce_attributes(answer.headers)
        assert attributes["specversion"] == "1.0" and attributes["id"]
        assert (attributes["type"], attributes["source"]) == (REPLY_TYPE, REPLY_SOURCE)


@pytest.mark.parametrize(
    "flags",
    [(), ("--event_type", REPLY_TYPE), ("--event_source", REPLY_SOURCE)],
    ids=["none", "type-only", "source-only"],
)
def test_without_type_and_source_the_response_is_empty(
    module_servers: ServerFactory, flags: tuple[str, ...]
) -> None:
    """The reference answered an invalid event (empty ce-source) here."""
    url = module_servers(*flags).url
    answer = post_json(url, ROW, ce_headers(**CORRELATION))
    assert answer.status_code == 200
    assert answer.content == b""
    assert not ce_attributes(answer.headers)
    assert model_doc(url)["events"] == 1


# --------------------------------------------------------------------------- reply sink


def timed_events(url: str, count: int) -> tuple[list[str], list[float]]:
    """Send ``count`` events one after the other; their ids and response times (seconds)."""
    ids, latencies = [], []
    with requests.Session() as session:
        for _ in range(count):
            event_id = new_id()
            started = time.perf_counter()
            answer = session.post(
                url + "/",
                data=requests.compat.json.dumps(ROW),
                headers=ce_headers(event_id),
                timeout=10,
            )
            latencies.append(time.perf_counter() - started)
            assert answer.status_code == 200, answer.text
            ids.append(event_id)
    return ids, latencies


def test_sink_receives_the_same_event(servers: ServerFactory, sink: Sink) -> None:
    url = servers(*REPLY_FLAGS, "--reply_url", sink.url).url
    event_id = new_id()
    answer = post_json(url, ROW, ce_headers(event_id, **CORRELATION, **NOT_COPIED))
    assert answer.status_code == 200
    sink.wait_for(lambda: len(sink.requests_with(event_id)) == 1)
    [delivered] = sink.requests_with(event_id)
    assert_valid_reply(delivered.headers, delivered.body, event_id)
    assert delivered.body == answer.content
    wait_until(lambda: reply_stats(url)["sent"] == 1, what="sent counter")
    assert reply_stats(url) == {"sent": 1, "failed": 0, "dropped": 0, "retries": 0}


def test_duplicate_is_not_sent_to_the_sink_again(servers: ServerFactory, sink: Sink) -> None:
    url = servers(*REPLY_FLAGS, "--reply_url", sink.url).url
    headers = ce_headers()
    for _ in range(3):
        assert post_json(url, ROW, headers).status_code == 200
    wait_until(lambda: reply_stats(url)["sent"] == 1, what="sent counter")
    time.sleep(0.2)  # a wrongly queued second reply would arrive by now
    assert len(sink.requests_with(headers["ce-id"])) == 1


def test_slow_sink_does_not_slow_ingestion(servers: ServerFactory, sink: Sink) -> None:
    sink.delay = 0.5
    url = servers(*REPLY_FLAGS, "--reply_url", sink.url).url
    ids, latencies = timed_events(url, 20)
    assert max(latencies) < sink.delay / 2, latencies
    sink.wait_for(lambda: {r.headers["ce-id"] for r in sink.received} == set(ids))
    wait_until(lambda: reply_stats(url)["sent"] == 20, what="all replies sent")
    assert model_doc(url)["events"] == 20
    assert len(sink.received) == 20


def test_dead_sink_does_not_fail_or_recount(servers: ServerFactory) -> None:
    """Connection refused on every attempt: each reply retried, then given up."""
    retries, backoff_total = 2, 0.1 + 0.2  # the sender backs off 0.1 s, then 0.2 s
    dead = f"http://127.0.0.1:{free_port()}/"
    url = servers(*REPLY_FLAGS, "--reply_url", dead, "--reply_retries", str(retries)).url
    _, latencies = timed_events(url, 20)
    assert max(latencies) < backoff_total / 2, latencies
    wait_until(lambda: reply_stats(url)["failed"] == 20, what="all replies failed")
    assert reply_stats(url) == {"sent": 0, "failed": 20, "dropped": 0, "retries": 40}
    doc = model_doc(url)
    assert (doc["events"], doc["rows"]) == (20, 20)


@pytest.mark.parametrize(("status", "attempts"), [(500, 3), (503, 3), (400, 1)])
def test_failing_sink_is_retried_only_when_it_may_help(
    servers: ServerFactory, sink: Sink, status: int, attempts: int
) -> None:
    """5xx is retried with backoff, then counted failed; a 400 will never succeed."""
    sink.status = status
    url = servers(*REPLY_FLAGS, "--reply_url", sink.url, "--reply_retries", "2").url
    ids, _ = timed_events(url, 3)
    wait_until(lambda: reply_stats(url)["failed"] == 3, what="replies given up")
    assert reply_stats(url) == {"sent": 0, "failed": 3, "dropped": 0, "retries": 3 * (attempts - 1)}
    for event_id in ids:
        assert len(sink.requests_with(event_id)) == attempts
    assert model_doc(url)["events"] == 3


def test_sink_slower_than_the_reply_timeout_is_given_up(servers: ServerFactory, sink: Sink) -> None:
    """Each attempt is cut at --reply_timeout_seconds, retried, then counted failed."""
    sink.delay = 3.0
    url = servers(
        *REPLY_FLAGS,
        "--reply_url",
        sink.url,
        "--reply_timeout_seconds",
        "0.2",
        "--reply_retries",
        "1",
    ).url
    ids, latencies = timed_events(url, 2)
    assert max(latencies) < 0.2, latencies  # blocking on the sink would take 0.5 s
    wait_until(lambda: reply_stats(url)["failed"] == 2, timeout=sink.delay, what="timeouts")
    assert reply_stats(url) == {"sent": 0, "failed": 2, "dropped": 0, "retries": 2}
    assert all(len(sink.requests_with(event_id)) == 2 for event_id in ids)


def test_full_reply_queue_drops_and_counts(servers: ServerFactory, sink: Sink) -> None:
    sink.delay = 1.0
    url = servers(*REPLY_FLAGS, "--reply_url", sink.url, "--reply_queue_size", "1").url
    _, latencies = timed_events(url, 40)
    assert max(latencies) < sink.delay / 4, latencies
    wait_until(lambda: sum(reply_stats(url).values()) == 40, timeout=15, what="replies settled")
    stats = reply_stats(url)
    assert stats["dropped"] > 0
    assert stats["sent"] + stats["dropped"] == 40
    assert len(sink.received) == stats["sent"]
    assert model_doc(url)["events"] == 40


def test_dead_sink_warns_once_not_once_per_reply(servers: ServerFactory) -> None:
    """A dead sink must not flood the log: one warning when failures start."""
    dead = f"http://127.0.0.1:{free_port()}/"
    server = servers(*REPLY_FLAGS, "--reply_url", dead, "--reply_retries", "0")
    timed_events(server.url, 10)
    wait_until(lambda: reply_stats(server.url)["failed"] == 10, what="all replies failed")
    warnings = [line for line in server.stderr().splitlines() if "reply delivery failing" in line]
    assert len(warnings) == 1
