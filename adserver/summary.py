"""The JSON view of a model's state (``/v1/metrics?format=json`` and reply event data)."""

from __future__ import annotations

from typing import Any

from adserver.constants import EVENTS_ACCEPTED, ROWS_ACCEPTED
from adserver.state import MetricsState
from cm_models.formulas import classification_report


def model_summary(state: MetricsState, *, with_matrix: bool = True) -> dict[str, Any]:
    """Metrics of the model; the matrix (classes squared) is left out of reply events."""
    classes = state.confusion.classes
    matrix = state.confusion.matrix()
    report = classification_report(matrix)
    columns = zip(
        classes,
        report.precision.tolist(),
        report.recall.tolist(),
        report.f1.tolist(),
        report.specificity.tolist(),
        report.support.tolist(),
    )
    per_class = {
        str(label): {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "specificity": specificity,
            "support": support,
        }
        for label, precision, recall, f1, specificity, support in columns
    }
    summary: dict[str, Any] = {"classes": classes}
    if with_matrix:
        summary["confusion_matrix"] = matrix.tolist()
    return {
        **summary,
        "accuracy": report.accuracy,
        "per_class": per_class,
        **report.averages,
        "rows": state.count(ROWS_ACCEPTED),
        "events": state.count(EVENTS_ACCEPTED),
    }


def metrics_document(model_name: str, state: MetricsState) -> dict[str, Any]:
    return {"models": {model_name: model_summary(state)}}
