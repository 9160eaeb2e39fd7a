"""A large body is decoded off the IOLoop: other requests are served while it is read.

The largest body the defaults allow (10 MB) takes a few hundred milliseconds to parse and
score; the IOLoop must not stall for all of it. The check compares the longest pause of a
5 ms ticker with the time the body takes, so it holds on fast and slow machines alike.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import orjson
import pytest

from adserver.app import build_server
from adserver.catalogue.wire import KSERVE_RESPONSE_TYPE
from adserver.http.answers import outcome_answer
from adserver.settings import Settings

LIMIT = Settings().max_body_bytes


def one_hot_feedback(rows: int) -> bytes:
    rng = np.random.default_rng(7)
    truth = np.eye(3, dtype=int)[rng.integers(0, 3, rows)].tolist()
    response = rng.random((rows, 3)).round(3).tolist()
    return orjson.dumps(
        {"truth": {"data": {"ndarray": truth}}, "response": {"data": {"ndarray": response}}}
    )


def kserve_response(rows: int) -> bytes:
    predictions = np.random.default_rng(8).random((rows, 3)).round(3).tolist()
    return orjson.dumps({"predictions": predictions})


def largest(make: object) -> bytes:
    """The largest body of this shape within the default body limit."""
    rows = 1 << 10
    while len(make(rows * 2)) <= LIMIT:  # type: ignore[operator]
        rows *= 2
    return make(rows)  # type: ignore[operator,no-any-return]


@pytest.mark.parametrize(
    ("make", "headers"),
    [
        (one_hot_feedback, {"content-type": "application/json"}),
        (
            kserve_response,
            {
                "ce-specversion": "1.0",
                "ce-id": "request-1",
                "ce-source": "tests",
                "ce-type": KSERVE_RESPONSE_TYPE,
                "content-type": "application/json",
            },
        ),
    ],
    ids=["feedback", "logger"],
)
def test_the_ioloop_keeps_turning_while_a_large_body_is_decoded(make, headers, tmp_path) -> None:
    body = largest(make)
    server = build_server(Settings(state="memory", state_dir=str(tmp_path)))
    service = server.service

    async def main() -> tuple[float, float]:
        pauses: list[float] = []
        running = True

        async def tick() -> None:
            last = time.perf_counter()
            while running:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                pauses.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.02)
        started = time.perf_counter()
        outcome = outcome_answer(await service.receive(headers, body))
        took = time.perf_counter() - started
        running = False
        await ticker
        await service.close()
        assert outcome.status == 200
        return max(pauses), took

    longest, took = asyncio.run(main())
    assert longest < max(0.1, took / 3), f"IOLoop paused {longest:.3f} s of {took:.3f} s"
