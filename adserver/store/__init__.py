"""State backends behind one interface; :func:`open_store` picks one from settings."""

from __future__ import annotations

from adserver.settings import Settings
from adserver.state import MetricsState
from adserver.store.base import Entry, StateStore
from adserver.store.memory import MemoryStore

__all__ = ["Entry", "StateStore", "open_store"]


def open_store(settings: Settings, state: MetricsState) -> StateStore:
    if settings.state == "memory":
        return MemoryStore(state, settings.dedup_retention_seconds, settings.dedup_max_ids)
    raise ValueError(f"unknown state store {settings.state!r} (expected: memory)")
