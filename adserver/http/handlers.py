"""Tornado application: thin handlers that translate HTTP to service calls and back."""

from __future__ import annotations

import urllib.parse
from typing import Any

import tornado.web
from prometheus_client import CollectorRegistry

from adserver.catalogue.wire import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_TEXT,
    DASHBOARD_REDIRECT,
    HEADER_AUTHORIZATION,
    QUERY_FROM,
    QUERY_SEGMENT,
    QUERY_STEP,
    QUERY_TO,
    ROUTE_DASHBOARD,
    ROUTE_DASHBOARD_FILE,
    ROUTE_EVENTS,
    ROUTE_LIVE,
    ROUTE_METRICS,
    ROUTE_MODEL_METRICS,
    ROUTE_PROTOCOL,
    ROUTE_READY,
)
from adserver.errors import RequestError
from adserver.exposition.encoder import Exposition
from adserver.exposition.windows import RangeDocuments, WindowGauges
from adserver.http.answers import json_error
from adserver.http.auth import Authenticator
from adserver.http.events import BodyBudget, BodyDeadlines, EventsEndpoint, EventsRouter, log_access
from adserver.http.static import CONTENT_SECURITY_POLICY, INDEX, StaticFile, load_dashboard
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
        self.finish_error(exc)

    def finish_error(self, error: RequestError, status: int | None = None) -> None:
        """The JSON error; ``status`` its own (else the one Tornado set already)."""
        _, headers, body = json_error(error)
        if status is not None:
            self.set_status(status)
        for name, value in headers.items():
            self.set_header(name, value)
        self.finish(body)


#: The application setting holding the Authenticator of reads (absent: reads are open).
READ_AUTH = "read_auth"


class ReadHandler(JsonErrorHandler):
    """A read that --auth_reads protects (health endpoints stay open: they are no reads)."""

    async def prepare(self) -> None:
        auth: Authenticator | None = self.settings.get(READ_AUTH)
        if auth is None:
            return
        try:
            await auth.check(self.request.headers.get(HEADER_AUTHORIZATION))
        except RequestError as error:
            self.finish_error(error, json_error(error).status)


class EventsHandler(JsonErrorHandler):
    """``/`` for every method but POST (which :class:`EventsRouter` serves): OPTIONS, a browser's
    GET to the dashboard (when it is served), else 405."""

    def initialize(self, dashboard: bool) -> None:
        self.dashboard = dashboard

    def get(self) -> None:
        if not (self.dashboard and "text/html" in self.request.headers.get("Accept", "")):
            raise tornado.web.HTTPError(405)  # as for any method / does not take
        self.redirect(DASHBOARD_REDIRECT)  # relative: below a proxy's path prefix too

    def options(self) -> None:
        self.set_header("Allow", "POST, OPTIONS")
        self.set_status(200)


class MetricsHandler(ReadHandler):
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
            self.finish(self.service.document())
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


class ModelMetricsHandler(ReadHandler):
    """``GET /v1/models/<name>/metrics``: one model's summary; with ``from`` and ``to``, its
    metrics over that range of prediction time. 404 for an unknown name; a bad range is a 400
    that changes nothing."""

    def initialize(self, service: FeedbackService, ranges: RangeDocuments) -> None:
        self.service = service
        self.ranges = ranges

    async def get(self, name: str) -> None:
        name = urllib.parse.unquote(name)
        arguments = {
            key: self.get_argument(key)
            for key in (QUERY_FROM, QUERY_TO, QUERY_STEP, QUERY_SEGMENT)
            if self.get_argument(key, None) is not None
        }
        try:
            if QUERY_FROM in arguments or QUERY_TO in arguments:
                body = await self.ranges.document(name, arguments)
            else:
                body = self.service.document(name)
        except RequestError as error:
            self.finish_error(error, json_error(error).status)
            return
        self.set_header("Content-Type", CONTENT_TYPE_JSON)
        self.finish(body)


class DashboardHandler(ReadHandler):
    """``GET /dashboard`` and its files, from memory: only the fixed list, anything else 404.
    Browsers revalidate every time (``no-cache`` with the ETag Tornado computes: a 304 when
    unchanged), so an upgraded server never runs against a cached page of the previous one."""

    def initialize(self, files: dict[str, StaticFile]) -> None:
        self.files = files

    def get(self, name: str = INDEX) -> None:
        found = self.files.get(name)
        if found is None:
            raise tornado.web.HTTPError(404)
        self.set_header("Content-Type", found.content_type)
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.finish(found.body)


class TextHandler(JsonErrorHandler):
    def initialize(self, text: str) -> None:
        self.text = text

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_TEXT)
        self.finish(self.text)


class ProtocolHandler(ReadHandler, TextHandler):
    """``GET /protocol``: a read, unlike the health endpoints' text."""


class ReadyHandler(JsonErrorHandler):
    """Ready while the server accepts events and every transport is healthy; a draining
    server is not ready."""

    def initialize(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    def get(self) -> None:
        if not self.lifecycle.ready:
            raise tornado.web.HTTPError(503, reason="Draining")
        if not self.lifecycle.healthy():
            raise tornado.web.HTTPError(503, reason="Unhealthy")
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
    auth: Authenticator | None = None,
    auth_reads: bool = False,
    dashboard: bool = True,
) -> EventsRouter:
    """The web application, with ``POST /`` served below it (see :mod:`adserver.http.events`).

    ``auth`` checks who may POST events, and with ``auth_reads`` who may read metrics (and the
    dashboard) too.
    """
    pages: list[tornado.web.URLSpec | tuple[Any, ...]] = []
    if dashboard:
        files = {"files": load_dashboard()}
        pages = [
            (ROUTE_DASHBOARD, DashboardHandler, files),
            (ROUTE_DASHBOARD_FILE, DashboardHandler, files),
        ]
    app = tornado.web.Application(
        [
            (ROUTE_EVENTS, EventsHandler, {"dashboard": dashboard}),
            (
                ROUTE_METRICS,
                MetricsHandler,
                {"exposition": Exposition(registry), "service": service, "windows": windows},
            ),
            (ROUTE_MODEL_METRICS, ModelMetricsHandler, {"service": service, "ranges": ranges}),
            (ROUTE_PROTOCOL, ProtocolHandler, {"text": protocol}),
            (ROUTE_LIVE, TextHandler, {"text": "ok"}),
            (ROUTE_READY, ReadyHandler, {"lifecycle": service.lifecycle}),
            *pages,
        ],
        default_handler_class=NotFoundHandler,
        log_function=quiet_log,
    )
    app.settings[READ_AUTH] = auth if auth_reads else None
    return EventsRouter(
        app,
        EventsEndpoint(service, max_body_bytes, BodyBudget(limit=max_body_bytes_in_flight), auth),
        BodyDeadlines(body_timeout_seconds, service),
    )
