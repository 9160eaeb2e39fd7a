"""Queued replies hold headers, not a summary each (issue 11, items 9 and 13).

Every reply carries ``per_class`` for every class (80 kB at 1,000 classes). A sink that accepts
and never answers keeps all 16 workers waiting and the queue filling: with a body per queued
reply, memory grew by queue length x classes. The gauges must show where the replies are:
waiting in the queue, or held by a worker.
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.events import ce_headers, feedback
from tests.support.http import post_json, scrape, value
from tests.support.processes import MULTICLASS_NUMERIC, REPLY_FLAGS, ServerFactory
from tests.support.timing import wait_until

CLASSES = 1000
WORKERS = 16  # ReplySender's concurrency
EVENTS = 600


class SilentSink:
    """Accepts connections and reads whatever is sent, but never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.stopping = False
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        while not self.stopping:
            for key, _ in self.selector.select(0.1):
                sock = key.fileobj
                if sock is self.listener:
                    connection, _ = self.listener.accept()
                    self.selector.register(connection, selectors.EVENT_READ)
                elif not sock.recv(1 << 16):  # type: ignore[union-attr]
                    self.selector.unregister(sock)
                    sock.close()  # type: ignore[union-attr]

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()


@pytest.fixture
def silent_sink() -> Iterator[SilentSink]:
    sink = SilentSink()
    sink.thread.start()
    try:
        yield sink
    finally:
        sink.close()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_stuck_sink_costs_headers_not_summaries(
    servers: ServerFactory, silent_sink: SilentSink
) -> None:
    server = servers(
        "--storage_uri",
        MULTICLASS_NUMERIC,
        "--max_classes",
        str(CLASSES),
        "--state",
        "memory",
        *REPLY_FLAGS,
        "--reply_url",
        silent_sink.url,
        "--reply_timeout_seconds",
        "300",
        "--reply_retries",
        "0",
    )
    every_class = list(range(CLASSES))
    first = post_json(server.url, feedback(every_class, every_class), ce_headers())
    assert first.status_code == 200 and len(first.content) > 75_000  # per_class of 1000
    row = feedback([[5]], [[5]])
    for _ in range(WORKERS + 4):  # every worker stuck, a few replies queued
        assert post_json(server.url, row, ce_headers()).status_code == 200
    wait_until(
        lambda: value(scrape(server.url), "feedback_reply_in_flight") == WORKERS, what="workers"
    )
    before = rss_bytes(server.process.pid)
    for _ in range(EVENTS):
        assert post_json(server.url, row, ce_headers()).status_code == 200
    grown = rss_bytes(server.process.pid) - before
    samples = scrape(server.url)
    print(f"\nRSS grew {grown / 2**20:.1f} MB for {EVENTS} queued replies")
    assert value(samples, "feedback_reply_in_flight") == WORKERS
    assert value(samples, "feedback_reply_queue_depth") == 1 + 4 + EVENTS
    assert value(samples, "feedback_reply_dropped_total") == 0
    # A summary per queued reply would be EVENTS x 80 kB = 48 MB.
    assert grown < 16 * 2**20, grown
