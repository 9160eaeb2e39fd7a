"""Build ``state.sql`` and ``view.json``: a state file written by the schema-3 server, and its view.

Run with the code of commit a97571f (the last with schema version 3) first on the path:

    git archive a97571f adserver cm_models | tar -x -C /tmp/v3
    PYTHONPATH=/tmp/v3 python tests/data/state_v3/build.py tests/data/state_v3

The dump is the file's own SQL (``iterdump``), so the migration test opens exactly that file.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import tempfile
from pathlib import Path

import numpy as np

from adserver.exposition.summary import model_summary
from adserver.state.committer import CommitPolicy
from adserver.state.join import Joiner, Label, LoggedRows
from adserver.state.sqlite.schema import SCHEMA_VERSION
from adserver.state.sqlite.store import SQLiteDialect, SQLiteStore, state_path
from adserver.state.store import Entry
from adserver.state.view import Delta, MetricsState
from cm_models import MultiClassNumeric
from cm_models.confusion import Cells
from cm_models.custom_metrics import CustomMetric
from tests.support.stores import BUCKETS

NOW = 1_700_000_000.0


def feedback(event_id: str, truth: list[int], predicted: list[int], **extra: object) -> Entry:
    cells = Cells.from_labels(np.array(truth), np.array(predicted))
    counters = (("rows_accepted", "", len(truth)), ("events_accepted", "", 1))
    return Entry(Delta(cells=cells, counters=counters, **extra), ("src", event_id))


async def write(directory: str) -> SQLiteStore:
    joiner = Joiner({"m": MultiClassNumeric()}, ttl=10_000)
    store = SQLiteStore(
        {"m": MetricsState()},
        SQLiteDialect.open(directory, "m"),
        "m",
        CommitPolicy(retention=10_000, max_ids=1000),
        joiner=joiner,
        clock=lambda: NOW,
        buckets=BUCKETS,
    )
    metrics = (
        CustomMetric("hits", "COUNTER", 2.0, (("shard", "a"),)),
        CustomMetric("hits", "COUNTER", 3.0, (("shard", "b"),)),
        CustomMetric("temperature", "GAUGE", 7.5),
        CustomMetric("latency", "TIMER", 15.0),
    )
    await store.commit([feedback("1", [0, 1, 1, 2], [0, 1, 0, 2], metrics=metrics)])
    await store.commit([feedback("2", [2, 3], [1, 3], metrics=metrics[1:])])
    await store.commit(
        [
            Entry(operation=LoggedRows("r1", "response", np.array([1, 2, 0]), NOW - 30)),
            Entry(operation=LoggedRows("r2", "response", np.array([4, 4]), NOW - 5)),
        ]
    )
    await store.commit(
        [Entry(operation=Label(("r1",), 0, np.array([1, 2])), event_key=("src", "l1"))]
    )
    await store.commit(
        [Entry(operation=Label(("p1",), 0, np.array([3, 1])), event_key=("src", "l2"))]
    )
    await store.commit([Entry(Delta(counters=(("events_rejected", "invalid_json", 1),)))])
    await store.close()
    return store


def view(store: SQLiteStore) -> dict[str, object]:
    state, custom = store.state, store.state.custom
    """Everything the migration must keep, as JSON (the test compares the upgraded store's)."""
    return {
        "summary": model_summary(state),
        "counters": sorted([name, label, value] for (name, label), value in state.counters.items()),
        "custom_counters": sorted(
            [k, list(map(list, t)), v] for (k, t), v in custom.counters.items()
        ),
        "custom_gauges": sorted([k, list(map(list, t)), v] for (k, t), v in custom.gauges.items()),
        "custom_timers": sorted(
            [k, list(map(list, t)), h.buckets.tolist(), h.count, h.total]
            for (k, t), h in custom.timers.items()
        ),
        "label_delay": [
            state.label_delay.buckets.tolist(),
            state.label_delay.count,
            state.label_delay.total,
        ],
        "seen_ids": store.seen_count,
        "row_counts": [store.row_counts.logged, store.row_counts.parked],
    }


def main(out: Path) -> None:
    assert SCHEMA_VERSION == 3, "run with the code of commit a97571f first on the path"
    with tempfile.TemporaryDirectory() as directory:
        store = asyncio.run(write(directory))
        assert store.state.count("labels", "joined") == 2
        connection = sqlite3.connect(state_path(directory))
        dump = "\n".join(connection.iterdump())
        connection.close()
    (out / "state.sql").write_text(dump + "\n")
    (out / "view.json").write_text(json.dumps(view(store), indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
