"""A user's own Seldon-style metrics classes, as they exist in manifests today.

They never import seldon_core: Seldon builds them as ``cls(name, storage_uri, elasticsearch_uri)``,
calls ``load()`` and then ``transform(truth, response, request)`` with numpy arrays (Seldon's
``extract_request_parts_json`` turns ``data.ndarray`` into ``np.array``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class MyMetrics:
    """Returns a plain list of metric dicts, one of them invalid (dropped alone)."""

    def __init__(self, name: str, storage_uri: str, elasticsearch_uri: str | None = None) -> None:
        self.name = name
        self.loaded = False

    def load(self) -> None:
        self.loaded = True

    def transform(
        self, truth: np.ndarray, response: np.ndarray, request: Any = None
    ) -> list[dict[str, Any]]:
        if not self.loaded:
            raise RuntimeError("load() was not called")
        if truth.shape != response.shape:  # numpy API: Seldon hands over arrays, not lists
            raise ValueError(f"shapes differ: {truth.shape} vs {response.shape}")
        correct = int((truth.argmax(axis=-1) == response.argmax(axis=-1)).sum())
        return [
            {"key": "user_correct", "type": "COUNTER", "value": correct},
            {"key": "user_seen", "type": "COUNTER", "value": len(truth), "tags": {"by": "user"}},
            {"key": "user_last_score", "type": "GAUGE", "value": float(response.max())},
            {"key": "user_broken", "type": "HISTOGRAM", "value": 1},
        ]


class Response:
    """Seldon's ``SeldonResponse(data, tags, metrics)`` without importing seldon_core."""

    def __init__(self, data: Any, tags: Any, metrics: list[dict[str, Any]]) -> None:
        self.data, self.tags, self.metrics = data, tags, metrics


class MyMetricsResponse:
    """Returns an object with ``.metrics``, as the reference's own models do."""

    def __init__(self, name: str, storage_uri: str, **_: Any) -> None:
        self.name = name

    def transform(self, truth: np.ndarray, response: np.ndarray, request: Any = None) -> Response:
        return Response(None, None, [{"key": "user_events", "type": "COUNTER", "value": 1}])


class FragileMetrics:
    """A realistic user bug: all-zero truth divides by zero (ZeroDivisionError, not ValueError)."""

    def __init__(self, name: str, storage_uri: str, **_: Any) -> None:
        self.name = name

    def transform(self, truth: np.ndarray, response: np.ndarray, request: Any = None) -> list:
        return [{"key": "user_ratio", "type": "GAUGE", "value": 1 / int(truth.sum())}]


class SeldonNamedMetrics:
    """Names its counter like a family the built-in models export (allowed for a user model)."""

    def transform(self, truth: np.ndarray, response: np.ndarray, request: Any = None) -> list:
        return [{"key": "seldon_metric_true_positive", "type": "COUNTER", "value": len(truth)}]
