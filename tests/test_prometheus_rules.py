"""promtool checks of the Prometheus rules and of the dashboard's PromQL.

The rules are what users page on, so they are unit-tested like code: `promtool test rules` runs
tests/data/rules/*.yaml against config/prometheus-rules.yaml. The dashboard repeats the rule
arithmetic over raw counters (it must work without the rules installed), so it is checked to
give the same numbers as the rules on the same series.

Without promtool these tests skip on a developer machine and fail in CI (CI=true).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dashboard import dashboard_exprs, dashboard_targets

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prometheus-rules.yaml"
UNIT_TESTS = sorted((ROOT / "tests" / "data" / "rules").glob("*.yaml"))
RECORDING_TEST = ROOT / "tests" / "data" / "rules" / "recording_test.yaml"

# dashboard (panel title, refId) -> the recording rule that must give the same samples
DASHBOARD_RULES = {
    ("Accuracy", "A"): "model:feedback_accuracy:ratio",
    ("Accuracy", "B"): "model:feedback_accuracy:ratio_increase1h",
    ("Precision by class", "A"): "model_class:feedback_precision:ratio",
    ("Precision by class", "B"): "model_class:feedback_precision:ratio_increase1h",
    ("Recall by class", "A"): "model_class:feedback_recall:ratio",
    ("Recall by class", "B"): "model_class:feedback_recall:ratio_increase1h",
    ("RMSE and MAE", "A"): "model:feedback_regression_rmse:ratio",
    ("RMSE and MAE", "B"): "model:feedback_regression_rmse:ratio_increase1h",
    ("RMSE and MAE", "C"): "model:feedback_regression_mae:ratio",
    ("Canary vs default accuracy", "C"): (
        "model_window:feedback_window_accuracy:canary_minus_default"
    ),
}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is not installed (Debian/Ubuntu: apt-get install prometheus)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{reason}; CI must run the rule tests")
        pytest.skip(reason)
    return path


def run(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_rule_file_passes_promtool_check(promtool: str) -> None:
    assert_ok(run(promtool, "check", "rules", RULES))


def test_unit_test_files_exist() -> None:
    assert {p.name for p in UNIT_TESTS} >= {"recording_test.yaml", "alerts_test.yaml"}


@pytest.mark.parametrize("path", UNIT_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests(promtool: str, path: Path) -> None:
    assert_ok(run(promtool, "test", "rules", path))


def test_a_wrong_expectation_fails(promtool: str, tmp_path: Path) -> None:
    """The harness can fail: promtool really compares values (0.7 -> 0.71 must be caught)."""
    data = yaml.safe_load(RECORDING_TEST.read_text())
    data["rule_files"] = [str(RULES)]
    for case in data["tests"]:
        for expr_test in case["promql_expr_test"]:
            for sample in expr_test["exp_samples"]:
                if sample["value"] == 0.7:
                    sample["value"] = 0.71
    result = run(promtool, "test", "rules", write_yaml(tmp_path / "wrong.yaml", data))
    assert result.returncode != 0
    assert "7.1E-01" in result.stdout + result.stderr  # the wrong expectation is reported


def test_dashboard_exprs_parse(promtool: str, tmp_path: Path) -> None:
    """Every panel query, variables filled in, is valid PromQL (checked as recording rules)."""
    exprs = dashboard_exprs()
    rules = [{"record": f"dashboard:expr_{i}:check", "expr": e} for i, e in enumerate(exprs)]
    path = write_yaml(tmp_path / "dashboard.yaml", {"groups": [{"name": "d", "rules": rules}]})
    assert_ok(run(promtool, "check", "rules", path))


def test_dashboard_quality_panels_equal_the_recording_rules(promtool: str, tmp_path: Path) -> None:
    """On the recording tests' series, each quality panel gives the rule's samples, no more or less.

    `(D - R) > eps or (D unless R) or (R unless D)` is empty iff the two agree (names ignored).
    """
    exprs = {(title, ref): expr for title, ref, expr in dashboard_targets()}
    assert DASHBOARD_RULES.keys() <= exprs.keys(), "a quality panel was renamed"
    checks = []
    for key, rule in DASHBOARD_RULES.items():
        dash = f"({exprs[key]})"
        mismatch = f"abs({dash} - {rule}) > 1e-9 or {dash} unless {rule} or {rule} unless {dash}"
        checks.append({"expr": mismatch, "eval_time": "120m", "exp_samples": []})
    fixture = yaml.safe_load(RECORDING_TEST.read_text())
    cases = [
        {"name": c["name"], "interval": c["interval"], "input_series": c["input_series"],
         "promql_expr_test": checks}
        for c in fixture["tests"]
    ]  # fmt: skip
    test_file = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": cases}
    assert_ok(run(promtool, "test", "rules", write_yaml(tmp_path / "dashboard.yaml", test_file)))
