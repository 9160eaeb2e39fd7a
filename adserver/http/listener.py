"""Accepting connections: a cap, a back-off when fds run out, JSON for Tornado's own errors.

Tornado's accept loop (``netutil.add_accept_handler``) lets ``accept()`` raise on ``EMFILE``: the
listening socket stays readable, so the loop runs again at once and logs a traceback each time (a
core at 100% and megabytes of log a second once idle connections use up the fd limit). This one
stops reading a listening socket that cannot accept, for 0.1 s doubling to 1 s, logs a warning at
most once a minute with a count, and refuses connections over ``--max_connections`` with a JSON
503 so file descriptors stay for the store and for the connections already open.

Tornado answers a request it cannot parse (a control character in a header, a malformed request
line or chunked body) with a bare ``400 Bad Request`` and no body, and closes a connection whose
request head is too large without any answer. :class:`GuardedStream` turns both into JSON
answers counted as rejected events.

With TLS (``--tls_cert_file``), accepted sockets are wrapped server-side with the current context
(:mod:`adserver.http.tls`) and served by :class:`GuardedTLSStream`; a plain HTTP request to the
TLS port gets a plain-text JSON 400. Connections over the cap are closed without a handshake: a
flood over the cap must not get the CPU a handshake costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import tornado.httpserver
import tornado.ioloop
import tornado.netutil
from tornado.iostream import IOStream, SSLIOStream, UnsatisfiableReadError

from adserver.catalogue import reasons
from adserver.errors import BadRequest, HeadersTooLarge, RequestError, Unavailable
from adserver.http.events import answer_and_close, closing_answer
from adserver.http.tls import ServerTLS
from adserver.logs import ThrottledWarning

log = logging.getLogger(__name__)

# Tornado's default; a head past it gets 431.
MAX_HEADER_BYTES = 65536
# What Tornado writes itself for a request it cannot parse (http1connection, 6.4 to 6.6).
TORNADO_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\n\r\n"
# Connections accepted per readiness event, as Tornado's own loop.
ACCEPT_BATCH = 128
PAUSE_FIRST_SECONDS = 0.1
PAUSE_MAX_SECONDS = 1.0
# File descriptors kept for the state store, reply connections, logs and the interpreter when
# --max_connections is derived from the fd limit.
RESERVED_FDS = 100
# The derived cap when the fd limit is unlimited.
UNLIMITED_FDS_CAP = 65536
# Connections answered before their request was read that may linger at once (until their
# client closes, at most LINGER_SECONDS): 503s over the cap, and Tornado's refusals.
MAX_LINGERING = 32
# What Tornado logs for every failed TLS handshake (iostream.SSLIOStream, 6.4 to 6.6).
TORNADO_HANDSHAKE_ERROR = "SSL Error on %s %s: %s"
# OpenSSL's reason for a plain HTTP request where a TLS ClientHello was expected.
OPENSSL_HTTP_REQUEST = "HTTP_REQUEST"

Reject = Callable[[str], Awaitable[None]]


def connection_cap(configured: int) -> int:
    """``--max_connections``, or (0) the soft ``RLIMIT_NOFILE`` less what the process needs."""
    if configured:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return UNLIMITED_FDS_CAP
    return max(1, soft - min(RESERVED_FDS, soft // 4))


@dataclass
class ConnectionStats:
    """Read by the exporter at scrape time."""

    open: int = 0
    refused: int = 0
    accept_errors: int = 0

    def snapshot(self) -> dict[str, int]:
        return {"open": self.open, "refused": self.refused, "accept_errors": self.accept_errors}


class Listener:
    """Accepts on the listening sockets and hands each connection to the HTTP server."""

    def __init__(
        self,
        http: tornado.httpserver.HTTPServer,
        reject: Reject,
        max_connections: int,
        stats: ConnectionStats,
        tls: ServerTLS | None = None,
    ) -> None:
        self.http = http
        self.tls = tls
        self.reject = reject
        self.max_connections = max_connections
        self.stats = stats
        self.sockets: list[socket.socket] = []
        self.paused: dict[socket.socket, object] = {}  # socket -> the timer that resumes it
        self.pause_seconds = PAUSE_FIRST_SECONDS
        # asyncio keeps only weak references to tasks: these hold counts and refusals until done.
        self.tasks: set[asyncio.Future[None]] = set()
        self.lingering = 0
        self.accept_failed = ThrottledWarning(
            log,
            "cannot accept connections (out of file descriptors or memory): they wait in the "
            "backlog while accepting backs off",
        )
        self.over_cap = ThrottledWarning(
            log, "refusing connections over --max_connections with 503"
        )
        self.too_many = closing_answer(
            Unavailable(
                f"the server has {max_connections} connections open; retry later",
                reasons.TOO_MANY_CONNECTIONS,
            )
        )
        self.handshake_failed = ThrottledWarning(
            log, "TLS handshakes failed (clients that do not trust the certificate, scanners)"
        )
        if tls is not None:
            logging.getLogger("tornado.general").addFilter(self.quiet_handshake_errors)

    def listen(self, port: int, address: str) -> None:
        self.io_loop = tornado.ioloop.IOLoop.current()
        for sock in tornado.netutil.bind_sockets(port, address=address):
            self.sockets.append(sock)
            self.io_loop.add_handler(sock, self.on_readable, tornado.ioloop.IOLoop.READ)

    def stop(self) -> None:
        """Stop accepting (connections already open stay)."""
        for sock in self.sockets:
            timer = self.paused.pop(sock, None)
            if timer is None:
                self.io_loop.remove_handler(sock)
            else:
                self.io_loop.remove_timeout(timer)
            sock.close()
        self.sockets.clear()

    def on_readable(self, sock: socket.socket, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as error:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: retrying cannot help
                self.pause(sock, error)
                return
            self.pause_seconds = PAUSE_FIRST_SECONDS
            if self.stats.open >= self.max_connections:
                self.refuse(connection)
                continue
            stream = self.stream(connection)
            if stream is not None:
                self.stats.open += 1
                self.http.handle_stream(stream, address)

    def stream(self, connection: socket.socket) -> GuardedStream | None:
        """The connection's stream; with TLS, the handshake starts on the next IOLoop turn."""
        if self.tls is None:
            return GuardedStream(connection, self)
        context = self.tls.context()
        try:
            wrapped = context.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        except OSError:  # the client is already gone
            connection.close()
            return None
        return GuardedTLSStream(wrapped, self, ssl_options=context)

    def quiet_handshake_errors(self, record: logging.LogRecord) -> bool:
        """Tornado warns once per failed handshake, which anyone reaching the port can repeat:
        one throttled warning instead."""
        if record.msg != TORNADO_HANDSHAKE_ERROR:
            return True
        self.handshake_failed.note(detail=record.getMessage())
        return False

    def pause(self, sock: socket.socket, error: OSError) -> None:
        """Stop reading the socket for a while: it stays readable, so retrying now would spin."""
        self.stats.accept_errors += 1
        self.accept_failed.note(detail=str(error))
        self.io_loop.remove_handler(sock)
        self.paused[sock] = self.io_loop.call_later(self.pause_seconds, self.resume, sock)
        self.pause_seconds = min(2 * self.pause_seconds, PAUSE_MAX_SECONDS)

    def resume(self, sock: socket.socket) -> None:
        del self.paused[sock]
        self.io_loop.add_handler(sock, self.on_readable, tornado.ioloop.IOLoop.READ)

    def refuse(self, connection: socket.socket) -> None:
        """503 without reading the request: the cap keeps fds for the connections open."""
        self.stats.refused += 1
        self.over_cap.note(detail=f"{self.stats.open} open")
        if self.tls is None:
            self.close_with(connection, self.too_many)
        else:
            connection.close()

    def close_with(self, connection: socket.socket, answer: bytes) -> None:
        """Answer a connection whose request is not read, and close it (see answer_and_close).

        Past MAX_LINGERING such connections at once, the answer is only attempted: a flood of
        them must not use up the fds kept for the rest of the process.
        """
        if self.lingering >= MAX_LINGERING:
            connection.setblocking(False)
            with contextlib.suppress(OSError):  # the client is gone: closing is the answer
                connection.send(answer)
            connection.close()
            return
        self.lingering += 1
        self.run(self.linger(IOStream(connection), answer))

    async def linger(self, stream: IOStream, answer: bytes) -> None:
        try:
            await answer_and_close(stream, answer)
        finally:
            self.lingering -= 1

    def count(self, reason: str) -> None:
        """Count a rejection from synchronous code (the stream's write or close)."""
        self.run(self.reject(reason))

    def run(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class GuardedStream(IOStream):
    """A server connection's stream that answers Tornado's own refusals with JSON."""

    def __init__(self, connection: socket.socket, listener: Listener, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.listener = listener
        # Tornado reads a chunk size with read_until; what follows a response is the next head.
        self.reading_head = True
        self.final: bytes | None = None

    def read_until(self, delimiter: bytes, max_bytes: int | None = None) -> Awaitable[bytes]:
        self.reading_head = False
        return super().read_until(delimiter, max_bytes)

    def write(self, data: bytes | memoryview) -> asyncio.Future[None]:
        if len(data) == len(TORNADO_BAD_REQUEST) and data == TORNADO_BAD_REQUEST:
            # Tornado closes the stream next: close() sends the answer.
            self.final = self.answer(
                BadRequest("the request head is not valid HTTP/1.1", reasons.MALFORMED_HEADERS)
                if self.reading_head
                else BadRequest(
                    "the chunked body is not valid HTTP/1.1", reasons.MALFORMED_CHUNKED_BODY
                )
            )
            written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            written.set_result(None)
            return written
        self.reading_head = True
        return super().write(data)

    def close(self, exc_info: Any = False) -> None:
        """Send the final answer, if any, from a duplicate of the socket, which can linger.

        A head past the limit makes IOStream close the stream itself: that is when its 431 is
        due. It is not answered while a previous response is still being written.
        """
        if not self.closed():
            self.listener.stats.open -= 1
            if (
                isinstance(exc_info, UnsatisfiableReadError)
                and self.reading_head
                and not self.writing()
            ):
                self.final = self.answer(
                    HeadersTooLarge(
                        f"the request head exceeds {MAX_HEADER_BYTES} bytes",
                        reasons.HEADERS_TOO_LARGE,
                    )
                )
            if self.final is not None:
                with contextlib.suppress(OSError):  # no fd left for the duplicate, or gone
                    self.listener.close_with(*self.hand_over(self.final))
        super().close(exc_info)

    def hand_over(self, answer: bytes) -> tuple[socket.socket, bytes]:
        """A duplicate of the socket to linger on, and the answer still to write on it."""
        return self.socket.dup(), answer

    def answer(self, error: RequestError) -> bytes:
        self.listener.count(error.reason)
        return closing_answer(error)


class GuardedTLSStream(GuardedStream, SSLIOStream):
    """The same over TLS; a plain HTTP request, which fails the handshake, is answered in plain
    text (as Go's servers do), so its sender learns what is wrong."""

    def close(self, exc_info: Any = False) -> None:
        if (
            isinstance(exc_info, ssl.SSLError)
            and exc_info.reason == OPENSSL_HTTP_REQUEST
            and not self.closed()
        ):
            self.final = self.answer(
                BadRequest(
                    "this port serves HTTPS: send the request over TLS", reasons.TLS_REQUIRED
                )
            )
        super().close(exc_info)

    def hand_over(self, answer: bytes) -> tuple[socket.socket, bytes]:
        """A TLS session cannot be duplicated: after a handshake the answer is encrypted here, at
        once (one small record, which the socket's buffer takes), and the duplicate of the bare
        socket only lingers."""
        raw = socket.socket(fileno=os.dup(self.socket.fileno()))
        if self._ssl_accepting:
            return raw, answer
        try:
            self.socket.send(answer)
        except OSError:
            raw.close()
            raise
        return raw, b""
