"""Sections: metrics a model derives on read from its declared statistics.

A section is one key of a model's JSON summary (``regression``, ``scores``), derived from one
span's tables (all time, a segment, a window, a range's step) by the same code, so every place
that shows a model's metrics shows the same numbers. The server knows sections by name only;
:mod:`adserver.exposition` maps a known section's values to Prometheus families.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any


class Section(ABC):
    """Derives one summary key from the tables of the statistics it reads."""

    #: The summary key (and, for the server's own sections, the name its families go by).
    name: str

    @abstractmethod
    def derive(self, tables: Mapping[str, Any]) -> dict[str, Any]:
        """JSON-ready metrics of one span (``tables``: accumulators by statistic name). A metric
        that is not defined yet (no rows, fewer than two) is None, never NaN."""
