"""Run wrk with bench/feedback.lua and parse the JSON line its done() prints.

wrk is the load generator because it is a small C program that costs the measured core nothing
(it runs pinned to the other core) and reports latency percentiles from an HDR-style histogram.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.servers import BENCH_DIR, pinned

LUA_SCRIPT = BENCH_DIR / "feedback.lua"
MARKER = "BENCH_JSON "


class WrkError(RuntimeError):
    """wrk failed, timed out, or printed no result line."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: counts from our Lua hooks plus wrk's own summary and latency percentiles."""

    duration_s: float
    requests: int  # completed responses (wrk)
    sent: int  # requests written (Lua request() calls)
    ok: int  # 2xx responses
    non2xx: int  # any other status
    non2xx_by_status: dict[str, int]  # e.g. {"500": 12}
    socket_errors: int  # connect + read + write + timeout
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @property
    def errors(self) -> int:
        """Everything that is not a 2xx answer."""
        return self.non2xx + self.socket_errors

    @property
    def ok_per_s(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0


def wrk_path() -> str | None:
    """Path of the wrk binary, None if not installed."""
    return shutil.which("wrk")


def parse(stdout: str) -> WrkResult:
    """Build a WrkResult from wrk's stdout (the BENCH_JSON line)."""
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            doc = json.loads(line[len(MARKER) :])
            break
    else:
        raise WrkError("wrk printed no BENCH_JSON line:\n" + stdout[-2000:])
    lat, err = doc["latency_us"], doc["errors"]
    return WrkResult(
        duration_s=doc["duration_us"] / 1e6,
        requests=doc["requests"],
        sent=doc["sent"],
        ok=doc["ok"],
        non2xx=doc["non2xx"],
        non2xx_by_status=doc.get("non2xx_by_status", {}),
        socket_errors=err["connect"] + err["read"] + err["write"] + err["timeout"],
        p50_ms=lat["p50"] / 1000.0,
        p90_ms=lat["p90"] / 1000.0,
        p99_ms=lat["p99"] / 1000.0,
        max_ms=lat["max"] / 1000.0,
        mean_ms=lat["mean"] / 1000.0,
    )


def run(
    url: str,
    payload: Path,
    id_prefix: str,
    connections: int,
    duration_s: int,
    cpu: int | None,
    request_timeout_s: int = 10,
    slack_s: float = 30.0,
    spread: int = 0,
    pause_ms: int = 0,
    token_file: Path | None = None,
) -> WrkResult:
    """Drive `url` for `duration_s` with `connections` connections on one thread, pinned to `cpu`.

    `spread` > 0 spreads the events over that many models and two endpoints (feedback.lua);
    `pause_ms` > 0 makes each connection wait that long before each request (a trickle);
    `token_file`: every request carries its token as `Authorization: Bearer`.

    The whole run is bounded: wrk is killed if it has not finished `slack_s` after its duration.
    """
    exe = wrk_path()
    if exe is None:
        raise WrkError("wrk not found: apt-get install -y --no-install-recommends wrk")
    argv = pinned(
        [
            exe,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, int(duration_s))}s",
            f"--timeout={request_timeout_s}s",
            "-s",
            str(LUA_SCRIPT),
            url,
            "--",
            str(payload),
            id_prefix,
            str(spread),
            str(pause_ms),
            str(token_file or ""),
        ],
        cpu,
    )
    try:
        proc = subprocess.run(
            argv,
            check=False,
            capture_output=True,
            text=True,
            timeout=duration_s + request_timeout_s + slack_s,
        )
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish within {exc.timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise WrkError(f"wrk exited {proc.returncode}: {proc.stderr.strip() or proc.stdout}")
    return parse(proc.stdout)
