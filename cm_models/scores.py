"""Probabilistic metrics of classifiers that send scores: log loss, Brier score, ROC AUC with
its error bound, and calibration, from sums and fixed-width histograms that merge by addition.

What is kept per span (every statistic a plain sum, so buckets, segments and replicas add):

- ``scores``: rows, the sums of their log losses and Brier terms, and how many rows did not sum
  to 1 (scored as sent, never renormalised);
- ``score_histogram``: per class, one vector of counts of that class's score by bin
  (``score_bins`` uniform bins over the score range): the rows whose truth is that class, then
  the others (one vector, not two: half the vectors to encode and add per event); ROC AUC is read
  from it exactly up to the pairs that share a bin, which count as ties: the exported
  ``error_bound`` is half of those pairs over P x N, the most the true AUC can differ;
- ``calibration``: 15 uniform bins of the confidence (scikit-learn's
  ``calibration_curve(strategy="uniform", n_bins=15)``): one vector of the bins' rows, then
  their score sums, then their positives (:func:`calibration_parts`).

Scores outside the configured range are refused (``score_out_of_range``); with a range other
than [0, 1] scores are not probabilities, so only AUC is derived. Everything here is numpy over
the event's rows: an event costs O(rows x classes) plus one histogram row per class.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adserver.catalogue import reasons
from cm_models.base import InvalidFeedback
from cm_models.sections import Section
from cm_models.statistics import VECTOR_DTYPE, Row, Statistic, Sums, elements_bytes, vector_bytes

log = logging.getLogger(__name__)

SCORES = "scores"
SCORE_HISTOGRAM = "score_histogram"
CALIBRATION = "calibration"
#: Bins of the reliability curve: scikit-learn's uniform ``calibration_curve`` with 15 bins.
CALIBRATION_BINS = 15
CALIBRATION_EDGES = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
#: The parts of the ``calibration`` statistic's one vector, 15 bins each, in order.
CALIBRATION_PARTS = ("rows", "score_sum", "positives")
DEFAULT_SCORE_BINS = 200
#: Events of at most this many rows and scores take the Python path (:func:`few_score_updates`).
FEW_ROWS, FEW_SCORES = 4, 64
MIN_SCORE_BINS, MAX_SCORE_BINS = 2, 10_000
UNIT_RANGE = (0.0, 1.0)
#: ``score_range`` that turns scores off: the models classify as they did before scores.
SCORES_OFF = "off"
#: The default ``score_range``: each model's own. ``BinaryMetrics`` keeps scores over [0, 1]
#: (it refused others before scores existed); ``MulticlassOneHot`` none, so the reference's
#: args keep working unchanged (it took any numbers' argmax, logits too) at their old cost.
SCORES_AUTO = "auto"
DEFAULT_SCORE_RANGE = SCORES_AUTO
PROBABILITIES = "0,1"
#: scikit-learn's clipping of probabilities in log loss, and its tolerance of a row's sum.
EPS = float(np.finfo(np.float64).eps)
SUM_RTOL = math.sqrt(EPS)
SUM_ATOL = 1e-8  # np.isclose's default, which scikit-learn keeps
#: At most one warning per model about unnormalised rows in this many seconds.
WARNING_INTERVAL = 60.0


def parse_score_range(value: object) -> tuple[float, float] | None:
    """``"lo,hi"``, a pair of numbers, or ``"off"`` (None); ValueError says what is wrong
    (``"auto"`` is resolved by :meth:`Scoring.of`, per model)."""
    if isinstance(value, str):
        if value.strip().lower() == SCORES_OFF:
            return None
        parts: Sequence[object] = value.split(",")
    elif isinstance(value, (list, tuple)):
        parts = value
    else:
        raise ValueError(f"score_range {value!r}: expected 'lo,hi' or 'off'")
    try:
        if len(parts) != 2 or any(isinstance(p, bool) for p in parts):
            raise ValueError
        low, high = (float(p) for p in parts)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"score_range {value!r}: expected two numbers 'lo,hi' or 'off'") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"score_range {value!r}: lo and hi must be finite with lo < hi")
    return low, high


def parse_score_bins(value: object) -> int:
    if type(value) is not int or not MIN_SCORE_BINS <= value <= MAX_SCORE_BINS:
        raise ValueError(
            f"score_bins {value!r}: expected an integer in {MIN_SCORE_BINS}..{MAX_SCORE_BINS}"
        )
    return value


@dataclass(frozen=True)
class ScoreScale:
    """How a model's scores are binned: ``bins`` uniform bins over ``[low, high]``."""

    bins: int
    low: float
    high: float

    @classmethod
    def of(cls, score_bins: object, score_range: object) -> ScoreScale | None:
        """The models' options (settings or a model's config keys); None: scores are off."""
        bins = parse_score_bins(score_bins)
        found = parse_score_range(score_range)
        return None if found is None else cls(bins, *found)

    @property
    def range(self) -> tuple[float, float]:
        return self.low, self.high

    @property
    def probabilities(self) -> bool:
        """Scores in [0, 1] are probabilities: log loss, Brier and calibration are defined."""
        return (self.low, self.high) == UNIT_RANGE

    def statistics(self) -> tuple[Statistic[Any, Any], ...]:
        scores = Sums(
            SCORES,
            (),
            (("rows", "int"), ("log_loss_sum", "real"), ("brier_sum", "real"),
             ("unnormalised_rows", "int")),
        )  # fmt: skip
        histogram = Sums(
            SCORE_HISTOGRAM,
            (("class", "int"),),
            (("counts", "vector"),),
            width=2 * self.bins,
        )
        if not self.probabilities:
            return scores, histogram
        calibration = Sums(
            CALIBRATION,
            (),
            (("bins", "vector"),),
            width=len(CALIBRATION_PARTS) * CALIBRATION_BINS,
        )
        return scores, histogram, calibration

    def check(self, scores: np.ndarray, what: str) -> None:
        """Refuse scores outside the range (numeric and finite already)."""
        if scores.min() < self.low or scores.max() > self.high:
            raise InvalidFeedback(
                f"{what}: scores must lie in [{self.low:g}, {self.high:g}] (--score_range)",
                reasons.SCORE_OUT_OF_RANGE,
            )

    def bin_of(self, scores: np.ndarray) -> np.ndarray:
        """Histogram bin of each score: the last bin holds ``high`` itself."""
        if (self.low, self.high) == UNIT_RANGE:
            scaled = scores * self.bins  # (s - 0) / 1 * bins: the same, in one pass
        else:
            scaled = (scores - self.low) / (self.high - self.low) * self.bins
        # scores were checked to lie in the range, so scaled >= 0 and truncation is floor
        cells = scaled.astype(np.int64)
        return np.minimum(cells, self.bins - 1, out=cells)


class Scoring:
    """What a classifier that sends scores keeps, for :class:`~cm_models.base.MetricModel`
    subclasses to declare and call: the scale, its statistics and section, and one event's
    updates (warning, at most once a minute, of rows that do not sum to 1)."""

    def __init__(self, model: str, scale: ScoreScale, binary: bool) -> None:
        self.scale = scale
        self.binary = binary
        self.statistics = scale.statistics()
        self.sections: tuple[Section, ...] = (ScoresSection(scale),)
        self._warn = UnnormalisedWarning(model)

    @classmethod
    def of(
        cls, model: str, score_bins: object, score_range: object, *, binary: bool
    ) -> Scoring | None:
        """None when ``score_range`` is off; ValueError for options that cannot be used."""
        if isinstance(score_range, str) and score_range.strip().lower() == SCORES_AUTO:
            score_range = PROBABILITIES if binary else SCORES_OFF
        scale = ScoreScale.of(score_bins, score_range)
        return None if scale is None else cls(model, scale, binary)

    def updates(self, truth_ids: np.ndarray, scores: np.ndarray) -> dict[str, list[Row]]:
        # numbers of any dtype (JSON true/false are numbers to numpy, as the seed took them)
        scores = scores.astype(np.float64, copy=False)
        found, unnormalised = score_updates(self.scale, truth_ids, scores, self.binary)
        if unnormalised:
            self._warn(unnormalised)
        return found


class UnnormalisedWarning:
    """One WARNING per model at most every :data:`WARNING_INTERVAL` seconds (any thread)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._last = -math.inf

    def __call__(self, rows: int) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < WARNING_INTERVAL:
                return
            self._last = now
        log.warning(
            "probability rows that do not sum to 1 are scored as sent (not renormalised) and "
            "counted in scores.unnormalised_rows",
            extra={"model": self.model, "rows": rows},
        )


def score_updates(
    scale: ScoreScale, truth_ids: np.ndarray, scores: np.ndarray, binary: bool
) -> tuple[dict[str, list[Row]], int]:
    """One event's rows of the score statistics, and how many of its rows do not sum to 1.

    ``scores``: a binary model's score of class 1 per row (1-d) or ``predict_proba``'s two
    columns; else one column per class (class id = column index). ``truth_ids``: validated
    class ids, each a column of ``scores`` (0 or 1 for a binary model). A few whole-array passes
    and no temporary per class: this is on every event's path (a few rows take
    :func:`few_score_updates`, the same rows without numpy's cost per call).
    """
    if truth_ids.shape[0] <= FEW_ROWS and scores.size <= FEW_SCORES:
        return few_score_updates(scale, truth_ids, scores, binary)
    return array_score_updates(scale, truth_ids, scores, binary)


def array_score_updates(
    scale: ScoreScale, truth_ids: np.ndarray, scores: np.ndarray, binary: bool
) -> tuple[dict[str, list[Row]], int]:
    """:func:`score_updates` in whole-array passes."""
    n = truth_ids.shape[0]
    unnormalised = 0
    if scores.ndim == 2 and scale.probabilities:
        # np.isclose(sums, 1, rtol=SUM_RTOL) as scikit-learn's check, without its overhead
        off_by = np.abs(scores @ np.ones(scores.shape[1]) - 1.0)  # faster than sum(axis=1)
        unnormalised = int(np.count_nonzero(off_by > SUM_ATOL + SUM_RTOL))
    if binary:
        positive = scores[:, 1] if scores.ndim == 2 else scores
        columns, truth_columns = positive[:, None], (truth_ids == 1)[:, None]
        brier_sum = float(np.square(positive - truth_ids).sum())
        confidence, correct = positive, truth_columns[:, 0]
        true_score = (
            np.where(correct, positive, 1.0 - positive)
            if scores.ndim == 1
            else scores.ravel()[np.arange(0, scores.size, 2) + truth_ids]
        )
    else:  # each row's entries by flat index: a short axis costs more than fancy indexing
        columns, flat, starts = scores, scores.ravel(), np.arange(0, scores.size, scores.shape[1])
        one_hot = np.zeros(scores.size, dtype=bool)
        truths = starts + truth_ids
        one_hot[truths] = True
        truth_columns = one_hot.reshape(scores.shape)
        brier_sum = float(np.square(scores - truth_columns).sum())  # rows' sums over k, summed
        top = scores.argmax(axis=1)
        confidence, correct = flat[starts + top], top == truth_ids
        true_score = flat[truths]
    histogram = histogram_rows(scale, columns, truth_columns, first_class=int(binary))
    updates: dict[str, list[Row]] = {SCORE_HISTOGRAM: histogram}
    if scale.probabilities:
        clipped = np.clip(true_score, EPS, 1.0 - EPS)  # float64, whatever the scores' dtype
        # -sum(log) is sum(-log) exactly: rounding is symmetric about zero
        log_loss_sum = -float(np.log(clipped, out=clipped).sum())
        updates[SCORES] = [(n, log_loss_sum, brier_sum, unnormalised)]
        updates[CALIBRATION] = [calibration_row(confidence, correct)]
    else:
        updates[SCORES] = [(n, 0.0, 0.0, 0)]
    return updates, unnormalised


def few_score_updates(
    scale: ScoreScale, truth_ids: np.ndarray, scores: np.ndarray, binary: bool
) -> tuple[dict[str, list[Row]], int]:
    """:func:`array_score_updates`' rows, bit for bit, in Python over the few rows' floats: the
    same operations in the same order (sums as numpy's pairwise :func:`numpy_sum`), numpy only
    for the row sums (BLAS's order) and the logarithms (numpy's own)."""
    truths: list[int] = truth_ids.tolist()
    table = scores.tolist()
    n, two_d = len(truths), scores.ndim == 2
    unnormalised = 0
    if two_d and scale.probabilities:
        sums = (scores @ np.ones(scores.shape[1])).tolist()
        unnormalised = sum(abs(total - 1.0) > SUM_ATOL + SUM_RTOL for total in sums)
    if binary:
        positive: list[float] = [row[1] for row in table] if two_d else table
        columns = [[p] for p in positive]
        squares = [(p - t) * (p - t) for p, t in zip(positive, truths)]
        confidence, correct = positive, [t == 1 for t in truths]
        if two_d:
            true_score = [row[t] for row, t in zip(table, truths)]
        else:
            true_score = [p if ok else 1.0 - p for p, ok in zip(positive, correct)]
        truth_columns = [[ok] for ok in correct]
    else:
        columns = table
        truth_columns = [[k == t for k in range(len(row))] for row, t in zip(table, truths)]
        squares = [
            (s - one) * (s - one)
            for row, hot in zip(table, truth_columns)
            for s, one in zip(row, hot)
        ]
        top = [max(range(len(row)), key=row.__getitem__) for row in table]  # the first maximum
        confidence = [row[k] for row, k in zip(table, top)]
        correct = [k == t for k, t in zip(top, truths)]
        true_score = [row[t] for row, t in zip(table, truths)]
    updates: dict[str, list[Row]] = {
        SCORE_HISTOGRAM: few_histogram_rows(scale, columns, truth_columns, int(binary))
    }
    if scale.probabilities:
        clipped = np.array([min(max(p, EPS), 1.0 - EPS) for p in true_score])
        log_loss_sum = -float(np.log(clipped, out=clipped).sum())
        updates[SCORES] = [(n, log_loss_sum, numpy_sum(squares), unnormalised)]
        updates[CALIBRATION] = [few_calibration_row(confidence, correct)]
    else:
        updates[SCORES] = [(n, 0.0, 0.0, 0)]
    return updates, unnormalised


def numpy_sum(values: Sequence[float]) -> float:
    """``np.sum`` of up to 128 floats, operation for operation: numpy's pairwise summation
    below its block size (sequential under 8 values, else 8 running sums combined in pairs)."""
    if len(values) < 8:
        total = 0.0
        for value in values:
            total += value
        return total
    partial = list(values[:8])
    whole = len(values) - len(values) % 8
    for start in range(8, whole, 8):
        for j in range(8):
            partial[j] += values[start + j]
    total = ((partial[0] + partial[1]) + (partial[2] + partial[3])) + (
        (partial[4] + partial[5]) + (partial[6] + partial[7])
    )
    for value in values[whole:]:
        total += value
    return total


def few_histogram_rows(
    scale: ScoreScale,
    columns: Sequence[Sequence[float]],
    truth_columns: Sequence[Sequence[bool]],
    first_class: int,
) -> list[Row]:
    """:func:`histogram_rows` over a few rows' floats (bins as :meth:`ScoreScale.bin_of`)."""
    width, low, span = scale.bins, scale.low, scale.high - scale.low
    unit = scale.range == UNIT_RANGE
    counts: list[dict[int, float]] = [{} for _ in columns[0]]
    for row, truth in zip(columns, truth_columns):
        for found, score, positive in zip(counts, row, truth):
            cell = min(int(score * width if unit else (score - low) / span * width), width - 1)
            index = cell if positive else width + cell
            found[index] = found.get(index, 0.0) + 1.0
    return [(first_class + k, elements_bytes(2 * width, c)) for k, c in enumerate(counts)]


#: The inner edges of the calibration bins, as Python floats.
INNER_EDGES: list[float] = CALIBRATION_EDGES[1:-1].tolist()


def few_calibration_row(confidence: Sequence[float], correct: Sequence[bool]) -> Row:
    """:func:`calibration_row` over a few rows: each bin's sums from 0.0 in row order."""
    bins = [bisect_left(INNER_EDGES, c) for c in confidence]
    elements: dict[int, float] = {}
    for part, weights in enumerate(([1.0] * len(bins), confidence, correct)):
        for b, weight in zip(bins, weights):
            index = part * CALIBRATION_BINS + b
            elements[index] = elements.get(index, 0.0) + weight
    return (elements_bytes(len(CALIBRATION_PARTS) * CALIBRATION_BINS, elements),)


def histogram_rows(
    scale: ScoreScale, columns: np.ndarray, truth_columns: np.ndarray, first_class: int
) -> list[Row]:
    """One row per column (class ``first_class`` + column index): its scores' bins where the
    row's truth is that class (``truth_columns``), then where it is not, from one bincount."""
    width, classes = scale.bins, columns.shape[1]
    # index class x 2 width + bin, + width where the truth is another class (the negatives)
    index = scale.bin_of(columns)
    index += np.arange(width, 2 * classes * width, 2 * width)[None, :]
    index -= truth_columns * width
    counts = np.bincount(index.ravel(), minlength=2 * classes * width)
    split = counts.astype(VECTOR_DTYPE).reshape(classes, 2 * width)
    return [(first_class + k, vector_bytes(split[k])) for k in range(classes)]


def calibration_row(confidence: np.ndarray, correct: np.ndarray) -> Row:
    """scikit-learn's binning: an inner edge's score falls in the lower bin. One bincount over
    the three parts; each bin's elements are added in row order, as three bincounts would."""
    bins = np.searchsorted(CALIBRATION_EDGES[1:-1], confidence)
    index = np.concatenate((bins, bins + CALIBRATION_BINS, bins + 2 * CALIBRATION_BINS))
    weights = np.concatenate((np.ones(bins.size), confidence, correct))
    width = len(CALIBRATION_PARTS) * CALIBRATION_BINS
    return (vector_bytes(np.bincount(index, weights=weights, minlength=width)),)


def calibration_parts(vector: np.ndarray) -> dict[str, np.ndarray]:
    """The ``calibration`` statistic's vector as its parts, by name (views, not copies)."""
    return dict(zip(CALIBRATION_PARTS, vector.reshape(len(CALIBRATION_PARTS), CALIBRATION_BINS)))


#: What a class (or an average) without both positives and negatives shows; copied, never shared.
NO_AUC: dict[str, float | None] = {"auc": None, "error_bound": None}


def roc_auc_of(histogram: Mapping[Row, Row]) -> dict[str, Any]:
    """Each class's AUC from its binned scores (pairs within a bin counted half; None without
    both kinds), and their averages: whole-array passes over all classes at once. Counts are
    integers, so every sum below is exact (up to 2**53) in whatever order it is taken."""
    keys = sorted(histogram)
    labels = [str(key[0]) for key in keys]
    if not keys:
        return {"per_class": {}, "macro": dict(NO_AUC), "weighted": dict(NO_AUC)}
    counts = np.array([histogram[key][0] for key in keys])
    positives, negatives = np.hsplit(counts, 2)
    p, n = positives.sum(axis=1), negatives.sum(axis=1)
    below = np.cumsum(negatives, axis=1) - negatives
    ties = (positives * negatives).sum(axis=1)
    pairs = p * n
    defined = pairs > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = 0.5 * ties / pairs
        auc = ((positives * below).sum(axis=1) + 0.5 * ties) / pairs
    per_class = {
        label: {"auc": a, "error_bound": b} if ok else dict(NO_AUC)
        for label, a, b, ok in zip(labels, auc.tolist(), bound.tolist(), defined.tolist())
    }
    return {
        "per_class": per_class,
        "macro": averaged(auc, bound, defined, np.ones(len(keys))),
        "weighted": averaged(auc, bound, defined, p),
    }


def averaged(
    auc: np.ndarray, bound: np.ndarray, defined: np.ndarray, weights: np.ndarray
) -> dict[str, float | None]:
    """The classes' AUCs and bounds averaged alike (an average of bounds bounds the average's
    error), over the classes whose AUC is defined."""
    if not defined.any():
        return dict(NO_AUC)
    w = weights[defined]
    total = w.sum()
    return {
        "auc": float(np.dot(w, auc[defined]) / total),
        "error_bound": float(np.dot(w, bound[defined]) / total),
    }


class ScoresSection(Section):
    """The ``scores`` summary key of a classifier that sends scores."""

    name = SCORES

    def __init__(self, scale: ScoreScale) -> None:
        self.scale = scale

    def derive(self, tables: Mapping[str, Any]) -> dict[str, Any]:
        rows, log_loss_sum, brier_sum, unnormalised = tables[SCORES].get((), (0, 0.0, 0.0, 0))
        probabilities = self.scale.probabilities and rows > 0
        return {
            "rows": int(rows),
            "log_loss": log_loss_sum / rows if probabilities else None,
            "brier_score": brier_sum / rows if probabilities else None,
            "unnormalised_rows": int(unnormalised),
            "roc_auc": roc_auc_of(tables[SCORE_HISTOGRAM]),
            "calibration": self.calibration(tables[CALIBRATION])
            if self.scale.probabilities
            else None,
        }

    @staticmethod
    def calibration(table: Mapping[Row, Row]) -> dict[str, Any]:
        (vector,) = table.get((), (np.zeros(len(CALIBRATION_PARTS) * CALIBRATION_BINS),))
        stored = calibration_parts(vector).values()
        total = float(vector[:CALIBRATION_BINS].sum())
        bins = []
        ece = 0.0
        edges = CALIBRATION_EDGES.tolist()
        # Python floats from one tolist() each: the same arithmetic, without a scalar per bin
        for b, (count, score_sum, positives) in enumerate(zip(*(v.tolist() for v in stored))):
            mean = score_sum / count if count else None
            observed = positives / count if count else None
            if mean is not None and observed is not None:
                ece += count / total * abs(observed - mean)
            bins.append({
                "lower": edges[b],
                "upper": edges[b + 1],
                "rows": int(count),
                "mean_score": mean,
                "observed": observed,
            })  # fmt: skip
        return {"ece": ece if total else None, "bins": bins}
