"""Who may send: a request's ``Authorization`` header, checked before any of its body is read.

``--auth token`` accepts the bearer tokens of a mounted file (:class:`TokenFile`); ``--auth oidc``
verifies a JWT, Knative's sender identity (:mod:`adserver.http.oidc`). What is refused is
counted by reason (``feedback_auth_refused_total``), and never logged with its token.
"""

from __future__ import annotations

import hmac
import logging
from typing import Protocol

from adserver.catalogue import reasons
from adserver.catalogue.reasons import AUTH
from adserver.catalogue.wire import BEARER
from adserver.errors import RequestError, StartupError, Unauthenticated
from adserver.http.watched import WatchedFiles
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
    """The tokens of ``--auth_token_file``, re-read when the file changes (at most once a
    second, :class:`~adserver.http.watched.WatchedFiles`); a file that cannot be read keeps
    the tokens last read, and warns without a word of its content."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.watched = WatchedFiles(
                (path,),
                self.read,
                check_seconds=TOKEN_FILE_CHECK_SECONDS,
                errors=(OSError, UnicodeDecodeError),
                warning=ThrottledWarning(log, "cannot read --auth_token_file: kept its tokens"),
                detail=lambda exc: type(exc).__name__,
            )
        except OSError as exc:
            raise StartupError(f"--auth_token_file {path!r}: {exc.strerror or exc}") from exc
        if not self.watched.value:
            log.warning("--auth_token_file holds no token: every request is refused")

    def read(self) -> tuple[bytes, ...]:
        with open(self.path, encoding="utf-8") as file:
            tokens = parse_tokens(file.read())
        log.info("bearer tokens read", extra={"tokens": len(tokens)})
        return tokens

    async def verify(self, token: str) -> None:
        """Every known token is compared, each in constant time."""
        given = token.encode()
        matched = False
        for known in self.watched.current():
            matched |= hmac.compare_digest(given, known)
        if not matched:
            raise Unauthenticated(
                "the bearer token is not one of --auth_token_file's", reasons.INVALID_TOKEN
            )
