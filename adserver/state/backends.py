"""State backends behind one interface; :func:`open_store` picks one from settings."""

from __future__ import annotations

import logging

from adserver.errors import StartupError
from adserver.loader import model_kind
from adserver.settings import Settings
from adserver.state.committer import CommitPolicy
from adserver.state.join import Joiner
from adserver.state.sqlite.store import SQLiteDialect, SQLiteStore, reset_state
from adserver.state.store import Entry, StateStore
from adserver.state.view import MetricsState

__all__ = ["Entry", "StateStore", "open_store"]

log = logging.getLogger(__name__)


def open_store(
    settings: Settings,
    state: MetricsState,
    joiner: Joiner,
    reserved_prefixes: tuple[str, ...] = (),
) -> StateStore:
    """``memory`` runs the same store on an in-memory database: identical semantics, no file."""
    if settings.state not in ("sqlite", "memory"):
        raise StartupError(f"unknown --state {settings.state!r}: expected sqlite or memory")
    durable = settings.state == "sqlite"
    if durable and settings.reset_state:
        moved = reset_state(settings.state_dir)
        log.warning("state reset", extra={"moved_to": str(moved) if moved else None})
    dialect = SQLiteDialect.open(
        settings.state_dir if durable else None,
        settings.model_name,
        model_kind(settings.storage_uri),
    )
    policy = CommitPolicy(
        retention=settings.dedup_retention_seconds,
        max_ids=settings.dedup_max_ids,
        join_max_rows=settings.join_max_rows,
        max_classes=settings.max_classes,
        reserved_prefixes=reserved_prefixes,
        max_custom_series=settings.max_custom_series,
    )
    return SQLiteStore(state, dialect, settings.model_name, policy, joiner=joiner)
