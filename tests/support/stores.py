"""What tests build stores from: the default buckets, a scorer standing in for a model, and
feedback events."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from adserver.catalogue.families import ROWS_ACCEPTED
from adserver.state.buckets import DEFAULT_BUCKETS, TimeBuckets
from adserver.state.store import Entry
from adserver.state.view import Delta
from cm_models.confusion import Cells

BUCKETS = TimeBuckets.parse(DEFAULT_BUCKETS)


def scoring(score: Any, *, thread_safe: bool = True) -> Any:
    """A model for the joiner that scores with ``score`` (in the transaction if thread-safe)."""
    return SimpleNamespace(observe=score, thread_safe=thread_safe)


def event(event_id: str, truth: Sequence[int], predicted: Sequence[int], **extra: Any) -> Entry:
    """Feedback with its truth and prediction (rows that count at once), keyed for dedup."""
    cells = Cells.from_labels(np.array(truth), np.array(predicted))
    delta = Delta(cells=cells, counters=((ROWS_ACCEPTED, "", len(truth)),), **extra)
    return Entry(delta, ("src", event_id))
