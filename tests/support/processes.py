"""``python -m adserver`` as a child process on a free loopback port, stopped by its PID."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import requests

from adserver.settings import Settings
from tests.support.events import REPLY_SOURCE, REPLY_TYPE

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
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


def wait_ready(
    url: str,
    process: subprocess.Popen[bytes],
    stderr: Path,
    timeout: float,
    verify: str | bool = True,
) -> None:
    """Poll ``/health/ready`` until 200; fail with the server's stderr if it dies or hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {stderr.read_text()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url + "/health/ready", timeout=0.5, verify=verify).status_code == 200:
                return
        time.sleep(0.03)
    process.kill()
    process.wait(5)
    raise RuntimeError(f"server not ready after {timeout}s: {stderr.read_text()}")


def start_server(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 10.0, ca: Path | None = None
) -> ServerProcess:
    """A ready server on a free loopback port; ``args`` are extra flags before ``MetricsServer``.

    ``ca``: the server serves HTTPS (``args`` name its certificate) and is verified against it.

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
    url = f"{'https' if ca else 'http'}://127.0.0.1:{port}"
    try:
        wait_ready(url, process, stderr, timeout, str(ca) if ca else True)
    except RuntimeError:
        ServerProcess(url, process, stderr, state_dir).cleanup()
        raise
    return ServerProcess(url, process, stderr, state_dir)


@dataclass
class ServerFactory:
    """Starts servers on demand and stops all of them (in parallel) at teardown."""

    started: list[ServerProcess] = field(default_factory=list)

    def __call__(
        self, *args: str, env: Mapping[str, str] | None = None, ca: Path | None = None
    ) -> ServerProcess:
        server = start_server(*args, env=env, ca=ca)
        self.started.append(server)
        return server

    def close(self) -> None:
        for server in self.started:
            server.terminate()
        for server in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait()
            server.cleanup()
