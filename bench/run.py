"""Run the whole benchmark: floor server, our server (memory, sqlite, reply sinks), scrape timing.

Usage: python -m bench [--duration 10] [--smoke] [--json out.json]   (see bench/README.md)

Exit status: 0 when every server started and answered 2xx and counted exactly the rows it
acknowledged; 1 otherwise (targets never change the exit status: they are reported).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import auth, machine, models, payloads, probe, report, servers, targets, wrk
from bench import baseline as ab
from bench import fill as fill_state
from bench.results import BASE_SUFFIX, BenchResults, CaseResult, ScrapeResult, ServerResult

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
    seed_grid: Grid  # the seed's configuration: durable, replies posted to a sink
    cost_grid: Grid  # seed-scores, seed-regression; seed too when one of them runs
    aged_grid: Grid  # full tables; memory and sqlite (empty) run it too, as the baseline
    servers: tuple[str, ...]
    scrape_events: int
    scrapes: int
    sink_delay_s: float
    fill: fill_state.FillSizes  # the state-age servers' tables, filled to these bounds
    repeats: int  # rounds of every case (an A/B's noise is the spread of its rounds)


ALL_SERVERS = (
    "floor",
    "memory",
    "sqlite",
    "seed",
    "seed-scores",
    "seed-regression",
    "seed-models",
    "seed-token",
    "seed-oidc",
    "seed-postgres",
    "memory-full",
    "sqlite-full",
    "replyce",
    "sink200",
    "deadsink",
    "scrape",
)
SMOKE_SERVERS = ALL_SERVERS
CASE_ORDER: Grid = [(1, 1), (1, 8), (1, 16), (100, 1), (100, 16), (1000, 1), (1000, 16)]
FULL_GRID: Grid = [(1, 1), (1, 16), (100, 1), (100, 16), (1000, 1), (1000, 16)]
SQLITE_REJECT = ("sqlite", "--state", "state_dir", "unrecognized", "invalid choice")
SMOKE_GRID: Grid = [(1, 1), (1, 16), (1000, 16)]
AGED = {"memory-full": "memory", "sqlite-full": "sqlite"}  # full tables -> the empty baseline
DURABLE = (
    "sqlite",
    "seed",
    "seed-scores",
    "seed-regression",
    "seed-models",
    "seed-token",
    "seed-oidc",
    "seed-postgres",
)  # kill -9 and restart at the end: acked rows survive
SPREAD_MODELS = 50  # seed-models: its models config's models, each with 2 endpoints (segments)
MODELS_REJECT = ("models_config", "unrecognized", "invalid choice")  # before --models_config
FLAG_REJECT = ("unrecognized", "invalid choice")  # before --auth, --score_range (argparse's words)
# Before RegressionMetrics exists (its own import errors are failures, not skips):
REGRESSION_REJECT = ("no module named 'adserver.cm_models.regression_metrics'",)
REGRESSION = "adserver.cm_models.regression_metrics.RegressionMetrics"
COSTED = ("seed-scores", "seed-regression")  # the event-cost variants (issue 14)
# seed-postgres before --state postgres, or without its extra (psycopg) installed
POSTGRES_REJECT = (*FLAG_REJECT, ".[postgres]")
# A PostgreSQL server's own figures: round trips, and the histogram of events per transaction.
ROUND_TRIPS = "feedback_state_round_trips_total"
TX_EVENTS_SUM = "feedback_state_transaction_events_sum"
TX_EVENTS_COUNT = "feedback_state_transaction_events_count"
AUTH_READY_S = 10.0  # an OIDC server answers 503 until it has fetched the issuer's keys
BASELINE_REPEATS = 3  # default --repeats with --baseline: a spread needs more than one round
RUN_OVERHEAD_S = 1.5  # per measured run besides warm-up and duration: count probes, wrk start


def make_plan(args: argparse.Namespace) -> Plan:
    """Translate CLI flags into a Plan."""
    default = SMOKE_SERVERS if args.smoke else ALL_SERVERS
    chosen = (
        tuple(s for s in ALL_SERVERS if s in set(args.servers.split(",")))
        if args.servers
        else default
    )
    smoke = args.smoke
    repeats = args.repeats or (BASELINE_REPEATS if args.baseline else 1)
    fill = fill_state.FillSizes(
        ids=args.fill_ids if args.fill_ids is not None else (2000 if smoke else 1_000_000),
        rows=args.fill_rows if args.fill_rows is not None else (2000 if smoke else 1_000_000),
        batch=args.fill_batch,
        rows_per_event=args.fill_rows_per_event or (1000 if smoke else 100_000),
    )
    if smoke:
        return Plan(
            "smoke",
            args.duration or 1,
            args.warmup if args.warmup is not None else 1,
            SMOKE_GRID,
            [(1, 16)],
            [(1, 16)],
            [(1, 1), (1, 16)],
            [(1000, 16)],
            [(1, 16)],
            chosen,
            5,
            10,
            args.sink_delay,
            fill,
            repeats,
        )
    return Plan(
        "full",
        args.duration or 10,
        args.warmup if args.warmup is not None else 2,
        FULL_GRID,
        FULL_GRID,
        [(1, 1), (1, 16)],
        [(1, 1), (1, 16)],
        [(1, 16), (1000, 1), (1000, 16)],
        [(1, 1), (1, 8), (1, 16)],
        chosen,
        5,
        args.scrapes,
        args.sink_delay,
        fill,
        repeats,
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


@dataclass(frozen=True)
class Variant:
    """One server of the plan: how to start it, its cases, and whether its counts are checked."""

    name: str
    argv_for: Callable[[int], list[str]]
    grid: Grid
    counted: bool = True
    may_reject: tuple[str, ...] = ()
    model: str | None = "bench"  # whose counts are checked (None: the sum over every model)
    tree: Path | None = None  # the --baseline export it runs from (None: this tree)
    spread: int = 0  # > 0: the load is spread over that many models and 2 endpoints
    token_file: Path | None = None  # every request carries its token (the --auth variants)
    body: str = payloads.FEEDBACK  # the kind of payload it is fed (bench/payloads.py)

    @property
    def plain(self) -> str:
        """The server it stands for: "memory" for both "memory" and "memory@base"."""
        return self.name.removesuffix(BASE_SUFFIX)


def _interleave(ours: list[Variant], theirs: list[Variant]) -> list[Variant]:
    """Each of our servers followed by its baseline twin, so within a round they run back to
    back and the machine's drift hits both sides alike."""
    twin = {v.plain: v for v in theirs}
    return [w for v in ours for w in (v, twin.get(v.name)) if w is not None]


def _union(grid: Grid, more: Grid) -> Grid:
    return [*grid, *(case for case in more if case not in grid)]


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
        baseline: ab.Baseline | None = None,
    ) -> None:
        self.plan, self.ps, self.work = plan, ps, work
        self.baseline = baseline
        self.retry_noisy = retry_noisy
        self.server_cpu, self.load_cpu = server_cpu, load_cpu
        self.r = results
        self.payloads = {
            kind: payloads.write_payloads(work / "payloads", kind=kind) for kind in payloads.BODIES
        }
        self._issuer: auth.Issuer | None = None
        self._postgres: Any = None  # bench.postgres.PostgresServer, started by postgres_dsn

    def fail(self, msg: str) -> None:
        print(f"FAIL: {msg}", file=sys.stderr, flush=True)
        self.r.failures.append(msg)

    def note(self, name: str, note: str) -> None:
        """A finding about one server: in its results, and on the console now."""
        sr = self.r.server(name)
        if sr:
            sr.notes.append(note)
        print(f"  {name}: {note}", flush=True)

    # -- one case -------------------------------------------------------------------------------
    def run_case(
        self,
        name: str,
        m: servers.Managed,
        rows: int,
        conns: int,
        counted: bool,
        repeat: int = 0,
        spread: int = 0,
        token_file: Path | None = None,
        body: str = payloads.FEEDBACK,
    ) -> CaseResult:
        """Measure one case; rerun it (up to --retry-noisy times) if others used the CPU."""
        acked_rows = 0
        for attempt in range(self.retry_noisy + 1):
            c = self.measure(name, m, rows, conns, counted, spread, token_file, body)
            acked_rows += (c.ok + c.warmup_ok) * rows
            if (c.other_cpu_pct or 0) < machine.NOISY_PCT or attempt == self.retry_noisy:
                break
            print(
                f"  (other processes used {c.other_cpu_pct:.0f}% of a core: waiting for quiet "
                f"and rerunning)",
                flush=True,
            )
            machine.wait_quiet(120.0, machine.NOISY_PCT)
        c.attempts, c.acked_rows_all, c.repeat = attempt + 1, acked_rows, repeat
        self.r.cases.append(c)
        return c

    def measure(
        self,
        name: str,
        m: servers.Managed,
        rows: int,
        conns: int,
        counted: bool,
        spread: int = 0,
        token_file: Path | None = None,
        body: str = payloads.FEEDBACK,
    ) -> CaseResult:
        """Warm up, measure, and (for our server) check rows counted against rows acknowledged.

        `spread`: the events go to that many models (and 2 endpoints); counts are their sum.
        `token_file`: every request carries its bearer token. `body`: the kind of payload."""
        payload = self.payloads[body][rows]
        url = m.base_url + "/"
        tag = uuid.uuid4().hex[:8]
        before = probe.stable_counts(m.base_url, m.model) if counted else None
        warm = (
            wrk.run(
                url,
                payload.path,
                f"{name}-{rows}x{conns}-w{tag}",
                conns,
                self.plan.warmup_s,
                self.load_cpu,
                spread=spread,
                token_file=token_file,
            )
            if self.plan.warmup_s > 0
            else None
        )
        mid = probe.stable_counts(m.base_url, m.model) if counted else None
        meter = machine.CpuMeter(pids=self.ps.pids()).start()
        res = wrk.run(
            url,
            payload.path,
            f"{name}-{rows}x{conns}-m{tag}",
            conns,
            self.plan.duration_s,
            self.load_cpu,
            spread=spread,
            token_file=token_file,
        )
        other_pct = meter.other_pct()
        after = probe.stable_counts(m.base_url, m.model) if counted else None
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
        model: str | None = "bench",
        tree: Path | None = None,
    ) -> servers.Managed | None:
        """Start a server; a start failure is a failure unless its log names a rejected flag."""
        try:
            m = self.ps.start(name, argv, port, self.server_cpu, model=model, tree=tree)
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

    def launch(self, v: Variant) -> servers.Managed | None:
        """Start one server and record its start-up figures; None if it did not start."""
        port = servers.free_port()
        argv = v.argv_for(port)
        sr = ServerResult(name=v.name, argv=argv)
        if v.tree is not None and self.baseline is not None:
            sr.notes.append(f"from --baseline {self.baseline.rev} ({self.baseline.commit[:10]})")
        self.r.servers.append(sr)
        return self.start(v.name, argv, port, sr, v.may_reject, v.model, v.tree)

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
        honest when the machine's background load drifts during a long run. With --repeats, each
        round of a case runs every server once (with --baseline: ours, then its twin).
        """
        p = self.plan
        sinks: dict[str, servers.Managed] = {}
        variants = self.variants(sinks)
        if self.baseline is not None:
            variants = _interleave(variants, self.variants(sinks, self.baseline.tree))
        started: dict[str, servers.Managed] = {}
        for v in variants:
            m = self.launch(v)
            if m is not None:
                started[v.name] = m
        for v in variants:
            if v.plain in AGED and v.name in started and not self.age(v.name, started[v.name]):
                self.ps.stop(started.pop(v.name))
            if v.token_file and v.name in started and not self.check_auth(v, started[v.name]):
                self.ps.stop(started.pop(v.name))

        cases = sorted({case for v in variants for case in v.grid}, key=CASE_ORDER.index)
        runs = p.repeats * sum(len(v.grid) for v in variants if v.name in started)
        minutes = runs * (p.warmup_s + p.duration_s + RUN_OVERHEAD_S) / 60
        print(f"{runs} measured runs, about {minutes:.1f} min", flush=True)
        for rows, conns in cases:
            for repeat in range(p.repeats):
                for v in variants:
                    m = started.get(v.name)
                    if m is None or (rows, conns) not in v.grid or not self.check_alive(v.name, m):
                        continue
                    try:
                        self.run_case(
                            v.name,
                            m,
                            rows,
                            conns,
                            v.counted,
                            repeat,
                            v.spread,
                            v.token_file,
                            v.body,
                        )
                    except (wrk.WrkError, OSError, RuntimeError) as exc:
                        self.fail(f"{v.name} {rows} rows c{conns}: {exc}")

        for name, m in started.items():
            sr = self.r.server(name)
            if sr and self.check_alive(name, m):
                sr.rss_after_mb = servers.rss_mb(m.pid)
        for v in variants:
            if v.spread and v.name in started and started[v.name].alive():
                self.check_spread(v, started[v.name])
        for server, sink in sinks.items():
            self.note_sink(server, sink)
        for v in variants:
            if v.plain == "seed-postgres" and v.name in started and started[v.name].alive():
                self.note_state(v.name, started[v.name])
        for v in variants:
            m = started.get(v.name)
            if m is None:
                continue
            if v.plain in DURABLE and m.alive():
                self.check_durable(v, m)
            else:
                self.ps.stop(m)
        for sink in sinks.values():
            self.ps.stop(sink)
        if self._issuer is not None:  # after the restarts, which fetch the keys again
            for v in variants:
                sr = self.r.server(v.name)
                if v.plain == "seed-oidc" and v.name in started and sr:
                    sr.notes.append(self._issuer.served.note())
            self._issuer.close()
        if "scrape" in p.servers:
            self.run_scrape()

    def seed_variant(
        self,
        name: str,
        grid: Grid,
        sinks: dict[str, servers.Managed],
        *,
        models_config: Path | None = None,
        flags: Sequence[str] = (),
        storage_uri: str = servers.SEED_STORAGE_URI,
        **variant: Any,
    ) -> Variant | None:
        """The seed's args (its own reply sink and state dir) plus what a variant adds; None if
        its sink did not start. ``variant``: the :class:`Variant` fields beyond its argv."""
        sink = self.start_sink(name, 0.0, sinks)
        if sink is None:
            return None
        argv_for = functools.partial(
            servers.seed_argv,
            state_dir=self.state_dir(name),
            reply_url=f"http://{servers.HOST}:{sink.port}/",
            models_config=models_config,
            flags=flags,
            storage_uri=storage_uri,
        )
        variant.setdefault("model", servers.SEED_MODEL)
        return Variant(name, argv_for, grid, **variant)

    def variants(
        self, sinks: dict[str, servers.Managed], tree: Path | None = None
    ) -> list[Variant]:
        """The servers of the plan, in the order their cases run; starts the reply sinks.

        With `tree` (the --baseline export): our servers only, named "<server>@base", each with
        its own state dir and sink, started from that tree.
        """
        p = self.plan
        aged = [c for c in p.aged_grid if any(n in p.servers for n in AGED)]
        costed = [c for c in p.cost_grid if any(n in p.servers for n in COSTED)]
        out: list[Variant] = []

        def named(name: str) -> str:
            return name if tree is None else name + BASE_SUFFIX

        if "floor" in p.servers and tree is None:
            out.append(Variant("floor", servers.floor_argv, p.grid, counted=False))
        if "memory" in p.servers:
            out.append(
                Variant(
                    named("memory"),
                    lambda port: servers.adserver_argv(port, ONE_HOT),
                    _union(p.grid, aged),
                )
            )
        if "sqlite" in p.servers:
            out.append(
                Variant(
                    named("sqlite"),
                    lambda port: self.sqlite_argv(port, named("sqlite")),
                    _union(p.durable_grid, aged),
                    may_reject=SQLITE_REJECT,
                )
            )
        seeds: list[tuple[str, Grid, dict[str, Any]]] = []
        # The seed's reply_url points at a sink that answers 200 at once, as a message dumper
        # or a broker does: every reply is really sent. Each variant has its own sink.
        if "seed" in p.servers:
            seeds.append(("seed", _union(p.seed_grid, costed), {}))
        # The event-cost variants: the seed's args with its model's scores kept (the probability
        # event; seed's own is the classification event), and with a regressor fed numbers.
        if "seed-scores" in p.servers:
            scores_on = {"flags": ["--score_range", "0,1"], "may_reject": FLAG_REJECT}
            seeds.append(("seed-scores", p.cost_grid, scores_on))
        if "seed-regression" in p.servers:
            regressor = {
                "storage_uri": REGRESSION,
                "body": payloads.REGRESSION,
                "may_reject": REGRESSION_REJECT,
            }
            seeds.append(("seed-regression", p.cost_grid, regressor))
        if "seed-models" in p.servers:
            # The seed's args plus a models config: the same load spread over its models.
            config = models.write_config(
                self.work / f"models-{named('seed-models')}.yaml",
                [models.isvc(i) for i in range(SPREAD_MODELS)],
                ONE_HOT,
            )
            spread = {
                "models_config": config,
                "may_reject": MODELS_REJECT,
                "model": None,
                "spread": SPREAD_MODELS,
            }
            seeds.append(("seed-models", p.seed_grid, spread))
        if "seed-token" in p.servers:
            # The seed's args plus --auth token: every request carries a bearer token.
            accepted, sent = auth.write_tokens(self.work, named("seed-token"))
            token = {
                "flags": ["--auth", "token", "--auth_token_file", str(accepted)],
                "may_reject": FLAG_REJECT,
                "token_file": sent,
            }
            seeds.append(("seed-token", p.seed_grid, token))
        if "seed-oidc" in p.servers:
            # The seed's args plus --auth oidc against the bench's issuer: one RS256 token.
            issuer = self.issuer()
            oidc = {
                "flags": issuer.server_flags(),
                "may_reject": FLAG_REJECT,
                "token_file": issuer.token_file,
            }
            seeds.append(("seed-oidc", p.seed_grid, oidc))
        if "seed-postgres" in p.servers:
            # The seed's args on a shared state: a database of its own on the bench's PostgreSQL.
            dsn = self.postgres_dsn(named("seed-postgres"))
            if dsn is not None:
                shared = {
                    "flags": ["--state", "postgres", "--postgres_dsn", dsn],
                    "may_reject": POSTGRES_REJECT,
                }
                seeds.append(("seed-postgres", p.seed_grid, shared))
        for server, grid, options in seeds:
            variant = self.seed_variant(named(server), grid, sinks, **options)
            if variant is not None:
                out.append(variant)
        bounds = {"max_ids": p.fill.ids, "max_rows": p.fill.rows}
        if "memory-full" in p.servers:
            out.append(
                Variant(
                    named("memory-full"),
                    lambda port: servers.adserver_argv(port, ONE_HOT, **bounds),
                    p.aged_grid,
                )
            )
        if "sqlite-full" in p.servers:
            out.append(
                Variant(
                    named("sqlite-full"),
                    lambda port: self.sqlite_argv(port, named("sqlite-full"), **bounds),
                    p.aged_grid,
                    may_reject=SQLITE_REJECT,
                )
            )
        if "replyce" in p.servers:  # reply CloudEvent in the answer, no sink: isolates its cost
            out.append(
                Variant(
                    named("replyce"),
                    lambda port: servers.adserver_argv(port, ONE_HOT, reply_ce=True),
                    p.sink_grid,
                )
            )
        if "sink200" in p.servers:
            sink = self.start_sink(named("sink200"), p.sink_delay_s, sinks)
            if sink is not None:
                slow = f"http://{servers.HOST}:{sink.port}/"
                out.append(
                    Variant(
                        named("sink200"),
                        lambda port: servers.adserver_argv(port, ONE_HOT, reply_url=slow),
                        p.sink_grid,
                    )
                )
        if "deadsink" in p.servers:
            dead = f"http://{servers.HOST}:{servers.free_port()}/"
            out.append(
                Variant(
                    named("deadsink"),
                    lambda port: servers.adserver_argv(port, ONE_HOT, reply_url=dead),
                    p.sink_grid,
                )
            )
        return [replace(v, tree=tree) for v in out]

    def start_sink(
        self, server: str, delay_s: float, sinks: dict[str, servers.Managed]
    ) -> servers.Managed | None:
        """A reply sink for `server`, on the load core: it stands for a remote service."""
        port = servers.free_port()
        try:
            sink = self.ps.start(
                f"{server}-sink",
                servers.sink_argv(port, delay_s),
                port,
                self.load_cpu,
                ready_path="/stats",
            )
        except servers.StartError as exc:
            self.fail(str(exc))
            return None
        sinks[server] = sink
        return sink

    def issuer(self) -> auth.Issuer:
        """The OIDC issuer of `seed-oidc` (and its --baseline twin), started once."""
        if self._issuer is None:
            self._issuer = auth.Issuer(self.work / "issuer")
            print(f"issuer: {self._issuer.url}", flush=True)
        return self._issuer

    def postgres_dsn(self, name: str) -> str | None:
        """A new database for `name` on the bench's PostgreSQL server, started on first use and
        pinned to the load core (it stands for a database on another machine). None without
        PostgreSQL's binaries or psycopg (both optional: the variant is skipped), or when the
        server fails (a failure)."""
        try:
            import psycopg

            from bench.postgres import PostgresError, PostgresServer, find_bindir
        except ImportError as exc:
            return self.skip(name, f"cannot import psycopg or bench.postgres: {exc}")
        if find_bindir() is None:
            return self.skip(name, "no PostgreSQL server binaries (apt-get install postgresql)")
        try:
            if self._postgres is None:
                server = PostgresServer()
                self._postgres = server.start()
                pinned = servers.pin_tree(server.pid or 0, self.load_cpu)
                print(f"postgres: pid {server.pid}, {pinned} processes pinned", flush=True)
            database = name.replace(BASE_SUFFIX, "_base").replace("-", "_")
            return str(self._postgres.create_database(database))
        except (PostgresError, psycopg.Error, OSError) as exc:
            self.fail(f"{name}: PostgreSQL: {exc}")
            return None

    def skip(self, name: str, why: str) -> None:
        """Record a server of the plan that cannot run here (not a failure)."""
        self.r.servers.append(ServerResult(name=name, argv=[], status=f"skipped: {why}"))
        print(f"SKIP {name}: {why}", file=sys.stderr)

    def close(self) -> None:
        """Stop the PostgreSQL server, if one was started (after every server using it)."""
        if self._postgres is not None:
            self._postgres.close()
            self._postgres = None

    def note_state(self, name: str, m: servers.Managed) -> None:
        """Round trips per event and events per transaction, from the server's own figures over
        its whole run (warm-ups included): what group commit and pipelining save."""
        try:
            found = probe.totals(m.base_url, (ROUND_TRIPS, TX_EVENTS_SUM, TX_EVENTS_COUNT))
        except (OSError, RuntimeError) as exc:
            self.fail(f"{name}: cannot read its state figures: {exc}")
            return
        trips, events = found.get(ROUND_TRIPS), found.get(TX_EVENTS_SUM)
        transactions = found.get(TX_EVENTS_COUNT)
        if trips is None or not events or not transactions:
            self.fail(f"{name}: no feedback_state_* figures in /v1/metrics: {sorted(found)}")
            return
        self.note(
            name,
            f"state: {trips / events:.2f} round trips per event, "
            f"{events / transactions:.1f} events per transaction "
            f"({transactions:.0f} transactions, {trips:.0f} round trips)",
        )

    def check_auth(self, v: Variant, m: servers.Managed) -> bool:
        """Auth is really on before any case is measured: an event without a token answers
        401, one with the variant's token 2xx (an OIDC server answers 503 until it has the
        issuer's keys: retried for AUTH_READY_S). False (a failure) otherwise."""
        assert v.token_file is not None
        token = v.token_file.read_text().strip()
        body = self.payloads[payloads.FEEDBACK][1].path.read_bytes()
        tag = uuid.uuid4().hex[:8]
        refused = probe.post_event(m.base_url, body, f"auth-{tag}-none")
        if refused != 401:
            self.fail(f"{v.name}: an event without a token answered {refused}, not 401")
            return False
        started, deadline = time.perf_counter(), time.monotonic() + AUTH_READY_S
        code = probe.post_event(m.base_url, body, f"auth-{tag}-0", token=token)
        attempt = 0
        while code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
            attempt += 1
            code = probe.post_event(m.base_url, body, f"auth-{tag}-{attempt}", token=token)
        if not 200 <= code < 300:
            self.fail(f"{v.name}: an event with the bench's token answered {code}")
            return False
        note = (
            f"auth on: 401 without a token, 2xx with it "
            f"(after {time.perf_counter() - started:.2f} s)"
        )
        self.note(v.name, note)
        return True

    def age(self, name: str, m: servers.Managed) -> bool:
        """Fill a state-age server's tables to their bounds; False (a failure) if that fails."""
        sizes = self.plan.fill
        print(f"{name}: filling {sizes.ids} ids and {sizes.rows} logged rows...", flush=True)
        try:
            done = fill_state.fill(m.base_url, sizes, f"fill-{uuid.uuid4().hex[:8]}", m.model)
        except (fill_state.FillError, OSError, RuntimeError) as exc:
            self.fail(f"{name}: fill failed: {exc}")
            return False
        sr = self.r.server(name)
        rss = servers.rss_mb(m.pid)
        if sr:
            sr.notes.append(f"{done.note()}; RSS after the fill {rss or 0:.1f} MB")
        print(f"  {name}: {done.note()}, RSS {rss or 0:.1f} MB", flush=True)
        return True

    def note_sink(self, server: str, sink: servers.Managed) -> None:
        """How many replies reached a sink (information: replies are best effort)."""
        sr = self.r.server(server)
        try:
            code, body = probe.request(sink.base_url + "/stats")
            if sr and code == 200:
                sr.notes.append(f"sink received {body.decode().strip()}")
        except OSError as exc:
            print(f"warning: {server} sink stats: {exc}", file=sys.stderr)

    def state_dir(self, name: str) -> Path:
        """A state dir private to this run and server (a restart reuses it)."""
        path = self.work / f"state-{name}"
        path.mkdir(exist_ok=True)
        return path

    def sqlite_argv(self, port: int, name: str, max_ids: int = 0, max_rows: int = 0) -> list[str]:
        """Durable mode on the server's state dir."""
        return servers.adserver_argv(
            port,
            ONE_HOT,
            state="sqlite",
            state_dir=self.state_dir(name),
            max_ids=max_ids,
            max_rows=max_rows,
        )

    def check_spread(self, v: Variant, m: servers.Managed) -> None:
        """Every model of the config counted rows in both endpoints' segments: the load really
        was spread (the row checks alone hold for any split of the sum)."""
        try:
            found = probe.segment_rows(m.base_url)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            self.fail(f"{v.name}: cannot read the models' segments: {exc}")
            return
        per_segment = [
            found.get(models.isvc(i), {}).get(endpoint, 0)
            for i in range(v.spread)
            for endpoint in models.ENDPOINTS
        ]
        note = (
            f"rows per (model, endpoint) over {v.spread} models x {len(models.ENDPOINTS)}: "
            f"min {min(per_segment)}, max {max(per_segment)}"
        )
        self.note(v.name, note)
        if min(per_segment) == 0:
            empty = sum(1 for n in per_segment if n == 0)
            self.fail(f"{v.name}: {empty} (model, endpoint) segments counted no rows: {note}")

    def check_durable(self, v: Variant, m: servers.Managed) -> None:
        """kill -9 a durable server and restart it on the same dir: acked rows must survive."""
        name = v.name
        acked = sum(c.acked_rows_all for c in self.r.cases if c.server == name)
        try:
            before = probe.stable_counts(m.base_url, m.model)
        except (OSError, RuntimeError) as exc:
            self.fail(f"{name}: cannot read counts before restart: {exc}")
            self.ps.stop(m)
            return
        self.ps.stop(m, kill=True)
        port = servers.free_port()
        try:
            m2 = self.ps.start(
                f"{name}-restart",
                v.argv_for(port),
                port,
                self.server_cpu,
                model=m.model,
                tree=v.tree,
            )
        except servers.StartError as exc:
            self.fail(f"{name} restart after kill -9: {exc}")
            return
        try:
            after = probe.stable_counts(m2.base_url, m2.model)
        finally:
            self.ps.stop(m2)
        note = (
            f"kill -9 + restart: {after.rows} rows after, {before.rows} before, {acked} "
            f"acked; restart to first 200 {m2.start_to_ready_s:.3f} s"
        )
        self.note(name, note)
        if after.rows < acked:
            self.fail(f"{name} lost acknowledged rows over kill -9: {note}")
        elif after.rows > before.rows:
            self.fail(f"{name} has more rows after restart than before: {note}")

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


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: at least 1")
    return n


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
    parser.add_argument(
        "--fill-ids",
        type=int,
        default=None,
        help="state-age servers: event ids remembered before measuring, also their "
        "--dedup_max_ids (default 1000000, smoke 2000)",
    )
    parser.add_argument(
        "--fill-rows",
        type=int,
        default=None,
        help="state-age servers: logged prediction rows, also their --join_max_rows "
        "(default 1000000, smoke 2000)",
    )
    parser.add_argument(
        "--fill-batch", type=int, default=1000, help="events per batched fill request"
    )
    parser.add_argument(
        "--fill-rows-per-event",
        type=int,
        default=None,
        help="prediction rows per fill logger event (default 100000, smoke 1000)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="REV",
        help="also run each selected server of ours from this git revision's tree, interleaved "
        "with ours, and print this / baseline per case (the floor and scrape run once)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive,
        default=None,
        metavar="N",
        help=f"rounds of every case (default 1, with --baseline {BASELINE_REPEATS})",
    )
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
    commit = None
    if args.baseline:
        try:
            commit = ab.resolve(servers.REPO_ROOT, args.baseline)
        except ab.BaselineError as exc:
            print(exc, file=sys.stderr)
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
        params={
            **asdict(plan),
            "server_cpu": server_cpu,
            "load_cpu": load_cpu,
            "baseline": args.baseline,
            "baseline_commit": commit,
        },
    )
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        ps = servers.ProcessSet(Path(tmp))
        runner: Runner | None = None
        try:
            base = None
            if args.baseline and commit:
                base = ab.export(
                    servers.REPO_ROOT, args.baseline, commit, Path(tmp) / "baseline", sys.executable
                )
                print(f"baseline: {args.baseline} ({commit[:10]}) exported to {base.tree}")
            runner = Runner(
                plan, ps, Path(tmp), server_cpu, load_cpu, results, args.retry_noisy, base
            )
            runner.run()
        except ab.BaselineError as exc:
            results.failures.append(str(exc))
            print(f"FAIL: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            interrupted = True
            results.failures.append("interrupted")
            print("interrupted: stopping servers", file=sys.stderr)
        finally:
            ps.stop_all()
            if runner is not None:
                runner.close()
    results.machine["loadavg_end"] = os.getloadavg()[0]
    results.targets = targets.evaluate(results)
    results.ab = ab.compare(results)
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
