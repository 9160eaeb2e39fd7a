"""Turn BenchResults into the printed tables (Markdown, so RESULTS.md is a copy) and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from bench.machine import NOISY_PCT
from bench.results import BenchResults, CaseResult


def _f(x: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def cases_table(r: BenchResults) -> str:
    """case, server, req/s, rows/s, p50, p99, ratios to the floor (of the same round), rows
    check; with --repeats, the round after the case."""
    rows: list[list[str]] = []
    ordered = sorted(r.cases, key=lambda c: (c.rows, c.connections, c.repeat))
    rounds = any(c.repeat for c in r.cases)
    for c in ordered:
        floor: CaseResult | None = r.case("floor", c.rows, c.connections, c.repeat)
        x_req = c.req_s / floor.req_s if floor and floor.req_s else None
        x_p99 = c.p99_ms / floor.p99_ms if floor and floor.p99_ms else None
        errors = c.non2xx + c.socket_errors
        rows.append(
            [
                c.case + (f" #{c.repeat + 1}" if rounds else ""),
                c.server,
                _f(c.req_s),
                _f(c.rows_s),
                _f(c.p50_ms, "{:.2f}"),
                _f(c.p99_ms, "{:.2f}"),
                _f(x_req, "{:.2f}"),
                _f(x_p99, "{:.2f}"),
                str(errors),
                _f(c.other_cpu_pct),
                c.check,
            ]
        )
    return _table(
        [
            "case",
            "server",
            "req/s",
            "rows/s",
            "p50 ms",
            "p99 ms",
            "x floor req/s",
            "x floor p99",
            "errors",
            "other CPU %",
            "rows counted vs acked",
        ],
        rows,
    )


def servers_table(r: BenchResults) -> str:
    """Start-up time and memory of every server process."""
    rows = [
        [
            s.name,
            s.status,
            _f(s.start_to_ready_s, "{:.3f}"),
            _f(s.rss_start_mb, "{:.1f}"),
            _f(s.rss_after_mb, "{:.1f}"),
            "; ".join(s.notes),
        ]
        for s in r.servers
    ]
    return _table(
        ["server", "status", "start to first 200 s", "RSS start MB", "RSS after load MB", "notes"],
        rows,
    )


def _pm(noise: float | None) -> str:
    return "-" if noise is None else f"+/- {noise * 100:.1f} %"


def _within(quotient: float, noise: float | None) -> str:
    """Whether 1.0 lies within the quotient's noise (the spread of its repeats)."""
    if noise is None:
        return "n/a (1 round)"
    return "within noise" if abs(quotient - 1.0) <= noise * quotient else "OUTSIDE noise"


def ab_table(r: BenchResults) -> str:
    """Per case and server: ratios to the floor of this tree and of the baseline, this / baseline
    with its noise (half the range of the rounds' quotients), for req/s and p99."""
    rows = [
        [
            a.case,
            a.server,
            str(a.repeats),
            _f(a.x_floor_req, "{:.3f}"),
            _f(a.base_x_floor_req, "{:.3f}"),
            f"{a.req_quotient:.3f}",
            _pm(a.req_noise),
            _within(a.req_quotient, a.req_noise),
            _f(a.x_floor_p99, "{:.3f}"),
            _f(a.base_x_floor_p99, "{:.3f}"),
            f"{a.p99_quotient:.3f}",
            _pm(a.p99_noise),
        ]
        for a in sorted(r.ab, key=lambda a: (a.rows, a.connections))
    ]
    return _table(
        [
            "case",
            "server",
            "rounds",
            "x floor req/s this",
            "x floor req/s baseline",
            "req/s this / baseline",
            "noise",
            "req/s verdict",
            "x floor p99 this",
            "x floor p99 baseline",
            "p99 this / baseline",
            "p99 noise",
        ],
        rows,
    )


def targets_table(r: BenchResults) -> str:
    """Each target with its measured value (and its noise over the rounds, when it is a
    quotient of rounds) and verdict."""
    rows = []
    for t in r.targets:
        verdict = {True: "met", False: "NOT MET", None: "n/a"}[t.met]
        if not t.required and t.measured is not None:
            verdict = "(info)"
        rows.append(
            [
                t.name,
                _f(t.measured, "{:.3f}")
                + ("" if t.measured is None else f" {t.unit}")
                + ("" if t.noise is None else f" {_pm(t.noise)}"),
                f"{t.op} {t.threshold:g} {t.unit}",
                verdict,
            ]
        )
    return _table(["target", "measured", "goal", "verdict"], rows)


def render(r: BenchResults) -> str:
    """The whole report as Markdown text."""
    m, p = r.machine, r.params
    parts = [
        (
            f"machine: {m.get('cpu_model', '?')}, nproc {m.get('nproc', '?')}, "
            f"Python {m.get('python', '?')}, wrk {m.get('wrk', '?')}, {m.get('date', '?')}, "
            f"commit {m.get('git_commit', '?')}, load avg {_f(m.get('loadavg_start'), '{:.2f}')}"
            f" -> {_f(m.get('loadavg_end'), '{:.2f}')}"
        ),
        (
            f"params: mode {p.get('mode')}, duration {p.get('duration_s')} s, warm-up "
            f"{p.get('warmup_s')} s, rounds {p.get('repeats')}, server cpu {p.get('server_cpu')}, "
            f"load cpu {p.get('load_cpu')}, other processes' CPU before the run "
            f"{_f(m.get('other_cpu_pct_before'))}% of a core"
        ),
        "",
        "### Throughput and latency (ratios to the floor server of the same run)",
        "",
        cases_table(r),
        "",
        "### Server processes",
        "",
        servers_table(r),
        "",
    ]
    if r.scrape:
        s = r.scrape
        parts += [
            "### Scrape",
            "",
            (
                f"GET /v1/metrics (text) with {s.classes} classes ({s.events} events, "
                f"{s.rows_counted} rows counted): median {s.median_ms:.2f} ms, "
                f"p90 {s.p90_ms:.2f} ms, max {s.max_ms:.2f} ms over {s.scrapes} scrapes; "
                f"body {s.body_bytes} bytes, {s.samples} samples"
            ),
            "",
        ]
    noisy = [c for c in r.cases if (c.other_cpu_pct or 0) > NOISY_PCT]
    if noisy:
        parts += [
            f"warning: {len(noisy)} of {len(r.cases)} runs shared the machine with other "
            f"processes using > {NOISY_PCT:.0f}% of a core (column 'other CPU %'); rerun "
            f"on a quiet machine before trusting their ratios",
            "",
        ]
    if r.ab:
        parts += [
            (
                f"### This tree ({m.get('git_commit', '?')}) against --baseline "
                f"{p.get('baseline')} ({str(p.get('baseline_commit'))[:10]}), same run"
            ),
            "",
            ab_table(r),
            "",
        ]
    parts += ["### Targets", "", targets_table(r), ""]
    if r.failures:
        parts += ["### FAILURES", ""] + [f"- {f}" for f in r.failures] + [""]
    return "\n".join(parts)


def write_json(r: BenchResults, path: Path) -> None:
    """Machine-readable copy of the same results."""
    path.write_text(json.dumps(r.to_json(), indent=2) + "\n")
