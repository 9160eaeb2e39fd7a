"""One persistent HTTP/1.1 connection for POSTing to a fixed URL (the reply sink).

Tornado's ``SimpleAsyncHTTPClient`` opens a new connection per request: a name lookup on the
resolver's thread, a TCP handshake (and a TLS one for https) and a new stream for every reply.
Each reply worker keeps one connection instead and reuses it while the sink keeps it open, so a
reply costs one write and one read on the IOLoop.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import tornado.httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.httputil import HTTPHeaders, RequestStartLine, ResponseStartLine
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

# A reply sink answers with a status; its body is read (to keep the connection usable), not kept.
MAX_RESPONSE_BYTES = 1 << 20


@dataclass(frozen=True)
class Target:
    """Where to connect and what to put in the request line and ``Host``."""

    host: str
    port: int
    path: str
    authority: str
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        authority = parts.netloc.rpartition("@")[2]
        return cls(parts.hostname, parts.port or (443 if tls else 80), path, authority, tls)


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
        self.reusable = (
            start_line.version == "HTTP/1.1" and headers.get("Connection", "").lower() != "close"
        )

    def data_received(self, chunk: bytes) -> None:
        """The body is not needed; reading it is what keeps the connection in step."""


class PersistentConnection:
    """POST to one URL over a connection that is opened on demand and kept while it works."""

    def __init__(self, url: str, tcp: TCPClient | None = None) -> None:
        self.target = Target.parse(url)
        self._tcp = tcp or TCPClient()
        self._tls = ssl.create_default_context() if self.target.tls else None
        self._params = HTTP1ConnectionParameters(max_body_size=MAX_RESPONSE_BYTES, decompress=False)
        self._stream: IOStream | None = None

    async def post(self, headers: dict[str, str], body: bytes, timeout: float) -> int:
        """The response status. Raises ``TimeoutError`` or ``OSError``; the connection is then
        closed, so the next call starts on a fresh one."""
        return await asyncio.wait_for(self._post(headers, body), timeout)

    async def _post(self, headers: dict[str, str], body: bytes) -> int:
        reused = self._stream is not None and not self._stream.closed()
        try:
            return await self._exchange(headers, body)
        except StreamClosedError:
            if not reused:
                raise
        # The sink closed an idle connection before reading this request: send it on a new one.
        return await self._exchange(headers, body)

    async def _exchange(self, headers: dict[str, str], body: bytes) -> int:
        try:
            if self._stream is None or self._stream.closed():
                self._stream = await self._tcp.connect(
                    self.target.host, self.target.port, ssl_options=self._tls
                )
            connection = HTTP1Connection(self._stream, is_client=True, params=self._params)
            request = HTTPHeaders(headers)
            request["Host"] = self.target.authority
            request["Content-Length"] = str(len(body))
            start = RequestStartLine("POST", self.target.path, "HTTP/1.1")
            connection.write_headers(start, request, body)
            connection.finish()
            response = _Response()
            if not await connection.read_response(response):
                raise StreamClosedError()  # tornado logged the malformed answer and closed
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
