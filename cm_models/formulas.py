"""Classification metrics derived from a confusion matrix.

Each formula is a few numpy lines over the whole matrix. Division by zero yields 0, which is
scikit-learn's ``zero_division=0`` convention, so results compare exactly with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def count_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` for counts whose numerator is 0 wherever the denominator is.

    That holds for every ratio below (e.g. no true positive without a prediction), so 0/0 gives
    0 by dividing by at least 1: scikit-learn's ``zero_division=0`` in one numpy call.
    """
    return np.true_divide(numerator, np.maximum(denominator, 1))


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
    return float(count_ratio(np.trace(matrix), matrix.sum()))


AVERAGED = ("precision", "recall", "f1")
#: The per-class arrays of a :class:`ClassificationReport`, in the order summaries list them.
PER_CLASS = ("precision", "recall", "f1", "specificity", "support")


def classification_report(matrix: np.ndarray) -> ClassificationReport:
    """All metrics in a dozen whole-matrix operations (this runs on every scrape and reply).

    With tp the diagonal, ``predicted`` the column sums and ``support`` the row sums, the
    denominators are: precision ``predicted``, recall ``support``, F1 ``predicted + support``
    (= 2tp + fp + fn), specificity ``total - support`` (= tn + fp). Micro averages pool the
    counts, which over all classes equals accuracy for precision, recall and F1 alike.
    """
    tp = np.diagonal(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    total = int(support.sum())
    numerators = np.array([tp, tp, 2 * tp, total - support - predicted + tp])
    denominators = np.array([predicted, support, predicted + support, total - support])
    per_class = count_ratio(numerators, denominators)
    scores = per_class[:3]
    # Divided by a Python int (count_ratio's guard, once): numpy's per-call cost dominates at a
    # few classes.
    rows = max(total, 1)
    correct = int(tp.sum()) / rows
    macro = (scores.sum(axis=1) / len(tp)).tolist() if len(tp) else [0.0, 0.0, 0.0]
    weighted = (scores @ support / rows).tolist()
    averages = {
        "micro": dict.fromkeys(AVERAGED, correct),
        "macro": dict(zip(AVERAGED, macro)),
        "weighted": dict(zip(AVERAGED, weighted)),
    }
    return ClassificationReport(
        accuracy=correct,
        precision=per_class[0],
        recall=per_class[1],
        f1=per_class[2],
        specificity=per_class[3],
        support=support,
        averages=averages,
    )
