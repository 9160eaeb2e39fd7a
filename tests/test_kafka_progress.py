"""What the consumer may commit: never past a record whose outcome is not final."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adserver.app import kafka_properties
from adserver.catalogue import reasons
from adserver.errors import BadRequest, InternalError, StartupError, Unavailable
from adserver.ingest.service import Accepted
from adserver.kafka.consumer import verdict
from adserver.kafka.progress import PartitionProgress


@given(st.integers(1, 60), st.integers(0, 2**32), st.data())
def test_the_commit_position_is_the_first_offset_not_final(
    count: int, seed: int, data: st.DataObject
) -> None:
    """Records finish in any order, some are sought back and taken again: the position is
    always the lowest offset taken and not final (or one past the last taken)."""
    rng = random.Random(seed)
    progress = PartitionProgress()
    start = data.draw(st.integers(0, 1000))
    offsets = list(range(start, start + count))
    for offset in offsets:
        progress.take(offset)
    final: set[int] = set()
    for offset in rng.sample(offsets, len(offsets)):
        if rng.random() < 0.2:  # a fault: sought back to it, the rest taken again
            progress.rewind(offset)
            final = {o for o in final if o < offset}
            for again in range(offset, start + count):
                progress.take(again)
            continue
        progress.finish(offset)
        final.add(offset)
        pending = [o for o in offsets if o not in final]
        expected = pending[0] if pending else start + count
        assert progress.position() == expected
        assert progress.pending == len(pending)


def test_nothing_to_commit_twice() -> None:
    progress = PartitionProgress()
    assert progress.to_commit() is None
    progress.take(7)
    progress.take(8)
    progress.finish(8)
    assert progress.to_commit() == 7  # committing 7 says: 7 is the next to read
    progress.committed = 7
    assert progress.to_commit() is None
    progress.finish(7)
    assert progress.to_commit() == 9


@pytest.mark.parametrize(
    ("outcome", "final", "reason"),
    [
        (Accepted([True]), True, None),
        (Accepted([False]), True, None),  # a redelivery, counted before
        (BadRequest("bad", reasons.INVALID_JSON), True, reasons.INVALID_JSON),
        (Unavailable("busy", reasons.STORE_ERROR), False, None),
        (Unavailable("draining", reasons.SHUTTING_DOWN), False, None),
    ],
)
def test_outcomes_are_final_unless_a_fault(outcome, final, reason) -> None:
    result = verdict(outcome)
    assert (result.final, result.reason, result.internal) == (final, reason, False)


def test_an_internal_error_is_retried_then_refused() -> None:
    result = verdict(InternalError("bug", reasons.INTERNAL_SERVER_ERROR))
    assert (result.final, result.internal) == (False, True)


def test_kafka_config_takes_properties_but_not_the_owned_ones() -> None:
    assert kafka_properties(" a.b=1, c=x=y ,") == {"a.b": "1", "c": "x=y"}
    for text in ("enable.auto.commit=true", "group.id=other", "novalue"):
        with pytest.raises(StartupError):
            kafka_properties(text)
