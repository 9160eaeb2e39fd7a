"""Readiness and drain, shared by every transport.

Each transport registers once; on SIGTERM :meth:`Lifecycle.drain` stops them all the same way:
the server stops being ready (new events are refused as ``shutting_down``, readiness probes
fail), every transport stops taking new work, the events already taken finish and commit, then
every transport closes. Events are counted in flight by the ingest core, so a transport cannot
forget to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


class Transport(Protocol):
    """What the lifecycle needs of a transport (HTTP today, a Kafka consumer next)."""

    def stop(self) -> None:
        """Take no new work (connections or records); what was taken goes on."""

    async def close(self) -> None:
        """Release everything, once the events in flight have finished."""


@dataclass
class Lifecycle:
    """Whether events are accepted, and how many are between arrival and their outcome.

    ``checks`` are the transports' own health (e.g. a Kafka consumer that lost its brokers):
    readiness fails while one of them does, though events over other transports are accepted.
    """

    ready: bool = True
    in_flight: int = 0
    transports: list[Transport] = field(default_factory=list)
    checks: list[Callable[[], bool]] = field(default_factory=list)

    def register(self, transport: Transport, check: Callable[[], bool] | None = None) -> None:
        self.transports.append(transport)
        if check is not None:
            self.checks.append(check)

    def healthy(self) -> bool:
        return all(check() for check in self.checks)

    async def drain(self, seconds: float) -> None:
        """Stop accepting, let in-flight events finish and commit, then close every transport."""
        self.ready = False
        for transport in self.transports:
            transport.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self.in_flight:
            log.warning("events still in flight after drain timeout")
        for transport in self.transports:
            await transport.close()
