"""Same-run A/B against another commit: export its tree, then compare the two sides per case.

`--baseline REV` runs each of our selected servers twice, from this tree and from REV's, on the
same core in the same run, their cases interleaved. Ratios to the floor of one run travel badly
across runs on a shared machine; the quotient of two servers measured seconds apart does not.
"""

from __future__ import annotations

import statistics
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from bench.results import BASE_SUFFIX, ABResult, BenchResults, CaseResult, Pick, spread
from bench.servers import tree_env


class BaselineError(RuntimeError):
    """REV is not a commit, its tree cannot be exported, or its server would not load from it."""


@dataclass(frozen=True)
class Baseline:
    """The exported tree of REV: its servers run with cwd and PYTHONPATH set to `tree`."""

    rev: str
    commit: str
    tree: Path


def resolve(repo: Path, rev: str) -> str:
    """The full commit id of `rev`; a BaselineError (before anything starts) if it is none."""
    p = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    if p.returncode != 0:
        raise BaselineError(f"--baseline {rev}: not a commit of {repo}")
    return p.stdout.strip()


def export(repo: Path, rev: str, commit: str, dest: Path, python: str) -> Baseline:
    """`git archive commit` unpacked into `dest` (inside the run's temporary directory, which the
    bench removes at the end, on failure and on Ctrl-C); checks that `adserver` imports from it."""
    dest.mkdir(parents=True)
    proc = subprocess.Popen(
        ["git", "archive", "--format=tar", commit],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            tar.extractall(dest, filter="data")
        _, err = proc.communicate()  # also drains the archive's padding after its last member
    except BaseException as exc:  # Ctrl-C while unpacking too: leave no git process behind
        proc.kill()
        proc.wait()
        if isinstance(exc, tarfile.TarError):
            raise BaselineError(f"--baseline {rev}: cannot unpack git archive: {exc}") from exc
        raise
    if proc.returncode != 0:
        raise BaselineError(f"--baseline {rev}: git archive failed: {err.decode().strip()}")
    base = Baseline(rev, commit, dest)
    origin = _adserver_origin(base, python)
    if not origin.startswith(str(dest) + "/"):
        raise BaselineError(
            f"--baseline {rev}: adserver would load from {origin or '?'}, not from {dest}"
        )
    return base


def _adserver_origin(base: Baseline, python: str) -> str:
    """Where `python -m adserver` started like a baseline server finds the package."""
    p = subprocess.run(
        [python, "-c", "import importlib.util as u; print(u.find_spec('adserver').origin)"],
        cwd=base.tree,
        env=tree_env(base.tree),
        capture_output=True,
        text=True,
        check=False,
    )
    return p.stdout.strip()


Pair = tuple[CaseResult, CaseResult, CaseResult | None]  # this, baseline, floor of one repeat


def _pairs(r: BenchResults, a: CaseResult) -> list[Pair]:
    """(this, baseline, floor) of every repeat of `a`'s case that both sides ran."""
    out = []
    for c in r.cases:
        if (c.server, c.rows, c.connections) != (a.server, a.rows, a.connections):
            continue
        b = r.case(a.server + BASE_SUFFIX, c.rows, c.connections, c.repeat)
        if b is not None and c.req_s and b.req_s and c.p99_ms and b.p99_ms:
            out.append((c, b, r.case("floor", c.rows, c.connections, c.repeat)))
    return out


def _x_floor(runs: list[tuple[CaseResult, CaseResult | None]], pick: Pick) -> float | None:
    """Median over the repeats of the ratio to the floor run of the same repeat (None without)."""
    if any(f is None or not pick(f) for _, f in runs):
        return None
    return statistics.median(pick(c) / pick(f) for c, f in runs if f is not None)


def compare(r: BenchResults) -> list[ABResult]:
    """Per case and server: both sides' ratios to the floor and the quotient this / baseline.

    The floor cancels in each repeat's quotient (both sides divide by the same floor run), so the
    quotient is the median of A_i / B_i and its noise is the spread of those repeats. Medians,
    not means: on a shared machine a neighbour's burst tends to spoil one round, not all.
    """
    out = []
    req: Pick = lambda c: c.req_s  # noqa: E731
    p99: Pick = lambda c: c.p99_ms  # noqa: E731
    for a in r.cases:
        if a.repeat != 0 or a.server == "floor" or a.server.endswith(BASE_SUFFIX):
            continue
        pairs = _pairs(r, a)
        if not pairs:
            continue
        ours = [(c, f) for c, _, f in pairs]
        theirs = [(b, f) for _, b, f in pairs]
        q_req = [c.req_s / b.req_s for c, b, _ in pairs]
        q_p99 = [c.p99_ms / b.p99_ms for c, b, _ in pairs]
        out.append(
            ABResult(
                server=a.server,
                rows=a.rows,
                connections=a.connections,
                repeats=len(pairs),
                x_floor_req=_x_floor(ours, req),
                base_x_floor_req=_x_floor(theirs, req),
                x_floor_p99=_x_floor(ours, p99),
                base_x_floor_p99=_x_floor(theirs, p99),
                req_quotient=statistics.median(q_req),
                req_noise=spread(q_req),
                p99_quotient=statistics.median(q_p99),
                p99_noise=spread(q_p99),
            )
        )
    return out
