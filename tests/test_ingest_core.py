"""The ingest core without any transport: events in, outcomes out.

No server process and no HTTP: events are built as a binding would decode them, and what comes
back is the core's outcome (accepted, per event new or a redelivery, with the reply CloudEvent)
or its refusal (a kind of error, a reason and a message; no status).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from adserver.app import build_server
from adserver.catalogue.families import EVENTS_ACCEPTED, EVENTS_REJECTED, ROWS_ACCEPTED
from adserver.catalogue.wire import KSERVE_RESPONSE_TYPE
from adserver.errors import ErrorKind, RequestError, Unavailable
from adserver.ingest.lifecycle import Lifecycle
from adserver.ingest.service import Accepted, FeedbackService, Outcome
from adserver.settings import Settings
from adserver.state.store import Entry
from adserver.wire.cloudevents import IncomingEvent, decode_request

ROW = {"truth": {"data": {"ndarray": [[0, 1]]}}, "response": {"data": {"ndarray": [[0.2, 0.8]]}}}
LABEL = {"truth": {"data": {"ndarray": [[0, 1]]}}}


def event(
    data: Any, event_id: str = "", puid: str | None = None, **attributes: str
) -> IncomingEvent:
    """A CloudEvent as any binding hands it to the core."""
    return IncomingEvent(
        {
            "specversion": "1.0",
            "id": event_id or uuid.uuid4().hex,
            "source": "tests",
            "type": "io.seldon.serving.feedback",
            **attributes,
        },
        data,
        puid=puid,
    )


def run(
    tmp_path: Path,
    steps: Callable[[FeedbackService], Awaitable[None]],
    **settings: Any,
) -> FeedbackService:
    """Run ``steps`` against a memory-state service; the service, closed, is returned to read."""
    service = build_server(Settings(state="memory", state_dir=str(tmp_path), **settings)).service

    async def main() -> None:
        try:
            await steps(service)
        finally:
            await service.close()

    asyncio.run(main())
    return service


def accepted(outcome: Outcome) -> Accepted:
    assert isinstance(outcome, Accepted), outcome
    return outcome


def refused(outcome: Outcome) -> RequestError:
    assert isinstance(outcome, RequestError), outcome
    return outcome


def rejections(service: FeedbackService) -> dict[str, int]:
    return service.store.state.labelled(EVENTS_REJECTED)


def test_an_event_is_counted_once_and_its_redelivery_accepted_as_not_new(tmp_path: Path) -> None:
    once = event(ROW)
    seen: list[Sequence[bool]] = []

    async def steps(service: FeedbackService) -> None:
        for events in ([once], [once], [event(ROW), once]):
            seen.append(accepted(await service.ingest(events)).new)

    service = run(tmp_path, steps)
    assert [list(new) for new in seen] == [[True], [False], [True, False]]
    assert service.store.state.count(EVENTS_ACCEPTED) == 2
    assert service.store.state.count(ROWS_ACCEPTED) == 2


def not_json() -> IncomingEvent:
    """A binary event whose body is no JSON, as the HTTP binding keeps it (its error inside)."""
    headers = {"ce-specversion": "1.0", "ce-id": "e-2", "ce-source": "tests", "ce-type": "t"}
    (decoded,) = decode_request(headers, b"not json")
    return decoded


@pytest.mark.parametrize(
    ("bad", "settings", "kind", "reason"),
    [
        (event({"response": ROW["response"]}), {}, ErrorKind.INVALID, "missing_truth"),
        (not_json(), {}, ErrorKind.INVALID, "invalid_json"),
        (
            event({"truth": {"data": {"ndarray": [[0, 1], [1, 0]]}}}),
            {"max_event_rows": 1},
            ErrorKind.TOO_LARGE,
            "too_many_rows",
        ),
    ],
    ids=["missing_truth", "invalid_json", "too_many_rows"],
)
def test_a_refusal_names_its_kind_and_reason_and_the_batch_counts_nothing(
    tmp_path: Path, bad: IncomingEvent, settings: dict[str, Any], kind: ErrorKind, reason: str
) -> None:
    outcomes: list[Outcome] = []

    async def steps(service: FeedbackService) -> None:
        outcomes.append(await service.ingest([event(ROW), bad]))

    service = run(tmp_path, steps, **settings)
    error = refused(outcomes[0])
    assert (error.kind, error.reason) == (kind, reason) and error.message
    assert not error.kind.fault
    assert service.store.state.count(EVENTS_ACCEPTED) == 0  # the good event went with it
    assert rejections(service) == {reason: 1}


def test_a_lone_feedback_event_gets_its_reply_a_logger_event_and_a_batch_none(
    tmp_path: Path,
) -> None:
    replies: dict[str, Any] = {}

    async def steps(service: FeedbackService) -> None:
        lone = event(ROW, "e-1", requestid="r-1", knativearrivaltime="now")
        replies["lone"] = accepted(await service.ingest([lone])).reply
        replies["body"] = service.summaries.body()
        logger = event({"predictions": [[0.1, 0.9]]}, type=KSERVE_RESPONSE_TYPE)
        replies["logger"] = accepted(await service.ingest([logger])).reply
        replies["batch"] = accepted(await service.ingest([event(ROW), event(ROW)])).reply

    settings = {"event_type": "reply.type", "event_source": "reply/source"}
    run(tmp_path, steps, **settings)
    reply = replies["lone"]
    assert reply is not None and reply.data == replies["body"]
    attributes = dict(reply.attributes)
    assert attributes.pop("time")
    assert attributes == {
        "specversion": "1.0",
        "id": "e-1",
        "type": "reply.type",
        "source": "reply/source",
        "requestid": "r-1",  # a correlation extension; Knative's own are not copied
    }
    assert orjson.loads(reply.data)["accuracy"] == 1.0
    assert replies["logger"] is None and replies["batch"] is None


def test_a_memory_mode_event_gets_its_outcome_without_waiting(tmp_path: Path) -> None:
    """Nothing on the way suspends, so HTTP's eager start answers it without a task."""
    outcomes: list[Outcome] = []

    async def steps(service: FeedbackService) -> None:
        coroutine = service.ingest([event(ROW)])
        with pytest.raises(StopIteration) as finished:
            coroutine.send(None)
        outcomes.append(finished.value.value)

    run(tmp_path, steps)
    assert list(accepted(outcomes[0]).new) == [True]


def test_a_label_joins_by_the_puid_its_transport_carried(tmp_path: Path) -> None:
    async def steps(service: FeedbackService) -> None:
        prediction = event({"predictions": [[0.1, 0.9]]}, "request-1", type=KSERVE_RESPONSE_TYPE)
        accepted(await service.ingest([prediction]))
        accepted(await service.ingest([event(LABEL)]))  # no id names the prediction: parked
        assert service.store.state.count(ROWS_ACCEPTED) == 0
        accepted(await service.ingest([event(LABEL, puid="request-1")]))

    service = run(tmp_path, steps)
    assert service.store.state.count(ROWS_ACCEPTED) == 1


def test_a_draining_core_refuses_new_events_as_a_fault_and_counts_nothing(
    tmp_path: Path,
) -> None:
    outcomes: list[Outcome] = []

    async def steps(service: FeedbackService) -> None:
        service.lifecycle.ready = False
        outcomes.append(await service.ingest([event(ROW)]))

    service = run(tmp_path, steps)
    error = refused(outcomes[0])
    assert (error.kind, error.reason) == (
        ErrorKind.UNAVAILABLE,
        "shutting_down",
    ) and error.kind.fault
    assert service.store.state.count(EVENTS_ACCEPTED) == 0 and rejections(service) == {}


def test_a_store_fault_is_refused_but_not_counted_as_a_rejection(tmp_path: Path) -> None:
    outcomes: list[Outcome] = []

    async def steps(service: FeedbackService) -> None:
        commit = service.store.commit

        async def failing(entries: Sequence[Entry]) -> list[bool]:
            if any(entry.event_key for entry in entries):  # the event, not its rejection
                raise Unavailable("state store unavailable", "store_error")
            return await commit(entries)

        service.store.commit = failing  # type: ignore[method-assign]
        outcomes.append(await service.ingest([event(ROW)]))

    service = run(tmp_path, steps)
    assert refused(outcomes[0]).reason == "store_error"
    assert rejections(service) == {}


def test_events_are_in_flight_from_arrival_until_their_outcome(tmp_path: Path) -> None:
    counts: list[int] = []

    async def steps(service: FeedbackService) -> None:
        commit = service.store.commit
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def held(entries: Sequence[Entry]) -> list[bool]:
            await gate
            return await commit(entries)

        service.store.commit = held  # type: ignore[method-assign]
        task = asyncio.create_task(service.ingest([event(ROW)]))
        await asyncio.sleep(0.01)
        counts.append(service.lifecycle.in_flight)
        gate.set_result(None)
        accepted(await task)
        counts.append(service.lifecycle.in_flight)

    run(tmp_path, steps)
    assert counts == [1, 0]


class FakeTransport:
    def __init__(self, name: str, lifecycle: Lifecycle, steps: list[str]) -> None:
        self.name, self.lifecycle, self.steps = name, lifecycle, steps

    def stop(self) -> None:
        self.steps.append(f"stop {self.name} ready={self.lifecycle.ready}")

    async def close(self) -> None:
        self.steps.append(f"close {self.name} in_flight={self.lifecycle.in_flight}")


@pytest.mark.parametrize("finishes", [True, False], ids=["finishes", "times_out"])
def test_drain_stops_every_transport_waits_for_events_in_flight_then_closes_them(
    finishes: bool,
) -> None:
    lifecycle = Lifecycle()
    steps: list[str] = []
    for name in ("http", "kafka"):
        lifecycle.register(FakeTransport(name, lifecycle, steps))

    async def main() -> None:
        lifecycle.in_flight = 1

        async def finish() -> None:
            await asyncio.sleep(0.1)
            steps.append("event done")
            lifecycle.in_flight = 0

        if finishes:
            task = asyncio.create_task(finish())
        await lifecycle.drain(seconds=0.05 if not finishes else 10)
        if finishes:
            await task

    asyncio.run(main())
    left = 0 if finishes else 1
    assert steps == [
        "stop http ready=False",
        "stop kafka ready=False",
        *(["event done"] if finishes else []),
        f"close http in_flight={left}",
        f"close kafka in_flight={left}",
    ]
