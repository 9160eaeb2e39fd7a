"""Run a user's Seldon-style metrics class unchanged, without importing seldon_core.

Such a class has ``transform(truth, response, request=None)`` and returns either an object with a
``metrics`` attribute (Seldon's ``SeldonResponse``) or a list of metric dicts.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from adserver.catalogue import reasons
from cm_models.base import InvalidFeedback, Observation, first_axis_rows, nested_array
from cm_models.custom_metrics import parse_metrics
from cm_models.sections import Section
from cm_models.statistics import Statistic

log = logging.getLogger(__name__)


def seldon_features(values: object) -> object:
    """What Seldon hands a model: ``np.array(data.ndarray)``, so user code may use numpy's API.

    Tensors arrive as arrays already; other payloads (strings, bytes, None) pass unchanged.
    """
    return nested_array(values, "feedback") if isinstance(values, list) else values


class SeldonStyle(Protocol):
    """A user's class as Seldon's server calls it."""

    def transform(self, truth: object, response: object, request: object = None) -> object: ...


class SeldonMetricsAdapter:
    """Presents a Seldon-style object as a :class:`cm_models.protocol.FeedbackModel` with no
    confusion matrix. User code is not known to be thread-safe: the server calls it on the
    IOLoop only (never inside a store transaction)."""

    seldon_class_label = False
    has_confusion = False
    numeric_rows = False  # a user's model may take any data
    thread_safe = False
    statistics: tuple[Statistic[Any, Any], ...] = ()  # its metrics are custom metrics
    sections: tuple[Section, ...] = ()

    def __init__(self, user_model: SeldonStyle, name: str) -> None:
        self.user_model = user_model
        self.name = name
        self.classes: list[int] = []

    def rows(self, values: object, what: str) -> list[object]:
        """A user's model may take any data: the first axis is its rows."""
        return first_axis_rows(values)

    def observe(self, truth: object, response: object, request: object = None) -> Observation:
        try:
            result = self.user_model.transform(
                seldon_features(truth), seldon_features(response), seldon_features(request)
            )
        except Exception as exc:
            # The same data would fail again: a 400 (not a 500 that Knative retries forever).
            log.warning("model transform failed", exc_info=True)
            raise InvalidFeedback(
                f"model rejected the feedback: {type(exc).__name__}: {exc}", reasons.MODEL_REJECTED
            ) from exc
        if result is None:
            return Observation()
        raw = getattr(result, "metrics", result)
        if raw is None:
            return Observation()
        if not isinstance(raw, (list, tuple)):
            raise InvalidFeedback(
                "model returned metrics that are not a list", reasons.MODEL_OUTPUT
            )
        metrics, problems = parse_metrics(raw)
        return Observation(metrics=tuple(metrics), metric_problems=tuple(problems))
