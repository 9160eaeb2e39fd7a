"""Small HTTP probes from the bench process: readiness, row counts, scrape timing, events.

Stdlib `http.client` only, so probing adds no dependency and little overhead to what is timed.
"""

from __future__ import annotations

import http.client
import json
import re
import statistics
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

_SAMPLE = r'^{}\{{[^}}]*model="([^"]*)"[^}}]*\}}\s+(\S+)'
_ROWS_RE = re.compile(_SAMPLE.format("feedback_rows_accepted_total"), re.MULTILINE)
_EVENTS_RE = re.compile(_SAMPLE.format("feedback_events_accepted_total"), re.MULTILINE)


def _conn(url: str, timeout_s: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s), path


def request(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 5.0,
) -> tuple[int, bytes]:
    """One request on a fresh connection; returns (status, body)."""
    conn, path = _conn(url, timeout_s)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def status(url: str, timeout_s: float = 0.5) -> int | None:
    """HTTP status of GET `url`, or None if nothing answers (yet)."""
    try:
        return request(url, timeout_s=timeout_s)[0]
    except (OSError, http.client.HTTPException):
        return None


@dataclass(frozen=True)
class Counts:
    """What the server says it counted for one model."""

    rows: int
    events: int


def counts(base_url: str, model: str | None = "bench", timeout_s: float = 5.0) -> Counts:
    """Rows and events counted, from `/v1/metrics?format=json`, else from the text exposition.

    `model` None: summed over every model the server lists (a many-model server's load is
    spread over its models, and the row checks hold for the sum)."""
    code, body = request(base_url + "/v1/metrics?format=json", timeout_s=timeout_s)
    if code == 200:
        try:
            doc = json.loads(body)["models"]
            chosen = doc.values() if model is None else [doc[model]]
            return Counts(
                rows=sum(int(m["rows"]) for m in chosen),
                events=sum(int(m["events"]) for m in chosen),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # not the JSON form yet: fall back to the text exposition below
    code, body = request(base_url + "/v1/metrics", timeout_s=timeout_s)
    if code != 200:
        raise RuntimeError(f"GET /v1/metrics answered {code}")
    text = body.decode(errors="replace")
    rows = {m: float(v) for m, v in _ROWS_RE.findall(text)}
    events = {m: float(v) for m, v in _EVENTS_RE.findall(text)}
    if model is None:
        return Counts(rows=int(sum(rows.values())), events=int(sum(events.values())))
    return Counts(rows=int(rows.get(model, 0)), events=int(events.get(model, 0)))


def segment_rows(base_url: str, timeout_s: float = 10.0) -> dict[str, dict[str, int]]:
    """Rows counted per model and segment, from `/v1/metrics?format=json` (D8: every model's
    summary has "segments" when it has dimensions); a model without segments maps to {}."""
    code, body = request(base_url + "/v1/metrics?format=json", timeout_s=timeout_s)
    if code != 200:
        raise RuntimeError(f"GET /v1/metrics?format=json answered {code}")
    models = json.loads(body)["models"]
    return {
        name: {seg: int(s["rows"]) for seg, s in summary.get("segments", {}).items()}
        for name, summary in models.items()
    }


def counter(base_url: str, family: str, model: str = "bench", timeout_s: float = 10.0) -> int:
    """One counter of the text exposition for `model` (0 while it has no sample)."""
    code, body = request(base_url + "/v1/metrics", timeout_s=timeout_s)
    if code != 200:
        raise RuntimeError(f"GET /v1/metrics answered {code}")
    pattern = re.compile(_SAMPLE.format(re.escape(family)), re.MULTILINE)
    found = {m: float(v) for m, v in pattern.findall(body.decode(errors="replace"))}
    return int(found.get(model, 0))


_ANY_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{.*\})?\s+(\S+)", re.MULTILINE)


def totals(base_url: str, names: tuple[str, ...], timeout_s: float = 10.0) -> dict[str, float]:
    """The sum over every label set of each sample name in `names` found in the text exposition
    (a figure of the whole process, such as the state's transactions); absent names are left out."""
    code, body = request(base_url + "/v1/metrics", timeout_s=timeout_s)
    if code != 200:
        raise RuntimeError(f"GET /v1/metrics answered {code}")
    found: dict[str, float] = {}
    for name, value in _ANY_SAMPLE.findall(body.decode(errors="replace")):
        if name in names:
            found[name] = found.get(name, 0.0) + float(value)
    return found


def stable_counts(
    base_url: str, model: str | None = "bench", settle_s: float = 0.1, timeout_s: float = 10.0
) -> Counts:
    """Counts once two reads `settle_s` apart agree.

    When wrk stops it abandons up to `-c` in-flight requests; the server may still count them
    (or commit them, in durable mode) after wrk has gone, so we wait for the count to settle.
    """
    deadline = time.monotonic() + timeout_s
    last = counts(base_url, model)
    while time.monotonic() < deadline:
        time.sleep(settle_s)
        now = counts(base_url, model)
        if now == last:
            return now
        last = now
    return last


def post_event(
    base_url: str,
    body: bytes,
    ce_id: str,
    source: str = "bench",
    timeout_s: float = 5.0,
    token: str | None = None,
) -> int:
    """POST one binary-mode feedback CloudEvent (with `token` as a bearer token); returns the
    HTTP status."""
    headers = {
        "ce-specversion": "1.0",
        "ce-type": "io.seldon.serving.feedback",
        "ce-source": source,
        "ce-id": ce_id,
        "content-type": "application/json",
    }
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return request(base_url + "/", "POST", body, headers, timeout_s)[0]


@dataclass(frozen=True)
class ScrapeTiming:
    """Wall time of GET /v1/metrics (text) on one keep-alive connection."""

    n: int
    median_ms: float
    p90_ms: float
    max_ms: float
    body_bytes: int
    samples: int


def time_scrapes(base_url: str, n: int = 50, timeout_s: float = 10.0) -> ScrapeTiming:
    """Median of `n` scrapes after one untimed warm scrape (keep-alive, like Prometheus)."""
    conn, path = _conn(base_url + "/v1/metrics", timeout_s)
    times: list[float] = []
    body = b""
    try:
        for i in range(n + 1):
            t0 = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            dt = time.perf_counter() - t0
            if resp.status != 200:
                raise RuntimeError(f"scrape answered {resp.status}")
            if i:
                times.append(dt * 1000.0)
    finally:
        conn.close()
    times.sort()
    samples = sum(
        1
        for line in body.decode(errors="replace").splitlines()
        if line and not line.startswith("#")
    )
    return ScrapeTiming(
        n=n,
        median_ms=statistics.median(times),
        p90_ms=times[min(len(times) - 1, int(0.9 * len(times)))],
        max_ms=times[-1],
        body_bytes=len(body),
        samples=samples,
    )
