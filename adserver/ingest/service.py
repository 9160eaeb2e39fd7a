"""The path of one message: decode, score or join, commit exactly once, then reply.

Everything here is independent of any transport: a transport passes a message (headers and
body) and the binding that decodes it in, and turns the :data:`Outcome` (events accepted, with
the reply CloudEvent; or a refusal, which names a kind of error, not a status) into its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from adserver.catalogue import reasons
from adserver.catalogue.families import (
    EVENTS_ACCEPTED,
    EVENTS_REJECTED,
    LOGGER_EVENTS,
    METRICS_REJECTED,
    ROWS_ACCEPTED,
    ignored,
)
from adserver.catalogue.wire import (
    ARRIVAL_TIME_SOURCE,
    EVENT_TIME_SOURCE,
    EXTENSION_INFERENCE_SERVICE,
    EXTENSION_REQUEST_ID,
    EXTENSION_ROW_INDEX,
    LOGGER_TYPES,
    MAX_ROW_INDEX,
    SELDON_FEEDBACK_TYPE,
)
from adserver.errors import BadRequest, NotFound, PayloadTooLarge, RequestError, Unavailable
from adserver.exposition.summary import SummaryCache, models_document
from adserver.ingest.lifecycle import Lifecycle
from adserver.ingest.routing import Route, Router, segment_values
from adserver.replies.sender import ReplySender
from adserver.state.join import Kind, Label, LoggedRows, as_rows
from adserver.state.store import Entry, Placement, StateStore
from adserver.state.view import Delta
from adserver.wire.cloudevents import (
    IncomingEvent,
    ReplyEvent,
    decode_request,
    parse_time,
    reply_event,
)
from adserver.wire.inference import Unscorable, prediction_payload, request_payload
from adserver.wire.kafka import AvroSchemas, delivered
from adserver.wire.seldon_feedback import Feedback, parse_feedback
from cm_models.base import InvalidFeedback
from cm_models.custom_metrics import CustomMetric
from cm_models.protocol import FeedbackModel

log = logging.getLogger(__name__)

#: Bodies from this size on are decoded off the IOLoop (below it, the hand-off costs more).
OFFLOAD_BODY_BYTES = 256 * 1024

#: A transport's binding: a message's headers (lower-case names) and body -> its events.
Binding = Callable[[Mapping[str, str], bytes], list[IncomingEvent]]


@dataclass(frozen=True)
class Accepted:
    """Every event of a message is counted.

    ``new`` says, per event, whether it was counted now (False: a redelivery, counted before).
    ``reply`` answers a lone feedback event when replies are configured. ``time_source`` says
    where a lone feedback's prediction time came from when its rows count under it (its
    ``ce-time``, or its arrival).
    """

    new: Sequence[bool]
    reply: ReplyEvent | None = None
    time_source: str | None = None


#: What became of a message: all its events counted, or none of them and why.
Outcome = Accepted | RequestError


@dataclass(frozen=True)
class ReplyConfig:
    event_type: str
    event_source: str


@dataclass(frozen=True)
class Target:
    """The model an event counts for: ``name`` None is the server's own (``--model_name``)."""

    name: str | None
    model: FeedbackModel
    route: Route | None = None

    def join_id(self, request_id: str) -> str:
        """Join ids are the model's own, so two models' predictions never meet."""
        return request_id if self.name is None else f"{self.name}/{request_id}"

    def segment(
        self, event: IncomingEvent, body: Any, tags: Mapping[str, Any] | None = None
    ) -> tuple[str | None, ...]:
        """The event's values of the model's segment dimensions (none for the server's)."""
        return () if self.route is None else segment_values(self.route, event, body, tags)


class FeedbackService:
    def __init__(
        self,
        model: FeedbackModel,
        store: StateStore,
        *,
        reply: ReplyConfig | None = None,
        sender: ReplySender | None = None,
        inference_service: str = "",
        max_event_rows: int = 1_000_000,
        lifecycle: Lifecycle | None = None,
        models: Mapping[str, FeedbackModel] | None = None,
        router: Router | None = None,
        avro: AvroSchemas | None = None,
    ) -> None:
        """``model`` is the server's own; with a ``router``, ``models`` are the configured ones
        (by name) and every event is routed to one of them (or to none). ``avro`` reads Avro
        record values a Knative KafkaSource delivers (``--kafka_avro_schema``)."""
        self.model = model
        self.models = dict(models or {})
        self.router = router
        self.server = Target(None, model)
        self.thread_safe = model.thread_safe and all(m.thread_safe for m in self.models.values())
        self.store = store
        self.max_event_rows = max_event_rows
        self.reply = reply
        self.sender = sender
        self.inference_service = inference_service
        self.summaries = SummaryCache(store.state)
        self._summaries = {name: SummaryCache(store.views.total(name)) for name in self.models}
        self.lifecycle = lifecycle or Lifecycle()
        self.avro = avro
        # One thread: large bodies are decoded one at a time, which also bounds their memory.
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder")

    async def receive(
        self,
        headers: Mapping[str, str],
        body: bytes,
        binding: Binding = decode_request,
        path_model: str | None = None,
    ) -> Outcome:
        """Count every event of a transport's message, or none of them.

        A refusal of the input is counted as a rejection; a fault of the server's (e.g. the
        store is unavailable) is not, since the sender retries. ``path_model`` is the model a
        route named (``POST /v1/models/<name>``). Events are in flight from here
        until their outcome, so a drain lets them finish; a draining server refuses new ones.
        """
        if not self.lifecycle.ready:  # the sender will retry elsewhere
            return Unavailable("the server is shutting down", reasons.SHUTTING_DOWN)
        self.lifecycle.in_flight += 1
        events: list[IncomingEvent] = []  # filled by the binding, so a refusal's log names them
        try:
            target = self.named(path_model)
            entries = await self.decoded(binding, headers, body, events, target)
            applied = await self.store.commit(entries)
        except RequestError as error:
            if not error.kind.fault:
                await self.reject(error.reason)
            self.log_event("event refused", events, reason=error.reason, kind=error.kind.value)
            return error
        finally:
            self.lifecycle.in_flight -= 1
        self.log_event("events committed", events, events=len(events), new=applied.count(True))
        if len(events) != 1 or is_logger_event(events[0]):
            return Accepted(applied)  # a logger event never gets a reply: no loops
        timed = entries[0].placement.time is not None  # direct feedback: rows under its time
        return Accepted(
            applied,
            self.reply_for(events[0], entries[0].model, new=applied[0]),
            prediction_time(events[0])[1] if timed else None,
        )

    def named(self, path_model: str | None) -> Target | None:
        """The model a route names (None: each event is routed); an unknown name is refused."""
        if path_model is None:
            return None
        if self.router is None and path_model == self.model.name:
            return self.server
        route = self.router.routes.get(path_model) if self.router is not None else None
        if route is None:
            raise NotFound(f"no model {path_model!r} is configured", reasons.UNKNOWN_MODEL)
        return Target(route.name, self.models[route.name], route)

    def target(self, event: IncomingEvent, body: Any) -> Target | None:
        """The model of an event no route named: the server's own, or as the router says."""
        if self.router is None:
            return self.server
        route = self.router.route(event, body)
        return None if route is None else Target(route.name, self.models[route.name], route)

    async def ingest(self, events: Sequence[IncomingEvent]) -> Outcome:
        """Events a transport decoded itself: counted whole, or refused, as by :meth:`receive`."""
        return await self.receive({}, b"", lambda _headers, _body: list(events))

    async def decoded(
        self,
        binding: Binding,
        headers: Mapping[str, str],
        body: bytes,
        events: list[IncomingEvent],
        target: Target | None = None,
    ) -> list[Entry]:
        """What each event adds (``events`` receives the events). A large body is decoded and
        scored on the decoding thread, so the IOLoop keeps serving other requests meanwhile; a
        user's model always runs on the IOLoop, one thread."""

        def decode() -> list[Entry]:
            try:
                # whatever the transport, an event from Kafka is decoded as the record itself
                decoded = binding(headers, body)
                events.extend(e for event in decoded for e in delivered(event, self.avro))
                return [self.entry(event, target) for event in events]
            except InvalidFeedback as exc:  # the model's verdict on the data
                raise BadRequest(str(exc), exc.reason) from exc

        if len(body) < OFFLOAD_BODY_BYTES or not self.thread_safe:
            return decode()
        return await asyncio.get_running_loop().run_in_executor(self._decoder, decode)

    def log_event(self, message: str, decoded: list[IncomingEvent], **fields: Any) -> None:
        """One DEBUG line per message (never at INFO: ingestion must stay quiet and fast)."""
        if log.isEnabledFor(logging.DEBUG):
            first = decoded[0] if decoded else IncomingEvent({}, None)
            ids = {
                "event_id": first.attributes.get("id"),
                "request_id": first.attributes.get(EXTENSION_REQUEST_ID) or first.puid,
            }
            log.debug(message, extra={"model": self.model.name, **ids, **fields})

    def entry(self, event: IncomingEvent, named: Target | None = None) -> Entry:
        """What one event adds, for the model ``named`` by its route or else routed to."""
        if is_logger_event(event):
            if (
                self.inference_service
                and self.router is None
                and event.attributes.get(EXTENSION_INFERENCE_SERVICE) != self.inference_service
            ):  # another model's prediction: nothing to store, nothing to remember
                return ignored_entry(reasons.OTHER_SERVICE)
            target = named or self.target(event, None if event.error else event.data)
            if target is None:  # no configured model's: acknowledged, counted, not stored
                return ignored_entry(reasons.UNKNOWN_MODEL)
            return self.logged(event, target, *LOGGER_TYPES[event.attributes["type"]])
        body = event.payload()
        feedback = parse_feedback(body)
        target = named or self.target(event, body)
        if target is None:
            raise BadRequest(
                "the feedback matches no configured model (see --models_config); name one by "
                "posting to /v1/models/<name>",
                reasons.UNKNOWN_MODEL,
            )
        if feedback.response is None:
            return self.label(event, feedback, target, body)
        key = feedback_key(event, target)
        observation = target.model.observe(feedback.truth, feedback.response, feedback.request)
        extra = self.feedback_delta(
            feedback, [*observation.metrics], len(observation.metric_problems)
        )
        delta = Delta(
            cells=observation.cells,
            counters=((ROWS_ACCEPTED, "", observation.rows),),
            updates=observation.updates,
        )
        placement = Placement(target.segment(event, body, feedback.tags), prediction_time(event)[0])
        return Entry(delta + extra, key, model=target.name, placement=placement)

    def feedback_delta(
        self, feedback: Feedback, model_metrics: list[CustomMetric], model_problems: int
    ) -> Delta:
        """What any feedback event adds besides its rows: itself, and its custom metrics."""
        metrics = [*model_metrics, *feedback.metrics]
        problems = model_problems + len(feedback.metric_problems)
        counters = [(EVENTS_ACCEPTED, "", 1)]
        if problems:
            counters.append((METRICS_REJECTED, "", problems))
        return Delta(metrics=tuple(metrics), counters=tuple(counters))

    def label(self, event: IncomingEvent, feedback: Feedback, target: Target, body: Any) -> Entry:
        """Feedback without a response: join its truth to the logged prediction by request id.

        Every id the label carries is a candidate, in order of preference; the store takes the
        first that names a logged prediction (a proxy may add a fresh ``ce-requestid`` of its
        own to feedback whose ``truth.meta.puid`` names the prediction).
        """
        candidates = (
            event.attributes.get(EXTENSION_REQUEST_ID),
            event.puid,
            feedback.puid,
            event.attributes.get("id"),
        )
        request_ids = tuple(dict.fromkeys(target.join_id(str(c)) for c in candidates if c))
        if not request_ids:
            raise BadRequest(
                "feedback has no response and no request id (ce-requestid, Seldon-Puid, "
                "truth.meta.puid or ce-id) to find the logged prediction",
                reasons.MISSING_RESPONSE,
            )
        self.check_rows(feedback.truth, "label")
        rows = as_rows(target.model.rows(feedback.truth, "truth"))
        first_row = row_index(event.attributes.get(EXTENSION_ROW_INDEX, 0), len(rows))
        operation = Label(
            request_ids=request_ids,
            first_row=first_row,
            truth=rows,
            extra=self.feedback_delta(feedback, [], 0),
            segment=target.segment(event, body, feedback.tags),
        )
        return Entry(event_key=feedback_key(event, target), operation=operation, model=target.name)

    def logged(self, event: IncomingEvent, target: Target, kind: Kind, key_attribute: str) -> Entry:
        """A payload logger's request or response event: keep its rows for later labels."""
        request_id = event.attributes.get(key_attribute)
        if not request_id:
            raise BadRequest(f"logger event lacks ce-{key_attribute}", reasons.MISSING_REQUEST_ID)
        # KServe reuses one ce-id for the request and the response event: the type tells them
        # apart. Every agent sends one ce-source and propagates the caller's Ce-Id, so two
        # models' events may share (source, id): each model remembers its own.
        key = event.key and (
            event.key[0],
            f"{target.join_id(event.key[1])}|{event.attributes['type']}",
        )
        try:
            body = event.payload()
            extract = prediction_payload if kind == "response" else request_payload
            values = extract(body)
            self.check_rows(values, f"logged {kind}")
            if kind == "response" and target.model.numeric_rows:
                # e.g. strings: valid, but never scorable; scores out of range never will be
                values = target.model.rows(values, kind)
        except (Unscorable, InvalidFeedback, BadRequest) as exc:
            if isinstance(exc, BadRequest) and exc.reason != reasons.INVALID_JSON:
                raise
            reason = getattr(exc, "reason", None) or str(exc)
            reason = reasons.NOT_JSON if reason == reasons.INVALID_JSON else reason
            return Entry(
                Delta(counters=((LOGGER_EVENTS, ignored(reason), 1),)), key, model=target.name
            )
        operation = LoggedRows(
            target.join_id(str(request_id)),
            kind,
            as_rows(values),
            prediction_time(event)[0],
            target.segment(event, body),
        )
        return Entry(event_key=key, operation=operation, model=target.name)

    def check_rows(self, values: Any, what: str) -> None:
        """Rows of a logger event or label are stored: their number is bounded (checked before
        anything is built from them)."""
        if isinstance(values, np.ndarray):
            rows = values.shape[0] if values.ndim else 1
        else:
            rows = len(values) if isinstance(values, list) else 1
        if rows > self.max_event_rows:
            raise PayloadTooLarge(
                f"the {what} has {rows} rows; at most {self.max_event_rows} are stored per event "
                "(--max_event_rows)",
                reasons.TOO_MANY_ROWS,
            )

    async def close(self) -> None:
        """After the last event: release the decoding thread, then the store."""
        self._decoder.shutdown(wait=True)
        await self.store.close()

    async def reject(self, reason: str) -> None:
        """Count a refusal; if even that cannot be recorded, the refusal still stands."""
        try:
            await self.store.commit([Entry(Delta(counters=((EVENTS_REJECTED, reason, 1),)))])
        except RequestError:
            log.warning("could not count a rejected event", extra={"reason": reason})

    def document(self, model: str | None = None) -> bytes:
        """The JSON summaries of one model (by name), or of every model, in configuration
        order with the server's own last; an unknown name is refused."""
        names = self.store.views.models()
        if model is not None:
            if model not in names:
                raise NotFound(f"no model {model!r} is configured", reasons.UNKNOWN_MODEL)
            names = [model]
        return models_document({name: self.model_document(name) for name in names})

    def model_document(self, name: str) -> dict[str, Any]:
        route = self.router.routes.get(name) if self.router is not None else None
        cache = self._summaries.get(name, self.summaries)
        return cache.document(
            self.store.views.segments(name) if route and route.segment_by else None
        )

    def summary_cache(self, model: str | None) -> SummaryCache:
        """The summaries of a model's totals (None: the server's own model)."""
        return self.summaries if model is None else self._summaries[model]

    def reply_for(self, event: IncomingEvent, model: str | None, *, new: bool) -> ReplyEvent | None:
        """The answer carries the summary of the state this event made (its bytes are shared by
        every reply of that state); a queued reply to ``--reply_url`` takes the summary current
        when a worker sends it, so the queue holds headers only, not a summary each."""
        if self.reply is None:
            return None
        summaries = self.summary_cache(model)
        reply = reply_event(event, self.reply.event_type, self.reply.event_source, summaries.body())
        if new and self.sender is not None:
            self.sender.submit(reply.binary_headers, summaries.body)
        return reply


def ignored_entry(reason: str) -> Entry:
    """A logger event acknowledged but not stored (nothing to remember): counted by reason."""
    return Entry(Delta(counters=((LOGGER_EVENTS, ignored(reason), 1),)))


def is_logger_event(event: IncomingEvent) -> bool:
    return event.attributes.get("type") in LOGGER_TYPES


def feedback_key(event: IncomingEvent, target: Target) -> tuple[str, str] | None:
    """What makes two feedback events the same feedback.

    Seldon's executor logs a feedback once per graph node that has a logger, each copy with its
    own ``ce-id`` (and ``modelid``) but the prediction's ``requestid``: such events are the same
    feedback when they name the same request and first row, whatever the node or the executor
    pod that sent them. Any other event is the same when its (source, id) is.
    """
    request_id = event.attributes.get(EXTENSION_REQUEST_ID)
    if event.key is None or event.attributes.get("type") != SELDON_FEEDBACK_TYPE or not request_id:
        return event.key
    first_row = event.attributes.get(EXTENSION_ROW_INDEX, 0)
    # "0", "00" and 0 name one row; a label refuses what is no number (invalid_row_index)
    with contextlib.suppress(TypeError, ValueError):
        first_row = int(first_row)
    return (SELDON_FEEDBACK_TYPE, f"{target.join_id(str(request_id))}|{first_row}")


def row_index(value: Any, rows: int) -> int:
    """First row a label covers; rows are 32-bit indexes, like class ids."""
    try:
        index = int(value)
    except (TypeError, ValueError, OverflowError):
        index = -1
    if not 0 <= index <= MAX_ROW_INDEX - rows:
        raise BadRequest(
            f"ce-rowindex must be an integer from 0 to {MAX_ROW_INDEX - rows}",
            reasons.INVALID_ROW_INDEX,
        )
    return index


def prediction_time(event: IncomingEvent) -> tuple[float, str]:
    """The event's ``time`` attribute as epoch seconds, or its arrival if it has none (or none
    that is a time), and which of the two it is."""
    value = event.attributes.get("time")
    try:
        if isinstance(value, datetime):
            return value.timestamp(), EVENT_TIME_SOURCE
        if isinstance(value, str):  # structured mode keeps attributes as sent
            return parse_time(value).timestamp(), EVENT_TIME_SOURCE
    except (BadRequest, ValueError, OverflowError):  # e.g. year 1 without an offset
        pass
    return time.time(), ARRIVAL_TIME_SOURCE
