"""Age a server before it is measured: fill its remembered ids and logged rows through HTTP.

The state-age cases measure a server whose tables are at their bounds (`--dedup_max_ids`
remembered event ids, `--join_max_rows` logged prediction rows), as after days of traffic. The
fill goes through `POST /` like any sender's events, so it does not depend on how the server
stores them:

- ids: batched CloudEvents (`application/cloudevents-batch+json`), `batch` single-row feedback
  events per request, each with its own id (the server counts and remembers every element);
- rows: KServe V1 response logger events (`org.kubeflow.serving.inference.response`,
  `{"predictions": [...]}`) of `rows_per_event` probability rows each, kept for the join.

Both are checked against the server's counters afterwards: a fill that did not land is a failure,
not a silently younger server.
"""

from __future__ import annotations

import http.client
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from bench import probe

CE_BATCH = "application/cloudevents-batch+json"
FEEDBACK_TYPE = "io.seldon.serving.feedback"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
FILL_SOURCE = "bench-fill"
_FEEDBACK_DATA = (
    '{"truth":{"data":{"ndarray":[[0,1,0]]}},"response":{"data":{"ndarray":[[0.2,0.7,0.1]]}}}'
)
_PREDICTION_ROWS = ("[0.2,0.7,0.1]", "[0.6,0.3,0.1]", "[0.1,0.2,0.7]")


@dataclass(frozen=True)
class FillSizes:
    """How much state to build: ids remembered and prediction rows logged (0 skips a part)."""

    ids: int
    rows: int
    batch: int = 1000  # events per batched request
    rows_per_event: int = 100_000  # prediction rows per logger event


@dataclass(frozen=True)
class FillResult:
    ids: int
    rows: int
    requests: int
    seconds: float

    def note(self) -> str:
        return (
            f"filled through HTTP before its cases: {self.ids} ids, {self.rows} logged rows "
            f"in {self.requests} requests, {self.seconds:.1f} s"
        )


class FillError(RuntimeError):
    """The server refused part of the fill, or its counters do not show it."""


def id_batch(tag: str, first: int, count: int) -> bytes:
    """`count` structured feedback events with ids `first ..`, as one batch body."""
    head = f'{{"specversion":"1.0","type":"{FEEDBACK_TYPE}","source":"{FILL_SOURCE}","id":"{tag}-'
    tail = f'","datacontenttype":"application/json","data":{_FEEDBACK_DATA}}}'
    return ("[" + ",".join(f"{head}{i}{tail}" for i in range(first, first + count)) + "]").encode()


def predictions_body(rows: int) -> bytes:
    """A KServe V1 response with `rows` probability rows."""
    cycle = len(_PREDICTION_ROWS)
    listed = ",".join(_PREDICTION_ROWS[i % cycle] for i in range(rows))
    return f'{{"predictions":[{listed}]}}'.encode()


def _post(conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str]) -> None:
    conn.request("POST", "/", body=body, headers=headers)
    resp = conn.getresponse()
    answer = resp.read()
    if not 200 <= resp.status < 300:
        raise FillError(f"fill request answered {resp.status}: {answer[:300]!r}")


def fill(base_url: str, sizes: FillSizes, tag: str, model: str = "bench") -> FillResult:
    """Send the fill on one kept-alive connection, then check the server counted all of it."""
    parts = urlsplit(base_url)
    before = probe.stable_counts(base_url, model)
    predicted_before = probe.counter(base_url, "feedback_predicted_rows_total", model)
    started = time.perf_counter()
    requests = 0
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300.0)
    try:
        for first in range(0, sizes.ids, sizes.batch):
            count = min(sizes.batch, sizes.ids - first)
            _post(conn, id_batch(tag, first, count), {"Content-Type": CE_BATCH})
            requests += 1
        for number, first in enumerate(range(0, sizes.rows, sizes.rows_per_event)):
            rows = min(sizes.rows_per_event, sizes.rows - first)
            headers = {
                "ce-specversion": "1.0",
                "ce-type": RESPONSE_TYPE,
                "ce-source": FILL_SOURCE,
                "ce-id": f"{tag}-rows-{number}",
                "content-type": "application/json",
            }
            _post(conn, predictions_body(rows), headers)
            requests += 1
    finally:
        conn.close()
    seconds = time.perf_counter() - started
    after = probe.stable_counts(base_url, model)
    predicted = probe.counter(base_url, "feedback_predicted_rows_total", model) - predicted_before
    if after.events - before.events != sizes.ids:
        raise FillError(
            f"fill sent {sizes.ids} batched events, the server counted "
            f"{after.events - before.events}"
        )
    if predicted != sizes.rows:
        raise FillError(f"fill logged {sizes.rows} prediction rows, the server counted {predicted}")
    return FillResult(sizes.ids, sizes.rows, requests, seconds)
