"""Process management: start servers pinned to a core, wait for readiness, stop them by PID.

Every process the bench starts goes through `ProcessSet`, whose `stop_all` runs in a `finally`
(and on Ctrl-C / SIGTERM), so a failed or interrupted run never leaves servers behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import probe

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"


def free_port() -> int:
    """A port nothing listens on right now (bind to port 0 on loopback, then release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    """Prefix `argv` with `taskset -c cpu` (taskset execs, so the PID stays the server's)."""
    if cpu is None or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", str(cpu), *argv]


def pin_tree(pid: int, cpu: int | None) -> int:
    """Pin a started server `pid` and its children to `cpu` (a server that forks, like
    PostgreSQL's postmaster: its later children inherit it); returns how many were pinned."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return 0
    pinned_count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid"
            if int(stat.parent.name) == pid or ppid == pid:
                os.sched_setaffinity(int(stat.parent.name), {cpu})
                pinned_count += 1
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return pinned_count


def tree_env(tree: Path) -> dict[str, str]:
    """This environment with `tree` first on PYTHONPATH: a baseline server's imports come from
    its own tree (its cwd too, since `python -m` puts the cwd before PYTHONPATH), not ours."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    return env


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """Resident set size in MB from /proc/<pid>/status (VmRSS; VmHWM: its peak so far), None
    if unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def adserver_argv(
    port: int,
    storage_uri: str,
    state: str | None = "memory",
    state_dir: Path | None = None,
    reply_url: str | None = None,
    reply_ce: bool = False,
    model_name: str = "bench",
    max_ids: int = 0,
    max_rows: int = 0,
) -> list[str]:
    """The drop-in command line of our server (Seldon MetricsServer flags plus ours).

    `reply_ce` (implied by `reply_url`) sets --event_type/--event_source, which makes the server
    answer each event with a reply CloudEvent. `max_ids` / `max_rows`, when set, are its
    --dedup_max_ids / --join_max_rows (the state-age cases fill the tables to these bounds).
    """
    argv = listening_argv(model_name, port, storage_uri)
    if state is not None:
        argv += ["--state", state]
    if state_dir is not None:
        argv += ["--state_dir", str(state_dir)]
    if reply_url is not None:
        argv += ["--reply_url", reply_url]
    if reply_ce or reply_url is not None:
        argv += ["--event_type", "io.seldon.serving.feedback.metrics", "--event_source", "bench"]
    if max_ids:
        argv += ["--dedup_max_ids", str(max_ids)]
    if max_rows:
        argv += ["--join_max_rows", str(max_rows)]
    return [*argv, "MetricsServer"]


SEED_MODEL = "multiclassserver"


def listening_argv(model_name: str, port: int, storage_uri: str) -> list[str]:
    """The start of every command line of our server: the seed's first flags, on loopback."""
    return [
        sys.executable,
        "-m",
        "adserver",
        "--model_name",
        model_name,
        "--http_port",
        str(port),
        "--http_host",
        HOST,
        "--protocol",
        "seldonfeedback.http",
        "--storage_uri",
        storage_uri,
    ]


SEED_STORAGE_URI = "adserver.cm_models.multiclass_one_hot.MulticlassOneHot"


def seed_argv(
    port: int,
    state_dir: Path,
    reply_url: str,
    models_config: Path | None = None,
    flags: Sequence[str] = (),
    storage_uri: str = SEED_STORAGE_URI,
) -> list[str]:
    """The seed's container args (durable SQLite state by default, reply CloudEvents posted to
    `reply_url`), plus what a bench needs: a loopback address and a private state dir; and
    `--models_config` when given (the many-model variant), `flags` (the --auth flags of the
    seed-token and seed-oidc variants, seed-scores's --score_range 0,1), another
    `storage_uri` (seed-regression's model)."""
    models = [] if models_config is None else ["--models_config", str(models_config)]
    return [
        *listening_argv(SEED_MODEL, port, storage_uri),
        "--state_dir",
        str(state_dir),
        "--reply_url",
        reply_url,
        "--event_type",
        "io.seldon.serving.feedback.metrics",
        "--event_source",
        "io.seldon.serving.feedback",
        *models,
        *flags,
        "MetricsServer",
    ]


def floor_argv(port: int) -> list[str]:
    """Command line of the bare Tornado + json floor server."""
    return [sys.executable, str(BENCH_DIR / "floor_server.py"), "--port", str(port), "--host", HOST]


def sink_argv(port: int, delay: float) -> list[str]:
    """Command line of the slow reply sink."""
    return [
        sys.executable,
        str(BENCH_DIR / "sink.py"),
        "--port",
        str(port),
        "--host",
        HOST,
        "--delay",
        str(delay),
    ]


class StartError(RuntimeError):
    """A process exited or never answered 200 before its start-up deadline."""

    def __init__(self, name: str, message: str, log_tail: str, returncode: int | None) -> None:
        super().__init__(f"{name}: {message}\n--- log tail ---\n{log_tail}")
        self.name = name
        self.log_tail = log_tail
        self.returncode = returncode


@dataclass
class Managed:
    """A started process, its log file, and what we measured while starting it."""

    name: str
    argv: list[str]
    proc: subprocess.Popen
    log_path: Path
    port: int
    started_at: float
    start_to_ready_s: float | None = None
    rss_start_mb: float | None = None
    model: str | None = "bench"  # the model its counts are read under (None: every model's sum)
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ProcessSet:
    """Owns every child process of the bench; `stop_all` is safe to call any number of times."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[Managed] = []

    def start(
        self,
        name: str,
        argv: list[str],
        port: int,
        cpu: int | None,
        ready_path: str | None = "/v1/metrics",
        timeout_s: float = 30.0,
        model: str | None = "bench",
        tree: Path | None = None,
    ) -> Managed:
        """Start `argv` pinned to `cpu`; if `ready_path` is set, wait for the first 200 on it.

        `tree`: run it from that source tree (the --baseline export) instead of ours."""
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - the child owns it; closed on stop
        started_at = time.perf_counter()
        proc = subprocess.Popen(
            pinned(argv, cpu),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tree or REPO_ROOT,
            env=None if tree is None else tree_env(tree),
        )
        log.close()
        m = Managed(
            name=name,
            argv=argv,
            proc=proc,
            log_path=log_path,
            port=port,
            started_at=started_at,
            model=model,
        )
        self._procs.append(m)
        if ready_path is not None:
            self._wait_ready(m, ready_path, timeout_s)
        return m

    def _wait_ready(self, m: Managed, path: str, timeout_s: float) -> None:
        """Poll `path` every few ms; the time to the first 200 is a start-up figure we report."""
        url = m.base_url + path
        deadline = m.started_at + timeout_s
        while time.perf_counter() < deadline:
            if not m.alive():
                raise StartError(
                    m.name,
                    f"exited with code {m.proc.returncode} before ready",
                    m.log_tail(),
                    m.proc.returncode,
                )
            if probe.status(url, timeout_s=0.5) == 200:
                m.start_to_ready_s = time.perf_counter() - m.started_at
                m.rss_start_mb = rss_mb(m.pid)
                return
            time.sleep(0.005)
        self.stop(m)
        raise StartError(m.name, f"no 200 on {path} within {timeout_s:.0f} s", m.log_tail(), None)

    def stop(self, m: Managed, kill: bool = False, grace_s: float = 5.0) -> None:
        """SIGTERM (or SIGKILL) this one process by PID, escalate to SIGKILL after `grace_s`."""
        if m.alive():
            try:
                os.kill(m.pid, signal.SIGKILL if kill else signal.SIGTERM)
                m.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.kill(m.pid, signal.SIGKILL)
                m.proc.wait(timeout=grace_s)
            except ProcessLookupError:
                pass
        if m in self._procs:
            self._procs.remove(m)

    def pids(self) -> list[int]:
        """PIDs of the processes still running (to tell our CPU time from others')."""
        return [m.pid for m in self._procs if m.alive()]

    def stop_all(self) -> None:
        """Stop everything still running, newest first."""
        for m in reversed(list(self._procs)):
            try:
                self.stop(m)
            except (OSError, subprocess.SubprocessError) as exc:  # keep stopping the others
                print(f"warning: could not stop {m.name} (pid {m.pid}): {exc}", file=sys.stderr)
