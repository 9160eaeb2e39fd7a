"""In-process state: nothing survives a restart (the reference's behaviour, chosen explicitly)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from adserver.state import MetricsState
from adserver.store.base import Clock, Entry, SeenIds, StateStore


class MemoryStore(StateStore):
    def __init__(
        self, state: MetricsState, retention: float, max_ids: int, clock: Clock = time.time
    ) -> None:
        super().__init__(state)
        self.seen = SeenIds(retention, max_ids, clock)

    async def commit(self, entries: Sequence[Entry]) -> list[bool]:
        applied = []
        for entry in entries:
            new = entry.event_key is None or self.seen.add(entry.event_key)
            if new:
                self.state.apply(entry.delta)
            applied.append(new)
        return applied
