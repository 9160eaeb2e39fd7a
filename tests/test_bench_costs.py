"""Issue 14's bench: the regression and probability events against a classification event.

No wrk and no server: the payloads, the plan's variants (with a process set that starts
nothing) and the target arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bench import payloads, report, run, servers, targets
from bench.results import BenchResults, CaseResult


def test_regression_bodies_are_one_number_per_row_and_deterministic(tmp_path: Path) -> None:
    first = payloads.write_payloads(tmp_path / "a", kind=payloads.REGRESSION)
    again = payloads.write_payloads(tmp_path / "b", kind=payloads.REGRESSION)
    assert sorted(first) == [1, 100, 1000]
    for rows, p in first.items():
        assert p.path.read_bytes() == again[rows].path.read_bytes()
        doc = json.loads(p.path.read_bytes())
        truth, response = (np.array(doc[k]["data"]["ndarray"]) for k in ("truth", "response"))
        assert truth.shape == response.shape == (rows,) and p.rows == rows
        assert truth.dtype == response.dtype == np.float64
    errors = np.abs(response - truth)  # of the 1000 rows: spread over the histogram's buckets
    assert errors.min() > 0 and errors.max() > 5


def test_a_new_kind_changes_no_byte_of_the_classification_bodies(tmp_path: Path) -> None:
    """The classification bodies are today's: their own generator, from the same seed."""
    feedback = payloads.write_payloads(tmp_path, kind=payloads.FEEDBACK)
    payloads.write_payloads(tmp_path, kind=payloads.REGRESSION)
    rng = np.random.default_rng(payloads.SEED)
    for rows, p in feedback.items():
        assert p.path.name == f"feedback_{rows}.json"
        assert p.path.read_bytes() == payloads.one_hot_feedback(rows, rng)


class _NoProcesses:
    """Stands for ProcessSet: the reply sinks it is asked for 'start' on a port, nothing runs."""

    def start(self, name: str, argv: list[str], port: int, cpu: int | None, **_: object):
        return SimpleNamespace(port=port)


def _variants(tmp_path: Path, *flags: str) -> dict[str, run.Variant]:
    plan = run.make_plan(run.parse_args(list(flags)))
    results = BenchResults(machine={}, params={})
    runner = run.Runner(plan, _NoProcesses(), tmp_path, None, None, results)  # type: ignore[arg-type]
    return {v.name: v for v in runner.variants({})}


def test_the_cost_variants_are_the_seed_with_scores_kept_and_a_regressor(tmp_path: Path) -> None:
    vs = _variants(tmp_path, "--servers", "floor,seed,seed-scores,seed-regression")
    cost = [(1, 16), (1000, 1), (1000, 16)]
    assert vs["seed-scores"].grid == vs["seed-regression"].grid == cost
    assert set(cost) <= set(vs["seed"].grid)
    scored, regression, seed = (
        vs[name].argv_for(8000) for name in ("seed-scores", "seed-regression", "seed")
    )
    at = scored.index("--score_range")
    assert scored[at + 1] == "0,1"
    del scored[at : at + 2]
    differ = {seed[i - 1] for i, (a, b) in enumerate(zip(scored, seed, strict=True)) if a != b}
    assert differ == {"--state_dir", "--reply_url"}  # its own state and sink, else the seed's
    assert regression[regression.index("--storage_uri") + 1] == run.REGRESSION
    assert seed[seed.index("--storage_uri") + 1] == servers.SEED_STORAGE_URI
    assert "--score_range" not in seed and "--score_range" not in regression
    for name in ("seed-scores", "seed-regression"):
        assert vs[name].model == servers.SEED_MODEL and name in run.DURABLE
    assert vs["seed-regression"].body == payloads.REGRESSION
    assert vs["seed"].body == vs["seed-scores"].body == vs["floor"].body == payloads.FEEDBACK


def test_seed_runs_the_cost_cases_only_beside_a_cost_variant(tmp_path: Path) -> None:
    """`--servers floor,seed` keeps the seed's cases of today."""
    assert _variants(tmp_path, "--servers", "floor,seed")["seed"].grid == [(1, 1), (1, 16)]


def test_smoke_adds_one_case(tmp_path: Path) -> None:
    vs = _variants(tmp_path, "--smoke")
    assert vs["seed-scores"].grid == vs["seed-regression"].grid == [(1000, 16)]
    assert vs["seed"].grid == [(1, 1), (1, 16), (1000, 16)]


def _case(server: str, rows: int, conns: int, req_s: float, repeat: int = 0) -> CaseResult:
    return CaseResult(
        server,
        rows,
        conns,
        1.0,
        req_s,
        req_s * rows,
        1.0,
        1.0,
        1.0,
        1.0,
        1,
        1,
        0,
        {},
        0,
        repeat=repeat,
    )


def test_cost_is_the_median_of_the_rounds_inverse_throughput_ratio_with_its_noise() -> None:
    r = BenchResults(machine={}, params={})
    for repeat, (classify, regression) in enumerate([(100.0, 100.0), (120.0, 100.0), (90.0, 50.0)]):
        r.cases += [
            _case("seed", 1000, 16, classify, repeat),
            _case("seed-regression", 1000, 16, regression, repeat),
        ]
    measured, noise = targets.cost_ratio(r, "seed-regression", "seed", 1000, 16)
    assert measured == pytest.approx(1.2)  # rounds: 1.0, 1.2, 1.8
    assert noise == pytest.approx(0.4 / 1.2)
    assert targets.cost_ratio(r, "seed-scores", "seed", 1000, 16) == (None, None)


def _costs(r: BenchResults) -> dict[str, targets.Target]:
    return {t.name: t for t in targets.evaluate(r) if "event cost vs classification" in t.name}


def test_cost_targets_bar_and_verdicts() -> None:
    r = BenchResults(machine={}, params={})
    r.cases += [
        _case("seed", 1000, 16, 60.0),
        _case("seed-regression", 1000, 16, 60.0),
        _case("seed-scores", 1000, 16, 40.0),
        _case("seed", 1, 16, 1000.0),
        _case("seed-scores", 1, 16, 500.0),
    ]
    got = _costs(r)
    assert len(got) == 6
    regression = got[
        "1000-row regression event cost vs classification (seed-regression vs seed) "
        "c16, cost = 1 / req/s"
    ]
    probability = got[
        "1000-row probability event cost vs classification (seed-scores vs seed) c16, "
        "cost = 1 / req/s"
    ]
    info = got[
        "single row probability event cost vs classification (seed-scores vs seed) c16, "
        "cost = 1 / req/s"
    ]
    assert (regression.measured, regression.met, regression.noise) == (1.0, True, None)
    assert (probability.measured, probability.met) == (1.5, False)
    assert (probability.op, probability.threshold) == ("<=", 1.2)
    assert info.measured == 2.0 and not info.required and info.met is None
    c1 = [t for name, t in got.items() if name.startswith("1000-row") and " c1," in name]
    assert len(c1) == 2 and all(t.required and t.measured is None for t in c1)


def test_the_targets_table_prints_a_quotient_s_noise() -> None:
    r = BenchResults(machine={}, params={})
    for repeat, regression in enumerate([100.0, 80.0]):
        r.cases += [
            _case("seed", 1000, 16, 100.0, repeat),
            _case("seed-regression", 1000, 16, regression, repeat),
        ]
    r.targets = targets.evaluate(r)
    line = next(
        row
        for row in report.targets_table(r).splitlines()
        if "seed-regression vs" in row and " c16," in row and "1000-row" in row
    )
    assert "1.125 x +/- 11.1 %" in line and "met" in line
