"""What tests build stores from: the default buckets, and a scorer standing in for a model."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from adserver.state.buckets import DEFAULT_BUCKETS, TimeBuckets

BUCKETS = TimeBuckets.parse(DEFAULT_BUCKETS)


def scoring(score: Any, *, thread_safe: bool = True) -> Any:
    """A model for the joiner that scores with ``score`` (in the transaction if thread-safe)."""
    return SimpleNamespace(observe=score, thread_safe=thread_safe)
