"""``--auth oidc``: a JWT proves its sender, as Knative's OIDC sender identity sends it.

The issuer's keys are found through its discovery document, over HTTPS only, trusting
``--oidc_ca_file`` (in a pod: the cluster's CA; the pod's own service-account token is sent where
the API server wants one). Keys are cached and fetched again for an unknown ``kid`` (at most once
every :data:`REFETCH_SECONDS`); until the first fetch succeeds, requests get 503
``issuer_unavailable`` while it is retried in the background. Only asymmetric algorithms are
accepted: never ``none``, never an HMAC keyed with a public key. A verified token is cached until
it expires, so a sender's next events cost a dict lookup, not a signature check.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
import orjson
import tornado.httpclient

from adserver.catalogue import reasons
from adserver.catalogue.wire import BEARER, HEADER_AUTHORIZATION, OIDC_DISCOVERY_PATH
from adserver.errors import Forbidden, StartupError, Unauthenticated, Unavailable
from adserver.logs import ThrottledWarning

log = logging.getLogger(__name__)

ALGORITHMS: Final = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
)
LEEWAY_SECONDS: Final = 60.0  # clock skew allowed on exp and nbf
REFETCH_SECONDS: Final = 10.0  # an unknown kid fetches the keys again at most this often
VERIFIED_CACHE: Final = 4096  # verified tokens remembered until they expire
FETCH_TIMEOUT_SECONDS: Final = 5.0
MAX_DOCUMENT_BYTES: Final = 1024 * 1024  # a discovery document or a key set
RETRY_FIRST_SECONDS: Final = 1.0  # an issuer down at start: retried, backing off to
RETRY_MAX_SECONDS: Final = 10.0
REQUIRED_CLAIMS: Final = ["exp", "iss", "aud", "sub"]


@dataclass(frozen=True)
class Subjects:
    """``--oidc_subjects``: exact subjects, and prefixes (written ending in ``*``)."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Subjects:
        items = [item.strip() for item in text.split(",") if item.strip()]
        return cls(
            frozenset(item for item in items if not item.endswith("*")),
            tuple(item[:-1] for item in items if item.endswith("*")),
        )

    def allows(self, subject: str) -> bool:
        """Empty: any subject the issuer vouches for."""
        if not self.exact and not self.prefixes:
            return True
        return subject in self.exact or subject.startswith(self.prefixes)


def invalid(why: str) -> Unauthenticated:
    return Unauthenticated(f"the bearer token is not valid: {why}", reasons.INVALID_TOKEN)


class OIDCVerifier:
    """Verifies JWTs against the keys of one issuer, for one audience."""

    def __init__(
        self, issuer: str, audience: str, subjects: Subjects, ca_file: str, token_file: str
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.subjects = subjects
        self.ca_file = ca_file
        self.token_file = token_file
        try:
            self.tls()  # an unreadable CA stops start-up, not the first fetch
        except OSError as exc:
            raise StartupError(f"--oidc_ca_file {ca_file!r}: {exc}") from exc
        self.keys: Mapping[str | None, Any] | None = None  # kid -> public key, once fetched
        self.fetched_at = -math.inf
        self.fetching: asyncio.Task[bool] | None = None
        self.retrying: asyncio.Task[None] | None = None
        self.verified: dict[str, tuple[float, str]] = {}  # token -> (exp, sub)
        self.client = tornado.httpclient.AsyncHTTPClient(
            force_instance=True, max_clients=2, max_body_size=MAX_DOCUMENT_BYTES
        )
        self.failed = ThrottledWarning(log, "cannot fetch the OIDC issuer's keys")

    def tls(self) -> ssl.SSLContext:
        """Re-read for every fetch: a rotated cluster CA needs no restart."""
        return ssl.create_default_context(cafile=self.ca_file)

    def start(self) -> None:
        """Fetch the keys in the background, retrying while the issuer is down."""
        self.retrying = asyncio.ensure_future(self.first_keys())

    async def first_keys(self) -> None:
        delay = RETRY_FIRST_SECONDS
        while not await self.refresh():
            await asyncio.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_SECONDS)

    def close(self) -> None:
        for task in (self.retrying, self.fetching):
            if task is not None:
                task.cancel()
        self.client.close()

    async def verify(self, token: str) -> None:
        now = time.time()
        cached = self.verified.get(token)
        if cached is not None and now < cached[0] + LEEWAY_SECONDS:
            subject = cached[1]
        else:
            self.verified.pop(token, None)
            subject = await self.verify_signature(token)
        if not self.subjects.allows(subject):
            raise Forbidden(
                f"the sender {subject!r} is not one of --oidc_subjects", reasons.FORBIDDEN_SUBJECT
            )

    async def verify_signature(self, token: str) -> str:
        """The token's subject, once its signature and claims are checked."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise invalid(str(exc)) from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            raise invalid(f"its algorithm is not one of {', '.join(ALGORITHMS)}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise invalid("its kid is not a string")
        key = await self.key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": REQUIRED_CLAIMS},
            )
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            raise invalid(str(exc)) from None
        subject, expires = claims["sub"], claims["exp"]
        if not isinstance(subject, str):
            raise invalid("its sub is not a string")
        if len(self.verified) >= VERIFIED_CACHE:
            del self.verified[next(iter(self.verified))]  # the oldest verified
        self.verified[token] = (float(expires), subject)
        return subject

    async def key(self, kid: str | None) -> Any:
        """The issuer's key ``kid`` names; an unknown one fetches the keys again (rate-limited)."""
        if self.keys is None:
            raise Unavailable(
                "the OIDC issuer's keys are not fetched yet; retry", reasons.ISSUER_UNAVAILABLE
            )
        found = self.keys.get(kid)
        if found is None and time.monotonic() - self.fetched_at >= REFETCH_SECONDS:
            if not await asyncio.shield(self.refresh()):
                raise Unavailable(
                    "the OIDC issuer's keys cannot be fetched; retry", reasons.ISSUER_UNAVAILABLE
                )
            found = self.keys.get(kid)
        if found is None:
            raise invalid("its kid names no key of the issuer")
        return found

    def refresh(self) -> asyncio.Task[bool]:
        """One fetch at a time, shared by every request waiting for it."""
        if self.fetching is None or self.fetching.done():
            self.fetching = asyncio.ensure_future(self.fetch())
        return self.fetching

    async def fetch(self) -> bool:
        self.fetched_at = time.monotonic()
        try:
            self.keys = await self.fetch_keys()
        except (OSError, ValueError, tornado.httpclient.HTTPClientError, jwt.PyJWTError) as exc:
            self.failed.note(issuer=self.issuer, error=f"{type(exc).__name__}: {exc}")
            return False
        log.info("OIDC keys fetched", extra={"issuer": self.issuer, "keys": len(self.keys)})
        return True

    async def fetch_keys(self) -> dict[str | None, Any]:
        discovery = await self.get_json(self.issuer.rstrip("/") + OIDC_DISCOVERY_PATH)
        if discovery.get("issuer") != self.issuer:
            raise ValueError(f"the discovery document names issuer {discovery.get('issuer')!r}")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
            raise ValueError(f"jwks_uri {jwks_uri!r} is not an https:// URL")
        keys = jwt.PyJWKSet.from_dict(await self.get_json(jwks_uri)).keys
        return {key.key_id: key.key for key in keys}

    async def get_json(self, url: str) -> dict[str, Any]:
        headers = {}
        token = self.own_token()
        if token:
            headers[HEADER_AUTHORIZATION] = f"{BEARER} {token}"
        response = await self.client.fetch(
            tornado.httpclient.HTTPRequest(
                url,
                headers=headers,
                ssl_options=self.tls(),
                request_timeout=FETCH_TIMEOUT_SECONDS,
                follow_redirects=False,
            )
        )
        document = orjson.loads(response.body)
        if not isinstance(document, dict):
            raise ValueError(f"{url} is not a JSON object")
        return document

    def own_token(self) -> str:
        """The pod's service-account token (rotated by the kubelet: read for every fetch)."""
        if not os.path.isfile(self.token_file):
            return ""
        with open(self.token_file, encoding="utf-8") as file:
            return file.read().strip()
