"""``POST /`` served by an ``HTTPMessageDelegate``, one layer below ``tornado.web``.

Every event pays for its HTTP handling, and ``tornado.web.RequestHandler`` on this path (handler
construction, default headers, the ``_execute`` coroutine, flush and finish bookkeeping) costs as
much as decoding, scoring and committing a single-row event (figures: bench/RESULTS.md). The
delegate keeps the same contract as a handler (JSON 413 before a too-large body is buffered, JSON
4xx/5xx, 503 while draining) and stays thin: it turns bytes into a ``FeedbackService.receive``
call and the outcome back into a response (:mod:`adserver.http.answers`). Every other route and
method stays on the ``tornado.web`` application.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sys
import time
import urllib.parse
import zlib
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import cast

import tornado.gen
import tornado.httputil
import tornado.ioloop
import tornado.util
import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.httputil import HTTPConnection, HTTPHeaders, ResponseStartLine
from tornado.iostream import IOStream, StreamClosedError

from adserver.catalogue import reasons
from adserver.catalogue.wire import HEADER_AUTHORIZATION, ROUTE_EVENTS, ROUTE_MODEL_EVENTS
from adserver.errors import (
    BadRequest,
    InternalError,
    PayloadTooLarge,
    RequestError,
    RequestTimeout,
    Unavailable,
    UnsupportedEncoding,
)
from adserver.http.answers import STATUS, Answer, json_error, outcome_answer
from adserver.http.auth import Authenticator
from adserver.http.eager import start_eagerly
from adserver.ingest.service import FeedbackService

log = logging.getLogger(__name__)


@dataclass
class BodyBudget:
    """Request bodies buffered at once, and how many bytes they may hold together
    (--max_body_bytes_in_flight): what the server holds is bounded, however many clients send.

    HTTP's own: a client pushes its body whether or not there is room for it, so room is taken
    as the bytes arrive; a transport that pulls (a Kafka consumer) bounds what it holds by what
    it fetches, and needs no budget of the core's.
    """

    held: int = 0
    limit: int = sys.maxsize

    def hold(self, size: int) -> bool:
        """Take ``size`` more bytes of the budget, if they fit."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True


@dataclass(frozen=True)
class EventsEndpoint:
    """What the events route needs, built once at start-up."""

    service: FeedbackService
    max_body_bytes: int
    budget: BodyBudget
    auth: Authenticator | None = None  # None: --auth none, anyone may send


# Content-Encoding -> zlib's wbits (gzip framing, or the zlib framing HTTP calls "deflate").
INFLATE_WBITS = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}
# How long a connection answered before its request was read may linger, dropping what comes.
LINGER_SECONDS = 2.0
# Repeated Content-Length fields, as HTTPHeaders joins them.
LENGTH_SEPARATOR = re.compile(r",[ \t]*")


def framing_error(length: str | None, transfer_encoding: str | None) -> RequestError | None:
    """Why the body cannot be delimited: Tornado would answer it a bare 400 as it reads the body.

    ``length`` is every Content-Length field joined by commas; equal ones are one length, as in
    Tornado.
    """
    if transfer_encoding is not None:
        if length is not None:
            return BadRequest(
                "Content-Length and Transfer-Encoding together leave the body's length ambiguous",
                reasons.CONTENT_LENGTH_WITH_TRANSFER_ENCODING,
            )
        if transfer_encoding.lower() != "chunked":
            return BadRequest(
                f"Transfer-Encoding {transfer_encoding!r} is not supported (only chunked)",
                reasons.UNSUPPORTED_TRANSFER_ENCODING,
            )
        return None
    if length is None or (length.isascii() and length.isdigit()):
        return None
    values = set(LENGTH_SEPARATOR.split(length))
    if len(values) == 1 and (value := values.pop()).isascii() and value.isdigit():
        return None
    return BadRequest(
        f"Content-Length {length!r} is not one non-negative integer", reasons.INVALID_CONTENT_LENGTH
    )


def declared_length(length: str) -> int:
    """The body's length from Content-Length fields that :func:`framing_error` accepted."""
    return int(LENGTH_SEPARATOR.split(length)[0])


def closing_answer(error: RequestError) -> bytes:
    """A whole response that ends the connection, for answers written to a bare stream."""
    status, headers, body = json_error(error)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    reason = tornado.httputil.responses.get(status, "Unknown")
    return (
        f"HTTP/1.1 {status} {reason}\r\n{head}Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1") + body


async def answer_and_close(stream: IOStream, answer: bytes) -> None:
    """Write a last answer, then close without resetting the connection under it.

    Closing a socket with unread request bytes makes the kernel reset the connection, and the
    reset can reach the client before it reads the answer. So the write side is shut down, and
    what the client still sends is read and dropped until it closes (or LINGER_SECONDS pass).
    """
    try:
        await stream.write(answer)
        stream.socket.shutdown(socket.SHUT_WR)
        deadline = stream.io_loop.time() + LINGER_SECONDS
        while True:
            await tornado.gen.with_timeout(
                deadline,
                stream.read_bytes(65536, partial=True),
                quiet_exceptions=StreamClosedError,
            )
    except (StreamClosedError, OSError, tornado.util.TimeoutError):
        pass
    finally:
        stream.close()


async def refuse_unframed(
    connection: HTTPConnection, error: RequestError, service: FeedbackService
) -> None:
    """Answer a request whose body cannot be delimited, and close.

    The stream is taken from Tornado (``detach``, allowed while headers are received), which
    would otherwise go on to read the body and answer a bare 400 itself.
    """
    stream = cast(HTTP1Connection, connection).detach()
    await service.reject(error.reason)
    await answer_and_close(stream, closing_answer(error))


class BodyDeadlines:
    """Requests whose body is still arriving; a sweep closes those older than the body timeout.

    Tornado's own ``body_timeout`` wraps every body read in ``gen.with_timeout``: a task and a
    turn of the event loop per request, a share of a single-row event's cost worth saving. Here
    a request pays a dict insert and delete, and a sweep twice a timeout (at most once a second)
    looks only at the requests still reading.
    """

    def __init__(self, seconds: float, service: FeedbackService) -> None:
        self.seconds = seconds
        self.service = service
        # In the order the requests started, so a sweep stops at the first one still in time.
        self.reading: dict[HTTP1Connection, float] = {}
        self.sweeper = tornado.ioloop.PeriodicCallback(self.sweep, 1000 * min(1.0, seconds / 2))
        self.counting: set[asyncio.Task[None]] = set()

    def sweep(self) -> None:
        expired = time.monotonic() - self.seconds
        for connection, started in list(self.reading.items()):
            if started > expired:
                return
            del self.reading[connection]
            self.time_out(connection)

    def time_out(self, connection: HTTP1Connection) -> None:
        """408 and close (the read under way fails, and Tornado ends the request)."""
        stream = connection.stream
        if stream is None or stream.closed():  # detached for an answer of its own
            return
        task = asyncio.ensure_future(self.service.reject(reasons.BODY_TIMEOUT))
        self.counting.add(task)
        task.add_done_callback(self.counting.discard)
        if stream.writing():  # already answered (e.g. 413): only the close is missing
            stream.close()
            return
        error = RequestTimeout(
            f"the body did not arrive within {self.seconds:g} s", reasons.BODY_TIMEOUT
        )

        def written(future: asyncio.Future[None]) -> None:
            if not future.cancelled():
                future.exception()  # a client gone before the answer is no error
            stream.close()

        stream.write(closing_answer(error)).add_done_callback(written)


class EventsRouter(tornado.httputil.HTTPServerConnectionDelegate):
    """``POST /`` goes to :class:`EventsDelegate`; everything else to the web application."""

    def __init__(
        self, app: tornado.web.Application, endpoint: EventsEndpoint, bodies: BodyDeadlines
    ) -> None:
        self.app = app
        self.endpoint = endpoint
        self.bodies = bodies

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
        self.request_conn = cast(HTTP1Connection, request_conn)  # what HTTPServer hands out
        self.delegate: tornado.httputil.HTTPMessageDelegate | None = None

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: HTTPHeaders,
    ) -> Awaitable[None] | None:
        assert isinstance(start_line, tornado.httputil.RequestStartLine)
        self.router.bodies.reading[self.request_conn] = time.monotonic()
        path = start_line.path.partition("?")[0]
        model = model_path(path)
        if start_line.method == "POST" and (path == ROUTE_EVENTS or model is not None):
            self.delegate = EventsDelegate(self.request_conn, self.router.endpoint, model)
        else:
            error = framing_error(headers.get("Content-Length"), headers.get("Transfer-Encoding"))
            if error is not None:
                return refuse_unframed(self.request_conn, error, self.router.endpoint.service)
            self.delegate = self.router.app.start_request(self.server_conn, self.request_conn)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        assert self.delegate is not None
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        assert self.delegate is not None
        # pop: the body-timeout sweep may have taken it out just before the body completed
        self.router.bodies.reading.pop(self.request_conn, None)
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.router.bodies.reading.pop(self.request_conn, None)
        if self.delegate is not None:
            self.delegate.on_connection_close()


def model_path(path: str) -> str | None:
    """The model ``POST /v1/models/<name>`` names (None for any other path)."""
    name = path[len(ROUTE_MODEL_EVENTS) :] if path.startswith(ROUTE_MODEL_EVENTS) else ""
    return urllib.parse.unquote(name) if name and "/" not in name else None


class EventsDelegate(tornado.httputil.HTTPMessageDelegate):
    """One request: buffer the body within the limit, then answer from the service."""

    def __init__(
        self, connection: HTTP1Connection, endpoint: EventsEndpoint, model: str | None = None
    ) -> None:
        self.connection = connection
        self.model = model  # named by the path, or None: each event is routed
        self.started = time.monotonic()
        self.endpoint = endpoint
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.received = 0
        self.held = 0  # bytes of the body budget this request holds
        self.prepaid = False  # held for the declared Content-Length at once
        self.refused = False
        # Set for a compressed body: what is buffered (and limited) is what it inflates to.
        self.inflater: zlib._Decompress | None = None
        self.inflated = 0
        # asyncio keeps only weak references to tasks: this one holds the answer until it is sent.
        self.task: asyncio.Task[None] | None = None

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: HTTPHeaders,
    ) -> Awaitable[None] | None:
        auth = self.endpoint.auth
        if auth is not None:
            return self.authorized(auth, headers)
        return self.head(headers)

    async def authorized(self, auth: Authenticator, headers: HTTPHeaders) -> None:
        """Who sent it is checked first: a refused sender's body is never read, and nothing it
        sent is counted but the refusal (feedback_auth_refused_total, not as a rejected event).
        """
        try:
            await auth.check(headers.get(HEADER_AUTHORIZATION))
        except RequestError as error:
            self.refused = True
            answer = closing_answer(error)
            log_access(STATUS[error.kind], "POST", ROUTE_EVENTS, time.monotonic() - self.started)
            await answer_and_close(self.connection.detach(), answer)
            return
        reading = self.head(headers)
        if reading is not None:
            await reading

    def head(self, headers: HTTPHeaders) -> Awaitable[None] | None:
        """Frame the body, and take its room in the budget, from the request's head."""
        self.headers = lowered = {name.lower(): value for name, value in headers.get_all()}
        declared = headers.get("Content-Length")
        error = framing_error(declared, lowered.get("transfer-encoding"))
        if error is not None:
            return refuse_unframed(self.connection, error, self.endpoint.service)
        length = None if declared is None else declared_length(declared)
        too_large = length is not None and length > self.limit
        # The limit is enforced here (a declared length) and in data_received (a chunked body),
        # so the client gets a JSON 413: the connection's own check would close it, or answer a
        # bare 400, before anything could answer (set before a 415 too, or Tornado would go on to
        # refuse a long declared body with a bare 400 of its own, counted as a second refusal).
        self.connection.set_max_body_size(
            length if length is not None and too_large else sys.maxsize
        )
        encoding = lowered.get("content-encoding")
        if encoding is not None and encoding.strip().lower() != "identity":
            wbits = INFLATE_WBITS.get(encoding.strip().lower())
            if wbits is None:
                return self.refuse(
                    UnsupportedEncoding(
                        f"Content-Encoding {encoding!r} is not supported (gzip or deflate)",
                        reasons.UNSUPPORTED_CONTENT_ENCODING,
                    )
                )
            self.inflater = zlib.decompressobj(wbits)
        if too_large:
            return self.refuse_large()
        if length is not None and self.inflater is None:
            self.prepaid = True
            if not self.hold(length):  # refused before any body is read
                self.refused = True
                return refuse_unframed(self.connection, self.busy(), self.endpoint.service)
        return None

    @property
    def limit(self) -> int:
        return self.endpoint.max_body_bytes

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.refused:
            return None
        self.received += len(chunk)
        if self.received > self.limit:
            return self.refuse_large()
        if self.inflater is not None:
            return self.inflate(chunk)
        if not self.prepaid and not self.hold(len(chunk)):
            return self.refuse_busy()
        self.chunks.append(chunk)
        return None

    def hold(self, size: int) -> bool:
        if not self.endpoint.budget.hold(size):
            return False
        self.held += size
        return True

    def release(self) -> None:
        """The body is gone (answered, refused, or its client left): give its bytes back."""
        self.endpoint.budget.held -= self.held
        self.held = 0

    def inflate(self, chunk: bytes) -> Awaitable[None] | None:
        """Never more than the limit is inflated: a small bomb is refused, not expanded."""
        assert self.inflater is not None
        room = self.limit - self.inflated
        try:
            data = self.inflater.decompress(chunk, room + 1)
        except zlib.error as exc:
            return self.refuse(self.corrupt(str(exc)))
        self.inflated += len(data)
        if len(data) > room:
            return self.refuse_large()
        if not self.hold(len(data)):
            return self.refuse_busy()
        self.chunks.append(data)
        return None

    def corrupt(self, why: str) -> RequestError:
        encoding = self.headers["content-encoding"]
        return BadRequest(
            f"the {encoding} body cannot be decompressed: {why}", reasons.INVALID_COMPRESSED_BODY
        )

    def finish(self) -> None:
        """The whole body is here: answer it now, or from a task if the answer has to wait."""
        if self.inflater is not None and not (self.inflater.eof and not self.inflater.unused_data):
            why = "data after its end" if self.inflater.eof else "it is truncated"
            self.task = start_eagerly(self.refuse(self.corrupt(why), close=False))
            return
        self.task = start_eagerly(self.respond())

    def on_connection_close(self) -> None:
        """The client left before sending the whole body: there is nothing to count."""
        self.chunks.clear()
        if self.task is None:  # else the answer releases the body when it is done with it
            self.release()

    def refuse_large(self) -> Awaitable[None]:
        return self.refuse(
            PayloadTooLarge(f"body exceeds {self.limit} bytes", reasons.BODY_TOO_LARGE)
        )

    def busy(self) -> RequestError:
        budget = self.endpoint.budget.limit
        return Unavailable(
            f"request bodies in flight would exceed {budget} bytes; retry", reasons.BODIES_IN_FLIGHT
        )

    def refuse_busy(self) -> Awaitable[None]:
        return self.refuse(self.busy())

    async def refuse(self, error: RequestError, *, close: bool = True) -> None:
        """Count the refusal and answer now; before the body is read, close, so the rest of the
        body is never buffered.

        Tornado closes the connection itself when a response finishes before the body was read;
        ``Connection: close`` tells the client not to reuse it.
        """
        self.refused = True
        self.chunks.clear()
        self.release()
        status, headers, body = json_error(error)
        await self.endpoint.service.reject(error.reason)
        self.send(status, {**headers, "Connection": "close"} if close else headers, body)

    async def respond(self) -> None:
        """The service counts the events in flight until their outcome; the answer is written
        in the same turn of the loop, so a drain never cuts it off."""
        try:
            self.send(*await self.answer())
        finally:
            self.release()

    async def answer(self) -> Answer:
        try:
            body = b"".join(self.chunks)
            self.chunks.clear()  # one copy of the body while it is counted
            outcome = await self.endpoint.service.receive(self.headers, body, path_model=self.model)
            return outcome_answer(outcome)
        except MemoryError:  # e.g. under an address-space limit: nothing was counted, retry
            log.warning("out of memory for an event", extra={"bytes": self.received})
            return json_error(Unavailable("out of memory for this event", reasons.OUT_OF_MEMORY))
        except Exception:
            log.exception("event failed unexpectedly")
            return json_error(InternalError("Internal Server Error", reasons.INTERNAL_SERVER_ERROR))

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
