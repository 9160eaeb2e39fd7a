"""Shared pieces of the HTTP-level tests: a real server subprocess, a real reply sink, payloads.

Everything here talks to real sockets on loopback, so the tests see exactly what Knative, a
Prometheus scraper or a reply sink would see.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
import tornado.httpserver
import tornado.netutil
import tornado.web
from prometheus_client.parser import text_string_to_metric_families

from adserver.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
FEEDBACK_TYPE = "io.seldon.serving.feedback"
REPLY_TYPE = "io.seldon.serving.feedback.metrics"
REPLY_SOURCE = "io.seldon.serving.feedback"
STRUCTURED_TYPE = "application/cloudevents+json"
BATCH_TYPE = "application/cloudevents-batch+json"
# Flags that make the server answer each event with a reply CloudEvent.
REPLY_FLAGS = ("--event_type", REPLY_TYPE, "--event_source", REPLY_SOURCE)
MULTICLASS_NUMERIC = "cm_models.multiclass_numeric.MultiClassNumeric"
ONE_HOT = "adserver.cm_models.multiclass_one_hot.MulticlassOneHot"
# Settings and Seldon label variables: removed from the child's environment so the developer's
# shell cannot change what a test sees (tests pass them explicitly when they mean to).
SELDON_ENV = (
    "SELDON_DEPLOYMENT_ID",
    "PREDICTIVE_UNIT_ID",
    "PREDICTIVE_UNIT_IMAGE",
    "PREDICTOR_ID",
    "PREDICTOR_LABELS",
    "SELDON_DEPLOYMENT_NAMESPACE",
)
SERVER_ENV = (*(item.metadata["env"] for item in dataclasses.fields(Settings)), *SELDON_ENV)


class FakeClock:
    """An injectable clock for the store: tests move time by setting ``now``."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    """A loopback port nothing listens on (also how a 'dead sink' is made)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV}
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


# --------------------------------------------------------------------------- server process


@dataclass
class ServerProcess:
    """``python -m adserver`` running as a child process, with stderr kept in a file."""

    url: str
    process: subprocess.Popen[bytes]
    stderr_path: Path
    state_dir: Path | None = None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 10.0) -> int:
        """The exit code after SIGTERM; killed (by pid) if it does not stop in time."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise

    def stop(self, timeout: float = 10.0) -> int:
        self.terminate()
        return self.wait(timeout)

    def cleanup(self) -> None:
        """Remove the stderr file and the state directory (after the process ended)."""
        self.stderr_path.unlink(missing_ok=True)
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def launch(
    argv: Iterable[str], env: Mapping[str, str] | None = None, cwd: Path = ROOT
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``python -m adserver argv...`` without waiting for it."""
    handle, name = tempfile.mkstemp(prefix="adserver-", suffix=".stderr")
    with os.fdopen(handle, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "adserver", *argv],
            cwd=cwd,
            env=child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    return process, Path(name)


def wait_ready(url: str, process: subprocess.Popen[bytes], stderr: Path, timeout: float) -> None:
    """Poll ``/health/ready`` until 200; fail with the server's stderr if it dies or hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {stderr.read_text()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url + "/health/ready", timeout=0.5).status_code == 200:
                return
        time.sleep(0.03)
    process.kill()
    process.wait(5)
    raise RuntimeError(f"server not ready after {timeout}s: {stderr.read_text()}")


def start_server(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 10.0
) -> ServerProcess:
    """A ready server on a free loopback port; ``args`` are extra flags before ``MetricsServer``.

    Unless the caller chooses one, the server keeps its (default, durable) state in a fresh
    temporary directory, so servers never share or leave state behind.
    """
    port = free_port()
    argv = ["--http_host", "127.0.0.1", "--http_port", str(port), *args]
    if "MetricsServer" not in argv:
        argv.append("MetricsServer")
    env = dict(env or {})
    state_dir = None
    if "STATE_DIR" not in env and "--state_dir" not in argv:
        state_dir = Path(tempfile.mkdtemp(prefix="adserver-state-"))
        env["STATE_DIR"] = str(state_dir)
    process, stderr = launch(argv, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, stderr, timeout)
    except RuntimeError:
        ServerProcess(url, process, stderr, state_dir).cleanup()
        raise
    return ServerProcess(url, process, stderr, state_dir)


@dataclass
class ServerFactory:
    """Starts servers on demand and stops all of them (in parallel) at teardown."""

    started: list[ServerProcess] = field(default_factory=list)

    def __call__(self, *args: str, env: Mapping[str, str] | None = None) -> ServerProcess:
        server = start_server(*args, env=env)
        self.started.append(server)
        return server

    def close(self) -> None:
        for server in self.started:
            server.terminate()
        for server in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait()
            server.cleanup()


# --------------------------------------------------------------------------- reply sink


@dataclass(frozen=True)
class Received:
    """One request as the sink saw it (header names lower-case)."""

    headers: dict[str, str]
    body: bytes
    at: float


class _SinkHandler(tornado.web.RequestHandler):
    def initialize(self, sink: Sink) -> None:
        self.sink = sink

    async def post(self) -> None:
        headers = {k.lower(): v for k, v in self.request.headers.get_all()}
        self.sink.record(Received(headers, self.request.body, time.monotonic()))
        if self.sink.delay:
            await asyncio.sleep(self.sink.delay)
        self.set_status(self.sink.status)
        self.finish()


class Sink:
    """A real Tornado HTTP server in a background thread that records every POST.

    ``delay`` (seconds, slept asynchronously) and ``status`` can change between tests.
    """

    def __init__(self, delay: float = 0.0, status: int = 200) -> None:
        self.delay = delay
        self.status = status
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.port = int(sockets[0].getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(sockets),))
        self._thread.daemon = True

    def __enter__(self) -> Sink:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    async def _serve(self, sockets: list[socket.socket]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = tornado.httpserver.HTTPServer(
            tornado.web.Application([(r"/.*", _SinkHandler, {"sink": self})])
        )
        server.add_sockets(sockets)
        self._ready.set()
        await self._stop.wait()
        server.stop()

    def record(self, item: Received) -> None:
        with self._lock:
            self.received.append(item)

    def requests_with(self, event_id: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.headers.get("ce-id") == event_id]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        wait_until(predicate, timeout, "sink condition")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- payloads


def new_id() -> str:
    return uuid.uuid4().hex


def ndarray(values: Any) -> dict[str, Any]:
    """A SeldonMessage with ``data.ndarray``."""
    return {"data": {"ndarray": values}}


def tensor(shape: list[int], values: list[float]) -> dict[str, Any]:
    return {"data": {"tensor": {"shape": shape, "values": values}}}


def tftensor_content(array: np.ndarray, dtype: str = "DT_FLOAT") -> dict[str, Any]:
    """A TensorProto in protobuf JSON with base64 ``tensorContent``, as Seldon's encoder makes."""
    little = {"DT_FLOAT": "<f4", "DT_DOUBLE": "<f8", "DT_INT64": "<i8"}[dtype]
    content = base64.b64encode(np.asarray(array, dtype=little).tobytes()).decode()
    dims = [{"size": str(size)} for size in np.shape(array)]
    proto = {"dtype": dtype, "tensorShape": {"dim": dims}, "tensorContent": content}
    return {"data": {"tftensor": proto}}


def feedback(truth: Any, response: Any, **extra: Any) -> dict[str, Any]:
    """A Seldon Feedback body from ndarray values (or ready-made SeldonMessages)."""
    body = {
        "truth": truth if isinstance(truth, dict) else ndarray(truth),
        "response": response if isinstance(response, dict) else ndarray(response),
    }
    body.update(extra)
    return body


def ce_headers(
    event_id: str | None = None,
    *,
    source: str = "tests",
    event_type: str = FEEDBACK_TYPE,
    content_type: str = "application/json",
    **extensions: str,
) -> dict[str, str]:
    """Binary-mode CloudEvent headers as a Knative Broker would deliver them."""
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event_id or new_id(),
        "ce-source": source,
        "ce-type": event_type,
        "Content-Type": content_type,
    }
    headers.update({f"ce-{name}": value for name, value in extensions.items()})
    return headers


def structured(data: Any, event_id: str | None = None, **attributes: Any) -> dict[str, Any]:
    """A structured-mode CloudEvent document carrying ``data``."""
    event = {
        "specversion": "1.0",
        "id": event_id or new_id(),
        "source": "tests",
        "type": FEEDBACK_TYPE,
        "datacontenttype": "application/json",
        "data": data,
    }
    event.update(attributes)
    return event


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


# --------------------------------------------------------------------------- reading state


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
