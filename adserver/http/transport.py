"""The HTTP server as the lifecycle sees it: started at start-up, stopped and closed on drain."""

from __future__ import annotations

from dataclasses import dataclass

import tornado.httpserver

from adserver.http.events import BodyDeadlines
from adserver.http.listener import Listener


@dataclass
class HTTPTransport:
    server: tornado.httpserver.HTTPServer
    listener: Listener
    bodies: BodyDeadlines

    def start(self, port: int, address: str) -> None:
        self.listener.listen(port, address)
        self.bodies.sweeper.start()

    def stop(self) -> None:
        """No new connections; requests already open go on (those still reading their body
        are refused as ``shutting_down`` once it is read)."""
        self.listener.stop()
        self.bodies.sweeper.stop()

    async def close(self) -> None:
        await self.server.close_all_connections()
