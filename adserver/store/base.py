"""The state-store interface: make deltas durable, exactly once, then apply them.

Handlers and models never see a backend: they call :meth:`StateStore.commit`. A backend only
decides where deltas and seen event ids live (process memory, a SQLite file, later Redis).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from adserver.state import Delta, MetricsState

Clock = Callable[[], float]


@dataclass(frozen=True)
class Entry:
    """One event's delta. ``event_key`` is (source, id) or None when it cannot be deduplicated."""

    delta: Delta
    event_key: tuple[str, str] | None = None


class StateStore(ABC):
    """Owns the :class:`MetricsState` and is the only writer to it."""

    def __init__(self, state: MetricsState) -> None:
        self.state = state

    @abstractmethod
    async def commit(self, entries: Sequence[Entry]) -> list[bool]:
        """Durably record entries; True for each applied, False for a duplicate event key.

        When this returns, applied deltas are in :attr:`state`. All entries of one call succeed
        or fail together.
        """

    async def close(self) -> None:
        """Finish pending work and release resources."""


class SeenIds:
    """Recently seen event keys, forgotten after ``retention`` seconds or beyond ``max_ids``."""

    def __init__(self, retention: float, max_ids: int, clock: Clock = time.time) -> None:
        self.retention = retention
        self.max_ids = max_ids
        self.clock = clock
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def add(self, key: tuple[str, str]) -> bool:
        """Remember ``key``; False if it was already known (a redelivery)."""
        now = self.clock()
        self._expire(now)
        if key in self._seen:
            return False
        self._seen[key] = now
        if len(self._seen) > self.max_ids:
            self._seen.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now: float) -> None:
        horizon = now - self.retention
        while self._seen:
            key, seen_at = next(iter(self._seen.items()))
            if seen_at > horizon:
                break
            del self._seen[key]
