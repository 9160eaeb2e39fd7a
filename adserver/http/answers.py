"""What HTTP answers: the one place error kinds become statuses, and outcomes become responses.

The ingest core knows no status codes; a refusal names its :class:`~adserver.errors.ErrorKind`. A
refusal is a JSON body ``{"error": ..., "reason": ...}``; accepted events are an empty 200, or
the reply CloudEvent in binary mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, NamedTuple

import orjson

from adserver.catalogue import reasons
from adserver.catalogue.wire import (
    BEARER,
    CONTENT_TYPE_JSON,
    HEADER_PREDICTION_TIME_SOURCE,
    HEADER_WWW_AUTHENTICATE,
)
from adserver.errors import ErrorKind, RequestError
from adserver.ingest.service import Outcome

#: Every kind of refusal, as HTTP says it. 5xx only for the server's faults, so Knative retries
#: those and never bad input.
STATUS: Final[Mapping[ErrorKind, int]] = {
    ErrorKind.INVALID: 400,
    ErrorKind.UNKNOWN_TARGET: 404,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.FORBIDDEN: 403,
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
    """Status, headers and body of every error answer the server gives (both route layers).

    A 401 names the scheme it wants (RFC 6750), and says when the token sent was not valid.
    """
    headers = {"Content-Type": CONTENT_TYPE_JSON}
    if error.kind is ErrorKind.UNAUTHENTICATED:
        sent = error.reason == reasons.INVALID_TOKEN
        headers[HEADER_WWW_AUTHENTICATE] = f'{BEARER} error="{error.reason}"' if sent else BEARER
    return Answer(STATUS[error.kind], headers, orjson.dumps(error.body()))


def outcome_answer(outcome: Outcome) -> Answer:
    """A refusal's JSON error, or 200: empty, or the reply CloudEvent in binary mode."""
    if isinstance(outcome, RequestError):
        return json_error(outcome)
    source = outcome.time_source
    timed = {} if source is None else {HEADER_PREDICTION_TIME_SOURCE: source}
    if outcome.reply is None:
        return Answer(200, timed, b"")
    return Answer(200, {**outcome.reply.binary_headers, **timed}, outcome.reply.data)
