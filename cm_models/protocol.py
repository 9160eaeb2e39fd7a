"""What the server needs of a metric model, declared once: the built-in models (every
:class:`~cm_models.base.MetricModel`) and :class:`~cm_models.seldon_adapter.SeldonMetricsAdapter`
(a user's Seldon-style class) both satisfy it, so the server never probes a model's type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from cm_models.base import Observation
from cm_models.sections import Section
from cm_models.statistics import Statistic


class FeedbackModel(Protocol):
    """A stateless scorer of feedback, with the properties the server decides by."""

    # Read-only properties: a plain attribute (or a class attribute) satisfies each.
    @property
    def name(self) -> str:
        """The ``model`` label of every exported series."""
        ...

    @property
    def classes(self) -> Sequence[int]:
        """Class ids known up front: they appear with zero counts before any feedback names
        them."""
        ...

    @property
    def has_confusion(self) -> bool:
        """Its observations carry confusion-matrix cells: the server exports the matrix and its
        ``seldon_metric_*`` families (which custom metrics then may not shadow)."""
        ...

    @property
    def seldon_class_label(self) -> bool:
        """Seldon's counters carry ``class="CLASS_<n>"`` (not for binary models)."""
        ...

    @property
    def numeric_rows(self) -> bool:
        """Logged predictions must be numbers: anything else is acknowledged, never stored."""
        ...

    @property
    def thread_safe(self) -> bool:
        """Our own pure-numpy code: it may run on any thread, also inside a store transaction
        (large bodies are scored on the decoding thread, joins on the writer thread). A user's
        model is not: it runs on the IOLoop only, never inside a transaction."""
        ...

    @property
    def statistics(self) -> Sequence[Statistic[Any, Any]]:
        """Statistics kept beside the confusion matrix (declared, additive); the observations
        fill their ``updates``."""
        ...

    @property
    def sections(self) -> Sequence[Section]:
        """Metrics derived on read from those statistics, each a key of the model's summaries."""
        ...

    def rows(self, values: object, what: str) -> np.ndarray | list[object]:
        """``values`` as a batch whose first axis is rows (to store a label by row)."""
        ...

    def observe(self, truth: object, response: object, request: object = None) -> Observation:
        """What one event adds; raises :class:`~cm_models.base.InvalidFeedback` for data it
        cannot score."""
        ...
