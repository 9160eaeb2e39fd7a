"""Time in tests: an injectable clock for the store, and polling until something holds."""

from __future__ import annotations

import time
from collections.abc import Callable


class FakeClock:
    """An injectable clock for the store: tests move time by setting ``now``."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)
