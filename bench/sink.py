"""Slow reply sink: accepts reply CloudEvents and answers 200 after a fixed delay.

It stands in for a slow downstream (a Knative broker under load) so the bench can show whether
reply delivery blocks ingestion. The delay is an async sleep, so the sink itself is never the
bottleneck. `GET /stats` returns {"received": n, "in_flight": n} for the report.

Run: python bench/sink.py --port 9000 [--delay 0.2] [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import tornado.ioloop
import tornado.web

STATS = {"received": 0, "in_flight": 0}


class SinkHandler(tornado.web.RequestHandler):
    """POST (any path): count, wait `delay` seconds without blocking, answer 200."""

    def initialize(self, delay: float) -> None:
        self.delay = delay

    async def post(self, _path: str = "") -> None:
        STATS["in_flight"] += 1
        try:
            await asyncio.sleep(self.delay)
        finally:
            STATS["in_flight"] -= 1
            STATS["received"] += 1
        self.set_status(200)


class StatsHandler(tornado.web.RequestHandler):
    """GET /stats: counters as JSON."""

    def get(self) -> None:
        self.write(dict(STATS))


def main() -> None:
    """Parse flags and serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds per request")
    args = parser.parse_args()
    app = tornado.web.Application(
        [
            (r"/stats", StatsHandler),
            (r"/(.*)", SinkHandler, {"delay": args.delay}),
        ]
    )
    app.listen(args.port, address=args.host)
    with contextlib.suppress(KeyboardInterrupt):
        tornado.ioloop.IOLoop.current().start()


if __name__ == "__main__":
    main()
