"""Deterministic request bodies for the benchmark.

Bodies (a classifier's one-hot truths and probabilities, or a regressor's numbers) are
generated once per run from a seeded numpy generator and written to files that the
wrk Lua script reads, so every server (floor and ours) parses byte-identical input and results
are comparable across runs and machines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_CLASSES = 3
SEED = 20240601


@dataclass(frozen=True)
class Payload:
    """One body file and how many rows (predictions) it carries."""

    name: str
    rows: int
    path: Path
    size_bytes: int


def feedback_body(truth: list, response: list) -> bytes:
    """A Seldon Feedback message with ndarray truth and response, compact JSON."""
    msg = {"truth": {"data": {"ndarray": truth}}, "response": {"data": {"ndarray": response}}}
    return json.dumps(msg, separators=(",", ":")).encode()


def one_hot_feedback(rows: int, rng: np.random.Generator) -> bytes:
    """`rows` one-hot truths with probability responses (argmax right ~70% of the time)."""
    truth_cls = rng.integers(0, N_CLASSES, size=rows)
    truth = np.eye(N_CLASSES, dtype=np.int64)[truth_cls]
    probs = rng.dirichlet(np.ones(N_CLASSES), size=rows)
    hit = rng.random(rows) < 0.7
    # Make the truth class the argmax on "hit" rows so the confusion matrix is realistic.
    probs[hit, truth_cls[hit]] += 1.0
    probs = np.round(probs / probs.sum(axis=1, keepdims=True), 4)
    return feedback_body(truth.tolist(), probs.tolist())


def regression_feedback(rows: int, rng: np.random.Generator) -> bytes:
    """`rows` real truths (around 100, spread 25) with predictions off by a noise of spread 5, one
    number per row as a regressor answers; 4 decimals, the precision of the probabilities."""
    truth = rng.normal(100.0, 25.0, size=rows)
    prediction = truth + rng.normal(0.0, 5.0, size=rows)
    return feedback_body(np.round(truth, 4).tolist(), np.round(prediction, 4).tolist())


def numeric_feedback(n_classes: int, shift: int) -> bytes:
    """Class-id truths 0..n-1 against predictions shifted by `shift` (fills off-diagonal cells)."""
    truth = [[i] for i in range(n_classes)]
    response = [[(i + shift) % n_classes] for i in range(n_classes)]
    return feedback_body(truth, response)


# The bodies a server can be fed, by kind: a classifier's (the default) and a regressor's.
FEEDBACK = "feedback"
REGRESSION = "regression"
BODIES: dict[str, Callable[[int, np.random.Generator], bytes]] = {
    FEEDBACK: one_hot_feedback,
    REGRESSION: regression_feedback,
}


def write_payloads(
    out_dir: Path, sizes: tuple[int, ...] = (1, 100, 1000), seed: int = SEED, kind: str = FEEDBACK
) -> dict[int, Payload]:
    """Write one body file of `kind` per batch size; return them keyed by rows per request.

    Each kind draws from its own generator seeded alike, so adding a kind changes no other
    kind's bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    payloads: dict[int, Payload] = {}
    for rows in sizes:
        body = BODIES[kind](rows, rng)
        path = out_dir / f"{kind}_{rows}.json"
        path.write_bytes(body)
        payloads[rows] = Payload(
            name=f"{rows} row" + ("s" if rows > 1 else ""),
            rows=rows,
            path=path,
            size_bytes=len(body),
        )
    return payloads
