"""Seldon ``Feedback`` bodies: ``{request?, response?, truth, reward?}``.

Custom metrics come from ``truth.meta.metrics`` as in Seldon's server; ``reward`` is ignored.
``truth.meta.tags`` may name segment values (``segment_by: [tag:<key>]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adserver.catalogue import reasons
from adserver.errors import BadRequest
from adserver.wire.seldon_message import decode_message
from cm_models.custom_metrics import CustomMetric, parse_metrics


@dataclass(frozen=True)
class Feedback:
    truth: Any
    response: Any = None
    request: Any = None
    metrics: tuple[CustomMetric, ...] = ()
    metric_problems: tuple[str, ...] = ()
    puid: str | None = None
    tags: Mapping[str, Any] = field(default_factory=dict)


def parse_feedback(body: Any) -> Feedback:
    if not isinstance(body, dict):
        raise BadRequest("feedback must be a JSON object", reasons.INVALID_BODY)
    if body.get("truth") is None:
        raise BadRequest("feedback has no truth", reasons.MISSING_TRUTH)
    truth_message = body["truth"]
    meta = truth_message.get("meta") if isinstance(truth_message, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    raw_metrics = meta.get("metrics") or []
    if not isinstance(raw_metrics, list):
        raise BadRequest("truth.meta.metrics must be a list", reasons.INVALID_METRICS)
    metrics, problems = parse_metrics(raw_metrics)
    return Feedback(
        truth=decode_message(truth_message, "truth"),
        response=optional_message(body, "response"),
        request=optional_message(body, "request"),
        metrics=tuple(metrics),
        metric_problems=tuple(problems),
        puid=meta.get("puid") if isinstance(meta.get("puid"), str) else None,
        tags=meta["tags"] if isinstance(meta.get("tags"), dict) else {},
    )


def optional_message(body: dict[str, Any], key: str) -> Any:
    return None if body.get(key) is None else decode_message(body[key], key)
