"""Names `RegressionMetrics` under `adserver.cm_models` too, like the reference's models."""

from cm_models.regression_metrics import RegressionMetrics

__all__ = ["RegressionMetrics"]
