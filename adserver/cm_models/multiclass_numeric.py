"""Keeps the reference's path `adserver.cm_models.multiclass_numeric.MultiClassNumeric` working."""

from cm_models.multiclass_numeric import MultiClassNumeric

__all__ = ["MultiClassNumeric"]
