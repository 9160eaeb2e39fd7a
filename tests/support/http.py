"""Talking to a running server: posting events, reading its model document and its metrics."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.events import ce_headers, new_id


def post_json(
    url: str, body: Any, headers: Mapping[str, str] | None = None, timeout: float = 10.0
) -> requests.Response:
    """POST ``body`` (JSON-encoded unless bytes/str) to the events endpoint ``/``."""
    if isinstance(body, str):
        body = body.encode()
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    send = {"Content-Type": "application/json", **(headers or {})}
    return requests.post(url + "/", data=data, headers=send, timeout=timeout)


def send_event(url: str, body: Any, event_id: str | None = None, **headers: str) -> str:
    """Deliver one binary-mode event and assert it was accepted; returns its id."""
    event_id = event_id or new_id()
    answer = post_json(url, body, ce_headers(event_id, **headers))
    assert answer.status_code == 200, answer.text
    return event_id


def model_doc(url: str, model: str = "model") -> dict[str, Any]:
    """The model's entry in ``GET /v1/metrics?format=json``."""
    answer = requests.get(url + "/v1/metrics", params={"format": "json"}, timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.json()["models"][model]


def reply_data(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What a reply event carries: the model document without its (classes squared) matrix."""
    return {key: value for key, value in doc.items() if key != "confusion_matrix"}


def cells(doc: Mapping[str, Any]) -> Counter[tuple[int, int]]:
    """Confusion-matrix cells {(truth, prediction): rows} of a model document (zeros left out)."""
    classes = doc["classes"]
    return Counter(
        {
            (classes[i], classes[j]): count
            for i, row in enumerate(doc["confusion_matrix"])
            for j, count in enumerate(row)
            if count
        }
    )


@dataclass(frozen=True)
class Progress:
    """What changed in a model's document between two reads: lets tests share a server."""

    events: int
    rows: int
    cells: Counter[tuple[int, int]]


def progress(before: Mapping[str, Any], after: Mapping[str, Any]) -> Progress:
    return Progress(
        events=after["events"] - before["events"],
        rows=after["rows"] - before["rows"],
        cells=cells(after) - cells(before),
    )


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, accept: str | None = None) -> Samples:
    """Every sample of ``/v1/metrics`` (classic text format) keyed by name and label set."""
    headers = {"Accept": accept} if accept else {}
    answer = requests.get(url + "/v1/metrics", headers=headers, timeout=5)
    assert answer.status_code == 200, answer.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


# Samples that move without any event: the process' own metrics and the open connections.
RESTLESS = ("process_", "feedback_http_connections")


def moved_samples(before: Samples, after: Samples) -> list[tuple[str, frozenset[tuple[str, str]]]]:
    """The samples an event changed (what moves by itself is left out)."""
    return [k for k, n in after.items() if n != before.get(k) and not k[0].startswith(RESTLESS)]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels`` (0 if absent)."""
    wanted = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and wanted <= ls]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else 0.0
