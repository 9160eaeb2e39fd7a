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


AVERAGED = ("precision", "recall", "f1")


def classification_report(matrix: np.ndarray) -> ClassificationReport:
    """All metrics in a few whole-matrix operations (this runs on every scrape and reply).

    Rows of the stacked arrays are precision, recall, F1 and specificity; micro averages pool
    the counts, macro averages are plain means, weighted ones are weighted by support.
    """
    c = ClassCounts.from_matrix(matrix)
    numerators = np.stack([c.tp, c.tp, 2 * c.tp, c.tn])
    denominators = np.stack([c.tp + c.fp, c.support, 2 * c.tp + c.fp + c.fn, c.tn + c.fp])
    per_class = safe_divide(numerators, denominators)
    scores = per_class[:3]
    support = c.support
    macro = scores.mean(axis=1) if support.size else np.zeros(3)
    weighted = safe_divide(scores @ support, support.sum())
    micro = safe_divide(numerators[:3].sum(axis=1), denominators[:3].sum(axis=1))
    averages = {
        kind: dict(zip(AVERAGED, values.tolist()))
        for kind, values in (("micro", micro), ("macro", macro), ("weighted", weighted))
    }
    return ClassificationReport(
        accuracy=accuracy(matrix),
        precision=per_class[0],
        recall=per_class[1],
        f1=per_class[2],
        specificity=per_class[3],
        support=support,
        averages=averages,
    )
