"""Keeps the reference's path `adserver.cm_models.multiclass_one_hot.MulticlassOneHot` working."""

from cm_models.multiclass_one_hot import MulticlassOneHot

__all__ = ["MulticlassOneHot"]
