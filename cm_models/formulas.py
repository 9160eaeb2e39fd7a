"""Classification metrics derived from a confusion matrix.

Each formula is a few numpy lines over the whole matrix. Division by zero yields 0, which is
scikit-learn's ``zero_division=0`` convention, so results compare exactly with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ``numerator / denominator`` with 0 where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


@dataclass(frozen=True)
class ClassCounts:
    """One-vs-rest counts per class: the sufficient statistics of every metric below."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray

    @classmethod
    def from_matrix(cls, matrix: np.ndarray) -> ClassCounts:
        """Rows are truth, columns are predictions."""
        tp = np.diag(matrix).astype(np.int64)
        support = matrix.sum(axis=1)
        predicted = matrix.sum(axis=0)
        fp = predicted - tp
        fn = support - tp
        tn = matrix.sum() - tp - fp - fn
        return cls(tp=tp, fp=fp, fn=fn, tn=tn)

    @property
    def support(self) -> np.ndarray:
        return self.tp + self.fn


@dataclass(frozen=True)
class ClassificationReport:
    """Everything users read about a classifier, computed at once from one matrix."""

    accuracy: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    specificity: np.ndarray
    support: np.ndarray
    averages: dict[str, dict[str, float]]


def accuracy(matrix: np.ndarray) -> float:
    return float(safe_divide(np.trace(matrix), matrix.sum()))


def averaged(values: np.ndarray, support: np.ndarray) -> dict[str, float]:
    """Macro (plain mean) and weighted (by support) averages of a per-class metric."""
    macro = float(values.mean()) if values.size else 0.0
    weighted = float(safe_divide((values * support).sum(), support.sum()))
    return {"macro": macro, "weighted": weighted}


def classification_report(matrix: np.ndarray) -> ClassificationReport:
    counts = ClassCounts.from_matrix(matrix)
    precision = safe_divide(counts.tp, counts.tp + counts.fp)
    recall = safe_divide(counts.tp, counts.support)
    f1 = safe_divide(2 * counts.tp, 2 * counts.tp + counts.fp + counts.fn)
    specificity = safe_divide(counts.tn, counts.tn + counts.fp)
    tp, fp, fn = counts.tp.sum(), counts.fp.sum(), counts.fn.sum()
    micro = {
        "precision": float(safe_divide(tp, tp + fp)),
        "recall": float(safe_divide(tp, tp + fn)),
        "f1": float(safe_divide(2 * tp, 2 * tp + fp + fn)),
    }
    per_metric = {"precision": precision, "recall": recall, "f1": f1}
    averages = {"micro": micro}
    for kind in ("macro", "weighted"):
        averages[kind] = {
            name: averaged(values, counts.support)[kind] for name, values in per_metric.items()
        }
    return ClassificationReport(
        accuracy=accuracy(matrix),
        precision=precision,
        recall=recall,
        f1=f1,
        specificity=specificity,
        support=counts.support,
        averages=averages,
    )
