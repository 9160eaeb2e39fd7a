"""Reply sink: accepts reply CloudEvents and answers 200, at once or after a fixed delay.

It stands in for the downstream of reply events: at once (``--delay 0``), a message dumper or a
broker; after a delay, a slow one (a Knative broker under load), so the bench can show whether
reply delivery blocks ingestion. The delay is a timer, so the sink itself is never the
bottleneck. ``GET /stats`` returns {"received": n, "in_flight": n} for the report.

It is a bare asyncio protocol, not a web framework: it shares the load core with wrk, and at
thousands of replies a second a framework's per-request cost would slow the load generator and
understate the server. It reads HTTP/1.1 requests with a ``Content-Length`` body (what the
server's reply connections send), keeps connections alive, and answers in order.

Run: python bench/sink.py --port 9000 [--delay 0.2] [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections import deque

STATS = {"received": 0, "in_flight": 0}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
MAX_HEAD = 64 * 1024


class SinkProtocol(asyncio.Protocol):
    """One connection: parse requests as they arrive, answer each after the sink's delay."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        # Answers in request order, each a one-item list: [None] until it is due.
        self.queue: deque[list[bytes | None]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self.reply_now(b"HTTP/1.1 431 Too Large\r\nConnection: close\r\n\r\n")
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            method, _, rest = head[0].partition(" ")
            self.handle(method, rest.partition(" ")[0])

    def handle(self, method: str, path: str) -> None:
        if method == "GET" and path == "/stats":
            body = json.dumps(STATS).encode()
            self.reply_now(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            return
        STATS["in_flight"] += 1
        if self.delay <= 0:
            self.done_one()
            self.reply_now(OK)
            return
        slot: list[bytes | None] = [None]
        self.queue.append(slot)
        asyncio.get_running_loop().call_later(self.delay, self.due, slot)

    def done_one(self) -> None:
        STATS["in_flight"] -= 1
        STATS["received"] += 1

    def due(self, slot: list[bytes | None]) -> None:
        """A delayed answer is due: send every answer that is due, in request order."""
        self.done_one()
        slot[0] = OK
        while self.queue and self.queue[0][0] is not None:
            self.write(self.queue.popleft()[0])

    def reply_now(self, answer: bytes) -> None:
        if self.queue:  # earlier requests still wait: keep the order
            self.queue.append([answer])
        else:
            self.write(answer)

    def write(self, answer: bytes | None) -> None:
        if answer is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(delay), host, port)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Parse flags and serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds per request")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.delay))


if __name__ == "__main__":
    main()
