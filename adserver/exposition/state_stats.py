"""Where the state lives, as the ``feedback_state_*`` families.

Every server exports ``feedback_state_info`` (its backend and keyspace), so a Prometheus rule
can tell, per target, whether replicas share one state (PostgreSQL: every replica exports the
global counts, collapse them) or each keeps its own (SQLite, memory: sum them). With a shared
database it adds this replica's own figures: how stale its views are, and what its
transactions cost (group commit's sizes, round trips, retries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from adserver.catalogue.families import MODEL, REASON, STATE
from adserver.exposition.collector import histogram_family, new
from adserver.state.committer import TRANSACTION_EVENTS, CommitStats
from adserver.state.view import Histogram


@dataclass(frozen=True)
class SharedFigures:
    """A shared store's figures: the committer's transactions, the dialect's round trips, and
    the poller's staleness (read at each scrape)."""

    commits: CommitStats
    round_trips: Callable[[], int]
    staleness: Callable[[], float]


class StateStats(Collector):
    """``backend``: ``--state``; ``keyspace``: the PostgreSQL schema, "" for another backend."""

    def __init__(
        self, model_name: str, backend: str, keyspace: str = "", shared: SharedFigures | None = None
    ) -> None:
        self.model_name = model_name
        self.backend = backend
        self.keyspace = keyspace
        self.shared = shared

    def collect(self) -> Iterator[Metric]:
        model = self.model_name
        info = new(STATE["info"])
        info.add_metric((model, self.backend, self.keyspace), 1)
        yield info
        shared = self.shared
        if shared is None:
            return
        staleness = new(STATE["staleness"])
        staleness.add_metric((model,), shared.staleness())
        yield staleness
        commits = shared.commits
        transactions = new(STATE["transactions"])
        transactions.add_metric((model,), commits.transactions)
        yield transactions
        sizes = Histogram(tuple(map(float, TRANSACTION_EVENTS)))
        sizes.buckets[:] = np.cumsum(commits.sizes)
        sizes.count, sizes.total = commits.transactions, commits.events
        yield histogram_family(STATE["transaction_events"], [(model, sizes)], lambda m: {MODEL: m})
        trips = new(STATE["round_trips"])
        trips.add_metric((model,), shared.round_trips())
        yield trips
        retries = new(STATE["retries"])
        counted = dict.fromkeys(STATE["retries"].values[REASON], 0) | dict(commits.retries)
        for reason, count in counted.items():
            retries.add_metric((model, reason), count)
        yield retries
