"""One persistent HTTP/1.1 connection for POSTing to a fixed URL (the reply sink).

Tornado's ``SimpleAsyncHTTPClient`` opens a new connection per request: a name lookup on the
resolver's thread, a TCP handshake (and a TLS one for https) and a new stream for every reply.
Each reply worker keeps one connection instead and reuses it while the sink keeps it open, so a
reply costs one write and one read on the IOLoop.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import tornado.httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.httputil import HTTPHeaders, HTTPInputError, RequestStartLine, ResponseStartLine
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

# A reply sink answers with a status; its body is read (to keep the connection usable), not kept.
MAX_RESPONSE_BYTES = 64 << 20


@dataclass(frozen=True)
class Target:
    """Where to connect, and the request line, ``Host`` and (for ``user:pass@``) basic auth."""

    host: str
    port: int
    path: str
    authority: str
    tls: bool
    authorization: str | None = None

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        credentials, _, authority = parts.netloc.rpartition("@")
        authorization = None
        if credentials:
            user_pass = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(user_pass.encode()).decode()
        port = parts.port or (443 if tls else 80)
        return cls(parts.hostname, port, path, authority, tls, authorization)


class _Response(tornado.httputil.HTTPMessageDelegate):
    """Keeps the status and whether the server lets the connection live on."""

    def __init__(self) -> None:
        self.code = 0
        self.reusable = False

    def headers_received(
        self, start_line: RequestStartLine | ResponseStartLine, headers: HTTPHeaders
    ) -> None:
        assert isinstance(start_line, ResponseStartLine)
        self.code = start_line.code
        options = {token.strip().lower() for token in headers.get("Connection", "").split(",")}
        self.reusable = start_line.version == "HTTP/1.1" and "close" not in options

    def data_received(self, chunk: bytes) -> None:
        """The body is not needed; reading it is what keeps the connection in step."""


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One context (and one load of the CA certificates) for every connection."""
    return ssl.create_default_context()


class PersistentConnection:
    """POST to one URL over a connection that is opened on demand and kept while it works."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._tcp = TCPClient()
        self._tls = tls_context() if target.tls else None
        self._params = HTTP1ConnectionParameters(max_body_size=MAX_RESPONSE_BYTES, decompress=False)
        self._stream: IOStream | None = None

    async def post(self, headers: Mapping[str, str], body: bytes, timeout: float) -> int:
        """The response status. Raises ``TimeoutError``, ``OSError`` or ``HTTPInputError``; the
        connection is then closed, so the next call starts on a fresh one."""
        async with asyncio.timeout(timeout):
            reused = self._stream is not None and not self._stream.closed()
            response = _Response()
            try:
                return await self._exchange(headers, body, response)
            except StreamClosedError:
                if not reused or response.code:
                    raise
            # The sink closed the idle connection before answering: send again on a new one. A
            # CloudEvent is known by its source and id, so a sink that did see the first copy
            # can tell the second for a duplicate.
            return await self._exchange(headers, body, _Response())

    async def _exchange(self, headers: Mapping[str, str], body: bytes, response: _Response) -> int:
        try:
            if self._stream is None or self._stream.closed():
                self._stream = await self._tcp.connect(
                    self.target.host, self.target.port, ssl_options=self._tls
                )
            connection = HTTP1Connection(self._stream, is_client=True, params=self._params)
            request = HTTPHeaders(headers)
            request["Host"] = self.target.authority
            if self.target.authorization:
                request["Authorization"] = self.target.authorization
            request["Content-Length"] = str(len(body))
            start = RequestStartLine("POST", self.target.path, "HTTP/1.1")
            connection.write_headers(start, request, body)
            connection.finish()
            if not await connection.read_response(response):
                raise HTTPInputError("malformed response")  # tornado logged it and closed
        except BaseException:  # includes cancellation by a timeout: the stream is out of step
            self.close()
            raise
        if not response.reusable:
            self.close()
        return response.code

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
