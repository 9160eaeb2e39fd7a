"""Run the whole benchmark: floor server, our server (memory, sqlite, reply sinks), scrape timing.

Usage: python -m bench [--duration 10] [--smoke] [--json out.json]   (see bench/README.md)

Exit status: 0 when every server started and answered 2xx and counted exactly the rows it
acknowledged; 1 otherwise (targets never change the exit status: they are reported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import machine, payloads, probe, report, servers, targets, wrk
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
    grid: Grid  # floor and memory server
    durable_grid: Grid  # sqlite server
    sink_grid: Grid  # reply-sink variants
    servers: tuple[str, ...]
    scrape_events: int
    scrapes: int
    sink_delay_s: float


ALL_SERVERS = ("floor", "memory", "sqlite", "replyce", "sink200", "deadsink", "scrape")
SMOKE_SERVERS = ("floor", "memory", "sqlite", "replyce", "sink200", "deadsink", "scrape")
FULL_GRID: Grid = [(1, 1), (1, 16), (100, 1), (100, 16), (1000, 1), (1000, 16)]
SQLITE_REJECT = ("sqlite", "--state", "state_dir", "unrecognized", "invalid choice")
SMOKE_GRID: Grid = [(1, 1), (1, 16), (1000, 16)]


def make_plan(args: argparse.Namespace) -> Plan:
    """Translate CLI flags into a Plan."""
    default = SMOKE_SERVERS if args.smoke else ALL_SERVERS
    chosen = (
        tuple(s for s in ALL_SERVERS if s in set(args.servers.split(",")))
        if args.servers
        else default
    )
    if args.smoke:
        return Plan(
            "smoke",
            args.duration or 1,
            args.warmup if args.warmup is not None else 1,
            SMOKE_GRID,
            [(1, 16)],
            [(1, 16)],
            chosen,
            5,
            10,
            args.sink_delay,
        )
    return Plan(
        "full",
        args.duration or 10,
        args.warmup if args.warmup is not None else 2,
        FULL_GRID,
        FULL_GRID,
        [(1, 1), (1, 16)],
        chosen,
        5,
        args.scrapes,
        args.sink_delay,
    )


def row_check(counted: int, events: int, res: wrk.WrkResult, rows: int) -> tuple[bool, str]:
    """Every acknowledged row counted, none counted twice, events whole.

    Bounds, not equality: when wrk stops it abandons up to `-c` requests in flight (sent, never
    answered), which the server may still count although nobody saw the answer. So
    acked <= counted <= acked + unanswered. An event answered with a non-2xx must not be counted:
    the sender will redeliver it, and a counted one would then be counted twice.
    """
    acked, sent = res.ok * rows, res.sent * rows
    unanswered = max(0, res.sent - res.requests)
    upper = (res.ok + unanswered) * rows
    if counted < acked:
        return False, f"LOST {acked - counted} acked rows (counted {counted}, acked {acked})"
    if counted > sent:
        return False, f"OVERCOUNT: counted {counted} rows > {sent} sent"
    if counted > upper:
        return False, (
            f"COUNTED REJECTED: {counted} rows counted > {acked} acked + "
            f"{unanswered * rows} unanswered; {res.non2xx} events answered non-2xx "
            f"{res.non2xx_by_status} were counted anyway (a redelivery double counts)"
        )
    if counted % rows:
        return False, f"PARTIAL event: counted {counted} rows, not a multiple of {rows}"
    if not res.ok <= events <= res.ok + unanswered:
        return False, f"events counted {events} outside [{res.ok}, {res.ok + unanswered}]"
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

    def __init__(
        self,
        plan: Plan,
        ps: servers.ProcessSet,
        work: Path,
        server_cpu: int | None,
        load_cpu: int | None,
        results: BenchResults,
        retry_noisy: int = 0,
    ) -> None:
        self.plan, self.ps, self.work = plan, ps, work
        self.retry_noisy = retry_noisy
        self.server_cpu, self.load_cpu = server_cpu, load_cpu
        self.r = results
        self.payloads = payloads.write_payloads(work / "payloads")

    def fail(self, msg: str) -> None:
        print(f"FAIL: {msg}", file=sys.stderr, flush=True)
        self.r.failures.append(msg)

    # -- one case -------------------------------------------------------------------------------
    def run_case(
        self, name: str, m: servers.Managed, rows: int, conns: int, counted: bool
    ) -> CaseResult:
        """Measure one case; rerun it (up to --retry-noisy times) if others used the CPU."""
        acked_rows = 0
        for attempt in range(self.retry_noisy + 1):
            c = self.measure(name, m, rows, conns, counted)
            acked_rows += (c.ok + c.warmup_ok) * rows
            if (c.other_cpu_pct or 0) < machine.NOISY_PCT or attempt == self.retry_noisy:
                break
            print(
                f"  (other processes used {c.other_cpu_pct:.0f}% of a core: waiting for quiet "
                f"and rerunning)",
                flush=True,
            )
            machine.wait_quiet(120.0, machine.NOISY_PCT)
        c.attempts, c.acked_rows_all = attempt + 1, acked_rows
        self.r.cases.append(c)
        return c

    def measure(
        self, name: str, m: servers.Managed, rows: int, conns: int, counted: bool
    ) -> CaseResult:
        """Warm up, measure, and (for our server) check rows counted against rows acknowledged."""
        payload = self.payloads[rows]
        url = m.base_url + "/"
        tag = uuid.uuid4().hex[:8]
        before = probe.stable_counts(m.base_url) if counted else None
        warm = (
            wrk.run(
                url,
                payload.path,
                f"{name}-{rows}x{conns}-w{tag}",
                conns,
                self.plan.warmup_s,
                self.load_cpu,
            )
            if self.plan.warmup_s > 0
            else None
        )
        mid = probe.stable_counts(m.base_url) if counted else None
        meter = machine.CpuMeter(pids=self.ps.pids()).start()
        res = wrk.run(
            url,
            payload.path,
            f"{name}-{rows}x{conns}-m{tag}",
            conns,
            self.plan.duration_s,
            self.load_cpu,
        )
        other_pct = meter.other_pct()
        after = probe.stable_counts(m.base_url) if counted else None
        c = CaseResult(
            server=name,
            rows=rows,
            connections=conns,
            duration_s=res.duration_s,
            req_s=res.ok_per_s,
            rows_s=res.ok_per_s * rows,
            p50_ms=res.p50_ms,
            p90_ms=res.p90_ms,
            p99_ms=res.p99_ms,
            max_ms=res.max_ms,
            ok=res.ok,
            sent=res.sent,
            non2xx=res.non2xx,
            non2xx_by_status=res.non2xx_by_status,
            socket_errors=res.socket_errors,
        )
        c.warmup_ok = warm.ok if warm is not None else 0
        c.other_cpu_pct = other_pct
        label = f"{name} {c.case}"
        if counted and before and mid and after:
            c.counted_rows, c.counted_events = after.rows - mid.rows, after.events - mid.events
            c.counted_rows_s = c.counted_rows / res.duration_s if res.duration_s else None
            c.check_ok, c.check = row_check(c.counted_rows, c.counted_events, res, rows)
            if not c.check_ok:
                self.fail(f"{label}: {c.check}")
            if warm is not None:
                ok, c.warmup_check = row_check(
                    mid.rows - before.rows, mid.events - before.events, warm, rows
                )
                if not ok:
                    self.fail(f"{label} warm-up: {c.warmup_check}")
        for phase, wr in (("warm-up", warm), ("measured", res)):
            if wr is not None and (wr.errors or wr.ok == 0):
                self.fail(
                    f"{label} {phase}: {wr.ok} 2xx, {wr.non2xx} non-2xx "
                    f"{wr.non2xx_by_status or ''}, "
                    f"{wr.socket_errors} socket errors"
                )
        print(
            f"  {label:<22} {c.req_s:9.0f} req/s {c.rows_s:10.0f} rows/s  p50 {c.p50_ms:7.2f}"
            f" ms  p99 {c.p99_ms:7.2f} ms  other CPU {other_pct:3.0f}%  {c.check}",
            flush=True,
        )
        return c

    # -- one server -----------------------------------------------------------------------------
    def start(
        self,
        name: str,
        argv: list[str],
        port: int,
        sr: ServerResult,
        may_reject: tuple[str, ...] = (),
    ) -> servers.Managed | None:
        """Start a server; a start failure is a failure unless its log names a rejected flag."""
        try:
            m = self.ps.start(name, argv, port, self.server_cpu)
        except servers.StartError as exc:
            tail = exc.log_tail.lower()
            if exc.returncode is not None and any(w in tail for w in may_reject):
                sr.status = "skipped: server rejected the flags"
                sr.notes.append(_last_log_message(exc.log_tail))
                print(
                    f"SKIP {name}: server rejected {' '.join(argv[-6:])}\n{exc.log_tail}",
                    file=sys.stderr,
                )
            else:
                sr.status = "failed: did not start"
                self.fail(str(exc))
            return None
        sr.pid, sr.start_to_ready_s, sr.rss_start_mb = m.pid, m.start_to_ready_s, m.rss_start_mb
        print(
            f"{name}: pid {m.pid}, first 200 after {m.start_to_ready_s:.3f} s, "
            f"RSS {m.rss_start_mb or 0:.1f} MB",
            flush=True,
        )
        return m

    def launch(
        self,
        name: str,
        argv_for: Callable[[int], list[str]],
        may_reject: tuple[str, ...] = (),
    ) -> servers.Managed | None:
        """Start one server and record its start-up figures; None if it did not start."""
        port = servers.free_port()
        argv = argv_for(port)
        sr = ServerResult(name=name, argv=argv)
        self.r.servers.append(sr)
        return self.start(name, argv, port, sr, may_reject)

    def check_alive(self, name: str, m: servers.Managed) -> bool:
        """False (and a failure recorded once) if the server has exited."""
        if m.alive():
            return True
        sr = self.r.server(name)
        if sr and not sr.status.startswith("failed"):
            sr.status = f"failed: exited with code {m.proc.returncode}"
            self.fail(f"{name} exited (code {m.proc.returncode}) during the run:\n{m.log_tail()}")
        return False

    # -- the plan -------------------------------------------------------------------------------
    def run(self) -> None:
        """Start every server of the plan, then run each case on each server back to back.

        All servers sit on the measured core, but only the one under load does any work. Running
        the floor and our variants of one case next to each other in time keeps their ratios
        honest when the machine's background load drifts during a long run.
        """
        p = self.plan
        sink: servers.Managed | None = None
        variants: list[tuple[str, Callable[[int], list[str]], Grid, bool, tuple[str, ...]]] = []
        if "floor" in p.servers:
            variants.append(("floor", servers.floor_argv, p.grid, False, ()))
        if "memory" in p.servers:
            variants.append(
                ("memory", lambda port: servers.adserver_argv(port, ONE_HOT), p.grid, True, ())
            )
        if "sqlite" in p.servers:
            variants.append(("sqlite", self.sqlite_argv, p.durable_grid, True, SQLITE_REJECT))
        if "replyce" in p.servers:  # reply CloudEvent in the answer, no sink: isolates its cost
            variants.append(
                (
                    "replyce",
                    lambda port: servers.adserver_argv(port, ONE_HOT, reply_ce=True),
                    p.sink_grid,
                    True,
                    (),
                )
            )
        if "sink200" in p.servers:
            sink_port = servers.free_port()
            try:
                sink = self.ps.start(
                    "sink",
                    servers.sink_argv(sink_port, p.sink_delay_s),
                    sink_port,
                    self.load_cpu,
                    ready_path="/stats",
                )
            except servers.StartError as exc:
                self.fail(str(exc))
            else:
                reply = f"http://{servers.HOST}:{sink_port}/"
                variants.append(
                    (
                        "sink200",
                        lambda port: servers.adserver_argv(port, ONE_HOT, reply_url=reply),
                        p.sink_grid,
                        True,
                        (),
                    )
                )
        if "deadsink" in p.servers:
            dead = f"http://{servers.HOST}:{servers.free_port()}/"
            variants.append(
                (
                    "deadsink",
                    lambda port: servers.adserver_argv(port, ONE_HOT, reply_url=dead),
                    p.sink_grid,
                    True,
                    (),
                )
            )

        started: dict[str, servers.Managed] = {}
        for name, argv_for, _grid, _counted, may_reject in variants:
            m = self.launch(name, argv_for, may_reject)
            if m is not None:
                started[name] = m

        cases = sorted({case for v in variants for case in v[2]}, key=FULL_GRID.index)
        for rows, conns in cases:
            for name, _argv_for, grid, counted, _rej in variants:
                m = started.get(name)
                if m is None or (rows, conns) not in grid or not self.check_alive(name, m):
                    continue
                try:
                    self.run_case(name, m, rows, conns, counted)
                except (wrk.WrkError, OSError, RuntimeError) as exc:
                    self.fail(f"{name} {rows} rows c{conns}: {exc}")

        for name, m in started.items():
            sr = self.r.server(name)
            if sr and self.check_alive(name, m):
                sr.rss_after_mb = servers.rss_mb(m.pid)
        if sink is not None:
            self.note_sink(sink)
        for name, m in started.items():
            if name == "sqlite" and m.alive():
                self.check_durable(m)
            else:
                self.ps.stop(m)
        if sink is not None:
            self.ps.stop(sink)
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

    def sqlite_argv(self, port: int) -> list[str]:
        """Durable mode on a state dir private to this run."""
        state_dir = self.work / "state"
        state_dir.mkdir(exist_ok=True)
        return servers.adserver_argv(port, ONE_HOT, state="sqlite", state_dir=state_dir)

    def check_durable(self, m: servers.Managed) -> None:
        """kill -9 the sqlite server and restart it on the same dir: acked rows must survive."""
        sr = self.r.server("sqlite")
        acked = sum(c.acked_rows_all for c in self.r.cases if c.server == "sqlite")
        try:
            before = probe.stable_counts(m.base_url)
        except (OSError, RuntimeError) as exc:
            self.fail(f"sqlite: cannot read counts before restart: {exc}")
            self.ps.stop(m)
            return
        self.ps.stop(m, kill=True)
        port = servers.free_port()
        try:
            m2 = self.ps.start("sqlite-restart", self.sqlite_argv(port), port, self.server_cpu)
        except servers.StartError as exc:
            self.fail(f"sqlite restart after kill -9: {exc}")
            return
        try:
            after = probe.stable_counts(m2.base_url)
        finally:
            self.ps.stop(m2)
        note = (
            f"kill -9 + restart: {after.rows} rows after, {before.rows} before, {acked} "
            f"acked; restart to first 200 {m2.start_to_ready_s:.3f} s"
        )
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
                self.fail(
                    f"scrape server counted {counts.rows} rows, acked {acked * SCRAPE_CLASSES}"
                )
            t = probe.time_scrapes(m.base_url, self.plan.scrapes)
            self.r.scrape = ScrapeResult(
                classes=SCRAPE_CLASSES,
                events=acked,
                rows_counted=counts.rows,
                scrapes=t.n,
                median_ms=t.median_ms,
                p90_ms=t.p90_ms,
                max_ms=t.max_ms,
                body_bytes=t.body_bytes,
                samples=t.samples,
            )
            sr.rss_after_mb = servers.rss_mb(m.pid)
            print(
                f"  scrape: median {t.median_ms:.2f} ms over {t.n}, {t.samples} samples", flush=True
            )
        except (OSError, RuntimeError) as exc:
            self.fail(f"scrape: {exc}")
        finally:
            self.ps.stop(m)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark the feedback-metrics server against a bare Tornado+json floor server."
        ),
    )
    parser.add_argument(
        "--duration",
        type=int,
        default=None,
        help="seconds per measured run (default 10, smoke 1; wrk takes whole s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="seconds of warm-up before each measured run (default 2, smoke 1)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="short run, fewer cases; still checks every row count"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables")
    parser.add_argument(
        "--servers", default="", help=f"comma list, subset of {','.join(ALL_SERVERS)} (default all)"
    )
    parser.add_argument("--server-cpu", type=int, default=0, help="core for servers (taskset)")
    parser.add_argument("--load-cpu", type=int, default=1, help="core for wrk and the bench")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    parser.add_argument("--scrapes", type=int, default=50, help="scrapes to time (median)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for other processes to use <10%% CPU",
    )
    parser.add_argument(
        "--retry-noisy",
        type=int,
        default=0,
        metavar="N",
        help="rerun a case up to N times if others used >10%% CPU during it",
    )
    parser.add_argument("--sink-delay", type=float, default=0.2, help="reply sink delay, s")
    return parser.parse_args(argv)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the plan; print and optionally save the report; 0 only if nothing failed."""
    args = parse_args(argv)
    plan = make_plan(args)
    if wrk.wrk_path() is None:
        print(
            "wrk not found: apt-get update && apt-get install -y --no-install-recommends wrk",
            file=sys.stderr,
        )
        return 2
    server_cpu: int | None = args.server_cpu
    load_cpu: int | None = args.load_cpu
    avail = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if (
        args.no_pin
        or not {args.server_cpu, args.load_cpu} <= avail
        or args.server_cpu == args.load_cpu
    ):
        if not args.no_pin:
            print(
                f"warning: cores {args.server_cpu},{args.load_cpu} not both available "
                f"({sorted(avail)}): not pinning",
                file=sys.stderr,
            )
        server_cpu = load_cpu = None
    else:
        os.sched_setaffinity(0, {args.load_cpu})  # the bench itself stays off the server's core
    if args.wait_quiet > 0:
        print(f"waiting up to {args.wait_quiet:.0f} s for a quiet machine...", flush=True)
    quiet_pct = machine.wait_quiet(args.wait_quiet, machine.NOISY_PCT)
    if quiet_pct >= machine.NOISY_PCT:
        print(
            f"warning: other processes use {quiet_pct:.0f}% of a core: figures will be noisy",
            file=sys.stderr,
        )
    results = BenchResults(
        machine={**machine.info(servers.REPO_ROOT), "other_cpu_pct_before": quiet_pct},
        params={**asdict(plan), "server_cpu": server_cpu, "load_cpu": load_cpu},
    )
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        ps = servers.ProcessSet(Path(tmp))
        try:
            Runner(plan, ps, Path(tmp), server_cpu, load_cpu, results, args.retry_noisy).run()
        except KeyboardInterrupt:
            interrupted = True
            results.failures.append("interrupted")
            print("interrupted: stopping servers", file=sys.stderr)
        finally:
            ps.stop_all()
    results.machine["loadavg_end"] = os.getloadavg()[0]
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
