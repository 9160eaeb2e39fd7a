"""Tornado application: thin handlers that translate HTTP to service calls and back."""

from __future__ import annotations

from typing import Any

import tornado.web
from prometheus_client import CollectorRegistry

from adserver.catalogue.reasons import UNKNOWN_MODEL
from adserver.catalogue.wire import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_TEXT,
    QUERY_FROM,
    QUERY_SEGMENT,
    QUERY_STEP,
    QUERY_TO,
    ROUTE_EVENTS,
    ROUTE_LIVE,
    ROUTE_METRICS,
    ROUTE_MODEL_METRICS,
    ROUTE_PROTOCOL,
    ROUTE_READY,
)
from adserver.errors import NotFound, RequestError
from adserver.exposition.encoder import Exposition
from adserver.exposition.windows import RangeDocuments, WindowGauges
from adserver.http.answers import Answer, json_error
from adserver.http.events import BodyBudget, BodyDeadlines, EventsEndpoint, EventsRouter, log_access
from adserver.ingest.lifecycle import Lifecycle
from adserver.ingest.service import FeedbackService


class JsonErrorHandler(tornado.web.RequestHandler):
    """Every error, including Tornado's own 404/405, is a JSON body, never an HTML page."""

    def set_default_headers(self) -> None:
        """No ``text/html`` default: an empty answer has no type, others set their own."""
        self.clear_header("Content-Type")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if not isinstance(exc, RequestError):  # Tornado's own 404/405/500
            exc = RequestError(self._reason, self._reason.lower().replace(" ", "_"))
        _, headers, body = json_error(exc)
        for name, value in headers.items():
            self.set_header(name, value)
        self.finish(body)


class EventsHandler(JsonErrorHandler):
    """``/`` for every method but POST (which :class:`EventsRouter` serves): OPTIONS, else 405."""

    def options(self) -> None:
        self.set_header("Allow", "POST, OPTIONS")
        self.set_status(200)


class MetricsHandler(JsonErrorHandler):
    """``GET /v1/metrics``: Prometheus text/OpenMetrics by negotiation, or JSON on request.

    Prometheus formats render in slices between events (:class:`Exposition`); JSON is the cached
    summary plus the matrix, which orjson writes straight from numpy (no object per cell).
    """

    def initialize(
        self, exposition: Exposition, service: FeedbackService, windows: WindowGauges | None
    ) -> None:
        self.exposition = exposition
        self.service = service
        self.windows = windows

    async def get(self) -> None:
        accept = self.request.headers.get("Accept", "")
        if self.get_argument("format", "") == "json" or CONTENT_TYPE_JSON in accept:
            self.set_header("Content-Type", CONTENT_TYPE_JSON)
            self.finish(self.service.summaries.document(self.service.model.name))
            return
        if self.windows is not None:
            await self.windows.refresh()  # at most every --window_refresh_seconds
        parts, content_type = await self.exposition.scrape(accept)
        self.set_header("Content-Type", content_type)
        self.set_header("Content-Length", sum(map(len, parts)))
        # One part at a time, each as it is: no copy of the whole body, and the stream never
        # writes more than a part (~100 kB) in one step of the IOLoop.
        for part in parts:
            self.write(part)
            await self.flush()
        self.finish()


class ModelMetricsHandler(JsonErrorHandler):
    """``GET /v1/models/<name>/metrics``: one model's summary; with ``from`` and ``to``, its
    metrics over that range of prediction time (:meth:`range`)."""

    def initialize(self, service: FeedbackService, ranges: RangeDocuments) -> None:
        self.service = service
        self.ranges = ranges

    async def get(self, name: str) -> None:
        if any(self.get_argument(key, None) is not None for key in (QUERY_FROM, QUERY_TO)):
            await self.range(name)
            return
        if name != self.service.model.name:
            self.answer(json_error(NotFound(f"no model named {name!r}", UNKNOWN_MODEL)))
            return
        self.set_header("Content-Type", CONTENT_TYPE_JSON)
        self.finish(self.service.summaries.document(name))

    async def range(self, name: str) -> None:
        """Steps and total over [from, to); a bad range is a 400 that changes nothing."""
        arguments = {
            key: self.get_argument(key)
            for key in (QUERY_FROM, QUERY_TO, QUERY_STEP, QUERY_SEGMENT)
            if self.get_argument(key, None) is not None
        }
        try:
            body = await self.ranges.document(name, arguments)
        except RequestError as error:
            self.answer(json_error(error))
            return
        self.set_header("Content-Type", CONTENT_TYPE_JSON)
        self.finish(body)

    def answer(self, answer: Answer) -> None:
        self.set_status(answer.status)
        for header, value in answer.headers.items():
            self.set_header(header, value)
        self.finish(answer.body)


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
    request = handler.request
    log_access(handler.get_status(), request.method or "", request.path, request.request_time())


def make_app(
    service: FeedbackService,
    registry: CollectorRegistry,
    *,
    windows: WindowGauges | None,
    ranges: RangeDocuments,
    protocol: str,
    max_body_bytes: int,
    max_body_bytes_in_flight: int,
    body_timeout_seconds: float,
) -> EventsRouter:
    """The web application, with ``POST /`` served below it (see :mod:`adserver.http.events`)."""
    app = tornado.web.Application(
        [
            (ROUTE_EVENTS, EventsHandler),
            (
                ROUTE_METRICS,
                MetricsHandler,
                {"exposition": Exposition(registry), "service": service, "windows": windows},
            ),
            (ROUTE_MODEL_METRICS, ModelMetricsHandler, {"service": service, "ranges": ranges}),
            (ROUTE_PROTOCOL, TextHandler, {"text": protocol}),
            (ROUTE_LIVE, TextHandler, {"text": "ok"}),
            (ROUTE_READY, ReadyHandler, {"lifecycle": service.lifecycle}),
        ],
        default_handler_class=NotFoundHandler,
        log_function=quiet_log,
    )
    return EventsRouter(
        app,
        EventsEndpoint(service, max_body_bytes, BodyBudget(limit=max_body_bytes_in_flight)),
        BodyDeadlines(body_timeout_seconds, service),
    )
