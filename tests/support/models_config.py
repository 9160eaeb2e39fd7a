"""The ``--models_config`` YAML of a set of :class:`~tests.support.streams.ModelSpec` (D7)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.streams import MODELS, ModelSpec


def model_entry(model: ModelSpec) -> dict[str, Any]:
    """One model as the file spells it: only what is set (the rest is the server's default)."""
    entry: dict[str, Any] = {"name": model.name, "storage_uri": model.storage_uri}
    if model.classes:
        entry["classes"] = list(model.classes)
    if model.threshold is not None:
        entry["threshold"] = model.threshold
    entry["match"] = dict(model.match)
    if model.segment_by:
        entry["segment_by"] = list(model.segment_by)
    if model.max_segments is not None:
        entry["max_segments"] = model.max_segments
    return entry


def models_config(models: Sequence[ModelSpec] = MODELS) -> str:
    return yaml.safe_dump({"models": [model_entry(m) for m in models]}, sort_keys=False)


def write_models_config(path: Path, models: Sequence[ModelSpec] = MODELS) -> Path:
    """Write the file (e.g. under ``tmp_path``) and return its path for ``--models_config``."""
    path.write_text(models_config(models))
    return path
