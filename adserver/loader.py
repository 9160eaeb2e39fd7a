"""Resolve ``--storage_uri`` to a metric model at start-up, failing loudly on a bad path."""

from __future__ import annotations

import importlib
import inspect

import cm_models
from adserver.errors import StartupError
from adserver.settings import Settings
from cm_models.base import MetricModel
from cm_models.protocol import FeedbackModel
from cm_models.regression_metrics import error_bounds
from cm_models.seldon_adapter import SeldonMetricsAdapter, SeldonStyle


class ModelLoadError(StartupError):
    """The configured model cannot be used; the message says why and what was tried."""


def resolve_class(path: str) -> type:
    """``pkg.module.Class`` (incl. Seldon's ``adserver.cm_models...``) or a bare cm_models name."""
    if "." not in path:
        found = getattr(cm_models, path, None)
        if not inspect.isclass(found):
            raise ModelLoadError(
                f"unknown model {path!r}; built-in models: {', '.join(sorted(cm_models.__all__))}"
            )
        return found
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import module {module_name!r} for {path!r}: {exc}") from exc
    found = getattr(module, class_name, None)
    if not inspect.isclass(found):
        raise ModelLoadError(f"module {module_name!r} has no class {class_name!r}")
    return found


#: What every :class:`MetricModel` keeps: one confusion matrix of class ids and the same
#: families, so switching among them keeps the counts meaningful (see :func:`model_kind`).
BUILTIN_KIND = "cm_models.*"


def model_kind(storage_uri: str) -> str:
    """What a state file records about the model that wrote it, and refuses to change.

    A user's class has its own families (it may even name them ``seldon_metric_*``, which the
    built-in models export themselves), so it owns its file; spellings of one class are one kind.
    """
    cls = resolve_class(storage_uri)
    return BUILTIN_KIND if issubclass(cls, MetricModel) else f"{cls.__module__}.{cls.__qualname__}"


def load_model(settings: Settings) -> FeedbackModel:
    """The model, ready before the first request: the one place that looks at what the class
    is (a built-in model, or a user's Seldon-style class wrapped in the adapter)."""
    cls = resolve_class(settings.storage_uri)
    try:
        bounds = error_bounds(settings.error_buckets)
    except ValueError as exc:
        raise ModelLoadError(f"--error_buckets {settings.error_buckets!r}: {exc}") from exc
    if issubclass(cls, MetricModel):
        try:
            return cls(
                name=settings.model_name,
                classes=settings.classes,
                threshold=settings.binary_threshold,
                error_buckets=bounds,
                score_bins=settings.score_bins,
                score_range=settings.score_range,
                max_classes=settings.max_classes,
            )
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"cannot configure {cls.__name__}: {exc}") from exc
    if not callable(getattr(cls, "transform", None)):
        raise ModelLoadError(
            f"{cls.__name__} is neither a cm_models.MetricModel nor has transform(truth, response)"
        )
    return SeldonMetricsAdapter(instantiate_seldon_style(cls, settings), settings.model_name)


def instantiate_seldon_style(cls: type, settings: Settings) -> SeldonStyle:
    """Seldon constructs models as ``cls(name, storage_uri, elasticsearch_uri)`` then ``load()``."""
    offered = {
        "name": settings.model_name,
        "storage_uri": settings.storage_uri,
        "elasticsearch_uri": settings.elasticsearch_uri or None,
    }
    parameters = inspect.signature(cls).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {k: v for k, v in offered.items() if accepts_any or k in parameters}
    try:
        instance = cls(**kwargs)
        if callable(getattr(instance, "load", None)):
            instance.load()
    except Exception as exc:  # a user's constructor can fail in any way; report it at start-up
        raise ModelLoadError(f"cannot start {cls.__name__}: {exc}") from exc
    return instance
