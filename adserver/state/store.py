"""The state-store interface: make deltas durable, exactly once, then apply them.

Handlers and models never see a backend: they call :meth:`StateStore.commit`. The one
implementation is :class:`adserver.state.committer.Committer`; a backend only supplies its
dialect, where counts, seen event ids and logged predictions live (a SQLite file, or an
in-memory SQLite database; PostgreSQL would be one more dialect).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from adserver.state.join import Label, LoggedRows
from adserver.state.view import Delta, KeyedState, MetricsState, Placement

__all__ = ["Clock", "Entry", "Placement", "StateStore"]

Clock = Callable[[], float]


@dataclass(frozen=True)
class Entry:
    """One event's effect.

    ``delta`` is known up front; ``operation`` (a logged prediction or a label to join) adds a
    delta the store computes inside its transaction, from what it holds. ``event_key`` is
    (source, id), or None when the event cannot be deduplicated (a plain POST). ``model`` is the
    model it belongs to (None: the server's own, ``--model_name``); ``placement`` is where the
    rows of ``delta`` count (a join places the rows it scores itself, from what it stored).
    """

    delta: Delta = field(default_factory=Delta)
    event_key: tuple[str, str] | None = None
    operation: LoggedRows | Label | None = None
    model: str | None = None
    placement: Placement = field(default_factory=Placement)


class StateStore(ABC):
    """Owns the :class:`MetricsState` and is the only writer to it."""

    views: KeyedState  # every model's totals and segments

    def __init__(self, state: MetricsState) -> None:
        self.state = state

    @abstractmethod
    async def commit(self, entries: Sequence[Entry]) -> list[bool]:
        """Record entries; True for each applied, False for a duplicate event key.

        When this returns, the entries are durable and their deltas are in :attr:`state`. The
        entries of one call succeed or fail together; a failure raises and changes nothing.
        """

    async def close(self) -> None:
        """Finish pending work and release resources."""
