"""A throw-away PostgreSQL server on loopback, for the tests and the benchmark.

``PostgresServer`` runs Debian's (or any) PostgreSQL binaries: ``initdb`` into a temporary
directory, then the postmaster itself as our child process (not daemonised by ``pg_ctl``), so
its PID is known from the start, it can be stopped, restarted or killed by that PID, and a crash
(``kill``) is the whole server dying at once, as when a container or machine goes down. It
listens on a free 127.0.0.1 port only, its Unix socket stays inside the temporary directory,
and ``fsync`` is on: tests that kill the server prove durability, not luck.

PostgreSQL refuses to run as root, so as root every program runs as ``nobody`` (``setpriv``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

SUPERUSER = "postgres"
UNPRIVILEGED = ("nobody", "nogroup")
# Small enough for a 2-core test machine running several clusters; fsync on for durability.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "127.0.0.1",
    "fsync": "on",
    "synchronous_commit": "on",
    "shared_buffers": "16MB",
    "max_connections": "100",
    "log_min_messages": "warning",
    "log_checkpoints": "off",
}
PROGRAMS = ("initdb", "postgres", "pg_isready")


def find_bindir() -> Path | None:
    """The directory of PostgreSQL's server programs: ``pg_config --bindir`` if it has them,
    else the newest /usr/lib/postgresql/<version>/bin (Debian puts them off PATH); None if none."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            output = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, check=True, text=True, timeout=10
            ).stdout
            candidates.append(Path(output.strip()))
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(
        (Path(p) for p in versions), key=lambda p: _version(p.parent.name), reverse=True
    )
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in PROGRAMS):
            return bindir
    return None


def _version(name: str) -> tuple[int, ...]:
    """``"15"`` -> (15,): newest first; a name without digits sorts last."""
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresError(RuntimeError):
    """The server could not be initialised or started; the message ends with its log."""


class PostgresServer:
    """One PostgreSQL cluster in its own temporary directory, removed by ``close``."""

    def __init__(
        self,
        bindir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        workdir: Path | None = None,
    ) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise PostgresError("no PostgreSQL server binaries (apt-get install postgresql)")
        self.bindir = found
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="postgres-"))
        self.datadir = self.workdir / "data"
        self.socketdir = self.workdir / "socket"
        self.logfile = self.workdir / "postgres.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._as_nobody = os.geteuid() == 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> PostgresServer:
        """Initialise the cluster on first use, start the postmaster, wait until it answers."""
        if self.process is not None and self.process.poll() is None:
            return self
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb()
        options = [f"-c{name}={value}" for name, value in self.settings.items()]
        argv = [
            str(self.bindir / "postgres"),
            "-D", str(self.datadir),
            "-p", str(self.port),
            "-k", str(self.socketdir),
            *options,
        ]  # fmt: skip
        with self.logfile.open("ab") as log:
            # Its own session: the postmaster and every backend share one process group, so a
            # crash (``kill``) takes them all down at once and leaves nothing behind.
            self.process = subprocess.Popen(
                self._as_owner(argv),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready(timeout)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: sessions rolled back, checkpoint written) by the postmaster's
        PID; immediate shutdown (SIGQUIT), then SIGKILL, if it does not exit in time."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGQUIT)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    self.kill()
        self._wait_group_gone(process.pid)
        self.process = None

    def kill(self) -> None:
        """Crash: SIGKILL the postmaster and every backend (its process group) at once, as when
        the machine dies. The next ``start`` runs crash recovery from the WAL."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        self._wait_group_gone(process.pid)
        self.process = None

    def restart(self, timeout: float = 60.0) -> None:
        """Stop (fast) and start again on the same port and data."""
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Stop the server and remove its directory (if this object made it: then nothing of
        it is kept, so it is killed rather than made to write its shutdown checkpoint)."""
        if self._own_workdir:
            self.kill()
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            self.stop()

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- clients -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs."""
        return self.process.pid if self.running and self.process else None

    @property
    def dsn(self) -> str:
        """A libpq URI for the default database ``postgres`` (as superuser, trust auth)."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """A libpq URI for ``database`` on this server (TCP on loopback, no password)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its DSN (needs psycopg)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn_for(name)

    def log(self, tail: int = 4000) -> str:
        """The end of the server's log: what to read when something fails."""
        with contextlib.suppress(OSError):
            return self.logfile.read_text(errors="replace")[-tail:]
        return ""

    # -- helpers -----------------------------------------------------------------------------

    def _as_owner(self, argv: list[str]) -> list[str]:
        """``argv`` run as the cluster's owner: ``nobody`` when we are root, else ourselves."""
        if not self._as_nobody:
            return argv
        user, group = UNPRIVILEGED
        return ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups", *argv]

    def _initdb(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socketdir.mkdir(exist_ok=True)
        if self._as_nobody:
            user, group = UNPRIVILEGED
            for path in (self.workdir, self.socketdir):
                shutil.chown(path, user, group)
        argv = [
            str(self.bindir / "initdb"),
            "-D", str(self.datadir),
            "-U", SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]  # fmt: skip
        with self.logfile.open("ab") as log:
            result = subprocess.run(
                self._as_owner(argv),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
            )
        if result.returncode != 0:
            raise PostgresError(f"initdb exited {result.returncode}:\n{self.log()}")

    def _wait_ready(self, timeout: float) -> None:
        """Poll ``pg_isready`` until the server accepts connections; fail with its log."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        probe = [
            str(self.bindir / "pg_isready"),
            "-h", "127.0.0.1",
            "-p", str(self.port),
            "-U", SUPERUSER,
            "-d", "postgres",
            "-q",
        ]  # fmt: skip
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise PostgresError(f"postgres exited {code}:\n{self.log()}")
            if subprocess.run(probe, stdin=subprocess.DEVNULL, check=False).returncode == 0:
                return
            time.sleep(0.1)
        self.kill()
        raise PostgresError(f"postgres not ready after {timeout}s:\n{self.log()}")

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
        """Wait until no process of the server's group is left (backends exit shortly after
        the postmaster; a restart must not find them still holding the shared memory)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
