"""A real reply sink: a Tornado HTTP server in a background thread that records every POST."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import tornado.httpserver
import tornado.netutil
import tornado.web

from tests.support.timing import wait_until


@dataclass(frozen=True)
class Received:
    """One request as the sink saw it (header names lower-case)."""

    headers: dict[str, str]
    body: bytes
    at: float


class _SinkHandler(tornado.web.RequestHandler):
    def initialize(self, sink: Sink) -> None:
        self.sink = sink

    async def post(self) -> None:
        headers = {k.lower(): v for k, v in self.request.headers.get_all()}
        self.sink.record(Received(headers, self.request.body, time.monotonic()))
        if self.sink.delay:
            await asyncio.sleep(self.sink.delay)
        self.set_status(self.sink.status)
        self.finish()


class Sink:
    """A real Tornado HTTP server in a background thread that records every POST.

    ``delay`` (seconds, slept asynchronously) and ``status`` can change between tests.
    """

    def __init__(self, delay: float = 0.0, status: int = 200) -> None:
        self.delay = delay
        self.status = status
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.port = int(sockets[0].getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(sockets),))
        self._thread.daemon = True

    def __enter__(self) -> Sink:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    async def _serve(self, sockets: list[socket.socket]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = tornado.httpserver.HTTPServer(
            tornado.web.Application([(r"/.*", _SinkHandler, {"sink": self})])
        )
        server.add_sockets(sockets)
        self._ready.set()
        await self._stop.wait()
        server.stop()

    def record(self, item: Received) -> None:
        with self._lock:
            self.received.append(item)

    def requests_with(self, event_id: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.headers.get("ce-id") == event_id]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        wait_until(predicate, timeout, "sink condition")
