"""Seldon's default metric labels, read from the same environment variables as Seldon.

Existing dashboards select on these, so the Seldon-compatible families keep them. Seldon's
``worker_id`` (a pid) is left out: it changes on every restart and breaks counter continuity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from adserver.catalogue.families import (
    DEPLOYMENT_NAME,
    IMAGE_NAME,
    IMAGE_VERSION,
    MODEL_IMAGE,
    MODEL_NAME,
    MODEL_VERSION,
    PREDICTOR_NAME,
    PREDICTOR_VERSION,
    SELDON_DEPLOYMENT_NAME,
    SELDON_DEPLOYMENT_NAMESPACE,
)
from adserver.catalogue.wire import (
    ENV_DEPLOYMENT,
    ENV_IMAGE,
    ENV_NAMESPACE,
    ENV_PREDICTIVE_UNIT,
    ENV_PREDICTOR,
    ENV_PREDICTOR_LABELS,
    NOT_IMPLEMENTED,
)


def seldon_default_labels(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    deployment = environ.get(ENV_DEPLOYMENT, NOT_IMPLEMENTED)
    image, _, version = environ.get(ENV_IMAGE, "").rpartition(":")
    if not image:
        image, version = environ.get(ENV_IMAGE) or NOT_IMPLEMENTED, NOT_IMPLEMENTED
    return {
        DEPLOYMENT_NAME: deployment,
        SELDON_DEPLOYMENT_NAME: deployment,
        MODEL_NAME: environ.get(ENV_PREDICTIVE_UNIT, NOT_IMPLEMENTED),
        MODEL_IMAGE: image,
        IMAGE_NAME: image,
        MODEL_VERSION: version,
        IMAGE_VERSION: version,
        PREDICTOR_NAME: environ.get(ENV_PREDICTOR, NOT_IMPLEMENTED),
        PREDICTOR_VERSION: predictor_version(environ.get(ENV_PREDICTOR_LABELS, "")),
        SELDON_DEPLOYMENT_NAMESPACE: environ.get(ENV_NAMESPACE, NOT_IMPLEMENTED),
    }


def predictor_version(labels_json: str) -> str:
    try:
        labels = json.loads(labels_json)
    except ValueError:
        return NOT_IMPLEMENTED
    version = labels.get("version") if isinstance(labels, dict) else None
    return str(version) if version is not None else NOT_IMPLEMENTED


def configured_model_labels(labels: Mapping[str, str], model: str) -> dict[str, str]:
    """A configured model's Seldon labels: ``model_name`` is the model's name (Seldon's is the
    pod's predictive unit, one for the whole server), so two models' series never collide."""
    return {**labels, MODEL_NAME: model}
