"""Seldon's custom-metric contract: ``{key, type: COUNTER|GAUGE|TIMER, value, tags}``.

Unlike Seldon's ``validate_metrics``, each dict is judged alone: one bad item is dropped and
counted, the rest (and the confusion-matrix update) still count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

MetricType = Literal["COUNTER", "GAUGE", "TIMER"]
METRIC_TYPES: tuple[MetricType, ...] = ("COUNTER", "GAUGE", "TIMER")

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True)
class CustomMetric:
    """One validated metric update. ``tags`` is sorted so equal series compare equal."""

    key: str
    type: MetricType
    value: float
    tags: tuple[tuple[str, str], ...] = ()


def parse_metric(item: object) -> CustomMetric:
    """Validate one metric dict; :class:`ValueError` says what is wrong with it."""
    if not isinstance(item, dict):
        raise ValueError("a metric must be an object")
    key, kind, value = item.get("key"), item.get("type"), item.get("value")
    if not isinstance(key, str) or not _NAME.match(key) or key.startswith("__"):
        raise ValueError(f"metric key {key!r} is not a valid Prometheus name")
    if kind not in METRIC_TYPES:
        raise ValueError(f"metric {key}: type must be one of {', '.join(METRIC_TYPES)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"metric {key}: value must be a finite number")
    if kind == "COUNTER" and value < 0:
        raise ValueError(f"metric {key}: a counter cannot decrease")
    tags = item.get("tags") or {}
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and _LABEL.match(k) and not k.startswith("__") for k in tags
    ):
        raise ValueError(f"metric {key}: tags must map label names to values")
    return CustomMetric(
        key, kind, float(value), tuple(sorted((k, str(v)) for k, v in tags.items()))
    )


def parse_metrics(items: Iterable[object]) -> tuple[list[CustomMetric], list[str]]:
    """The valid metrics and one message per rejected item."""
    accepted: list[CustomMetric] = []
    problems: list[str] = []
    for item in items:
        try:
            accepted.append(parse_metric(item))
        except ValueError as exc:
            problems.append(str(exc))
    return accepted, problems
