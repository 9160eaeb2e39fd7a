"""PersistentConnection against a real socket server on loopback that counts connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from adserver.replies.connection import PersistentConnection, Target


@dataclass
class RawSink:
    """Answers each request with ``status``; optionally closes after each answer, saying so in
    a ``Connection`` header (``close_with``) or not (a sink that drops idle connections)."""

    status: int = 200
    close_with: bytes = b""
    hang_up: bool = False
    delay: float = 0.0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                await asyncio.sleep(self.delay)
                close = b"Connection: %s\r\n" % self.close_with if self.close_with else b""
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n%s\r\nok" % (self.status, close)
                )
                await writer.drain()
                if self.close_with or self.hang_up:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@asynccontextmanager
async def running(sink: RawSink) -> AsyncIterator[str]:
    server = await asyncio.start_server(sink.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/sink?x=1"
    finally:
        server.close()


def posts(sink: RawSink, count: int, timeout: float = 2.0) -> list[int | str]:
    async def main() -> list[int | str]:
        async with running(sink) as url:
            connection = PersistentConnection(Target.parse(url))
            statuses: list[int | str] = []
            for number in range(count):
                try:
                    statuses.append(await connection.post({"ce-id": str(number)}, b"{}", timeout))
                except TimeoutError:
                    statuses.append("timeout")
                await asyncio.sleep(0.01)  # lets a hung-up connection be noticed as closed
            connection.close()
            return statuses

    return asyncio.run(main())


def test_one_connection_serves_every_request() -> None:
    sink = RawSink()
    assert posts(sink, 5) == [200] * 5
    assert sink.connections == 1
    first = sink.requests[0].decode()
    assert first.startswith("POST /sink?x=1 HTTP/1.1\r\n")
    assert "Host: 127.0.0.1:" in first and "Content-Length: 2" in first and first.endswith("{}")


@pytest.mark.parametrize("header", [b"close", b"Keep-Alive, Close"])
def test_connection_close_is_honoured(header: bytes) -> None:
    sink = RawSink(close_with=header)
    assert posts(sink, 3) == [200] * 3
    assert sink.connections == 3 and len(sink.requests) == 3  # no request sent twice


def test_a_dropped_idle_connection_is_replaced_without_losing_the_request() -> None:
    sink = RawSink(hang_up=True)
    assert posts(sink, 3) == [200] * 3
    assert len(sink.requests) == 3 and sink.connections == 3


def test_credentials_in_the_url_are_sent_as_basic_auth() -> None:
    async def main(sink: RawSink) -> None:
        async with running(sink) as url:
            connection = PersistentConnection(
                Target.parse(url.replace("http://", "http://user:secret@"))
            )
            assert await connection.post({}, b"{}", 2.0) == 200
            connection.close()

    sink = RawSink()
    asyncio.run(main(sink))
    assert b"Authorization: Basic dXNlcjpzZWNyZXQ=\r\n" in sink.requests[0]


def test_status_is_returned_not_raised() -> None:
    assert posts(RawSink(status=503), 2) == [503, 503]


def test_a_timeout_abandons_the_connection() -> None:
    sink = RawSink(delay=0.3)
    assert posts(sink, 2, timeout=0.1) == ["timeout", "timeout"]
    assert sink.connections == 2  # never reused while an answer is still owed


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://sink.default/", Target("sink.default", 80, "/", "sink.default", False)),
        (
            "https://u%40x:p@h:8443/a?b=c",
            Target("h", 8443, "/a?b=c", "h:8443", True, "Basic dUB4OnA="),  # u@x:p
        ),
        ("http://h:1", Target("h", 1, "/", "h:1", False)),
    ],
)
def test_target(url: str, expected: Target) -> None:
    assert Target.parse(url) == expected


@pytest.mark.parametrize("url", ["ftp://h/", "http:///x", "sink.default"])
def test_bad_url(url: str) -> None:
    with pytest.raises(ValueError, match="not an http"):
        Target.parse(url)
