"""Replicas on one PostgreSQL database: many servers, one exact state (issue 15).

Real server processes started by the CLI with the seed's args and ``--state postgres``, replies
posted to a real sink. Clients deliver every event to a random replica and, like a Knative
broker, send it again (to another random replica) until it is acknowledged, while replicas are
killed with SIGKILL and restarted and PostgreSQL itself restarts. Whatever happened, every event
counts exactly once, every replica shows the same document, and a real Prometheus scraping them
all computes, from config/prometheus-rules.yaml, what scikit-learn computes.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from sklearn.metrics import accuracy_score, precision_score, recall_score

from adserver.catalogue import reasons
from adserver.catalogue.wire import KSERVE_RESPONSE_TYPE, ROUTE_READY
from bench.postgres import PostgresServer
from bench.servers import SEED_MODEL, SEED_STORAGE_URI
from tests.prometheus import by_label, host_port, require_program, run_prometheus, single
from tests.support.events import ce_headers, feedback, new_id
from tests.support.http import model_doc, post_json, scrape, value
from tests.support.oracle import one_matrix
from tests.support.processes import (
    MULTICLASS_NUMERIC,
    REPLY_FLAGS,
    ServerProcess,
    free_port,
    launch,
    wait_ready,
)
from tests.support.sink import Sink
from tests.support.timing import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

CLASSES = 4
EVENTS = 160
CLIENTS = 8
REFRESH = "0.25"
# Everything a replica may take to see another's commit: a few change-log polls.
CONVERGED = 5.0
TRANSIENT = (502, 503)  # what a client retries, as a broker does; anything else is a failure


def seed_args(dsn: str, reply_url: str, storage_uri: str = SEED_STORAGE_URI) -> list[str]:
    """The seed's container args (bench/servers.py ``seed_argv``) on shared PostgreSQL state."""
    return [
        "--model_name", SEED_MODEL,
        "--protocol", "seldonfeedback.http",
        "--storage_uri", storage_uri,
        "--reply_url", reply_url,
        *REPLY_FLAGS,
        "--state", "postgres",
        "--postgres_dsn", dsn,
        "--postgres_refresh_seconds", REFRESH,
    ]  # fmt: skip


def start_together(args: Sequence[str], count: int) -> list[ServerProcess]:
    """``count`` servers launched at once (not one after the other), then each waited for."""
    launched = []
    for _ in range(count):
        port = free_port()
        argv = ["--http_host", "127.0.0.1", "--http_port", str(port), *args, "MetricsServer"]
        process, stderr = launch(argv)
        launched.append(ServerProcess(f"http://127.0.0.1:{port}", process, stderr))
    try:
        for server in launched:
            wait_ready(server.url, server.process, server.stderr_path, 30)
    except RuntimeError:
        stop_all(launched)
        raise
    return launched


def stop_all(servers: Sequence[ServerProcess]) -> None:
    for server in servers:
        server.terminate()
    for server in servers:
        with contextlib.suppress(Exception):
            server.wait()
        server.cleanup()


class Replicas:
    """Servers of one model on one database; a crashed one is replaced by a new process."""

    def __init__(self, args: Sequence[str], count: int) -> None:
        self.args = list(args)
        self.lock = threading.Lock()
        self.servers = start_together(self.args, count)
        self.dead: list[ServerProcess] = []

    def urls(self) -> list[str]:
        with self.lock:
            return [server.url for server in self.servers]

    def crash(self, index: int) -> None:
        """SIGKILL one replica (by PID: no drain, no goodbye) and start another in its place."""
        with self.lock:
            victim = self.servers[index]
        victim.process.kill()
        victim.process.wait(10)
        self.dead.append(victim)
        (replacement,) = start_together(self.args, 1)
        with self.lock:
            self.servers[index] = replacement

    def docs(self) -> list[dict[str, Any]]:
        return [model_doc(url, SEED_MODEL) for url in self.urls()]

    def converged(self, events: int) -> dict[str, Any]:
        """The one document every replica shows once each has polled the others' commits
        (``events`` of them: equal documents alone may be each replica's own events)."""
        found: list[dict[str, Any]] = []

        def one_state() -> bool:
            found[:] = self.docs()
            return [doc["events"] for doc in found] == [events] * len(found) and all(
                doc == found[0] for doc in found
            )

        try:
            wait_until(one_state, CONVERGED, f"every replica showing the same {events} events")
        except AssertionError as exc:
            shown = [{k: doc.get(k) for k in ("events", "rows")} for doc in found]
            raise AssertionError(f"{exc}; they show {shown}") from None
        return found[0]

    def close(self) -> None:
        stop_all([*self.servers, *self.dead])


@contextlib.contextmanager
def replicas(args: Sequence[str], count: int = 3) -> Iterator[Replicas]:
    group = Replicas(args, count)
    try:
        yield group
    finally:
        group.close()


def deliver(group: Replicas, body: Any, headers: dict[str, str], rng: random.Random) -> int:
    """Send until a replica acknowledges it (2xx), each try to a random replica; how many tries.

    A broker's retries are what make crashes harmless: an event a dying replica never answered
    is sent again, and one it committed but could not acknowledge counts once all the same."""
    deadline = time.monotonic() + 60
    for attempt in range(1, 10_000):
        url = rng.choice(group.urls())
        try:
            answer = post_json(url, body, headers, timeout=5)
        except requests.RequestException:
            answer = None
        if answer is not None and 200 <= answer.status_code < 300:
            return attempt
        assert answer is None or answer.status_code in TRANSIENT, (answer.status_code, answer.text)
        assert time.monotonic() < deadline, f"{headers} not acknowledged after {attempt} tries"
        time.sleep(0.05)
    raise AssertionError(f"{headers} never acknowledged")


def one_hot(classes: Sequence[int]) -> list[list[int]]:
    return [[int(c == k) for k in range(CLASSES)] for c in classes]


@dataclass
class Stream:
    """Feedback events of one to three rows, about 70% correct, every class on both axes."""

    truth: list[list[int]] = field(default_factory=list)
    predicted: list[list[int]] = field(default_factory=list)

    @classmethod
    def draw(cls, events: int, rng: random.Random) -> Stream:
        stream = cls()
        for _ in range(events):
            truth = [rng.randrange(CLASSES) for _ in range(rng.randint(1, 3))]
            predicted = [t if rng.random() < 0.7 else rng.randrange(CLASSES) for t in truth]
            stream.truth.append(truth)
            stream.predicted.append(predicted)
        return stream

    def rows(self) -> tuple[list[int], list[int]]:
        return [c for e in self.truth for c in e], [c for e in self.predicted for c in e]


def assert_one_state(group: Replicas, events: int, truth: list[int], predicted: list[int]) -> None:
    """Every replica's document is the same (within a few polls), and scikit-learn's."""
    doc = group.converged(events)
    assert doc["rows"] == len(truth)
    assert doc["confusion_matrix"] == one_matrix(truth, predicted, doc["classes"])
    assert doc["accuracy"] == pytest.approx(accuracy_score(truth, predicted))


def test_every_event_counts_once_through_crashes_and_a_database_restart(
    private_postgres: PostgresServer,
) -> None:
    require_program("prometheus")  # before starting anything for nothing
    rng = random.Random(20250915)
    stream = Stream.draw(EVENTS, rng)
    ids = [new_id() for _ in range(EVENTS)]
    tries: list[int] = []
    with Sink() as sink, replicas(seed_args(private_postgres.dsn, sink.url)) as group:

        def send(index: int) -> None:
            mine = random.Random(index)
            time.sleep(mine.uniform(0.1, 0.5))  # a paced stream: the faults hit it midway
            body = feedback(one_hot(stream.truth[index]), one_hot(stream.predicted[index]))
            headers = ce_headers(ids[index])
            tries.append(deliver(group, body, headers, mine))
            if mine.random() < 0.1:  # an acknowledgement the broker lost: it sends again
                deliver(group, body, headers, mine)

        def crash() -> None:
            group.crash(rng.randrange(len(group.servers)))

        faults = [crash, crash, private_postgres.restart, crash]
        with ThreadPoolExecutor(CLIENTS) as clients:
            sending = [clients.submit(send, i) for i in range(EVENTS)]
            for point, fault in enumerate(faults, 1):  # each at its share of the stream
                share = EVENTS * point // (len(faults) + 1)
                wait_until(lambda n=share: len(tries) >= n, 60, f"{share} events acknowledged")
                fault()
            for done in sending:
                done.result()
        assert sum(tries) > EVENTS, "nothing was ever retried: the faults missed the traffic"
        truth, predicted = stream.rows()
        assert_one_state(group, EVENTS, truth, predicted)
        assert sink.received, "replies reach the sink"

        # What Prometheus computes from the rules over the three replicas is scikit-learn's.
        targets = [host_port(url) for url in group.urls()]
        with run_prometheus(targets) as prometheus:
            selector = f'{{model="{SEED_MODEL}"}}'
            rows = prometheus.wait_for(
                f"model:feedback_rows:sum{selector}", lambda r: bool(r) and len(r) == 1
            )
            assert single(rows) == len(truth)
            accuracy = single(prometheus.query(f"model:feedback_accuracy:ratio{selector}"))
            assert accuracy == pytest.approx(accuracy_score(truth, predicted))
            for rule, score in (("precision", precision_score), ("recall", recall_score)):
                found = by_label(
                    prometheus.query(f"model_class:feedback_{rule}:ratio{selector}"), "class"
                )
                want = score(truth, predicted, labels=range(CLASSES), average=None, zero_division=0)
                assert found == {str(c): pytest.approx(v) for c, v in enumerate(want)}, rule


def response(group: Replicas, rid: str, predicted: list[int], rng: random.Random) -> None:
    """A KServe logger's response event (ce-id = the request id), to a random replica."""
    headers = ce_headers(rid, event_type=KSERVE_RESPONSE_TYPE)
    deliver(group, {"predictions": predicted}, headers, rng)


def label(group: Replicas, rid: str, truth: list[int], rng: random.Random) -> None:
    """A labelling client's feedback naming the request, to a random replica."""
    deliver(group, {"truth": {"data": {"ndarray": truth}}}, ce_headers(requestid=rid), rng)


def test_predictions_and_labels_join_once_across_replicas(postgres_dsn: str) -> None:
    """A prediction logged through one replica and its label sent to another join exactly once,
    in either order; labels parked before every replica restarted still meet their prediction."""
    rng = random.Random(7)
    ids = [new_id() for _ in range(30)]
    predictions = {rid: [rng.randrange(3) for _ in range(2)] for rid in ids}
    labels = {rid: [rng.randrange(3) for _ in range(2)] for rid in ids}
    first, then = ids[:15], ids[15:]
    with Sink() as sink, replicas(seed_args(postgres_dsn, sink.url, MULTICLASS_NUMERIC)) as group:
        for rid in first:  # the prediction first, its label later (each through any replica)
            response(group, rid, predictions[rid], rng)
            label(group, rid, labels[rid], rng)
        for rid in then:  # labels first: parked in the database
            label(group, rid, labels[rid], rng)
        for index in range(len(group.servers)):  # every replica killed and replaced in turn
            group.crash(index)
        for rid in then:
            response(group, rid, predictions[rid], rng)
        doc = group.converged(len(ids))  # the labels (logger events count apart)
        truth = [t for rid in ids for t in labels[rid]]
        predicted = [p for rid in ids for p in predictions[rid]]
        assert doc["rows"] == len(truth)
        assert doc["confusion_matrix"] == one_matrix(truth, predicted, doc["classes"])
        rows = 2 * len(first)
        for url in group.urls():
            samples = scrape(url)
            counted = {
                outcome: value(samples, "feedback_labels_total", outcome=outcome)
                for outcome in ("joined", "parked", "late", "duplicate")
            }
            assert counted == {"joined": rows, "parked": rows, "late": rows, "duplicate": 0}


def ready(url: str) -> bool:
    with contextlib.suppress(requests.RequestException):
        return requests.get(url + ROUTE_READY, timeout=1).status_code == 200
    return False


def test_a_database_outage_is_503_and_unready_everywhere_then_nothing_is_lost(
    private_postgres: PostgresServer,
) -> None:
    """Within 5 s of the database going away every replica, idle or not, says it is not ready
    (and keeps serving the last state it read); events are refused with 503 and counted
    nowhere; once it is back, all recover and exactly the acknowledged events count."""
    rng = random.Random(3)
    with Sink() as sink, replicas(seed_args(private_postgres.dsn, sink.url)) as group:
        for _ in range(5):
            deliver(group, feedback(one_hot([1]), one_hot([1])), ce_headers(), rng)
        before = group.converged(5)
        private_postgres.stop()
        wait_until(lambda: not any(ready(url) for url in group.urls()), 5.0, "all unready")
        assert group.docs() == [before] * len(group.servers)
        for url in group.urls():
            answer = post_json(url, feedback(one_hot([2]), one_hot([2])), ce_headers())
            assert answer.status_code == 503, answer.text
            assert answer.json()["reason"] == reasons.STORE_ERROR
            now = int(time.time()) // 60 * 60  # a range is read from the database: 503, not 500
            span = {"from": str(now - 3600), "to": str(now)}
            answer = requests.get(f"{url}/v1/models/{SEED_MODEL}/metrics", params=span, timeout=10)
            assert answer.status_code == 503, answer.text
            assert answer.json()["reason"] == reasons.STORE_ERROR
        private_postgres.start()
        wait_until(lambda: all(ready(url) for url in group.urls()), 15.0, "all ready again")
        for _ in range(5):
            deliver(group, feedback(one_hot([0]), one_hot([1])), ce_headers(), rng)
        group.converged(10)


def test_five_replicas_started_together_on_an_empty_database_all_come_up(
    postgres_dsn: str,
) -> None:
    """They all migrate the empty database at once: one wins, the others find it done."""
    rng = random.Random(5)
    with Sink() as sink, replicas(seed_args(postgres_dsn, sink.url), 5) as group:
        for url in group.urls():
            answer = post_json(url, feedback(one_hot([3]), one_hot([3])), ce_headers())
            assert answer.status_code == 200, answer.text
        group.converged(5)
        deliver(group, feedback(one_hot([2]), one_hot([3])), ce_headers(), rng)
        group.converged(6)
