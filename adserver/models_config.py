"""``--models_config``: the YAML file that lists the models one server counts for.

Read once at start-up; every mistake is a :class:`ModelsConfigError` that names the file and the
line, so a typo fails the rollout instead of silently sending a model's events elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from adserver.catalogue.wire import MATCH_BODY, MATCH_EXTENSIONS, SEGMENT_FIELDS, SEGMENT_KEYED
from adserver.errors import StartupError
from adserver.loader import ModelLoadError, load_model, resolve_class
from adserver.settings import Settings
from cm_models.protocol import FeedbackModel
from cm_models.regression_metrics import error_bounds
from cm_models.scores import SCORES_AUTO, SCORES_OFF, parse_score_bins, parse_score_range

#: A model's name is the ``model`` label of its series.
MODEL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MATCH_KEYS = (*MATCH_EXTENSIONS, *MATCH_BODY)
MODEL_KEYS = frozenset(
    {"name", "storage_uri", "classes", "threshold", "default", "match", "segment_by",
     "max_segments", "error_buckets",
     "score_bins", "score_range"}
)  # fmt: skip


class ModelsConfigError(StartupError):
    """The models config cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class ModelConfig:
    """One configured model: how to build it, which events are its, and how they segment."""

    name: str
    storage_uri: str
    classes: tuple[int, ...] = ()
    threshold: float = 0.5
    default: bool = False
    match: Mapping[str, str] = field(default_factory=dict)
    segment_by: tuple[str, ...] = ()
    max_segments: int | None = None  # None: --max_segments
    error_buckets: str | None = None  # None: --error_buckets
    score_bins: int | None = None  # None: --score_bins
    score_range: str | None = None  # None: --score_range
    where: str = ""  # "<file>:line <n>" of its entry, for the errors of loading it

    def settings(self, server: Settings) -> Settings:
        """The server's settings as this model's loader sees them (its name, class, classes)."""
        return replace(
            server,
            model_name=self.name,
            storage_uri=self.storage_uri,
            classes=self.classes,
            binary_threshold=self.threshold,
            error_buckets=self.error_buckets or server.error_buckets,
            score_bins=server.score_bins if self.score_bins is None else self.score_bins,
            score_range=server.score_range if self.score_range is None else self.score_range,
        )


class _Mapping(dict[Any, Any]):
    """A YAML mapping that remembers where it and each of its keys are (1-based lines)."""

    line = 0
    lines: dict[Any, int]


class _Loader(yaml.SafeLoader):
    """Safe YAML whose mappings carry their lines and refuse a key given twice."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Mapping:
    loader.flatten_mapping(node)
    mapping = _Mapping()
    mapping.line = node.start_mark.line + 1
    mapping.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, (str, int, float, bool)) or key in mapping:
            raise yaml.MarkedYAMLError(problem=f"key {key!r} is not a unique scalar",
                                       problem_mark=key_node.start_mark)  # fmt: skip
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = line
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_configured_models(
    configured: list[ModelConfig], settings: Settings
) -> dict[str, FeedbackModel]:
    """Each configured model, built now: one that cannot be (e.g. classes its class refuses)
    fails start-up naming its entry's line."""
    models = {}
    for config in configured:
        try:
            models[config.name] = load_model(config.settings(settings))
        except ModelLoadError as exc:
            raise ModelsConfigError(f"{config.where}: model {config.name!r}: {exc}") from exc
    return models


def load_models_config(path: str, settings: Settings) -> list[ModelConfig]:
    """The models of ``path``, validated against ``settings`` (--max_models, --model_name)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelsConfigError(f"--models_config {path}: cannot read it: {exc}") from exc
    try:
        document = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}" if mark is not None else "?"
        raise ModelsConfigError(f"{path}:{where}: not valid YAML: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise ModelsConfigError(f"{path}: not valid YAML: {exc}") from exc
    return _Parser(path, settings).models(document)


@dataclass
class _Parser:
    path: str
    settings: Settings

    def fail(self, line: int, message: str) -> ModelsConfigError:
        return ModelsConfigError(f"{self.path}:line {line}: {message}")

    def models(self, document: Any) -> list[ModelConfig]:
        if not isinstance(document, _Mapping) or not isinstance(document.get("models"), list):
            line = document.line if isinstance(document, _Mapping) else 1
            raise self.fail(line, "expected a mapping with a list `models`")
        unknown = sorted(map(str, document.keys() - {"models"}))
        if unknown:
            raise self.fail(document.lines[unknown[0]], f"unknown key {unknown[0]!r}")
        items = document["models"]
        if not items:
            raise self.fail(document.lines["models"], "`models` lists no model")
        if len(items) > self.settings.max_models:
            raise self.fail(
                document.lines["models"],
                f"{len(items)} models, more than --max_models ({self.settings.max_models})",
            )
        models: list[ModelConfig] = []
        for item in items:
            model = self.model(item, document.lines["models"])
            line = item.lines["name"]
            if any(other.name == model.name for other in models):
                raise self.fail(line, f"model name {model.name!r} is given twice")
            if model.default and any(other.default for other in models):
                raise self.fail(item.lines["default"], "a second `default: true` model")
            models.append(model)
        return models

    def model(self, item: Any, line: int) -> ModelConfig:
        if not isinstance(item, _Mapping):
            raise self.fail(line, "each model must be a mapping")
        unknown = sorted(map(str, item.keys() - MODEL_KEYS))
        if unknown:
            raise self.fail(item.lines[unknown[0]], f"unknown key {unknown[0]!r}")
        for required in ("name", "storage_uri"):
            if not isinstance(item.get(required), str):
                raise self.fail(item.lines.get(required, item.line), f"`{required}` is required")
        name = item["name"]
        if not MODEL_NAME.fullmatch(name):
            raise self.fail(item.lines["name"], f"name {name!r} is not [A-Za-z0-9_.:-]{{1,64}}")
        try:
            resolve_class(item["storage_uri"])
        except ModelLoadError as exc:
            raise self.fail(item.lines["storage_uri"], str(exc)) from exc
        return ModelConfig(
            name=name,
            storage_uri=item["storage_uri"],
            classes=self.classes(item),
            threshold=self.number(item, "threshold", 0.5),
            default=self.flag(item, "default"),
            match=self.match(item),
            segment_by=self.segment_by(item),
            max_segments=self.max_segments(item),
            error_buckets=self.error_buckets(item),
            score_bins=self.score_bins(item),
            score_range=self.score_range(item),
            where=f"{self.path}:line {item.line}",
        )

    def classes(self, item: _Mapping) -> tuple[int, ...]:
        found = item.get("classes", [])
        if not isinstance(found, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in found
        ):
            raise self.fail(item.lines["classes"], "`classes` must be a list of integers")
        if len(set(found)) > self.settings.max_classes:
            raise self.fail(item.lines["classes"], "more `classes` than --max_classes")
        return tuple(found)

    def number(self, item: _Mapping, key: str, default: float) -> float:
        found = item.get(key, default)
        if not isinstance(found, (int, float)) or isinstance(found, bool):
            raise self.fail(item.lines[key], f"`{key}` must be a number")
        return float(found)

    def flag(self, item: _Mapping, key: str) -> bool:
        found = item.get(key, False)
        if not isinstance(found, bool):
            raise self.fail(item.lines[key], f"`{key}` must be true or false")
        return found

    def match(self, item: _Mapping) -> dict[str, str]:
        if "match" not in item:
            return {}
        found = item["match"]
        if not isinstance(found, _Mapping):
            raise self.fail(item.lines["match"], "`match` must be a mapping")
        for key, value in found.items():
            if key not in MATCH_KEYS:
                raise self.fail(
                    found.lines[key], f"unknown match key {key!r}: one of {', '.join(MATCH_KEYS)}"
                )
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise self.fail(found.lines[key], f"match {key!r} must be a string")
        return {str(key): str(value) for key, value in found.items()}

    def segment_by(self, item: _Mapping) -> tuple[str, ...]:
        found = item.get("segment_by", [])
        if not isinstance(found, list):
            raise self.fail(item.lines["segment_by"], "`segment_by` must be a list")
        for dimension in found:
            source, colon, key = str(dimension).partition(":")
            known = (source in SEGMENT_KEYED and key) if colon else source in SEGMENT_FIELDS
            if not isinstance(dimension, str) or not known:
                keyed = ", ".join(f"{source}:<key>" for source in SEGMENT_KEYED)
                raise self.fail(
                    item.lines["segment_by"],
                    f"unknown segment dimension {dimension!r}: one of "
                    f"{', '.join(SEGMENT_FIELDS)}, {keyed}",
                )
        if len(set(found)) != len(found):
            raise self.fail(item.lines["segment_by"], "a segment dimension is given twice")
        return tuple(found)

    def error_buckets(self, item: _Mapping) -> str | None:
        """A list of upper edges, as ``--error_buckets`` spells them."""
        if "error_buckets" not in item:
            return None
        found = item["error_buckets"]
        try:
            if not isinstance(found, list):
                raise ValueError("`error_buckets` must be a list of numbers")
            return ",".join(map(repr, error_bounds(found)))
        except ValueError as exc:
            raise self.fail(item.lines["error_buckets"], str(exc)) from exc

    def max_segments(self, item: _Mapping) -> int | None:
        found = item.get("max_segments")
        if found is not None and (type(found) is not int or found < 1):
            raise self.fail(item.lines["max_segments"], "`max_segments` must be a positive integer")
        return found

    def score_bins(self, item: _Mapping) -> int | None:
        found = item.get("score_bins")
        if found is not None:
            try:
                parse_score_bins(found)
            except ValueError as exc:
                raise self.fail(item.lines["score_bins"], f"`score_bins`: {exc}") from exc
        return found

    def score_range(self, item: _Mapping) -> str | None:
        """``[lo, hi]``, ``off`` or ``auto`` (also ``"lo,hi"``), kept as the setting spells it."""
        if "score_range" not in item:
            return None
        found = item["score_range"]
        if found is False:  # YAML 1.1 reads a bare `off` as false
            return SCORES_OFF
        if isinstance(found, str) and found.strip().lower() == SCORES_AUTO:
            return SCORES_AUTO
        try:
            scale = parse_score_range(found)
        except ValueError as exc:
            raise self.fail(item.lines["score_range"], f"`score_range`: {exc}") from exc
        return SCORES_OFF if scale is None else f"{scale[0]!r},{scale[1]!r}"
