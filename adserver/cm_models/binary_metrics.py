"""Keeps the reference's path `adserver.cm_models.binary_metrics.BinaryMetrics` working."""

from cm_models.binary_metrics import BinaryMetrics

__all__ = ["BinaryMetrics"]
