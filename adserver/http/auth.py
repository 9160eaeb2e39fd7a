"""Who may send: a request's ``Authorization`` header, checked before any of its body is read.

``--auth token`` accepts the bearer tokens of a mounted file (:class:`TokenFile`); ``--auth oidc``
verifies a JWT, Knative's sender identity (:mod:`adserver.http.oidc`). What is refused is
counted by reason (``feedback_auth_refused_total``), and never logged with its token.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import time
from typing import Protocol

from adserver.catalogue import reasons
from adserver.catalogue.reasons import AUTH
from adserver.catalogue.wire import BEARER
from adserver.errors import RequestError, StartupError, Unauthenticated
from adserver.logs import ThrottledWarning

log = logging.getLogger(__name__)

#: A token file is looked at (one stat) at most this often.
TOKEN_FILE_CHECK_SECONDS = 1.0


class Verifier(Protocol):
    """Proves a bearer token, or raises the refusal (a :class:`RequestError`)."""

    async def verify(self, token: str) -> None: ...


class Authenticator:
    """The one check of every protected route; counts its refusals by reason."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self.refused = dict.fromkeys(AUTH, 0)

    async def check(self, authorization: str | None) -> None:
        try:
            await self.verifier.verify(bearer_token(authorization))
        except RequestError as error:
            self.refused[error.reason] += 1
            raise

    def snapshot(self) -> dict[str, int]:
        """Read by the exporter at scrape time."""
        return dict(self.refused)


def bearer_token(authorization: str | None) -> str:
    """The token of ``Authorization: Bearer <token>`` (the scheme in any case, RFC 7235)."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != BEARER.lower():
        raise Unauthenticated(
            f"a bearer token is required (Authorization: {BEARER} <token>)", reasons.MISSING_TOKEN
        )
    token = token.strip()
    if not token:
        raise Unauthenticated("the bearer token is empty", reasons.INVALID_TOKEN)
    return token


def parse_tokens(text: str) -> tuple[bytes, ...]:
    """One token a line; blank lines and ``#`` comments are not tokens."""
    lines = (line.strip() for line in text.splitlines())
    return tuple(line.encode() for line in lines if line and not line.startswith("#"))


class TokenFile:
    """The tokens of ``--auth_token_file``, re-read when the file changes.

    A mounted Secret changes by an atomic swap of its ``..data`` symlink: the path resolves to
    a new file whose mtime may be older than the old one's, so the file is known by its resolved
    path, mtime and size together. It is looked at most once a second; a file that cannot be
    read keeps the tokens last read (and warns), so a rotation never locks every sender out.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: tuple[str, int, int] | None = None
        self.tokens: tuple[bytes, ...] = ()
        self.checked = -math.inf
        self.unreadable = ThrottledWarning(log, "cannot read --auth_token_file: kept its tokens")
        try:
            self.reload()
        except OSError as exc:
            raise StartupError(f"--auth_token_file {path!r}: {exc.strerror or exc}") from exc
        if not self.tokens:
            log.warning("--auth_token_file holds no token: every request is refused")

    def identity(self) -> tuple[str, int, int]:
        resolved = os.path.realpath(self.path)
        status = os.stat(resolved)
        return resolved, status.st_mtime_ns, status.st_size

    def reload(self) -> None:
        """Read the file if it is not the one read last."""
        identity = self.identity()
        if identity != self.seen:
            with open(identity[0], encoding="utf-8") as file:
                self.tokens = parse_tokens(file.read())
            self.seen = identity
            log.info("bearer tokens read", extra={"tokens": len(self.tokens)})

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self.checked < TOKEN_FILE_CHECK_SECONDS:
            return
        self.checked = now
        try:
            self.reload()
        except (OSError, UnicodeDecodeError) as exc:
            self.unreadable.note(error=type(exc).__name__)

    async def verify(self, token: str) -> None:
        """Every known token is compared, each in constant time."""
        self.refresh()
        given = token.encode()
        matched = False
        for known in self.tokens:
            matched |= hmac.compare_digest(given, known)
        if not matched:
            raise Unauthenticated(
                "the bearer token is not one of --auth_token_file's", reasons.INVALID_TOKEN
            )
