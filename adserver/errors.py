"""Errors that map to an HTTP status and a JSON body ``{"error": ..., "reason": ...}``."""

from __future__ import annotations


class RequestError(Exception):
    """A request the server refuses; ``reason`` is a stable machine-readable code."""

    status = 400

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason

    def body(self) -> dict[str, str]:
        return {"error": self.message, "reason": self.reason}


class BadRequest(RequestError):
    """Malformed input: Knative does not retry a 400, which is right, since retrying cannot help."""


class PayloadTooLarge(RequestError):
    status = 413


class RequestTimeout(RequestError):
    """The body did not arrive in time; the connection is closed."""

    status = 408


class UnsupportedEncoding(RequestError):
    """A ``Content-Encoding`` the server cannot read."""

    status = 415


class HeadersTooLarge(RequestError):
    status = 431


class Unavailable(RequestError):
    """A transient fault (e.g. the state store is busy): 503 asks the sender to retry."""

    status = 503


class InternalError(RequestError):
    """A bug or an unexpected fault: answered as JSON like every other error, and logged."""

    status = 500


class StartupError(Exception):
    """Configuration or state the server cannot start with; the message says how to fix it."""
