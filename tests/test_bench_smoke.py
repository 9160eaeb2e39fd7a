"""Smoke run of the benchmark (`python -m bench --smoke`).

Why a test: the bench is the proof of the performance claims, so it must keep working; and its
smoke mode is also an end-to-end check that the real server, under concurrent load, counts exactly
the rows it acknowledged (never fewer, never twice) and answers every event with a 2xx.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _need_wrk() -> None:
    """Skip without wrk, except in CI, where its absence is a failure."""
    if shutil.which("wrk") is None:
        msg = "wrk is not installed: apt-get install -y --no-install-recommends wrk"
        if _in_ci():
            pytest.fail(msg)
        pytest.skip(msg)


def run_bench(
    args: list[str], out: Path, timeout: float, module: str = "bench"
) -> tuple[dict[str, Any], str]:
    """``python -m <module> *args --json out``: its JSON document, and its output for messages.
    Fails the test if the bench exits non-zero or reports a failed case."""
    _need_wrk()
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, "--json", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    log = f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    doc = json.loads(out.read_text())
    assert doc["failures"] == [], log
    return doc, log


@pytest.mark.e2e
def test_bench_smoke(tmp_path: Path) -> None:
    """Every server starts, answers 2xx under load, and rows counted == rows acknowledged."""
    doc, log = run_bench(["--smoke"], tmp_path / "smoke.json", timeout=600)
    servers = {c["server"] for c in doc["cases"]}
    assert {"floor", "memory", "seed", "seed-models", "memory-full", "sqlite-full"} <= servers, log
    notes = {s["name"]: " ".join(s["notes"]) for s in doc["servers"]}
    for aged in ("memory-full", "sqlite-full"):  # filled through HTTP and checked before its cases
        assert "2000 ids, 2000 logged rows" in notes[aged], notes
    assert "kill -9 + restart" in notes["seed"] and "sink received" in notes["seed"], notes
    spread = "rows per (model, endpoint) over 50 models x 2"  # the load reached every segment
    assert spread in notes["seed-models"] and "kill -9 + restart" in notes["seed-models"], notes
    statuses = {s["name"]: s["status"] for s in doc["servers"]}
    for guarded in ("seed-token", "seed-oidc"):  # skipped only by a server without --auth
        if not statuses[guarded].startswith("skipped"):
            assert "auth on: 401 without a token, 2xx with it" in notes[guarded], notes
            assert guarded in servers and "kill -9 + restart" in notes[guarded], notes
    assert "issuer served" in notes["seed-oidc"] or statuses["seed-oidc"].startswith("skipped")
    # skipped only without PostgreSQL's binaries or psycopg, or by a server without the store
    if not statuses["seed-postgres"].startswith("skipped"):
        assert "seed-postgres" in servers and "kill -9 + restart" in notes["seed-postgres"], notes
        assert "round trips per event" in notes["seed-postgres"], notes
    targets = {t["name"]: t for t in doc["targets"]}
    seed_p99 = "default config (seed) single row c1 p99 vs memory c1 p99"
    assert targets[seed_p99]["measured"] is not None, targets
    checked = [c for c in doc["cases"] if c["check_ok"] is not None]
    assert checked, log
    for case in checked:
        assert case["check_ok"], f"{case['server']} {case['case']}: {case['check']}"
        assert case["ok"] > 0 and case["non2xx"] == 0 and case["socket_errors"] == 0, case
        assert case["ok"] * case["rows"] <= case["counted_rows"] <= case["sent"] * case["rows"]
    assert doc["scrape"] is not None and doc["scrape"]["rows_counted"] == 500, log


@pytest.mark.e2e
def test_bench_baseline_ab(tmp_path: Path) -> None:
    """`--baseline HEAD`: memory also runs from HEAD's exported tree, both sides every round,
    and the A/B table prints both ratios to the floor and their quotient with its noise."""
    md = tmp_path / "ab.md"
    ab_args = ["--servers", "floor,memory", "--baseline", "HEAD", "--repeats", "2", "--warmup", "0"]
    doc, log = run_bench(
        ["--smoke", *ab_args, "--markdown", str(md)], tmp_path / "ab.json", timeout=300
    )
    notes = {s["name"]: " ".join(s["notes"]) for s in doc["servers"]}
    assert "from --baseline HEAD" in notes["memory@base"], notes
    runs = {(c["server"], c["case"], c["repeat"]) for c in doc["cases"] if c["check_ok"]}
    assert {("memory@base", "1 row c16", 1), ("memory", "1 row c16", 1)} <= runs, log
    ab = {a["case"]: a for a in doc["ab"] if a["server"] == "memory"}
    assert set(ab) == {"1 row c1", "1 row c16", "1000 rows c16"}, doc["ab"]
    for a in ab.values():
        assert a["repeats"] == 2 and a["req_noise"] is not None, a
        assert a["x_floor_req"] > 0 and a["base_x_floor_req"] > 0, a
    table = md.read_text()
    for column in ("x floor req/s this", "x floor req/s baseline", "req/s this / baseline"):
        assert column in table, table


@pytest.mark.e2e
def test_bench_buckets_smoke(tmp_path: Path) -> None:
    """`python -m bench.buckets --smoke`: the rows written straight into the state file read
    back exactly through the server (by hour, by minute, per segment), window gauges appear,
    and every trickle event during the scrapes is answered 2xx and counted."""
    doc, log = run_bench(["--smoke"], tmp_path / "buckets.json", 300, module="bench.buckets")
    assert doc["fill"]["minutes"] >= 119 and doc["fill"]["rows_written"]["cells"] > 0, log
    assert doc["server"]["window_samples"] > 0, log
    trickle = doc["trickle"]
    # Every answer a 2xx, every acknowledged event counted. What wrk's script counts as sent
    # but saw no answer for when it stopped (the request in flight, and one its request() hook
    # built during the pause) is no failure: it may count or not, never more than sent.
    assert trickle["ok"] > 0 and trickle["non2xx"] == 0 and trickle["socket_errors"] == 0, log
    assert trickle["ok"] <= trickle["rows_counted"] <= trickle["sent"], log
    measured = {t["name"]: t["measured"] for t in doc["targets"]}
    assert all(value is not None for value in measured.values()), measured
