"""A regressor's and a scorer's sections over prediction time, through a real durable server:
events in two clock hours, a range in steps of 1h (each step scikit-learn's of its own rows),
the window gauges of 1h and 24h, and the same after a restart."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from sklearn.metrics import roc_auc_score, root_mean_squared_error

from adserver.catalogue import families
from tests.support.events import ce_headers, feedback
from tests.support.http import Samples, scrape
from tests.support.processes import ServerFactory
from tests.support.scores import SLACK, assert_scores
from tests.test_regression_http import assert_matches_sklearn
from tests.test_sections_exposition import CONFIG

HOUR = 3600
#: How long before now each event's prediction was made: 90 minutes ago is another clock hour
#: than now, outside the 1h window and inside the 24h one.
AGES = (5400, 5400, 0, 0)
WINDOWS = ("1h", "24h")


def ce_time(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def events(now: float) -> list[tuple[int, dict[str, dict[str, np.ndarray]]]]:
    """(prediction time, each model's truth and response) per event: random, seeded."""
    rng = np.random.default_rng(14)
    made = []
    for age in AGES:
        rows = int(rng.integers(5, 30))
        truth = rng.normal(10, 4, rows).round(3)
        labels = rng.integers(0, 2, rows)
        made.append(
            (
                int(now - age),
                {
                    "reg": {"truth": truth, "predicted": (truth + rng.normal(0, 1, rows)).round(3)},
                    "bin": {"truth": labels, "scores": rng.random(rows).round(4)},
                },
            )
        )
    return made


def joined(rows: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Truth and response of several events' rows, in the order sent."""
    truth, response = (np.concatenate([r[k] for r in rows]) for k in rows[0])
    return truth, response


def ranged(url: str, model: str, start: int, end: int) -> dict[str, Any]:
    arguments = {"from": str(start), "to": str(end), "step": "1h"}
    answer = requests.get(f"{url}/v1/models/{model}/metrics", params=arguments, timeout=10)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def window_gauges(url: str) -> Samples:
    """A scrape once the window gauges (read in the background after a scrape) are there."""
    names = {families.WINDOW_SECTIONS[k].exposed for k in ("rmse", "roc_auc")}
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(url)
        found = {(n, dict(ls)["window"]) for n, ls in samples if n in names}
        if found >= {(n, w) for n in names for w in WINDOWS}:
            return samples
        assert time.monotonic() < deadline, f"window gauges: {sorted(found)}"
        time.sleep(0.2)


def gauge(samples: Samples, key: str, model: str, window: str) -> float:
    name = families.WINDOW_SECTIONS[key].exposed
    labels = {("model", model), ("segment", ""), ("window", window)}
    return samples[name, frozenset(labels)]


def test_steps_and_windows_of_the_sections_survive_a_restart(
    servers: ServerFactory, tmp_path: Path
) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(CONFIG)
    flags = ("--models_config", str(config), "--state_dir", str(tmp_path / "state"))
    flags += ("--window_refresh_seconds", "0.2")
    first = servers(*flags)
    now = time.time()
    sent = events(now)
    for at, models in sent:
        for model, rows in models.items():
            truth, response = rows.values()
            body = feedback(truth.tolist(), response.tolist())
            headers = ce_headers(time=ce_time(at))
            answer = requests.post(
                f"{first.url}/v1/models/{model}", json=body, headers=headers, timeout=10
            )
            assert answer.status_code == 200, answer.text
    start = int(now - max(AGES)) // HOUR * HOUR
    end = (int(now) // HOUR + 1) * HOUR
    documents = {model: ranged(first.url, model, start, end) for model in ("reg", "bin")}
    for model, section in (("reg", "regression"), ("bin", "scores")):
        steps = documents[model]["steps"]
        assert [(s["from"], s["to"]) for s in steps] == [
            (s, s + HOUR) for s in range(start, end, HOUR)
        ]
        for step in steps:
            rows = [models[model] for at, models in sent if step["from"] <= at < step["to"]]
            if not rows:
                assert step[section]["rows"] == 0
            elif model == "reg":
                truth, predicted = joined(rows)
                assert_matches_sklearn(step[section], truth.tolist(), predicted.tolist())
            else:
                assert_scores(step[section], *joined(rows), binary=True, width=2)
        assert sum(bool(s[section]["rows"]) for s in steps) == 2  # two clock hours

    samples = window_gauges(first.url)
    recent = [(at, models) for at, models in sent if now - at < HOUR]
    for window, kept in (("1h", recent), ("24h", sent)):
        rmse = root_mean_squared_error(*joined([models["reg"] for _, models in kept]))
        assert gauge(samples, "rmse", "reg", window) == pytest.approx(rmse, rel=1e-9)
        labels, scores = joined([models["bin"] for _, models in kept])
        read = documents["bin"]["steps"][-1] if window == "1h" else documents["bin"]["total"]
        macro = read["scores"]["roc_auc"]["macro"]
        assert gauge(samples, "roc_auc", "bin", window) == pytest.approx(macro["auc"], rel=1e-12)
        assert abs(macro["auc"] - roc_auc_score(labels, scores)) <= macro["error_bound"] + SLACK
    assert first.stop() == 0

    second = servers(*flags)
    assert {model: ranged(second.url, model, start, end) for model in documents} == documents
    again = window_gauges(second.url)
    for key, model in (("rmse", "reg"), ("roc_auc", "bin")):
        for window in WINDOWS:
            assert gauge(again, key, model, window) == gauge(samples, key, model, window)
