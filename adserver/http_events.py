"""``POST /`` served by an ``HTTPMessageDelegate``, one layer below ``tornado.web``.

Every event pays for its HTTP handling, and ``tornado.web.RequestHandler`` costs about 90 us per
request on this path (handler construction, default headers, the ``_execute`` coroutine, flush
and finish bookkeeping): on a single-row event that is as much as decoding, scoring and
committing it. The delegate keeps the same contract as a handler (JSON 413 before a too-large
body is buffered, JSON 4xx/5xx, 503 while draining, in-flight tracking) and stays thin: it turns
bytes into a ``FeedbackService.handle`` call and the outcome back into a response. Every other
route and method stays on the ``tornado.web`` application.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass

import orjson
import tornado.httputil
import tornado.web
from tornado.httputil import HTTPConnection, HTTPHeaders, ResponseStartLine
from tornado.iostream import StreamClosedError

from adserver import reasons
from adserver.constants import CONTENT_TYPE_JSON, ROUTE_EVENTS
from adserver.eager import start_eagerly
from adserver.errors import InternalError, PayloadTooLarge, RequestError, Unavailable
from adserver.ingest import FeedbackService

log = logging.getLogger(__name__)


@dataclass
class Lifecycle:
    """Shared by the events route and shutdown: readiness, and events not yet answered."""

    ready: bool = True
    in_flight: int = 0


@dataclass(frozen=True)
class EventsEndpoint:
    """What the events route needs, built once at start-up."""

    service: FeedbackService
    max_body_bytes: int
    lifecycle: Lifecycle


class EventsRouter(tornado.httputil.HTTPServerConnectionDelegate):
    """``POST /`` goes to :class:`EventsDelegate`; everything else to the web application."""

    def __init__(self, app: tornado.web.Application, endpoint: EventsEndpoint) -> None:
        self.app = app
        self.endpoint = endpoint

    def start_request(
        self, server_conn: object, request_conn: HTTPConnection
    ) -> tornado.httputil.HTTPMessageDelegate:
        return RequestDispatch(self, server_conn, request_conn)


class RequestDispatch(tornado.httputil.HTTPMessageDelegate):
    """Chooses the delegate from the request line alone: an event needs no ``HTTPServerRequest``
    (its construction parses the host, query and cookies' headers, a few us per event)."""

    def __init__(self, router: EventsRouter, server_conn: object, request_conn: HTTPConnection):
        self.router = router
        self.server_conn = server_conn
        self.request_conn = request_conn
        self.delegate: tornado.httputil.HTTPMessageDelegate | None = None

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: HTTPHeaders,
    ) -> Awaitable[None] | None:
        assert isinstance(start_line, tornado.httputil.RequestStartLine)
        if start_line.method == "POST" and start_line.path.partition("?")[0] == ROUTE_EVENTS:
            self.delegate = EventsDelegate(self.request_conn, self.router.endpoint)
        else:
            self.delegate = self.router.app.start_request(self.server_conn, self.request_conn)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        assert self.delegate is not None
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        assert self.delegate is not None
        self.delegate.finish()

    def on_connection_close(self) -> None:
        if self.delegate is not None:
            self.delegate.on_connection_close()


def json_error(error: RequestError) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of every error answer the server gives (both route layers)."""
    return error.status, {"Content-Type": CONTENT_TYPE_JSON}, orjson.dumps(error.body())


class EventsDelegate(tornado.httputil.HTTPMessageDelegate):
    """One request: buffer the body within the limit, then answer from the service."""

    def __init__(self, connection: HTTPConnection, endpoint: EventsEndpoint) -> None:
        self.connection = connection
        self.started = time.monotonic()
        self.endpoint = endpoint
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.received = 0
        self.refused = False
        # asyncio keeps only weak references to tasks: this one holds the answer until it is sent.
        self.task: asyncio.Task[None] | None = None

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: HTTPHeaders,
    ) -> Awaitable[None] | None:
        self.headers = {name.lower(): value for name, value in headers.get_all()}
        declared = headers.get("Content-Length", "")
        too_large = declared.isdigit() and int(declared) > self.endpoint.max_body_bytes
        # The limit is enforced here (a declared length) and in data_received (a chunked body),
        # so the client gets a JSON 413: the connection's own check would close it, or answer a
        # bare 400, before anything could answer.
        self.connection.set_max_body_size(int(declared) if too_large else sys.maxsize)
        return self.refuse_large() if too_large else None

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.refused:
            return None
        self.received += len(chunk)
        if self.received > self.endpoint.max_body_bytes:
            self.chunks.clear()
            return self.refuse_large()
        self.chunks.append(chunk)
        return None

    def finish(self) -> None:
        """The whole body is here: answer it now, or from a task if the answer has to wait."""
        self.task = start_eagerly(self.respond())

    def on_connection_close(self) -> None:
        """The client left before sending the whole body: there is nothing to count."""
        self.chunks.clear()

    async def refuse_large(self) -> None:
        """Count the refusal, answer 413 now and close, so the rest of the body is never buffered.

        Tornado closes the connection itself when a response finishes before the body was read;
        ``Connection: close`` tells the client not to reuse it.
        """
        self.refused = True
        limit = self.endpoint.max_body_bytes
        status, headers, body = json_error(
            PayloadTooLarge(f"body exceeds {limit} bytes", reasons.BODY_TOO_LARGE)
        )
        await self.endpoint.service.reject(reasons.BODY_TOO_LARGE)
        self.send(status, {**headers, "Connection": "close"}, body)

    async def respond(self) -> None:
        """Counted in flight until the answer is written, so a drain never cuts it off."""
        lifecycle = self.endpoint.lifecycle
        lifecycle.in_flight += 1
        try:
            self.send(*await self.answer())
        finally:
            lifecycle.in_flight -= 1

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        try:
            if not self.endpoint.lifecycle.ready:  # draining: the sender will retry elsewhere
                raise Unavailable("the server is shutting down", reasons.SHUTTING_DOWN)
            outcome = await self.endpoint.service.handle(self.headers, b"".join(self.chunks))
        except RequestError as error:
            return json_error(error)
        except Exception:
            log.exception("event failed unexpectedly")
            return json_error(InternalError("Internal Server Error", reasons.INTERNAL_SERVER_ERROR))
        if outcome.reply is None:
            return outcome.status, {}, b""
        return outcome.status, dict(outcome.reply.headers), outcome.reply.body

    def send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        response = HTTPHeaders(headers)
        response["Content-Length"] = str(len(body))
        start = ResponseStartLine("", status, tornado.httputil.responses.get(status, "Unknown"))
        connection = self.connection
        try:
            connection.write_headers(start, response, body or None)
            connection.finish()
        except StreamClosedError:
            pass  # the client is gone; the event is counted all the same
        log_access(status, "POST", ROUTE_EVENTS, time.monotonic() - self.started)


def log_access(status: int, method: str, path: str, seconds: float) -> None:
    """No access line per event at INFO; failures are logged at WARNING."""
    level = logging.WARNING if status >= 500 else logging.DEBUG
    if log.isEnabledFor(level):
        log.log(
            level,
            "request",
            extra={
                "status": status,
                "method": method,
                "path": path,
                "duration_ms": round(1000 * seconds, 3),
            },
        )
