"""Result records shared by the runner, the targets and the report (plain dataclasses -> JSON)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

BASE_SUFFIX = "@base"  # a server run from the --baseline tree: "memory@base" pairs with "memory"


def spread(xs: list[float]) -> float | None:
    """Half the range, relative to the median: the +/- of a few repeats (None for one)."""
    if len(xs) < 2:
        return None
    return (max(xs) - min(xs)) / 2 / statistics.median(xs)


@dataclass
class CaseResult:
    """One measured wrk run against one server."""

    server: str
    rows: int
    connections: int
    duration_s: float
    req_s: float  # 2xx answers per second
    rows_s: float  # rows acknowledged (2xx x rows per request) per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    ok: int
    sent: int
    non2xx: int
    non2xx_by_status: dict[str, int]
    socket_errors: int
    counted_rows: int | None = None  # server's row delta over the measured run (None: floor)
    counted_events: int | None = None
    counted_rows_s: float | None = None
    check_ok: bool | None = None  # None: not checkable (floor)
    check: str = "n/a"
    warmup_check: str = "n/a"
    warmup_ok: int = 0  # 2xx answers during the warm-up
    other_cpu_pct: float | None = None  # CPU used by processes not ours, % of one core
    attempts: int = 1  # >1 when reruns were needed because the machine was busy
    acked_rows_all: int = 0  # rows acked over every warm-up and attempt of this case
    repeat: int = 0  # which of the --repeats rounds of this case (0: the first)

    @property
    def case(self) -> str:
        return f"{self.rows} row{'s' if self.rows > 1 else ''} c{self.connections}"


@dataclass
class ServerResult:
    """One server process: how it started, its memory, and whether it was usable."""

    name: str
    argv: list[str]
    status: str = "ok"  # ok | skipped: ... | failed: ...
    pid: int | None = None
    start_to_ready_s: float | None = None
    rss_start_mb: float | None = None
    rss_after_mb: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class ScrapeResult:
    """Timing of GET /v1/metrics (text) with a 100-class confusion matrix filled."""

    classes: int
    events: int
    rows_counted: int
    scrapes: int
    median_ms: float
    p90_ms: float
    max_ms: float
    body_bytes: int
    samples: int


@dataclass
class Target:
    """A goal expressed as a ratio or bound, evaluated from figures of the same run."""

    name: str
    measured: float | None
    op: str  # ">=" or "<="
    threshold: float
    unit: str = "x"
    required: bool = True  # False: printed for information, no verdict
    noise: float | None = None  # +/- relative, over the rounds (a same-run quotient's spread)

    @property
    def met(self) -> bool | None:
        if self.measured is None or not self.required:
            return None
        return (
            self.measured >= self.threshold if self.op == ">=" else self.measured <= self.threshold
        )


@dataclass
class ABResult:
    """One case of one server against the same server run from the --baseline tree.

    x_floor_*: median over the repeats of the ratio to the floor run of the same repeat (None
    without a floor); *_quotient: median of the repeats' this / baseline; *_noise: half the
    range of those repeats, relative to the median (None with one repeat).
    """

    server: str
    rows: int
    connections: int
    repeats: int
    x_floor_req: float | None
    base_x_floor_req: float | None
    x_floor_p99: float | None
    base_x_floor_p99: float | None
    req_quotient: float
    req_noise: float | None
    p99_quotient: float
    p99_noise: float | None

    @property
    def case(self) -> str:
        return f"{self.rows} row{'s' if self.rows > 1 else ''} c{self.connections}"


Pick = Callable[[CaseResult], float]  # the figure of a run a quotient compares


@dataclass
class BenchResults:
    """Everything one run measured, plus what went wrong."""

    machine: dict
    params: dict
    servers: list[ServerResult] = field(default_factory=list)
    cases: list[CaseResult] = field(default_factory=list)
    scrape: ScrapeResult | None = None
    targets: list[Target] = field(default_factory=list)
    ab: list[ABResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def case(self, server: str, rows: int, connections: int, repeat: int = 0) -> CaseResult | None:
        """The measured run of `server` for this case and repeat (targets use the first)."""
        for c in self.cases:
            if (c.server, c.rows, c.connections, c.repeat) == (server, rows, connections, repeat):
                return c
        return None

    def quotients(
        self, server: str, other: str, rows: int, connections: int, pick: Pick
    ) -> list[float]:
        """pick(server) / pick(other) of this case in every round both ran, in round order:
        two servers measured seconds apart, so the machine's drift cancels in each."""
        out = []
        for a in self.cases:
            if (a.server, a.rows, a.connections) != (server, rows, connections):
                continue
            b = self.case(other, rows, connections, a.repeat)
            if b is not None and pick(a) and pick(b):
                out.append(pick(a) / pick(b))
        return out

    def server(self, name: str) -> ServerResult | None:
        return next((s for s in self.servers if s.name == name), None)

    def to_json(self) -> dict:
        """JSON-ready dict, with derived fields (case names, target verdicts) spelled out."""
        doc = asdict(self)
        for c, d in zip(self.cases, doc["cases"], strict=True):
            d["case"] = c.case
        for t, d in zip(self.targets, doc["targets"], strict=True):
            d["met"] = t.met
        for a, d in zip(self.ab, doc["ab"], strict=True):
            d["case"] = a.case
        return doc
