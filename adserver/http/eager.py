"""Run a coroutine at once, up to its first real wait; a task takes over only if it has to wait.

Python 3.12's ``asyncio.eager_task_factory`` does this for every task; the server targets 3.11.
An event answered without waiting (memory mode: decode, count, answer) then costs no task, no
extra turn of the event loop, and no close callback registered on the connection while the
answer is pending: together a share of a single-row event's time under load worth saving
(figures: bench/RESULTS.md).

The synchronous part runs in the caller's task and context (for ``POST /``, the connection's):
``asyncio.current_task()``, context variables and ``asyncio.timeout`` there belong to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def start_eagerly(coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T] | None:
    """None if the coroutine already finished; else the task that finishes it.

    Exceptions of the synchronous part propagate to the caller, as from a plain call.
    """
    try:
        awaited = coroutine.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_Resumed(coroutine, awaited))


class _Resumed(Coroutine[Any, Any, T]):
    """A started coroutine, as a task sees a new one.

    The task's first step receives what the coroutine already waits on (a future keeps the
    "blocking" flag it set when it was first yielded, so the task waits on it as usual); every
    later step, and anything thrown in, even before that first step (a cancellation), goes
    straight to the coroutine.
    """

    def __init__(self, coroutine: Coroutine[Any, Any, T], awaited: Any) -> None:
        self._coroutine = coroutine
        self._pending: list[Any] = [awaited]

    def send(self, value: Any) -> Any:
        if self._pending:
            return self._pending.pop()
        return self._coroutine.send(value)

    def throw(self, *exc: Any) -> Any:  # type: ignore[override]
        self._pending.clear()
        return self._coroutine.throw(*exc)

    def close(self) -> None:
        self._coroutine.close()

    def __next__(self) -> Any:
        return self.send(None)

    def __await__(self) -> Generator[Any, None, T]:
        return self  # type: ignore[return-value]
