"""State backends behind one interface; :func:`open_store` picks one from settings."""

from __future__ import annotations

import logging

from adserver.errors import StartupError
from adserver.settings import Settings
from adserver.state import MetricsState
from adserver.store.base import Entry, StateStore
from adserver.store.memory import MemoryStore
from adserver.store.sqlite import SQLiteStore, reset_state

__all__ = ["Entry", "StateStore", "open_store"]

log = logging.getLogger(__name__)


def open_store(settings: Settings, state: MetricsState) -> StateStore:
    if settings.state == "memory":
        return MemoryStore(state, settings.dedup_retention_seconds, settings.dedup_max_ids)
    if settings.state == "sqlite":
        if settings.reset_state:
            moved = reset_state(settings.state_dir)
            log.warning("state reset", extra={"moved_to": str(moved) if moved else None})
        return SQLiteStore(
            state,
            settings.state_dir,
            settings.model_name,
            retention=settings.dedup_retention_seconds,
            max_ids=settings.dedup_max_ids,
        )
    raise StartupError(f"unknown --state {settings.state!r}: expected sqlite or memory")
