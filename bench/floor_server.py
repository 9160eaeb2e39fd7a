"""Floor server: the least work any Tornado JSON endpoint can do.

It reads the body, parses it with the standard `json` module and answers 200. Our server is
measured as a ratio to this floor in the same run on the same core, which cancels out the machine
and makes the targets portable. `GET /v1/metrics` answers an empty 200 so the same readiness probe
(time to first 200) works for both.

Run: python bench/floor_server.py --port 8080 [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import contextlib
import json

import tornado.ioloop
import tornado.web


class FeedbackHandler(tornado.web.RequestHandler):
    """POST /: parse the JSON body, nothing else."""

    def post(self) -> None:
        try:
            json.loads(self.request.body)
        except ValueError:
            self.set_status(400)
            return
        self.set_status(200)


class MetricsHandler(tornado.web.RequestHandler):
    """GET /v1/metrics: empty 200 (readiness probe only)."""

    def get(self) -> None:
        self.set_status(200)


def main() -> None:
    """Parse flags and serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    app = tornado.web.Application([(r"/", FeedbackHandler), (r"/v1/metrics", MetricsHandler)])
    app.listen(args.port, address=args.host)
    with contextlib.suppress(KeyboardInterrupt):
        tornado.ioloop.IOLoop.current().start()


if __name__ == "__main__":
    main()
