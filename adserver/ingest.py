"""The path of one request: decode, score, commit exactly once, then reply.

Everything here is independent of HTTP: handlers pass headers and body in and turn the
:class:`Outcome` back into a response.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cloudevents.core.bindings.http import HTTPMessage

from adserver.constants import (
    EVENTS_ACCEPTED,
    EVENTS_DUPLICATE,
    EVENTS_REJECTED,
    METRIC_PREFIX,
    METRICS_REJECTED,
    ROWS_ACCEPTED,
    SELDON_METRIC_PREFIX,
)
from adserver.errors import BadRequest, RequestError
from adserver.events import IncomingEvent, decode_request, reply_message
from adserver.protocols.seldon_feedback import Feedback, parse_feedback
from adserver.reply import ReplySender
from adserver.state import Delta
from adserver.store.base import Entry, StateStore
from adserver.summary import model_summary
from cm_models.base import InvalidFeedback, MetricModel
from cm_models.custom_metrics import CustomMetric

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What the handler sends back: a status and, when replies are configured, a CloudEvent."""

    status: int
    reply: HTTPMessage | None = None


@dataclass(frozen=True)
class ReplyConfig:
    event_type: str
    event_source: str


class FeedbackService:
    def __init__(
        self,
        model: Any,
        store: StateStore,
        *,
        reply: ReplyConfig | None = None,
        sender: ReplySender | None = None,
    ) -> None:
        self.model = model
        self.store = store
        self.reply = reply
        self.sender = sender
        self.in_flight = 0
        # Custom metrics may not shadow the families the server derives itself.
        self.reserved_prefixes = (METRIC_PREFIX,) + (
            (SELDON_METRIC_PREFIX,) if isinstance(model, MetricModel) else ()
        )

    async def handle(self, headers: Mapping[str, str], body: bytes) -> Outcome:
        """Count every event of the request, or none of them (answering 4xx)."""
        self.in_flight += 1
        try:
            return await self._handle(headers, body)
        finally:
            self.in_flight -= 1

    async def _handle(self, headers: Mapping[str, str], body: bytes) -> Outcome:
        try:
            events = decode_request(headers, body)
            entries = [self.score(event) for event in events]
        except RequestError as error:
            await self.reject(error.reason)
            raise
        applied = await self.store.commit(entries)
        duplicates = applied.count(False)
        if duplicates:
            await self.store.commit([Entry(Delta(counters=((EVENTS_DUPLICATE, "", duplicates),)))])
        if len(events) != 1:
            return Outcome(200)
        return Outcome(200, self.reply_for(events[0], new=applied[0]))

    def score(self, event: IncomingEvent) -> Entry:
        feedback = parse_feedback(event.data)
        if feedback.response is None:
            raise BadRequest(
                "feedback has no response (prediction) to compare the truth with",
                "missing_response",
            )
        try:
            observation = self.model.observe(feedback.truth, feedback.response, feedback.request)
        except InvalidFeedback as exc:
            raise BadRequest(str(exc), exc.reason) from exc
        metrics, refused = self.admissible([*observation.metrics, *feedback.metrics])
        problems = len(observation.metric_problems) + len(feedback.metric_problems) + refused
        counters = [(EVENTS_ACCEPTED, "", 1), (ROWS_ACCEPTED, "", observation.rows)]
        if problems:
            counters.append((METRICS_REJECTED, "", problems))
            log.debug("custom metrics refused", extra=self.log_fields(event, feedback))
        delta = Delta(cells=observation.cells, metrics=tuple(metrics), counters=tuple(counters))
        return Entry(delta=delta, event_key=event.key)

    def admissible(self, metrics: list[CustomMetric]) -> tuple[list[CustomMetric], int]:
        """Drop custom metrics that would clash with the server's own families or types."""
        custom = self.store.state.custom
        kept = [
            m
            for m in metrics
            if not m.key.startswith(self.reserved_prefixes) and not custom.conflicts(m)
        ]
        types: dict[str, str] = {}
        consistent = [m for m in kept if types.setdefault(custom.family(m.key), m.type) == m.type]
        return consistent, len(metrics) - len(consistent)

    async def reject(self, reason: str) -> None:
        await self.store.commit([Entry(Delta(counters=((EVENTS_REJECTED, reason, 1),)))])

    def reply_for(self, event: IncomingEvent, *, new: bool) -> HTTPMessage | None:
        if self.reply is None:
            return None
        message = reply_message(
            event, self.reply.event_type, self.reply.event_source, model_summary(self.store.state)
        )
        if new and self.sender is not None:
            self.sender.submit(message)
        return message

    @staticmethod
    def log_fields(event: IncomingEvent, feedback: Feedback | None = None) -> dict[str, Any]:
        return {
            "event_id": event.attributes.get("id"),
            "request_id": event.attributes.get("requestid") or (feedback and feedback.puid),
        }
