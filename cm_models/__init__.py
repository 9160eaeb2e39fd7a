"""Metric models: small classes that turn feedback arrays into additive counts and sums."""

from cm_models.base import InvalidFeedback, MetricModel, Observation
from cm_models.binary_metrics import BinaryMetrics
from cm_models.multiclass_numeric import MultiClassNumeric
from cm_models.multiclass_one_hot import MulticlassOneHot
from cm_models.regression_metrics import RegressionMetrics

__all__ = [
    "BinaryMetrics",
    "InvalidFeedback",
    "MetricModel",
    "MultiClassNumeric",
    "MulticlassOneHot",
    "Observation",
    "RegressionMetrics",
]
