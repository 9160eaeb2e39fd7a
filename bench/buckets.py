"""``python -m bench.buckets``: memory, scrape time and event latency with every bucket filled.

Issue 13's storage bounds: 100 models x 2 segments x 10 classes with 48 h of minute buckets
filled, the server must stay <= 200 MB RSS, a ``/v1/metrics`` scrape (window gauges refreshed)
<= 1 s, and no event may wait more than 50 ms meanwhile.

Filling 48 h through HTTP would take as long as the traffic it stands for, so the probe writes the
statistic rows straight into the state file: the server creates the file (schema, models), is
stopped, the rows go in with SQL in one transaction, and the server is started on it again. A
(model, segment)'s minute ``k`` holds pattern ``(k + model + segment) % PATTERNS`` of
:func:`make_patterns`; hours, days and all-time hold the exact sums of their minutes (every row
counts at every granularity, D1), written as such. The fill is then read back through the
server (``/v1/models/<m>/metrics`` ranges by hour and by minute, and all-time) and compared with
the same patterns summed in Python, before anything is timed.

    python -m bench.buckets                 # 100 models, 48 h (~2 min fill, ~2 GB file)
    python -m bench.buckets --smoke         # 4 models, 2 h: checks the probe itself (~20 s)
    python -m bench.buckets --json out.json --markdown out.md

Exit status 0 when the server started, the fill read back exactly and every trickle event was
answered 2xx; 1 otherwise (targets never change it: they are reported as met / NOT MET).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from adserver.catalogue.families import EVENTS_ACCEPTED, PREDICTED_ROWS, ROWS_ACCEPTED
from adserver.state.buckets import DEFAULT_BUCKETS, TimeBuckets
from adserver.state.view import DELAY_BUCKETS, bucket_index
from bench import machine, models, payloads, probe, report, servers, wrk
from bench.results import BenchResults, Target
from cm_models.statistics import ALL_TIME

NUMERIC = "cm_models.multiclass_numeric.MultiClassNumeric"
SERVER_MODEL = "buckets"  # --model_name: the server itself (D7)
STATE_FILE = "feedback-state.sqlite3"
PATTERNS = 7  # distinct minute fills, so neighbouring buckets and models differ
DELAYS_S = (5.0, 600.0, 7200.0)  # label delays of a bucket's rows (half, a third, the rest)
SEED = 20240613
# Each statistic table written: its own keys and values after (model, segment, time_bucket).
OWN: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "cells": (("truth", "prediction"), ("count",)),
    "counters": (("name", "label"), ("value",)),
    "label_delay": (("bucket",), ("count", "total")),
}
KEY = ("model", "segment", "time_bucket")


class ProbeError(RuntimeError):
    """The state file is not shaped as expected, or the server read back something else."""


@dataclass(frozen=True)
class Shape:
    models: int
    classes: int
    cells: int  # non-zero confusion cells per bucket and segment (the diagonal first)
    hours: int  # of minute buckets filled, ending at the current minute

    @property
    def names(self) -> list[str]:
        return [f"m{i:03d}" for i in range(self.models)]


@dataclass(frozen=True)
class Patterns:
    """Per pattern: its cells (truth, prediction, count), counters and label-delay rows."""

    cells: list[list[tuple[int, int, int]]]
    counters: list[list[tuple[str, str, int]]]
    delays: list[list[tuple[int, int, float]]]

    def rows(self, pattern: int) -> int:
        return sum(count for _, _, count in self.cells[pattern])

    def predicted(self, pattern: int) -> int:
        return next(v for name, _, v in self.counters[pattern] if name == PREDICTED_ROWS)

    def table(self, name: str) -> Sequence[Sequence[Sequence[object]]]:
        tables: dict[str, Sequence[Sequence[Sequence[object]]]] = {
            "cells": self.cells,
            "counters": self.counters,
            "label_delay": self.delays,
        }
        return tables[name]


def make_patterns(shape: Shape, seed: int = SEED) -> Patterns:
    """Deterministic minute fills: mostly right predictions, 80% of predictions labelled."""
    rng = np.random.default_rng(seed)
    n = shape.classes
    order = [(i, i) for i in range(n)] + [(t, p) for t in range(n) for p in range(n) if t != p]
    chosen = sorted(order[: shape.cells])
    cells, counters, delays = [], [], []
    for _ in range(PATTERNS):
        counts = [int(rng.integers(5, 20) if t == p else rng.integers(1, 4)) for t, p in chosen]
        these = [(t, p, c) for (t, p), c in zip(chosen, counts, strict=True)]
        rows = sum(counts)
        split = [rows // 2, rows // 3, rows - rows // 2 - rows // 3]
        cells.append(these)
        counters.append([(PREDICTED_ROWS, "", rows + rows // 4), (ROWS_ACCEPTED, "", rows)])
        delays.append(
            sorted(
                (bucket_index(DELAY_BUCKETS, s), k, s * k)
                for s, k in zip(DELAYS_S, split, strict=True)
            )
        )
    return Patterns(cells, counters, delays)


def pattern_of(minute_start: int, model: int, segment: int, finest: int) -> int:
    return (minute_start // finest + model + segment) % PATTERNS


@dataclass
class Filled:
    minutes: list[int]  # starts of the minute buckets filled (epoch s), in order
    rows_written: dict[str, int]
    seconds: float
    file_mb: float


def _columns(con: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in con.execute(f"PRAGMA table_info({table})")]


def fill_state(path: Path, shape: Shape, pat: Patterns, buckets: TimeBuckets, now: float) -> Filled:
    """Write every bucket of ``shape`` into the (stopped) server's state file, in one
    transaction; minute rows in the tables' key order (time bucket first, schema v5)."""
    t0 = time.perf_counter()
    con = sqlite3.connect(path, isolation_level=None)
    try:
        for table, (keys, values) in OWN.items():
            found, wanted = _columns(con, table), [*KEY, *keys, *values]
            if sorted(found) != sorted(wanted):
                raise ProbeError(f"table {table} has columns {found}, the probe writes {wanted}")
        for table, wanted in (("segments", ["model", "segment"]), ("classes", ["model", "class"])):
            if sorted(_columns(con, table)) != sorted(wanted):
                raise ProbeError(f"table {table}: columns {_columns(con, table)}, not {wanted}")
        con.execute("PRAGMA journal_mode=OFF")  # the server turns WAL on again when it opens it
        con.execute("PRAGMA synchronous=OFF")
        finest = buckets.finest
        first = int(buckets.first_kept(0, now))
        start = buckets.decode(first)[1]
        end = int(now // finest) * finest  # the current minute stays for the probe's events
        start = max(start, end - shape.hours * 3600)
        minutes = list(range(start, end, finest))
        con.execute("BEGIN")
        _temp_tables(con, shape, pat, buckets, minutes, now)
        written = {}
        for table, (keys, values) in OWN.items():
            own = ", ".join((*keys, *values))
            pk = ", ".join(f"p.{k}" for k in keys)
            sums = ", ".join(f"SUM(h.n * p.{v})" for v in values)
            target = f"INSERT INTO {table} ({', '.join(KEY)}, {own}) "
            before = con.total_changes
            con.execute(
                target + f"SELECT m.name, s.name, mi.bucket, {pk}, "
                f"{', '.join(f'p.{v}' for v in values)} FROM temp.minutes mi "
                f"CROSS JOIN temp.models m CROSS JOIN temp.segs s CROSS JOIN temp.p_{table} p "
                f"WHERE p.pattern = (mi.k + m.idx + s.idx) % {PATTERNS}"
            )
            con.execute(
                target + f"SELECT m.name, s.name, h.bucket, {pk}, {sums} FROM temp.hist h "
                f"CROSS JOIN temp.models m CROSS JOIN temp.segs s CROSS JOIN temp.p_{table} p "
                f"WHERE h.off = (m.idx + s.idx) % {PATTERNS} AND p.pattern = h.pattern "
                f"GROUP BY h.bucket, m.name, s.name, {pk}"
            )
            written[table] = con.total_changes - before
        # The event part counts under the model's totals (D2): one event per row here.
        con.execute(
            f"INSERT INTO counters ({', '.join(KEY)}, name, label, value) "
            "SELECT model, '', time_bucket, ?, '', SUM(value) FROM counters "
            "WHERE time_bucket = ? AND name = ? GROUP BY model",
            (EVENTS_ACCEPTED, ALL_TIME, ROWS_ACCEPTED),
        )
        con.execute(
            "INSERT INTO segments (model, segment) SELECT m.name, s.name FROM temp.models m, "
            "temp.segs s"
        )
        con.execute(
            "INSERT OR IGNORE INTO classes (model, class) SELECT m.name, c.value "
            "FROM temp.models m, "
            "json_each(?) c",
            (json.dumps(list(range(shape.classes))),),
        )
        con.execute("COMMIT")
    finally:
        con.close()
    return Filled(minutes, written, time.perf_counter() - t0, path.stat().st_size / 2**20)


def _temp_tables(
    con: sqlite3.Connection,
    shape: Shape,
    pat: Patterns,
    buckets: TimeBuckets,
    minutes: list[int],
    now: float,
) -> None:
    """The small tables the fill's INSERT ... SELECTs cross: minutes, models, segments, the
    patterns, and per coarser bucket how many of its minutes use each pattern (``hist``)."""
    con.execute("CREATE TEMP TABLE minutes (bucket INTEGER PRIMARY KEY, k INTEGER NOT NULL)")
    con.execute("CREATE TEMP TABLE models (name TEXT PRIMARY KEY, idx INTEGER) WITHOUT ROWID")
    con.execute("CREATE TEMP TABLE segs (name TEXT PRIMARY KEY, idx INTEGER) WITHOUT ROWID")
    con.execute("CREATE TEMP TABLE hist (bucket INTEGER, off INTEGER, pattern INTEGER, n INTEGER)")
    hist: Counter[tuple[int, int, int]] = Counter()
    minute_rows = []
    for t in minutes:
        of_minute = buckets.keys(t, now)  # its minute, hour and day
        k = t // buckets.finest
        minute_rows.append((of_minute[0], k))
        for off in range(PATTERNS):
            for coarse in (*of_minute[1:], ALL_TIME):
                hist[(coarse, off, (k + off) % PATTERNS)] += 1
    con.executemany("INSERT INTO temp.minutes VALUES (?, ?)", minute_rows)
    con.executemany(
        "INSERT INTO temp.models VALUES (?, ?)", [(n, i) for i, n in enumerate(shape.names)]
    )
    con.executemany(
        "INSERT INTO temp.segs VALUES (?, ?)", [(s, i) for i, s in enumerate(models.ENDPOINTS)]
    )
    con.executemany(
        "INSERT INTO temp.hist VALUES (?, ?, ?, ?)", [(*key, n) for key, n in hist.items()]
    )
    for table, (keys, values) in OWN.items():
        columns = ", ".join((*keys, *values))
        con.execute(
            f"CREATE TEMP TABLE p_{table} (pattern INTEGER, {columns}, "
            f"PRIMARY KEY (pattern, {', '.join(keys)})) WITHOUT ROWID"
        )
        marks = ", ".join("?" * (1 + len(keys) + len(values)))
        con.executemany(
            f"INSERT INTO temp.p_{table} VALUES ({marks})",
            [(p, *row) for p, rows in enumerate(pat.table(table)) for row in rows],
        )


@dataclass
class Expect:
    """What the fill holds for one model, from the patterns (not from the file)."""

    shape: Shape
    pat: Patterns
    minutes: list[int]
    finest: int

    def rows(self, model: int, start: float, end: float, segment: int | None = None) -> int:
        return self._sum(self.pat.rows, model, start, end, segment)

    def predicted(self, model: int, start: float, end: float, segment: int | None = None) -> int:
        return self._sum(self.pat.predicted, model, start, end, segment)

    def _sum(
        self, of: Callable[[int], int], model: int, start: float, end: float, segment: int | None
    ) -> int:
        segs = range(len(models.ENDPOINTS)) if segment is None else [segment]
        return sum(
            of(pattern_of(t, model, s, self.finest))
            for t in self.minutes
            if start <= t < end
            for s in segs
        )


def _get(base_url: str, path: str, timeout_s: float = 30.0) -> dict:
    code, body = probe.request(base_url + path, timeout_s=timeout_s)
    if code != 200:
        raise ProbeError(f"GET {path} answered {code}: {body[:300]!r}")
    return json.loads(body)


def check_fill(base_url: str, ex: Expect) -> list[str]:
    """Read one model's fill back through the server: all-time, by hour, by minute, a segment.
    Returns what differs (empty: the server reads exactly what was written)."""
    wrong: list[str] = []
    name, index = ex.shape.names[0], 0
    every = _get(base_url, f"/v1/models/{name}/metrics")["models"][name]
    written = ex.rows(index, -math.inf, math.inf)
    if every["rows"] != written:
        wrong.append(f"{name} all-time rows {every['rows']}, written {written}")
    for position, segment in enumerate(models.ENDPOINTS):
        got = every.get("segments", {}).get(segment, {}).get("rows")
        written = ex.rows(index, -math.inf, math.inf, position)
        if got != written:
            wrong.append(f"{name} segment {segment} all-time rows {got}, written {written}")
    start = -(-ex.minutes[0] // 3600) * 3600
    end = (ex.minutes[-1] + ex.finest) // 3600 * 3600
    ranges: list[tuple[int, int, int, int | None]] = [
        (start, end, 3600, None),  # hour buckets
        (end - 3600, end, 60, None),  # minute buckets
        (start, end, 3600, 1),  # one segment
    ]
    for lo, hi, step, seg in ranges:
        query = f"from={lo}&to={hi}&step={step}"
        if seg is not None:
            query += f"&segment={models.ENDPOINTS[seg]}"
        doc = _get(base_url, f"/v1/models/{name}/metrics?{query}")
        steps = doc.get("steps", [])
        if len(steps) != (hi - lo) // step:
            wrong.append(f"{query}: {len(steps)} steps, expected {(hi - lo) // step}")
        for one in steps:
            rows = ex.rows(index, _epoch(one["from"]), _epoch(one["to"]), seg)
            if one["rows"] != rows:
                wrong.append(f"{query}: step {one['from']} rows {one['rows']}, written {rows}")
                break
        total = doc.get("total", {})
        for key, value in (
            ("rows", ex.rows(index, lo, hi, seg)),
            ("predictions", ex.predicted(index, lo, hi, seg)),
        ):
            if total.get(key) != value:
                wrong.append(f"{query}: total {key} {total.get(key)}, written {value}")
    return wrong


def _epoch(value: str | float) -> float:
    """A range end as the server spells it (epoch seconds or RFC 3339) in epoch seconds."""
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass
class Probe:
    """Everything the probe measured (the JSON document), and what went wrong."""

    shape: dict
    machine: dict
    fill: dict = field(default_factory=dict)
    server: dict = field(default_factory=dict)
    scrape: dict = field(default_factory=dict)
    trickle: dict = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def server_argv(port: int, state_dir: Path, config: Path, refresh_s: int) -> list[str]:
    """Durable state (the default), the models config, window gauges refreshed every
    ``refresh_s`` so that refreshes run all through the timed scrapes."""
    return [
        *servers.listening_argv(SERVER_MODEL, port, NUMERIC),
        "--state_dir",
        str(state_dir),
        "--models_config",
        str(config),
        "--window_refresh_seconds",
        str(refresh_s),
        "MetricsServer",
    ]


def wait_windows(base_url: str, timeout_s: float) -> tuple[float, str]:
    """Seconds until a text scrape carries window gauges, and that scrape."""
    t0 = time.perf_counter()
    while True:
        code, body = probe.request(base_url + "/v1/metrics", timeout_s=timeout_s)
        text = body.decode(errors="replace")
        if code == 200 and "\nfeedback_window_" in text:
            return time.perf_counter() - t0, text
        if time.perf_counter() - t0 > timeout_s:
            raise ProbeError(f"no feedback_window_* gauges within {timeout_s:.0f} s")
        time.sleep(0.2)


def scrapes_under_trickle(
    base_url: str, work: Path, args: argparse.Namespace, load_cpu: int | None, r: Probe
) -> None:
    """Time text scrapes while a steady trickle of single-row events (every model, both
    endpoints) runs on its own connection; the trickle's slowest answer is the figure."""
    body = payloads.feedback_body([[3]], [[5]])
    trickle_file = work / "trickle.json"
    trickle_file.write_bytes(body)
    t0 = time.perf_counter()
    probe.time_scrapes(base_url, 1, timeout_s=60.0)
    one_s = time.perf_counter() - t0
    duration = max(5, math.ceil(args.scrapes * one_s * 1.5) + 3)
    found: dict[str, wrk.WrkResult | Exception] = {}

    def trickle() -> None:
        try:
            found["res"] = wrk.run(
                base_url + "/",
                trickle_file,
                f"trickle-{os.getpid()}",
                1,
                duration,
                load_cpu,
                spread=args.models,
                pause_ms=args.trickle_ms,
            )
        except (wrk.WrkError, OSError) as exc:
            found["res"] = exc

    before = probe.stable_counts(base_url, None)
    thread = threading.Thread(target=trickle)
    thread.start()
    time.sleep(1.0)
    t0 = time.perf_counter()
    t = probe.time_scrapes(base_url, args.scrapes, timeout_s=60.0)
    scrapes_s = time.perf_counter() - t0
    thread.join()
    res = found["res"]
    if isinstance(res, Exception):
        raise ProbeError(f"trickle: {res}")
    after = probe.stable_counts(base_url, None)
    r.scrape = {
        "scrapes": t.n,
        "median_ms": t.median_ms,
        "p90_ms": t.p90_ms,
        "max_ms": t.max_ms,
        "body_bytes": t.body_bytes,
        "samples": t.samples,
        "seconds": scrapes_s,
        "trickle_s": duration,  # the trickle ran from 1 s before the scrapes for this long
    }
    if scrapes_s + 1.0 > duration:
        r.failures.append(f"the scrapes took {scrapes_s:.1f} s, past the {duration} s trickle")
    r.trickle = {
        "pause_ms": args.trickle_ms,
        "sent": res.sent,
        "ok": res.ok,
        "non2xx": res.non2xx,
        "socket_errors": res.socket_errors,
        "p50_ms": res.p50_ms,
        "p99_ms": res.p99_ms,
        "max_ms": res.max_ms,
        "rows_counted": after.rows - before.rows,
    }
    if res.errors or res.ok == 0:
        r.failures.append(
            f"trickle: {res.ok} 2xx, {res.non2xx} non-2xx, {res.socket_errors} errors"
        )
    elif not res.ok <= after.rows - before.rows <= res.sent:
        r.failures.append(f"trickle: {after.rows - before.rows} rows counted, {res.ok} acked")


def run(args: argparse.Namespace, r: Probe, work: Path, ps: servers.ProcessSet) -> None:
    server_cpu, load_cpu = (None, None) if args.no_pin else (args.server_cpu, args.load_cpu)
    shape = Shape(args.models, args.classes, args.cells or args.classes**2, args.hours)
    config = models.write_config(
        work / "models.yaml", shape.names, NUMERIC, classes=range(shape.classes)
    )
    state_dir = work / "state"
    state_dir.mkdir()
    port = servers.free_port()
    argv = server_argv(port, state_dir, config, args.window_refresh)
    r.server["argv"] = argv
    first = ps.start("buckets-create", argv, port, server_cpu, model=None)
    ps.stop(first)  # it made the state file: schema, models; now the rows go in

    buckets = TimeBuckets.parse(DEFAULT_BUCKETS)
    pat = make_patterns(shape)
    now = time.time()
    print(f"filling {shape} ...", flush=True)
    filled = fill_state(state_dir / STATE_FILE, shape, pat, buckets, now)
    r.fill = asdict(filled) | {"minutes": len(filled.minutes)}
    print(
        f"  {len(filled.minutes)} minutes, rows {filled.rows_written}, {filled.seconds:.1f} s, "
        f"file {filled.file_mb:.0f} MB",
        flush=True,
    )

    port = servers.free_port()
    argv = server_argv(port, state_dir, config, args.window_refresh)
    m = ps.start("buckets", argv, port, server_cpu, timeout_s=args.start_timeout, model=None)
    r.server |= {"start_to_ready_s": m.start_to_ready_s, "rss_start_mb": m.rss_start_mb}
    print(f"server: first 200 after {m.start_to_ready_s:.2f} s, RSS {m.rss_start_mb:.1f} MB")
    wrong = check_fill(m.base_url, Expect(shape, pat, filled.minutes, buckets.finest))
    r.failures += [f"read back: {w}" for w in wrong]
    print(f"  read back: {'ok' if not wrong else '; '.join(wrong[:3])}", flush=True)
    r.server["rss_after_reads_mb"] = servers.rss_mb(m.pid)
    seconds, text = wait_windows(m.base_url, args.start_timeout)
    windows = sum(1 for line in text.splitlines() if line.startswith("feedback_window_"))
    r.server |= {"first_window_gauges_s": seconds, "window_samples": windows}
    print(f"  window gauges after {seconds:.1f} s: {windows} samples", flush=True)
    scrapes_under_trickle(m.base_url, work, args, load_cpu, r)
    r.server |= {
        "rss_after_scrapes_mb": servers.rss_mb(m.pid),
        "rss_peak_mb": servers.rss_mb(m.pid, "VmHWM"),
    }
    if not m.alive():
        r.failures.append(f"server exited (code {m.proc.returncode}):\n{m.log_tail()}")


def evaluate(r: Probe) -> list[Target]:
    s, sc, tr = r.server, r.scrape, r.trickle
    return [
        Target(
            "RSS peak (VmHWM) over start-up, reads and scrapes",
            s.get("rss_peak_mb"),
            "<=",
            200.0,
            unit="MB",
        ),
        Target(
            "one /v1/metrics text scrape, window gauges refreshed (median)",
            sc.get("median_ms"),
            "<=",
            1000.0,
            unit="ms",
        ),
        Target(
            "slowest single-row event while scrapes run", tr.get("max_ms"), "<=", 50.0, unit="ms"
        ),
        Target(
            "RSS after the scrapes",
            s.get("rss_after_scrapes_mb"),
            "<=",
            200.0,
            unit="MB",
            required=False,
        ),
        Target("slowest scrape", sc.get("max_ms"), "<=", 1000.0, unit="ms", required=False),
        Target(
            "start to first 200 on the filled state",
            s.get("start_to_ready_s"),
            "<=",
            5.0,
            unit="s",
            required=False,
        ),
    ]


def render(r: Probe) -> str:
    f, s, sc, tr = r.fill, r.server, r.scrape, r.trickle
    lines = [
        f"machine: {r.machine.get('cpu_model', '?')}, nproc {r.machine.get('nproc', '?')}, "
        f"commit {r.machine.get('git_commit', '?')}",
        f"shape: {r.shape}",
    ]
    if f:
        lines.append(
            f"fill: {f['minutes']} minute buckets x {r.shape['models']} models x "
            f"{len(models.ENDPOINTS)} segments; rows written {f['rows_written']}; "
            f"{f['seconds']:.1f} s; state file {f['file_mb']:.0f} MB"
        )
    if s.get("start_to_ready_s") is not None:
        rss = ", ".join(
            f"{what} {s.get(key) or 0:.1f} MB"
            for what, key in (
                ("start", "rss_start_mb"),
                ("after reads", "rss_after_reads_mb"),
                ("after scrapes", "rss_after_scrapes_mb"),
                ("peak", "rss_peak_mb"),
            )
        )
        lines.append(
            f"server: first 200 after {s['start_to_ready_s']:.2f} s; RSS {rss}; window gauges "
            f"after {s.get('first_window_gauges_s') or 0:.1f} s ({s.get('window_samples')} samples)"
        )
    if sc:
        lines.append(
            f"scrapes: median {sc['median_ms']:.1f} ms, p90 {sc['p90_ms']:.1f} ms, max "
            f"{sc['max_ms']:.1f} ms over {sc['scrapes']}; {sc['samples']} samples, "
            f"{sc['body_bytes']} bytes"
        )
    if tr:
        lines.append(
            f"trickle (1 event every {tr['pause_ms']} ms, every model): {tr['ok']} 2xx of "
            f"{tr['sent']}, p50 {tr['p50_ms']:.2f} ms, p99 {tr['p99_ms']:.2f} ms, max "
            f"{tr['max_ms']:.2f} ms"
        )
    lines += ["", report.targets_table(BenchResults(machine={}, params={}, targets=r.targets))]
    if r.failures:
        lines += ["", "### FAILURES", "", *(f"- {x}" for x in r.failures)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.buckets", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--smoke", action="store_true", help="4 models, 2 h, 5 scrapes")
    parser.add_argument("--models", type=int, default=None, help="models (default 100)")
    parser.add_argument("--classes", type=int, default=10, help="classes per model")
    parser.add_argument(
        "--cells",
        type=int,
        default=None,
        help="non-zero cells per bucket and segment (default classes^2)",
    )
    parser.add_argument(
        "--hours", type=int, default=None, help="hours of minute buckets, <= 48 (default 48)"
    )
    parser.add_argument("--scrapes", type=int, default=None, help="text scrapes timed (default 20)")
    parser.add_argument("--trickle-ms", type=int, default=20, help="pause between trickle events")
    parser.add_argument(
        "--window-refresh", type=int, default=15, help="--window_refresh_seconds (the default)"
    )
    parser.add_argument("--start-timeout", type=float, default=600.0, help="s to first 200")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    args.models = args.models or (4 if args.smoke else 100)
    args.hours = args.hours or (2 if args.smoke else 48)
    args.scrapes = args.scrapes or (5 if args.smoke else 20)
    if not 2 <= args.hours <= 48:
        parser.error("--hours: from 2 (a whole hour to read back) to 48 (minutes are kept 48 h)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if wrk.wrk_path() is None:
        print("wrk not found: apt-get install -y --no-install-recommends wrk", file=sys.stderr)
        return 2
    avail = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if not {args.server_cpu, args.load_cpu} <= avail or args.server_cpu == args.load_cpu:
        args.no_pin = True
    if not args.no_pin:
        os.sched_setaffinity(0, {args.load_cpu})
    r = Probe(
        shape={
            "models": args.models,
            "classes": args.classes,
            "hours": args.hours,
            "cells": args.cells or args.classes**2,
        },
        machine=machine.info(servers.REPO_ROOT),
    )
    with tempfile.TemporaryDirectory(prefix="bench-buckets-") as tmp:
        ps = servers.ProcessSet(Path(tmp))
        try:
            run(args, r, Path(tmp), ps)
        except (ProbeError, servers.StartError, OSError, sqlite3.Error, RuntimeError) as exc:
            r.failures.append(str(exc))
        except KeyboardInterrupt:
            r.failures.append("interrupted")
        finally:
            ps.stop_all()
    r.targets = evaluate(r)
    text = render(r)
    print()
    print(text)
    if args.json:
        doc = asdict(r)
        for t, d in zip(r.targets, doc["targets"], strict=True):
            d["met"] = t.met
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 1 if r.failures else 0


if __name__ == "__main__":
    sys.exit(main())
