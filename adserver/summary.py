"""The JSON view of a model's state (``/v1/metrics?format=json`` and reply event data)."""

from __future__ import annotations

from typing import Any

from adserver.constants import EVENTS_ACCEPTED, ROWS_ACCEPTED
from adserver.state import MetricsState
from cm_models.formulas import classification_report


def model_summary(state: MetricsState) -> dict[str, Any]:
    classes = state.confusion.classes
    matrix = state.confusion.matrix()
    report = classification_report(matrix)
    per_class = {
        str(label): {
            "precision": float(report.precision[i]),
            "recall": float(report.recall[i]),
            "f1": float(report.f1[i]),
            "specificity": float(report.specificity[i]),
            "support": int(report.support[i]),
        }
        for i, label in enumerate(classes)
    }
    return {
        "classes": classes,
        "confusion_matrix": matrix.tolist(),
        "accuracy": report.accuracy,
        "per_class": per_class,
        **report.averages,
        "rows": state.count(ROWS_ACCEPTED),
        "events": state.count(EVENTS_ACCEPTED),
    }


def metrics_document(model_name: str, state: MetricsState) -> dict[str, Any]:
    return {"models": {model_name: model_summary(state)}}
