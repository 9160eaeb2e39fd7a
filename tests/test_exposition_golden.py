"""The whole exposition of servers fed known events, against golden files made before the
metric catalogue (adserver/catalogue/families.py) existed: every family's name, type, help and
label sets, and the values that do not depend on timing, must stay byte for byte as they were.

To re-make the golden files (only for an intended change of the exposition):
``python -m tests.test_exposition_golden``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import requests

from adserver.catalogue.wire import KSERVE_RESPONSE_TYPE
from tests.support.events import ce_headers, feedback, new_id
from tests.support.http import post_json, send_event
from tests.support.processes import DATA, MULTICLASS_NUMERIC, REPLY_FLAGS, ServerFactory
from tests.support.sink import Sink
from tests.support.timing import wait_until

GOLDEN = DATA / "exposition"
FORMATS = {
    "text": "text/plain;version=0.0.4",
    "openmetrics": "application/openmetrics-text;version=1.0.0",
}
SELDON_ENV = {
    "SELDON_DEPLOYMENT_ID": "golden-model",
    "PREDICTIVE_UNIT_ID": "classifier",
    "PREDICTIVE_UNIT_IMAGE": "seldonio/alibi-detect-server:1.6.0",
    "PREDICTOR_ID": "default",
    "PREDICTOR_LABELS": '{"version": "v2"}',
    "SELDON_DEPLOYMENT_NAMESPACE": "seldon",
}
CUSTOM = [
    {"key": "golden_counter", "type": "COUNTER", "value": 2, "tags": {"team": "a"}},
    {"key": "golden_gauge", "type": "GAUGE", "value": 5},
    {"key": "golden_timer", "type": "TIMER", "value": 250},
    {"key": "feedback_taken", "type": "GAUGE", "value": 1},  # a reserved prefix: rejected
]
# Samples whose values depend on timing (delays, the reply workers, open connections).
VOLATILE = re.compile(r"^feedback_(label_delay_seconds|reply_|http_connections)")


def multiclass_events(url: str) -> None:
    """Every kind of event the server counts: feedback with custom metrics, a redelivery, a
    refusal, logged predictions and labels joined, parked, duplicated and evicted."""
    body = feedback([[1], [2], [0]], [[1], [1], [0]])
    body["truth"]["meta"] = {"metrics": CUSTOM}
    event_id = send_event(url, body)
    send_event(url, body, event_id)  # redelivered
    assert post_json(url, b"{", ce_headers()).status_code == 400

    def log(request_id: str) -> None:
        headers = ce_headers(request_id, event_type=KSERVE_RESPONSE_TYPE)
        assert post_json(url, b'{"predictions": [1, 2]}', headers).status_code == 200

    def label(request_id: str) -> None:
        truth = {"truth": {"data": {"ndarray": [1, 1]}}}
        answer = post_json(url, truth, ce_headers(requestid=request_id))
        assert answer.status_code == 200, answer.text

    first, waiting = new_id(), new_id()
    log(first)
    label(first)  # joined
    label(first)  # again: a duplicate
    label(waiting)  # parked
    log(new_id())  # over --join_max_rows: the labelled first one goes, uncounted
    log(new_id())  # the unlabelled one before goes: prediction_evicted
    label(new_id())  # parked over the bound: label_evicted
    assert post_json(url, b"\x00binary", ce_headers(event_type=KSERVE_RESPONSE_TYPE)).ok


def binary_events(url: str) -> None:
    send_event(url, feedback([1, 0, 1, 1], [0.9, 0.2, 0.4, 0.7]))


CASES: dict[str, tuple[tuple[str, ...], Callable[[str], None]]] = {
    "multiclass": (
        ("--storage_uri", MULTICLASS_NUMERIC, "--join_max_rows", "2", "--model_name", "iris"),
        multiclass_events,
    ),
    "binary": (("--storage_uri", "BinaryMetrics"), binary_events),
}


def exposition(servers: ServerFactory, sink: Sink, case: str) -> dict[str, str]:
    """The case's scrape in each format, without process_* and with volatile values masked."""
    flags, send = CASES[case]
    url = servers(
        *flags,
        "--state",
        "memory",
        "--reply_url",
        sink.url.rstrip("/"),
        *REPLY_FLAGS,
        env=SELDON_ENV,
    ).url
    send(url)
    wait_until(lambda: stable(url), what="the reply workers to go idle")
    return {form: normalised(url, accept) for form, accept in FORMATS.items()}


def stable(url: str) -> bool:
    text = requests.get(url + "/v1/metrics", timeout=5).text
    return "feedback_reply_in_flight{model=" in text and not re.search(
        r"^feedback_reply_(queue_depth|in_flight)\{[^}]*\} [1-9]", text, re.M
    )


def normalised(url: str, accept: str) -> str:
    answer = requests.get(url + "/v1/metrics", headers={"Accept": accept}, timeout=5)
    assert answer.status_code == 200
    lines = []
    for line in answer.text.splitlines(keepends=True):
        name = line.split(" ", 3)[2] if line.startswith(("# HELP", "# TYPE")) else line
        if name.startswith("process_"):
            continue
        if VOLATILE.match(line):
            line = line.rsplit(" ", 1)[0] + " _\n"
        lines.append(line)
    return "".join(lines)


@pytest.mark.parametrize("case", CASES)
def test_the_exposition_is_unchanged(servers: ServerFactory, sink: Sink, case: str) -> None:
    for form, text in exposition(servers, sink, case).items():
        golden = (GOLDEN / f"{case}.{form}.txt").read_text()
        assert text == golden, f"{case} in {form} differs from tests/data/exposition"


def main() -> None:
    GOLDEN.mkdir(exist_ok=True)
    factory = ServerFactory()
    try:
        for case in CASES:
            with Sink() as sink:
                for form, text in exposition(factory, sink, case).items():
                    (GOLDEN / f"{case}.{form}.txt").write_text(text)
    finally:
        factory.close()


if __name__ == "__main__":
    main()
