"""What HTTP answers: the one place error kinds become statuses, and outcomes become responses.

The ingest core knows no status codes; a refusal names its :class:`~adserver.errors.ErrorKind`. A
refusal is a JSON body ``{"error": ..., "reason": ...}``; accepted events are an empty 200, or
the reply CloudEvent in binary mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, NamedTuple

import orjson

from adserver.catalogue.wire import CONTENT_TYPE_JSON
from adserver.errors import ErrorKind, RequestError
from adserver.ingest.service import Outcome

#: Every kind of refusal, as HTTP says it. 5xx only for the server's faults, so Knative retries
#: those and never bad input.
STATUS: Final[Mapping[ErrorKind, int]] = {
    ErrorKind.INVALID: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.TOO_SLOW: 408,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED_ENCODING: 415,
    ErrorKind.HEAD_TOO_LARGE: 431,
    ErrorKind.INTERNAL: 500,
    ErrorKind.UNAVAILABLE: 503,
}


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


def json_error(error: RequestError) -> Answer:
    """Status, headers and body of every error answer the server gives (both route layers)."""
    return Answer(
        STATUS[error.kind], {"Content-Type": CONTENT_TYPE_JSON}, orjson.dumps(error.body())
    )


def outcome_answer(outcome: Outcome) -> Answer:
    """A refusal's JSON error, or 200: empty, or the reply CloudEvent in binary mode."""
    if isinstance(outcome, RequestError):
        return json_error(outcome)
    if outcome.reply is None:
        return Answer(200, {}, b"")
    return Answer(200, outcome.reply.binary_headers, outcome.reply.data)
