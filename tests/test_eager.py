"""start_eagerly: what finishes without waiting runs now; the rest behaves as a normal task."""

from __future__ import annotations

import asyncio

import pytest

from adserver.http.eager import start_eagerly


def test_a_coroutine_that_never_waits_finishes_inside_the_call() -> None:
    steps: list[str] = []

    async def answer() -> None:
        steps.append("answered")

    async def main() -> None:
        assert start_eagerly(answer()) is None
        assert steps == ["answered"]  # before any turn of the loop

    asyncio.run(main())


def test_a_waiting_coroutine_runs_eagerly_to_its_wait_then_finishes_in_a_task() -> None:
    steps: list[object] = []

    async def answer(gate: asyncio.Future[int]) -> None:
        steps.append("started")
        steps.append(await gate)
        await asyncio.sleep(0)  # a bare yield to the loop is relayed too
        steps.append(await asyncio.sleep(0.001, "slept"))

    async def main() -> None:
        gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = start_eagerly(answer(gate))
        assert task is not None and steps == ["started"]
        gate.set_result(7)
        await task
        assert steps == ["started", 7, "slept"]

    asyncio.run(main())


def test_exceptions_reach_whoever_would_have_seen_them() -> None:
    async def fails_at_once() -> None:
        raise ValueError("now")

    async def fails_later(gate: asyncio.Future[None]) -> None:
        await gate
        raise KeyError("later")

    async def main() -> None:
        with pytest.raises(ValueError, match="now"):
            start_eagerly(fails_at_once())
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = start_eagerly(fails_later(gate))
        assert task is not None
        gate.set_result(None)
        with pytest.raises(KeyError, match="later"):
            await task

    asyncio.run(main())


def test_the_task_returns_the_coroutines_value() -> None:
    async def answer(gate: asyncio.Future[int]) -> int:
        return await gate + 1

    async def main() -> None:
        gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = start_eagerly(answer(gate))
        assert task is not None
        gate.set_result(41)
        assert await task == 42

    asyncio.run(main())


@pytest.mark.parametrize("first_step_ran", [True, False])
def test_cancelling_the_task_cancels_the_coroutine_where_it_waits(first_step_ran: bool) -> None:
    seen: list[str] = []

    async def answer(gate: asyncio.Future[None]) -> None:
        try:
            await gate
        except asyncio.CancelledError:
            seen.append("cancelled while waiting")
            raise

    async def main() -> None:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = start_eagerly(answer(gate))
        assert task is not None
        if first_step_ran:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled while waiting"]
        # Cancelled in its wait, the task cancels the future; before its first step it has none.
        assert gate.cancelled() is first_step_ran

    asyncio.run(main())
