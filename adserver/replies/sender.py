"""Asynchronous delivery of reply CloudEvents to ``--reply_url``.

Ingestion only enqueues (bounded; a full queue drops and counts). Workers POST with a timeout, each
over its own kept-alive connection, and retry with exponential backoff. A slow or dead sink
therefore never slows, fails or re-counts an incoming event (the reference posted synchronously
and double counted on sink errors).

A queued reply is its binary-mode headers (those of the answer to its event, spelled once) and
where to get its data: the worker takes the data (the model's summary, shared by every reply of
one state) when it starts sending. A full queue of a stuck sink therefore holds headers, not a
summary of every class per reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tornado.httputil import HTTPInputError

from adserver.errors import StartupError
from adserver.logs import ThrottledWarning
from adserver.replies.connection import PersistentConnection, Target

log = logging.getLogger(__name__)

# Statuses worth another attempt; any other non-2xx is final (retrying cannot help).
RETRYABLE_STATUS = frozenset({404, 408, 409, 429}) | frozenset(range(500, 600))


@dataclass
class ReplyStats:
    sent: int = 0
    failed: int = 0
    dropped: int = 0
    retries: int = 0
    in_flight: int = 0  # taken from the queue by a worker, not yet sent or given up


@dataclass(frozen=True)
class QueuedReply:
    headers: Mapping[str, str]
    data: Callable[[], bytes]


class ReplySender:
    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        retries: int,
        queue_size: int,
        concurrency: int = 16,
        backoff: float = 0.1,
    ) -> None:
        try:
            self.target = Target.parse(url)
        except ValueError as exc:  # fail start-up, not every reply
            raise StartupError(f"--reply_url: {exc}") from exc
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.concurrency = concurrency
        self.backoff = backoff
        self.stats = ReplyStats()
        self._queue: asyncio.Queue[QueuedReply] = asyncio.Queue(maxsize=queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self.failing = ThrottledWarning(log, "reply delivery failing")  # a dead sink: once a minute

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]

    def submit(self, headers: Mapping[str, str], data: Callable[[], bytes]) -> None:
        """Queue a reply CloudEvent (its binary-mode headers); ``data`` is called when a worker
        starts sending it."""
        try:
            self._queue.put_nowait(QueuedReply(headers, data))
        except asyncio.QueueFull:
            self.stats.dropped += 1

    def snapshot(self) -> dict[str, int]:
        """Counters, ``queued`` (waiting for a worker) and ``in_flight`` (held by workers)."""
        return {**vars(self.stats), "queued": self._queue.qsize()}

    async def close(self, drain_seconds: float = 5.0) -> None:
        """Give queued replies a bounded chance to go out, then stop."""
        try:
            await asyncio.wait_for(self._queue.join(), drain_seconds)
        except TimeoutError:
            log.warning("reply queue not drained", extra={"queued": self._queue.qsize()})
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def _work(self) -> None:
        connection = PersistentConnection(self.target)
        try:
            while True:
                reply = await self._queue.get()
                self.stats.in_flight += 1
                try:
                    await self._deliver(connection, reply.headers, reply.data())
                finally:
                    self.stats.in_flight -= 1
                    self._queue.task_done()
        finally:
            connection.close()

    async def _deliver(
        self, connection: PersistentConnection, headers: Mapping[str, str], body: bytes
    ) -> None:
        error = ("not sent", False)
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            failure = await self._post(connection, headers, body)
            if failure is None:
                self.stats.sent += 1
                return
            error = failure
            if not error[1]:
                break
        self.stats.failed += 1
        self.failing.note(url=self.url, error=error[0], failed_total=self.stats.failed)

    async def _post(
        self, connection: PersistentConnection, headers: Mapping[str, str], body: bytes
    ) -> tuple[str, bool] | None:
        """None on success, else (what went wrong, whether a retry may help)."""
        try:
            status = await connection.post(headers, body, self.timeout)
        except (TimeoutError, OSError, HTTPInputError) as exc:
            return f"{type(exc).__name__}: {exc}", True
        if 200 <= status < 300:
            return None
        return f"HTTP {status}", status in RETRYABLE_STATUS
