"""The ``feedback_state_*`` families: every backend's info, a shared store's own figures."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adserver.exposition.state_stats import SharedFigures, StateStats
from adserver.state.committer import CommitStats


def scrape(stats: StateStats) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(stats)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_local_store_exports_only_where_it_lives() -> None:
    assert scrape(StateStats("m", "sqlite")) == {
        ("feedback_state_info", (("backend", "sqlite"), ("keyspace", ""), ("model", "m"))): 1.0
    }


def test_a_shared_store_exports_its_transactions_round_trips_and_staleness() -> None:
    commits = CommitStats()
    for events in (1, 3, 3, 300):
        commits.committed(events)
    commits.retries["deadlock"] += 2
    found = scrape(
        StateStats("m", "postgres", "feedback_m", SharedFigures(commits, lambda: 17, lambda: 0.5))
    )
    model = (("model", "m"),)
    assert (
        found[
            ("feedback_state_info", (("backend", "postgres"), ("keyspace", "feedback_m"), *model))
        ]
        == 1
    )
    assert found[("feedback_state_staleness_seconds", model)] == 0.5
    assert found[("feedback_state_transactions_total", model)] == 4
    assert found[("feedback_state_round_trips_total", model)] == 17
    events = "feedback_state_transaction_events"
    assert [
        found[(events + "_bucket", (("le", le), *model))]
        for le in ("1.0", "2.0", "4.0", "256.0", "+Inf")
    ] == [1, 1, 3, 3, 4]
    assert (found[(events + "_count", model)], found[(events + "_sum", model)]) == (4, 307)
    retries = {
        labels[1][1]: v
        for (name, labels), v in found.items()
        if name == "feedback_state_retries_total"
    }
    assert retries == {"deadlock": 2, "serialization": 0, "other": 0}
