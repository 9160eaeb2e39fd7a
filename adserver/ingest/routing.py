"""Which configured model an event belongs to, and its values of the model's segment dimensions.

Precedence (README, "Many models"): the path ``/v1/models/<name>``; else a model whose ``match``
names the V2 body's ``model_name``/``model_version``; else the model whose ``match`` keys all
equal the event's extensions (most keys wins, ties go to the first in the file); else the
default model; else none. Routes are indexed by the set of keys they match on, so an event costs
one dict lookup per distinct key set, never a scan of the models.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from adserver.catalogue.wire import (
    BODY_MODEL_VERSION,
    EXTENSION_ANNOTATIONS,
    EXTENSION_METADATA,
    MATCH_BODY,
    SEGMENT_ANNOTATION,
    SEGMENT_METADATA,
    SEGMENT_TAG,
)
from adserver.wire.cloudevents import IncomingEvent
from adserver.wire.json_body import loads

#: One segment value: None when the event does not tell it.
SegmentValues = tuple[str | None, ...]


@dataclass(frozen=True)
class Route:
    """A configured model as routing sees it."""

    name: str
    match: Mapping[str, str] = field(default_factory=dict)
    segment_by: tuple[str, ...] = ()
    default: bool = False


@dataclass(frozen=True)
class _Tier:
    """Routes matching on one set of keys: the event's values of those keys -> the route."""

    keys: tuple[str, ...]
    routes: dict[tuple[str, ...], tuple[int, Route]]


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = {route.name: route for route in routes}
        self.default = next((route for route in routes if route.default), None)
        by_keys: dict[tuple[str, ...], dict[tuple[str, ...], tuple[int, Route]]] = {}
        for index, route in enumerate(routes):
            if route.match:
                keys = tuple(sorted(route.match))
                by_keys.setdefault(keys, {}).setdefault(
                    tuple(route.match[key] for key in keys), (index, route)
                )
        # Body-naming key sets first, then the most keys; one tier per (body, count).
        ordered = sorted(by_keys, key=_rank)
        self.tiers = [
            [_Tier(keys, by_keys[keys]) for keys in tier]
            for _, tier in itertools.groupby(ordered, key=_rank)
        ]

    def route(self, event: IncomingEvent, body: Any) -> Route | None:
        """The model of an event that names none by its path; ``body`` is its JSON payload."""
        for tier in self.tiers:
            found = [
                hit
                for group in tier
                if (hit := group.routes.get(_values(group.keys, event, body))) is not None
            ]
            if found:
                return min(found, key=lambda hit: hit[0])[1]
        return self.default


def _rank(keys: tuple[str, ...]) -> tuple[bool, int]:
    return (not any(key in MATCH_BODY for key in keys), -len(keys))


def _values(keys: tuple[str, ...], event: IncomingEvent, body: Any) -> tuple[str, ...]:
    """The event's value of each key ("" when it has none: no route matches on an empty value)."""
    return tuple(_field(key, event, body) or "" for key in keys)


def _field(key: str, event: IncomingEvent, body: Any) -> str | None:
    source = body if key in MATCH_BODY else event.attributes
    value = source.get(key) if isinstance(source, dict | Mapping) else None
    return None if value is None or isinstance(value, dict | list) else str(value)


def segment_values(
    route: Route, event: IncomingEvent, body: Any, tags: Mapping[str, Any] | None = None
) -> SegmentValues:
    """The event's value of each of the model's dimensions, in declared order (None: unknown).

    ``tags`` are a feedback's ``truth.meta.tags``; a logger event has none.
    """
    if not route.segment_by:
        return ()
    parsed: dict[str, Any] = {}  # the JSON extensions, parsed once per event
    return tuple(_dimension(dimension, event, body, tags, parsed) for dimension in route.segment_by)


def _dimension(
    dimension: str,
    event: IncomingEvent,
    body: Any,
    tags: Mapping[str, Any] | None,
    parsed: dict[str, Any],
) -> str | None:
    source, _, key = dimension.partition(":")
    if source == SEGMENT_TAG:
        return _scalar(tags.get(key)) if tags else None
    if source == SEGMENT_ANNOTATION:
        return _scalar(_lookup(_json_extension(EXTENSION_ANNOTATIONS, event, parsed), key))
    if source == SEGMENT_METADATA:  # request headers: each a list of values, the first counts
        values = _lookup(_json_extension(EXTENSION_METADATA, event, parsed), key)
        return _scalar(values[0] if isinstance(values, list) and values else values)
    if source == BODY_MODEL_VERSION:
        return _scalar(body.get(source)) if isinstance(body, dict) else None
    return _scalar(event.attributes.get(source))  # endpoint, component


def _json_extension(name: str, event: IncomingEvent, parsed: dict[str, Any]) -> Any:
    """A JSON-valued extension (KServe's ``ce-annotations``, ``ce-metadata``); {} if it is not."""
    if name not in parsed:
        raw = event.attributes.get(name)
        try:
            parsed[name] = loads(raw) if isinstance(raw, str | bytes) else raw
        except ValueError:  # orjson's JSONDecodeError: an unreadable extension tells nothing
            parsed[name] = None
    return parsed[name]


def _lookup(mapping: Any, key: str) -> Any:
    """``key`` of a JSON object; header names compare case-insensitively, as HTTP's do."""
    if not isinstance(mapping, dict):
        return None
    if key in mapping:
        return mapping[key]
    lowered = key.lower()
    return next((v for k, v in mapping.items() if str(k).lower() == lowered), None)


def _scalar(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
