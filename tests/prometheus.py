"""A real Prometheus (Debian's ``prometheus`` binary) scraping test servers on loopback.

The end-to-end tests prove that what users will run works: Prometheus scrapes ``/v1/metrics``
(it asks for OpenMetrics), evaluates config/prometheus-rules.yaml, and answers PromQL over its
HTTP API. Each instance gets a free port, a temporary config and TSDB, and is stopped by PID.

Missing programs skip the tests on a developer machine and fail them in CI (CI=true).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.support.processes import ROOT, free_port

RULES = ROOT / "config" / "prometheus-rules.yaml"
JOB = "feedback-metrics"
Result = list[dict[str, Any]]


def in_ci() -> bool:
    """CI must run every end-to-end test: there a missing program is a failure, not a skip."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require(what: str, found: str | None, install: str) -> str:
    """``found`` if set; otherwise skip (developer machine) or fail (CI) naming the install line."""
    if found:
        return found
    reason = f"{what} is not available ({install})"
    if in_ci():
        pytest.fail(f"{reason}; CI must run the end-to-end tests")
    pytest.skip(reason)


def require_program(name: str, install: str = "apt-get install prometheus") -> str:
    """The path of executable ``name`` (see ``require``)."""
    return require(name, shutil.which(name), install)


def job(targets: Iterable[str], name: str = JOB, **options: Any) -> dict[str, Any]:
    """One scrape job of ``targets`` at ``/v1/metrics``; ``options`` such as ``authorization``."""
    return {
        "job_name": name,
        "metrics_path": "/v1/metrics",
        "static_configs": [{"targets": list(targets)}],
        **options,
    }


def config(jobs: list[dict[str, Any]], rules: Path) -> dict[str, Any]:
    """Scrape every second at ``/v1/metrics`` and evaluate the rules every second."""
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": jobs,
    }


def host_port(url: str) -> str:
    """``http://127.0.0.1:8080`` -> ``127.0.0.1:8080`` (a target, and its ``instance`` label)."""
    return url.split("://", 1)[-1].rstrip("/")


@dataclass
class Prometheus:
    """A running Prometheus and a small client for its HTTP API."""

    url: str
    process: subprocess.Popen[bytes]
    workdir: Path

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-4000:]

    def query(self, expr: str) -> Result:
        """The instant vector of ``expr`` now; an error answer fails the test with its message."""
        answer = requests.post(self.url + "/api/v1/query", data={"query": expr}, timeout=10)
        body = answer.json()
        assert answer.status_code == 200 and body.get("status") == "success", (
            f"{expr}\n-> {answer.status_code} {body.get('errorType')}: {body.get('error')}"
        )
        assert body["data"]["resultType"] == "vector", body["data"]
        return body["data"]["result"]

    def wait_for(
        self, expr: str, predicate: Callable[[Result], bool], timeout: float = 30.0
    ) -> Result:
        """Poll ``expr`` until ``predicate`` holds (the first scrape and rule run take seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s: {expr} = {result}\n"
                    f"targets: {self.target_health()}\nlog: {self.log()}"
                )
            time.sleep(0.2)

    def target_health(self) -> list[dict[str, Any]]:
        """Health and last scrape error of every target: what to read when a wait times out."""
        answer = requests.get(self.url + "/api/v1/targets", timeout=5).json()
        return [
            {k: t.get(k) for k in ("scrapePool", "scrapeUrl", "health", "lastError")}
            for t in answer["data"]["activeTargets"]
        ]

    def stop(self) -> None:
        """Terminate by PID, kill if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def samples(result: Result, *labels: str) -> dict[tuple[str, ...], float]:
    """{label values: value} of a vector, keyed by ``labels`` (all labels must be distinct)."""
    found: dict[tuple[str, ...], float] = {}
    for item in result:
        key = tuple(item["metric"].get(label, "") for label in labels)
        assert key not in found, f"two samples for {dict(zip(labels, key))}: {result}"
        found[key] = float(item["value"][1])
    return found


def by_label(result: Result, label: str) -> dict[str, float]:
    """{value of ``label``: sample value}, e.g. per class."""
    return {key[0]: v for key, v in samples(result, label).items()}


def single(result: Result) -> float:
    """The value of a vector that must hold exactly one sample."""
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def wait_ready(prometheus: Prometheus, timeout: float = 30.0) -> None:
    """Poll ``/-/ready``; fail with the log if the process dies or never gets ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prometheus.process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {prometheus.log()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(prometheus.url + "/-/ready", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    prometheus.stop()
    raise RuntimeError(f"prometheus not ready after {timeout}s: {prometheus.log()}")


@contextlib.contextmanager
def run_prometheus(
    targets: Iterable[str] = (), rules: Path = RULES, jobs: list[dict[str, Any]] | None = None
) -> Iterator[Prometheus]:
    """A ready Prometheus scraping ``targets`` (``host:port``) in one job, or ``jobs`` when
    given; stopped and removed on exit."""
    binary = require_program("prometheus")
    workdir = Path(tempfile.mkdtemp(prefix="prometheus-e2e-"))
    scrape = jobs if jobs is not None else [job(targets)]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config(scrape, rules)))
    port = free_port()
    with (workdir / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, workdir)
    try:
        wait_ready(prometheus)
        yield prometheus
    finally:
        prometheus.stop()
        shutil.rmtree(workdir, ignore_errors=True)
