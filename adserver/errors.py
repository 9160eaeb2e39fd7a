"""Refusals, by kind: the core says what is wrong, each transport maps the kind to its answer.

A refusal carries a :class:`ErrorKind`, a stable machine-readable ``reason`` and a message; it names
no HTTP status. HTTP maps kinds to statuses once, in :mod:`adserver.http.answers` (a Kafka
consumer would map them to "skip and count" or "retry").
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorKind(enum.Enum):
    """What kind of refusal an error is; its transport decides how to answer each kind."""

    INVALID = "invalid"  # the input is wrong: sending it again cannot help
    UNKNOWN_TARGET = "unknown_target"  # the input names something that does not exist
    TOO_LARGE = "too_large"  # the input is over a documented cap
    TOO_SLOW = "too_slow"  # the input did not arrive in time
    UNSUPPORTED_ENCODING = "unsupported_encoding"  # the input is in an encoding not read
    HEAD_TOO_LARGE = "head_too_large"  # the transport's own envelope is over its cap
    UNAUTHENTICATED = "unauthenticated"  # no credentials, or ones that do not prove a sender
    FORBIDDEN = "forbidden"  # a proven sender that is not allowed
    UNAVAILABLE = "unavailable"  # a transient fault: a retry may succeed
    INTERNAL = "internal"  # a bug or an unexpected fault

    @property
    def fault(self) -> bool:
        """The server's fault, not the input's: nothing was wrong with what was sent."""
        return self in (ErrorKind.UNAVAILABLE, ErrorKind.INTERNAL)


class RequestError(Exception):
    """A request the server refuses; ``reason`` is a stable machine-readable code."""

    kind: ClassVar[ErrorKind] = ErrorKind.INVALID

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason

    def body(self) -> dict[str, str]:
        return {"error": self.message, "reason": self.reason}


class BadRequest(RequestError):
    """Malformed input: Knative does not retry a 400, which is right, since retrying cannot help."""


class NotFound(RequestError):
    """The input names a model (a route's target) that is not configured."""

    kind = ErrorKind.UNKNOWN_TARGET


class PayloadTooLarge(RequestError):
    kind = ErrorKind.TOO_LARGE


class RequestTimeout(RequestError):
    """The body did not arrive in time; the connection is closed."""

    kind = ErrorKind.TOO_SLOW


class UnsupportedEncoding(RequestError):
    """A ``Content-Encoding`` the server cannot read."""

    kind = ErrorKind.UNSUPPORTED_ENCODING


class HeadersTooLarge(RequestError):
    kind = ErrorKind.HEAD_TOO_LARGE


class Unauthenticated(RequestError):
    """The request does not prove who sent it: nothing of it is read."""

    kind = ErrorKind.UNAUTHENTICATED


class Forbidden(RequestError):
    """The sender is proven, but not one of those allowed."""

    kind = ErrorKind.FORBIDDEN


class Unavailable(RequestError):
    """A transient fault (e.g. the state store is busy): the sender should retry."""

    kind = ErrorKind.UNAVAILABLE


class InternalError(RequestError):
    """A bug or an unexpected fault: answered like every other error, and logged."""

    kind = ErrorKind.INTERNAL


class StartupError(Exception):
    """Configuration or state the server cannot start with; the message says how to fix it."""
