"""A running confusion matrix whose classes are discovered as they appear.

Updates arrive as *cells* (truth, prediction, count) so the same delta can be written to a store,
summed across replicas and applied here: counts add, nothing else is kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Class ids are packed two to a uint64 key to count pairs with one np.unique call.
CLASS_ID_MIN = -(2**31)
CLASS_ID_MAX = 2**31 - 1
_OFFSET = np.int64(2**31)


@dataclass(frozen=True)
class Cells:
    """Distinct (truth, prediction) pairs with how many rows fell in each."""

    truth: np.ndarray
    prediction: np.ndarray
    count: np.ndarray

    @classmethod
    def from_labels(cls, truth: np.ndarray, prediction: np.ndarray) -> Cells:
        """Group row labels into cells in one vectorised pass (no per-row Python loop)."""
        if truth.size == 1:
            return cls(truth.reshape(1), prediction.reshape(1), np.ones(1, dtype=np.int64))
        high = (truth.astype(np.int64) + _OFFSET).astype(np.uint64) << np.uint64(32)
        low = (prediction.astype(np.int64) + _OFFSET).astype(np.uint64)
        unique, counts = np.unique(high | low, return_counts=True)
        return cls(
            truth=(unique >> np.uint64(32)).astype(np.int64) - _OFFSET,
            prediction=(unique & np.uint64(0xFFFFFFFF)).astype(np.int64) - _OFFSET,
            count=counts.astype(np.int64),
        )

    @classmethod
    def concat(cls, parts: list[Cells]) -> Cells:
        """Cells of several updates in one (pairs may repeat; counts still add)."""
        if len(parts) == 1:
            return parts[0]
        return cls(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("truth", "prediction", "count")
            )
        )

    @property
    def rows(self) -> int:
        return int(self.count.sum())

    def items(self) -> Iterable[tuple[int, int, int]]:
        return zip(self.truth.tolist(), self.prediction.tolist(), self.count.tolist())


class ConfusionMatrix:
    """Counts of (truth, prediction) pairs; rows are truth, columns are predictions.

    Rows and columns are kept in sorted class order (scikit-learn's), so reading the matrix is
    free; a new class (rare) rebuilds it in the new order.
    """

    def __init__(self, classes: Iterable[int] = ()) -> None:
        self.classes: list[int] = []
        self._index: dict[int, int] = {}
        self._counts = np.zeros((0, 0), dtype=np.int64)
        self._ensure(list(classes))

    def matrix(self) -> np.ndarray:
        """The matrix with rows and columns in :attr:`classes` order (read-only view)."""
        view = self._counts.view()
        view.flags.writeable = False
        return view

    def add(self, cells: Cells) -> None:
        truth, prediction = cells.truth.tolist(), cells.prediction.tolist()
        self._ensure(truth + prediction)
        index = self._index
        if len(truth) == 1:  # one cell (every single-row event): plain indexing, far cheaper
            self._counts[index[truth[0]], index[prediction[0]]] += cells.count[0]
            return
        rows = [index[c] for c in truth]
        cols = [index[c] for c in prediction]
        np.add.at(self._counts, (rows, cols), cells.count)

    def _ensure(self, classes: list[int]) -> None:
        new = {c for c in classes if c not in self._index}
        if not new:
            return
        old = self.classes
        self.classes = sorted([*old, *new])
        self._index = {label: i for i, label in enumerate(self.classes)}
        self._counts = embedded(self._counts, old, self.classes)


def embedded(matrix: np.ndarray, old: Sequence[int], classes: Sequence[int]) -> np.ndarray:
    """``matrix`` (rows and columns in ``old`` order) placed in a matrix over ``classes``, a
    superset of ``old``: the others' rows and columns are zero."""
    index = {label: i for i, label in enumerate(classes)}
    moved = [index[label] for label in old]
    grown = np.zeros((len(classes),) * 2, dtype=matrix.dtype)
    grown[np.ix_(moved, moved)] = matrix
    return grown
