"""Run the whole benchmark: floor server, our server (memory, sqlite, reply sinks), scrape timing.

Usage: python -m bench [--duration 10] [--smoke] [--json out.json]   (see bench/README.md)

Exit status: 0 when every server started and answered 2xx and counted exactly the rows it
acknowledged; 1 otherwise (targets never change the exit status: they are reported).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import payloads, probe, report, servers, targets, wrk
from bench.results import BenchResults, CaseResult, ScrapeResult, ServerResult

ONE_HOT = "cm_models.multiclass_one_hot.MulticlassOneHot"
NUMERIC = "cm_models.multiclass_numeric.MultiClassNumeric"
SCRAPE_CLASSES = 100

Grid = list[tuple[int, int]]  # (rows per request, connections)


@dataclass(frozen=True)
class Plan:
    """What to run; `--smoke` picks a short plan that still checks every row count."""

    mode: str
    duration_s: int
    warmup_s: int
    grid: Grid          # floor and memory server
    durable_grid: Grid  # sqlite server
    sink_grid: Grid     # reply-sink variants
    servers: tuple[str, ...]
    scrape_events: int
    scrapes: int
    sink_delay_s: float


ALL_SERVERS = ("floor", "memory", "sqlite", "sink200", "deadsink", "scrape")
FULL_GRID: Grid = [(1, 1), (1, 16), (100, 1), (100, 16), (1000, 1), (1000, 16)]
SMOKE_GRID: Grid = [(1, 1), (1, 16), (1000, 16)]


def make_plan(args: argparse.Namespace) -> Plan:
    """Translate CLI flags into a Plan."""
    chosen = tuple(s for s in ALL_SERVERS if s in set(args.servers.split(","))) \
        if args.servers else ALL_SERVERS
    if args.smoke:
        return Plan("smoke", args.duration or 1, args.warmup if args.warmup is not None else 1,
                    SMOKE_GRID, [(1, 16)], [(1, 16)], chosen, 5, 10, args.sink_delay)
    return Plan("full", args.duration or 10, args.warmup if args.warmup is not None else 2,
                FULL_GRID, FULL_GRID, [(1, 1), (1, 16)], chosen, 5, args.scrapes,
                args.sink_delay)


def machine_info() -> dict:
    """Where the figures come from: CPU, core count, versions, date, commit."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    def out(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10,
                               cwd=servers.REPO_ROOT)
        except (OSError, subprocess.SubprocessError):
            return "?"
        lines = (p.stdout or p.stderr).strip().splitlines()
        return lines[0] if lines else "?"
    import numpy
    import tornado
    return {
        "cpu_model": model, "nproc": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "date": _dt.datetime.now().astimezone().isoformat(
            timespec="seconds"),
        "wrk": out(["wrk", "-v"]).replace("wrk ", "").split(" [")[0] if wrk.wrk_path() else None,
        "tornado": tornado.version, "numpy": numpy.__version__,
        "git_commit": out(["git", "rev-parse", "--short", "HEAD"]),
    }


def row_check(counted: int, events: int, res: wrk.WrkResult, rows: int) -> tuple[bool, str]:
    """Every acknowledged row counted, none counted twice, events whole.

    Bounds, not equality: when wrk stops it abandons up to `-c` requests in flight, which the
    server may still count although nobody saw the answer. So acked <= counted <= sent.
    """
    acked, sent = res.ok * rows, res.sent * rows
    if counted < acked:
        return False, f"LOST {acked - counted} acked rows (counted {counted}, acked {acked})"
    if counted > sent:
        return False, f"OVERCOUNT: counted {counted} rows > {sent} sent"
    if counted % rows:
        return False, f"PARTIAL event: counted {counted} rows, not a multiple of {rows}"
    if not res.ok <= events <= res.sent:
        return False, f"events counted {events} outside [{res.ok} acked, {res.sent} sent]"
    extra = counted - acked
    if extra == 0:
        return True, f"ok: {counted} counted = {acked} acked"
    return True, f"ok: {counted} counted = {acked} acked + {extra} in flight"


def _last_log_message(log: str, limit: int = 160) -> str:
    """Last log line, or its "message" field when the server logs JSON lines."""
    lines = log.strip().splitlines()
    if not lines:
        return ""
    last = lines[-1]
    with contextlib.suppress(ValueError, AttributeError):
        last = str(json.loads(last).get("message", last))
    return last[:limit]


class Runner:
    """Runs the plan against started servers and collects results and failures."""

    def __init__(self, plan: Plan, ps: servers.ProcessSet, work: Path,
                 server_cpu: int | None, load_cpu: int | None, results: BenchResults) -> None:
        self.plan, self.ps, self.work = plan, ps, work
        self.server_cpu, self.load_cpu = server_cpu, load_cpu
        self.r = results
        self.payloads = payloads.write_payloads(work / "payloads")

    def fail(self, msg: str) -> None:
        print(f"FAIL: {msg}", file=sys.stderr, flush=True)
        self.r.failures.append(msg)

    # -- one case -------------------------------------------------------------------------------
    def run_case(self, name: str, m: servers.Managed, rows: int, conns: int,
                 counted: bool) -> CaseResult:
        """Warm up, measure, and (for our server) check rows counted against rows acknowledged."""
        payload = self.payloads[rows]
        url = m.base_url + "/"
        tag = uuid.uuid4().hex[:8]
        before = probe.stable_counts(m.base_url) if counted else None
        warm = wrk.run(url, payload.path, f"{name}-{rows}x{conns}-w{tag}", conns,
                       self.plan.warmup_s, self.load_cpu) if self.plan.warmup_s > 0 else None
        mid = probe.stable_counts(m.base_url) if counted else None
        res = wrk.run(url, payload.path, f"{name}-{rows}x{conns}-m{tag}", conns,
                      self.plan.duration_s, self.load_cpu)
        after = probe.stable_counts(m.base_url) if counted else None
        c = CaseResult(server=name, rows=rows, connections=conns, duration_s=res.duration_s,
                       req_s=res.ok_per_s, rows_s=res.ok_per_s * rows, p50_ms=res.p50_ms,
                       p90_ms=res.p90_ms, p99_ms=res.p99_ms, max_ms=res.max_ms, ok=res.ok,
                       sent=res.sent, non2xx=res.non2xx, socket_errors=res.socket_errors)
        label = f"{name} {c.case}"
        if counted and before and mid and after:
            c.counted_rows, c.counted_events = after.rows - mid.rows, after.events - mid.events
            c.counted_rows_s = c.counted_rows / res.duration_s if res.duration_s else None
            c.check_ok, c.check = row_check(c.counted_rows, c.counted_events, res, rows)
            if not c.check_ok:
                self.fail(f"{label}: {c.check}")
            if warm is not None:
                ok, c.warmup_check = row_check(mid.rows - before.rows, mid.events - before.events,
                                               warm, rows)
                if not ok:
                    self.fail(f"{label} warm-up: {c.warmup_check}")
        for phase, wr in (("warm-up", warm), ("measured", res)):
            if wr is not None and (wr.errors or wr.ok == 0):
                self.fail(f"{label} {phase}: {wr.ok} 2xx, {wr.non2xx} non-2xx, "
                          f"{wr.socket_errors} socket errors")
        self.r.cases.append(c)
        print(f"  {label:<22} {c.req_s:9.0f} req/s {c.rows_s:10.0f} rows/s  p50 {c.p50_ms:7.2f}"
              f" ms  p99 {c.p99_ms:7.2f} ms  {c.check}", flush=True)
        return c

    # -- one server -----------------------------------------------------------------------------
    def start(self, name: str, argv: list[str], port: int, sr: ServerResult,
              may_reject: tuple[str, ...] = ()) -> servers.Managed | None:
        """Start a server; a start failure is a failure unless its log names a rejected flag."""
        try:
            m = self.ps.start(name, argv, port, self.server_cpu)
        except servers.StartError as exc:
            tail = exc.log_tail.lower()
            if exc.returncode is not None and any(w in tail for w in may_reject):
                sr.status = "skipped: server rejected the flags"
                sr.notes.append(_last_log_message(exc.log_tail))
                print(f"SKIP {name}: server rejected {' '.join(argv[-6:])}\n{exc.log_tail}",
                      file=sys.stderr)
            else:
                sr.status = "failed: did not start"
                self.fail(str(exc))
            return None
        sr.pid, sr.start_to_ready_s, sr.rss_start_mb = m.pid, m.start_to_ready_s, m.rss_start_mb
        print(f"{name}: pid {m.pid}, first 200 after {m.start_to_ready_s:.3f} s, "
              f"RSS {m.rss_start_mb or 0:.1f} MB", flush=True)
        return m

    def run_grid(self, name: str, m: servers.Managed, grid: Grid, counted: bool,
                 sr: ServerResult) -> None:
        """All cases of one server; stop early if it dies."""
        for rows, conns in grid:
            if not m.alive():
                sr.status = f"failed: exited with code {m.proc.returncode}"
                self.fail(f"{name} exited (code {m.proc.returncode}) during the run:\n"
                          f"{m.log_tail()}")
                return
            try:
                self.run_case(name, m, rows, conns, counted)
            except (wrk.WrkError, OSError, RuntimeError) as exc:
                self.fail(f"{name} {rows} rows c{conns}: {exc}")
        sr.rss_after_mb = servers.rss_mb(m.pid)
        if not m.alive():
            sr.status = f"failed: exited with code {m.proc.returncode}"
            self.fail(f"{name} exited (code {m.proc.returncode}):\n{m.log_tail()}")

    def bench_server(self, name: str, argv_for: Callable[[int], list[str]], grid: Grid,
                     counted: bool = True,
                     may_reject: tuple[str, ...] = ()) -> servers.Managed | None:
        """Start, run the grid, leave running (caller stops); returns the process or None."""
        port = servers.free_port()
        argv = argv_for(port)
        sr = ServerResult(name=name, argv=argv)
        self.r.servers.append(sr)
        m = self.start(name, argv, port, sr, may_reject)
        if m is not None:
            self.run_grid(name, m, grid, counted, sr)
        return m

    # -- the plan -------------------------------------------------------------------------------
    def run(self) -> None:
        """Every server in the plan, one at a time, so each has the measured core to itself."""
        p = self.plan
        if "floor" in p.servers:
            m = self.bench_server("floor", servers.floor_argv, p.grid, counted=False)
            if m:
                self.ps.stop(m)
        if "memory" in p.servers:
            m = self.bench_server("memory", lambda port: servers.adserver_argv(port, ONE_HOT),
                                  p.grid)
            if m:
                self.ps.stop(m)
        if "sqlite" in p.servers:
            self.run_durable()
        if "sink200" in p.servers:
            sink_port = servers.free_port()
            try:
                sink = self.ps.start("sink", servers.sink_argv(sink_port, p.sink_delay_s),
                                     sink_port, self.load_cpu, ready_path="/stats")
            except servers.StartError as exc:
                self.fail(str(exc))
            else:
                reply = f"http://{servers.HOST}:{sink_port}/"
                m = self.bench_server("sink200", lambda port: servers.adserver_argv(
                    port, ONE_HOT, reply_url=reply), p.sink_grid)
                if m:
                    self.ps.stop(m)
                self.note_sink(sink)
                self.ps.stop(sink)
        if "deadsink" in p.servers:
            dead = f"http://{servers.HOST}:{servers.free_port()}/"
            m = self.bench_server("deadsink", lambda port: servers.adserver_argv(
                port, ONE_HOT, reply_url=dead), p.sink_grid)
            if m:
                self.ps.stop(m)
        if "scrape" in p.servers:
            self.run_scrape()

    def note_sink(self, sink: servers.Managed) -> None:
        """How many replies reached the slow sink (information: replies are best effort)."""
        sr = self.r.server("sink200")
        try:
            code, body = probe.request(sink.base_url + "/stats")
            if sr and code == 200:
                sr.notes.append(f"sink received {body.decode().strip()}")
        except OSError as exc:
            print(f"warning: sink stats: {exc}", file=sys.stderr)

    def run_durable(self) -> None:
        """sqlite mode, then kill -9 and restart on the same state dir: acked rows must survive."""
        state_dir = self.work / "state"
        state_dir.mkdir(exist_ok=True)

        def argv_for(port: int) -> list[str]:
            return servers.adserver_argv(port, ONE_HOT, state="sqlite", state_dir=state_dir)

        m = self.bench_server("sqlite", argv_for, self.plan.durable_grid,
                              may_reject=("sqlite", "--state", "state_dir", "unrecognized",
                                          "invalid choice"))
        if m is None:
            return
        sr = self.r.server("sqlite")
        acked = sum(c.ok * c.rows for c in self.r.cases if c.server == "sqlite")
        try:
            before = probe.stable_counts(m.base_url)
        except (OSError, RuntimeError) as exc:
            self.fail(f"sqlite: cannot read counts before restart: {exc}")
            self.ps.stop(m)
            return
        self.ps.stop(m, kill=True)
        port = servers.free_port()
        try:
            m2 = self.ps.start("sqlite-restart", argv_for(port), port, self.server_cpu)
        except servers.StartError as exc:
            self.fail(f"sqlite restart after kill -9: {exc}")
            return
        try:
            after = probe.stable_counts(m2.base_url)
        finally:
            self.ps.stop(m2)
        note = (f"kill -9 + restart: {after.rows} rows after, {before.rows} before, measured "
                f"runs acked {acked}; restart to first 200 {m2.start_to_ready_s:.3f} s")
        if sr:
            sr.notes.append(note)
        print(f"  sqlite {note}", flush=True)
        if after.rows < acked:
            self.fail(f"sqlite lost acknowledged rows over kill -9: {note}")
        elif after.rows > before.rows:
            self.fail(f"sqlite has more rows after restart than before: {note}")

    def run_scrape(self) -> None:
        """Fill a 100-class confusion matrix (MultiClassNumeric), then time text scrapes."""
        port = servers.free_port()
        argv = servers.adserver_argv(port, NUMERIC)
        sr = ServerResult(name="scrape", argv=argv)
        self.r.servers.append(sr)
        m = self.start("scrape", argv, port, sr)
        if m is None:
            return
        try:
            acked = 0
            for shift in range(self.plan.scrape_events):
                body = payloads.numeric_feedback(SCRAPE_CLASSES, shift)
                code = probe.post_event(m.base_url, body, f"scrape-{uuid.uuid4().hex}")
                if 200 <= code < 300:
                    acked += 1
                else:
                    self.fail(f"scrape server answered {code} to a 100-class event")
            counts = probe.stable_counts(m.base_url)
            if counts.rows != acked * SCRAPE_CLASSES:
                self.fail(f"scrape server counted {counts.rows} rows, acked "
                          f"{acked * SCRAPE_CLASSES}")
            t = probe.time_scrapes(m.base_url, self.plan.scrapes)
            self.r.scrape = ScrapeResult(classes=SCRAPE_CLASSES, events=acked,
                                         rows_counted=counts.rows, scrapes=t.n,
                                         median_ms=t.median_ms, p90_ms=t.p90_ms,
                                         max_ms=t.max_ms, body_bytes=t.body_bytes,
                                         samples=t.samples)
            sr.rss_after_mb = servers.rss_mb(m.pid)
            print(f"  scrape: median {t.median_ms:.2f} ms over {t.n}, {t.samples} samples",
                  flush=True)
        except (OSError, RuntimeError) as exc:
            self.fail(f"scrape: {exc}")
        finally:
            self.ps.stop(m)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(
        "Benchmark the feedback-metrics server against a bare Tornado+json floor server."))
    parser.add_argument("--duration", type=int, default=None,
                        help="seconds per measured run (default 10, smoke 1; wrk takes whole s)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="seconds of warm-up before each measured run (default 2, smoke 1)")
    parser.add_argument("--smoke", action="store_true",
                        help="short run, fewer cases; still checks every row count")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables")
    parser.add_argument("--servers", default="",
                        help=f"comma list, subset of {','.join(ALL_SERVERS)} (default all)")
    parser.add_argument("--server-cpu", type=int, default=0, help="core for servers (taskset)")
    parser.add_argument("--load-cpu", type=int, default=1, help="core for wrk and the bench")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    parser.add_argument("--scrapes", type=int, default=50, help="scrapes to time (median)")
    parser.add_argument("--sink-delay", type=float, default=0.2, help="reply sink delay, s")
    return parser.parse_args(argv)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the plan; print and optionally save the report; 0 only if nothing failed."""
    args = parse_args(argv)
    plan = make_plan(args)
    if wrk.wrk_path() is None:
        print("wrk not found: apt-get update && apt-get install -y --no-install-recommends wrk",
              file=sys.stderr)
        return 2
    server_cpu: int | None = args.server_cpu
    load_cpu: int | None = args.load_cpu
    avail = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if args.no_pin or not {args.server_cpu, args.load_cpu} <= avail \
            or args.server_cpu == args.load_cpu:
        if not args.no_pin:
            print(f"warning: cores {args.server_cpu},{args.load_cpu} not both available "
                  f"({sorted(avail)}): not pinning", file=sys.stderr)
        server_cpu = load_cpu = None
    else:
        os.sched_setaffinity(0, {args.load_cpu})  # the bench itself stays off the server's core
    results = BenchResults(machine=machine_info(), params={
        **asdict(plan), "server_cpu": server_cpu,
        "load_cpu": load_cpu})
    signal.signal(signal.SIGTERM, _raise_interrupt)
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        ps = servers.ProcessSet(Path(tmp))
        try:
            Runner(plan, ps, Path(tmp), server_cpu, load_cpu, results).run()
        except KeyboardInterrupt:
            interrupted = True
            results.failures.append("interrupted")
            print("interrupted: stopping servers", file=sys.stderr)
        finally:
            ps.stop_all()
    results.targets = targets.evaluate(results)
    text = report.render(results)
    print()
    print(text)
    if args.json:
        report.write_json(results, args.json)
    if args.markdown:
        args.markdown.write_text(text)
    if interrupted:
        return 130
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
