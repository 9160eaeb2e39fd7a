"""`python -m bench --baseline REV`: the exported tree, and the A/B arithmetic (no wrk needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import baseline
from bench.results import BenchResults, CaseResult


def _repo(path: Path, files: dict[str, str]) -> str:
    """A throwaway git repository with one commit of `files`; returns the commit id."""
    path.mkdir()
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    return baseline.resolve(path, "HEAD")


def test_export_serves_adserver_from_the_tree(tmp_path: Path) -> None:
    """The baseline's servers import REV's adserver, not the installed or the current one."""
    repo = tmp_path / "repo"
    commit = _repo(repo, {"adserver/__init__.py": "", "adserver/__main__.py": ""})
    base = baseline.export(repo, "HEAD", commit, tmp_path / "tree", sys.executable)
    assert (base.tree / "adserver" / "__main__.py").is_file()
    assert not (base.tree / ".git").exists()


def test_export_refuses_a_tree_without_adserver(tmp_path: Path) -> None:
    """Without adserver in REV the servers would run the installed package: an A/B of us
    against ourselves, so the bench refuses it."""
    repo = tmp_path / "repo"
    commit = _repo(repo, {"README.md": "no package here\n"})
    with pytest.raises(baseline.BaselineError, match="would load from"):
        baseline.export(repo, "HEAD", commit, tmp_path / "tree", sys.executable)


def test_resolve_refuses_what_is_not_a_commit(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _repo(repo, {"README.md": "x\n"})
    with pytest.raises(baseline.BaselineError, match="not a commit"):
        baseline.resolve(repo, "no-such-rev")


def _run(server: str, req_s: float, p99_ms: float, repeat: int) -> CaseResult:
    return CaseResult(
        server, 1, 16, 1.0, req_s, req_s, 1.0, 1.0, p99_ms, 1.0, 1, 1, 0, {}, 0, repeat=repeat
    )


def test_compare_quotient_and_noise_from_the_rounds() -> None:
    """Quotient: the median of the rounds' this / baseline (the floor cancels in each round);
    noise: half their range; ratios to the floor: per round, then the median."""
    r = BenchResults(machine={}, params={})
    for repeat, (a, b) in enumerate([(100.0, 100.0), (110.0, 100.0), (80.0, 50.0)]):
        r.cases += [
            _run("floor", 200.0, 2.0, repeat),
            _run("memory", a, 4.0, repeat),
            _run("memory@base", b, 2.0, repeat),
        ]
    (ab,) = baseline.compare(r)
    assert (ab.server, ab.case, ab.repeats) == ("memory", "1 row c16", 3)
    assert ab.req_quotient == pytest.approx(1.1)
    assert ab.req_noise == pytest.approx(0.3 / 1.1)
    assert ab.x_floor_req == pytest.approx(0.5) and ab.base_x_floor_req == pytest.approx(0.5)
    assert ab.p99_quotient == pytest.approx(2.0) and ab.p99_noise == pytest.approx(0.0)
