"""Models configs (``--models_config``) for the many-model servers of the bench.

Every model is matched by a KServe InferenceService name (``ce-inferenceservicename``) and
segmented by ``ce-endpoint``, the shape a platform with one InferenceService per model and a
canary revision next to the default one sends. The same names are what the load (wrk's
feedback.lua) and the probes put on their events.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

ENDPOINTS = ("default", "canary")  # ce-endpoint values: KServe's two revisions of a model


def isvc(index: int) -> str:
    """The InferenceService name model `index` is matched by (feedback.lua spells it alike)."""
    return f"isvc-{index}"


def write_config(
    path: Path,
    names: Sequence[str],
    storage_uri: str,
    classes: Sequence[int] | None = None,
) -> Path:
    """A models config: model i is `names[i]`, matched by `isvc(i)`, segmented by endpoint."""
    models = []
    for index, name in enumerate(names):
        model: dict[str, object] = {
            "name": name,
            "storage_uri": storage_uri,
            "match": {"inferenceservicename": isvc(index)},
            "segment_by": ["endpoint"],
        }
        if classes is not None:
            model["classes"] = list(classes)
        models.append(model)
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return path
