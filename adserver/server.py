"""Tornado application: thin handlers that translate HTTP to service calls and back."""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import orjson
import tornado.web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from adserver.constants import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_TEXT,
    ROUTE_EVENTS,
    ROUTE_LIVE,
    ROUTE_METRICS,
    ROUTE_PROTOCOL,
    ROUTE_READY,
)
from adserver.errors import PayloadTooLarge, RequestError, Unavailable
from adserver.ingest import FeedbackService
from adserver.summary import metrics_document

log = logging.getLogger(__name__)


@dataclass
class Lifecycle:
    """Shared by handlers and shutdown: readiness, and events whose answer is not yet sent."""

    ready: bool = True
    in_flight: int = 0


class JsonErrorHandler(tornado.web.RequestHandler):
    """Every error, including Tornado's own 404/405, is a JSON body, never an HTML page."""

    def set_default_headers(self) -> None:
        """No ``text/html`` default: an empty answer has no type, others set their own."""
        self.clear_header("Content-Type")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, RequestError):
            body = exc.body()
        else:
            reason = self._reason.lower().replace(" ", "_")
            body = {"error": self._reason, "reason": reason}
        self.finish(self.json_body(body))

    def json_body(self, body: dict[str, str]) -> bytes:
        self.set_header("Content-Type", CONTENT_TYPE_JSON)
        return orjson.dumps(body)

    def send_error_for(self, error: RequestError) -> None:
        self.set_status(error.status)
        self.write_error(error.status, exc_info=(type(error), error, None))


@tornado.web.stream_request_body
class EventsHandler(JsonErrorHandler):
    """``POST /``: one request carries one event (or a CloudEvents batch)."""

    def initialize(
        self, service: FeedbackService, max_body_bytes: int, lifecycle: Lifecycle
    ) -> None:
        self.service = service
        self.lifecycle = lifecycle
        self.max_body_bytes = max_body_bytes
        self.chunks: list[bytes] = []
        self.received = 0
        self.too_large = False

    # prepare and data_received are plain functions (cheaper than coroutines on every event);
    # they return an awaitable, which Tornado awaits, only when refusing a body.
    def prepare(self) -> Awaitable[None] | None:
        if self.request.method != "POST":
            return None
        declared = self.request.headers.get("Content-Length", "")
        too_large = declared.isdigit() and int(declared) > self.max_body_bytes
        # The limit is enforced here (a declared length) and in data_received (a chunked body),
        # so the client gets a JSON 413: Tornado's own check would drop the connection or answer
        # a bare 400 before this handler could answer.
        self.request.connection.set_max_body_size(int(declared) if too_large else sys.maxsize)
        return self.refuse_large() if too_large else None

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.too_large:
            return None
        self.received += len(chunk)
        if self.received > self.max_body_bytes:
            self.chunks.clear()
            return self.refuse_large()
        self.chunks.append(chunk)
        return None

    async def refuse_large(self) -> None:
        """Count the refusal, answer 413 now and close, so the rest of the body is never buffered.

        Tornado closes the connection itself when a response finishes before the body was read;
        ``Connection: close`` tells the client not to reuse it.
        """
        self.too_large = True
        error = PayloadTooLarge(f"body exceeds {self.max_body_bytes} bytes", "body_too_large")
        await self.service.reject(error.reason)
        self.set_header("Connection", "close")
        self.send_error_for(error)

    async def post(self) -> None:
        """Counted in flight until the answer is written, so a drain never cuts it off."""
        if self.too_large:
            return
        self.lifecycle.in_flight += 1
        try:
            await self.finish(await self.answer())
        finally:
            self.lifecycle.in_flight -= 1

    async def answer(self) -> bytes | None:
        headers = {name.lower(): value for name, value in self.request.headers.get_all()}
        try:
            if not self.lifecycle.ready:  # draining: nothing new may start, the sender retries
                raise Unavailable("the server is shutting down", "shutting_down")
            outcome = await self.service.handle(headers, b"".join(self.chunks))
        except RequestError as error:
            self.set_status(error.status)
            return self.json_body(error.body())
        self.set_status(outcome.status)
        if outcome.reply is None:
            return None
        for name, value in outcome.reply.headers.items():
            self.set_header(name, value)
        return outcome.reply.body

    def options(self) -> None:
        self.set_header("Allow", "POST, OPTIONS")
        self.set_status(200)


class MetricsHandler(JsonErrorHandler):
    """``GET /v1/metrics``: Prometheus text/OpenMetrics by negotiation, or JSON on request."""

    def initialize(self, registry: CollectorRegistry, service: FeedbackService) -> None:
        self.registry = registry
        self.service = service

    def get(self) -> None:
        accept = self.request.headers.get("Accept", "")
        if self.get_argument("format", "") == "json" or CONTENT_TYPE_JSON in accept:
            document = metrics_document(self.service.model.name, self.service.store.state)
            self.set_header("Content-Type", CONTENT_TYPE_JSON)
            self.finish(orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY))
            return
        encoder, content_type = choose_encoder(accept)
        self.set_header("Content-Type", content_type)
        self.finish(encoder(self.registry))


class TextHandler(JsonErrorHandler):
    def initialize(self, text: str) -> None:
        self.text = text

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_TEXT)
        self.finish(self.text)


class ReadyHandler(JsonErrorHandler):
    """Ready while the server accepts events; a draining server is not ready."""

    def initialize(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    def get(self) -> None:
        if not self.lifecycle.ready:
            raise tornado.web.HTTPError(503, reason="Draining")
        self.set_header("Content-Type", CONTENT_TYPE_TEXT)
        self.finish(b"ok")


class NotFoundHandler(JsonErrorHandler):
    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


def quiet_log(handler: tornado.web.RequestHandler) -> None:
    """No access line per event at INFO; failures are logged at WARNING."""
    status = handler.get_status()
    level = logging.WARNING if status >= 500 else logging.DEBUG
    if not log.isEnabledFor(level):
        return
    log.log(
        level,
        "request",
        extra={
            "status": status,
            "method": handler.request.method,
            "path": handler.request.path,
            "duration_ms": round(1000 * handler.request.request_time(), 3),
        },
    )


def make_app(
    service: FeedbackService,
    registry: CollectorRegistry,
    *,
    protocol: str,
    max_body_bytes: int,
    lifecycle: Lifecycle,
) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (
                ROUTE_EVENTS,
                EventsHandler,
                {"service": service, "max_body_bytes": max_body_bytes, "lifecycle": lifecycle},
            ),
            (ROUTE_METRICS, MetricsHandler, {"registry": registry, "service": service}),
            (ROUTE_PROTOCOL, TextHandler, {"text": protocol}),
            (ROUTE_LIVE, TextHandler, {"text": "ok"}),
            (ROUTE_READY, ReadyHandler, {"lifecycle": lifecycle}),
        ],
        default_handler_class=NotFoundHandler,
        log_function=quiet_log,
    )
