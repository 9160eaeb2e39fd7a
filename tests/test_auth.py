"""Who may send (--auth): bearer tokens from a file, and JWTs of a local OIDC issuer over HTTPS.

Real servers on loopback; the issuer is an ``http.server`` in a thread of the test process,
serving its discovery document and key set over HTTPS with a certificate of a test CA, which
the server trusts as --oidc_ca_file. A refused request changes nothing but
``feedback_auth_refused_total{reason}``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from adserver.catalogue import reasons
from adserver.http import auth
from tests.support.certs import Authority, PrivateKey, ec_key, pem_public, rsa_key
from tests.support.events import ce_headers, feedback
from tests.support.http import model_doc, post_json, scrape, value
from tests.support.processes import free_port, launch

AUDIENCE = "feedback-metrics"
SENDER = "system:serviceaccount:knative-eventing:mt-broker-filter"
REFUSED = "feedback_auth_refused_total"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Issuer:
    """A local OIDC issuer over HTTPS: its keys by kid, and how often its key set was read."""

    directory: Path
    port: int = field(default_factory=free_port)
    keys: dict[str, tuple[PrivateKey, str]] = field(default_factory=dict)  # kid -> key, alg
    jwks_reads: int = 0
    server: ThreadingHTTPServer | None = None

    def __post_init__(self) -> None:
        self.ca, self.cert, self.key = Authority.make().write(self.directory)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def add(self, key: PrivateKey, algorithm: str) -> str:
        kid = uuid.uuid4().hex
        self.keys[kid] = (key, algorithm)
        return kid

    def jwks(self) -> dict[str, Any]:
        listed = []
        for kid, (key, algorithm) in self.keys.items():
            codec = RSAAlgorithm if algorithm[0] in "RP" else ECAlgorithm
            jwk = codec.to_jwk(key.public_key(), as_dict=True)
            listed.append({**jwk, "kid": kid, "alg": algorithm, "use": "sig"})
        return {"keys": listed}

    def start(self) -> None:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/openid/v1/jwks"}
                elif self.path == "/openid/v1/jwks":
                    issuer.jwks_reads += 1
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def token(self, kid: str, **claims: Any) -> str:
        """A token signed with ``kid``'s key: valid for the server unless ``claims`` say not."""
        key, algorithm = self.keys[kid]
        now = int(time.time())
        body = {"iss": self.url, "aud": AUDIENCE, "sub": SENDER, "iat": now, "exp": now + 600}
        body.update(claims)
        return jwt.encode(
            {k: v for k, v in body.items() if v is not None},
            key,
            algorithm=algorithm,
            headers={"kid": kid},
        )

    def flags(self, *subjects: str) -> tuple[str, ...]:
        allowed = ("--oidc_subjects", ",".join(subjects)) if subjects else ()
        return (
            "--auth",
            "oidc",
            "--oidc_issuer",
            self.url,
            "--oidc_audience",
            AUDIENCE,
            "--oidc_ca_file",
            str(self.ca),
            "--oidc_token_file",
            str(self.directory / "no-token"),
            "--state",
            "memory",
            "--log_level",
            "DEBUG",
            *allowed,
        )


def post(url: str, token: str | None = None, scheme: str = "Bearer") -> requests.Response:
    headers = ce_headers()
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}"
    return post_json(url, feedback([[1, 0]], [[1, 0]]), headers)


def accepted(url: str) -> float:
    return model_doc(url)["events"]


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Issuer]:
    running = Issuer(tmp_path_factory.mktemp("issuer"))
    running.rsa = running.add(rsa_key(), "RS256")  # type: ignore[attr-defined]
    running.ec = running.add(ec_key(), "ES256")  # type: ignore[attr-defined]
    running.start()
    yield running
    running.stop()


def keys_fetched(server: Any, issuer: Issuer, kid: str) -> None:
    """Ready comes before the first fetch of the keys ends (events get 503 until then)."""
    eventually(lambda: post(server.url, issuer.token(kid)).status_code == 200, 10.0)


@pytest.fixture(scope="module")
def oidc_server(module_servers, issuer):
    server = module_servers(*issuer.flags("system:serviceaccount:knative-eventing:*"))
    keys_fetched(server, issuer, issuer.rsa)
    return server


def test_valid_tokens_pass_rsa_and_ec(oidc_server, issuer) -> None:
    before = accepted(oidc_server.url)
    for kid in (issuer.rsa, issuer.ec):
        answer = post(oidc_server.url, issuer.token(kid))
        assert answer.status_code == 200, answer.text
    # aud may be a list
    assert post(oidc_server.url, issuer.token(issuer.rsa, aud=["x", AUDIENCE])).status_code == 200
    assert accepted(oidc_server.url) == before + 3


def tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "system:serviceaccount:knative-eventing:other"
    return ".".join((header, b64(json.dumps(claims).encode()), signature))


def unsigned(issuer: Issuer) -> str:
    """``alg: none``: a token anyone can write."""
    claims = jwt.decode(issuer.token(issuer.rsa), options={"verify_signature": False})
    return jwt.encode(claims, None, algorithm="none")


def hmac_with_public_key(issuer: Issuer) -> str:
    """HS256 keyed with the issuer's public key PEM (the classic algorithm confusion)."""
    key, _ = issuer.keys[issuer.rsa]
    claims = jwt.decode(issuer.token(issuer.rsa), options={"verify_signature": False})
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": issuer.rsa}).encode())
    signing_input = f"{head}.{b64(json.dumps(claims).encode())}"
    mac = hmac.new(pem_public(key), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def stranger(issuer: Issuer) -> str:
    """Signed with a key the issuer never published (its kid unknown even after a refetch)."""
    outsider = Issuer(issuer.directory / "outsider")
    kid = outsider.add(rsa_key(), "RS256")
    return outsider.token(kid, iss=issuer.url)


CASES = {
    "expired": (401, reasons.INVALID_TOKEN, lambda i: i.token(i.rsa, exp=int(time.time()) - 120)),
    "not_yet_valid": (401, reasons.INVALID_TOKEN, lambda i: i.token(i.ec, nbf=time.time() + 300)),
    "wrong_issuer": (401, reasons.INVALID_TOKEN, lambda i: i.token(i.rsa, iss="https://evil")),
    "wrong_audience": (401, reasons.INVALID_TOKEN, lambda i: i.token(i.ec, aud="other")),
    "no_subject": (401, reasons.INVALID_TOKEN, lambda i: i.token(i.rsa, sub=None)),
    "unknown_kid": (401, reasons.INVALID_TOKEN, stranger),
    "tampered": (401, reasons.INVALID_TOKEN, lambda i: tampered(i.token(i.rsa))),
    "alg_none": (401, reasons.INVALID_TOKEN, unsigned),
    "hs256_public_key": (401, reasons.INVALID_TOKEN, hmac_with_public_key),
    "malformed": (401, reasons.INVALID_TOKEN, lambda i: "not.a-jwt"),
    "subject": (
        403,
        reasons.FORBIDDEN_SUBJECT,
        lambda i: i.token(i.ec, sub="system:serviceaccount:default:intruder"),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_tokens_are_refused_and_nothing_is_counted(oidc_server, issuer, case) -> None:
    status, reason, make = CASES[case]
    token = make(issuer)
    before_doc, before = model_doc(oidc_server.url), scrape(oidc_server.url)
    answer = post(oidc_server.url, token)
    assert answer.status_code == status, answer.text
    assert answer.json()["reason"] == reason
    if status == 401:
        assert answer.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    after = scrape(oidc_server.url)
    assert value(after, REFUSED, reason=reason) == value(before, REFUSED, reason=reason) + 1
    assert model_doc(oidc_server.url) == before_doc
    assert token not in oidc_server.stderr()


@pytest.mark.parametrize("authorization", [None, "Basic dXNlcjpwYXNz"])
def test_no_bearer_token_is_missing_token(oidc_server, authorization) -> None:
    headers = ce_headers()
    if authorization is not None:
        headers["Authorization"] = authorization
    before = scrape(oidc_server.url)
    answer = post_json(oidc_server.url, feedback([[1, 0]], [[1, 0]]), headers)
    assert answer.status_code == 401
    assert answer.json()["reason"] == reasons.MISSING_TOKEN
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    moved = value(scrape(oidc_server.url), REFUSED, reason=reasons.MISSING_TOKEN)
    assert moved == value(before, REFUSED, reason=reasons.MISSING_TOKEN) + 1
    assert value(before, "feedback_events_rejected_total") == 0


def test_issuer_down_then_up_and_a_key_added_later(servers, tmp_path) -> None:
    """503 while the keys were never fetched; then 200 without a restart. An unknown kid fetches
    the keys again (at most once every 10 s), so a key the issuer adds later is found."""
    issuer = Issuer(tmp_path)
    first = issuer.add(rsa_key(), "RS256")
    server = servers(*issuer.flags())
    answer = post(server.url, issuer.token(first))
    assert answer.status_code == 503, answer.text
    assert answer.json()["reason"] == reasons.ISSUER_UNAVAILABLE
    issuer.start()
    try:
        keys_fetched(server, issuer, first)
        fetched = time.monotonic()
        later = issuer.add(ec_key(), "ES256")
        reads = issuer.jwks_reads
        # within 10 s of the last fetch an unknown kid is refused without asking the issuer
        answer = post(server.url, issuer.token(later))
        assert answer.json()["reason"] == reasons.INVALID_TOKEN
        assert issuer.jwks_reads == reads
        time.sleep(max(0.0, fetched + 10.5 - time.monotonic()))
        assert post(server.url, issuer.token(later)).status_code == 200
        assert issuer.jwks_reads == reads + 1
    finally:
        issuer.stop()


def write_secret(directory: Path, version: str, text: str) -> None:
    """A mounted Secret, as the kubelet updates it: files in ``..<version>``, the ``..data``
    symlink swapped atomically, ``tokens`` a symlink through it."""
    data = directory / f"..{version}"
    data.mkdir()
    (data / "tokens").write_text(text)
    os.utime(data / "tokens", (1_000_000_000, 1_000_000_000))  # older than any before it
    (directory / "..tmp").symlink_to(data.name)
    os.replace(directory / "..tmp", directory / "..data")
    if not (directory / "tokens").is_symlink():
        (directory / "tokens").symlink_to("..data/tokens")


def eventually(check: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_token_file_rotation_and_secret_swap(servers, tmp_path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    write_secret(secret, "v1", "# senders\n\n  alpha-token-1111  \nbravo-token-2222\n")
    server = servers(
        "--auth", "token", "--auth_token_file", str(secret / "tokens"), "--log_level", "DEBUG"
    )
    before = accepted(server.url)
    assert post(server.url, "alpha-token-1111").status_code == 200
    assert post(server.url, "bravo-token-2222").status_code == 200
    for wrong in ("# senders", "alpha-token-111", "alpha-token-11111", "nope"):
        answer = post(server.url, wrong)
        assert answer.status_code == 401
        assert answer.json()["reason"] == reasons.INVALID_TOKEN
    assert accepted(server.url) == before + 2
    # the same size, an older mtime: found by its resolved path
    write_secret(secret, "v2", "# senders\n\n  charl-token-3333  \nbravo-token-2222\n")
    eventually(lambda: post(server.url, "charl-token-3333").status_code == 200)
    assert post(server.url, "alpha-token-1111").status_code == 401
    assert post(server.url, "bravo-token-2222").status_code == 200
    stderr = server.stderr()
    assert "bearer tokens read" in stderr
    assert not any(token in stderr for token in ("alpha-token", "bravo-token", "charl-token"))


def test_a_rewritten_token_file_is_read_again(servers, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("first-token\n")
    server = servers("--auth", "token", "--auth_token_file", str(tokens))
    assert post(server.url, "first-token").status_code == 200
    tokens.write_text("second-token\n")
    eventually(lambda: post(server.url, "second-token").status_code == 200)
    assert post(server.url, "first-token").status_code == 401


def test_tokens_are_compared_in_constant_time(tmp_path, monkeypatch) -> None:
    path = tmp_path / "tokens"
    path.write_text("one\ntwo\n")
    compared: list[tuple[bytes, bytes]] = []
    constant_time = hmac.compare_digest

    def compare(given: bytes, known: bytes) -> bool:
        compared.append((given, known))
        return constant_time(given, known)

    monkeypatch.setattr(auth.hmac, "compare_digest", compare)
    tokens = auth.TokenFile(str(path))
    asyncio.run(tokens.verify("one"))
    assert compared == [(b"one", b"one"), (b"one", b"two")]  # every token, even after a match


def test_auth_reads_protects_reads_not_health(servers, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("reader-token\n")
    server = servers(
        "--auth", "token", "--auth_token_file", str(tokens), "--auth_reads", "--state", "memory"
    )
    bearer = {"Authorization": "Bearer reader-token"}
    for route in ("/v1/metrics", "/v1/models/model/metrics", "/protocol"):
        answer = requests.get(server.url + route, timeout=5)
        assert answer.status_code == 401, route
        assert answer.json()["reason"] == reasons.MISSING_TOKEN
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert requests.get(server.url + route, headers=bearer, timeout=5).status_code == 200
    for route in ("/health/ready", "/health/live"):
        assert requests.get(server.url + route, timeout=5).status_code == 200
    text = requests.get(server.url + "/v1/metrics", headers=bearer, timeout=5).text
    assert f'{REFUSED}{{model="model",reason="missing_token"}} 3.0' in text


def test_without_auth_nothing_changes(servers) -> None:
    server = servers("--state", "memory")
    assert post(server.url, "anything").status_code == 200
    assert not any(name == REFUSED for name, _ in scrape(server.url))


@pytest.mark.parametrize(
    "flags",
    [
        ("--auth", "token"),
        ("--auth", "token", "--auth_token_file", "/nonexistent/tokens"),
        ("--auth", "oidc"),
        ("--auth", "oidc", "--oidc_audience", "a", "--oidc_issuer", "http://issuer"),
        ("--auth", "oidc", "--oidc_audience", "a", "--oidc_ca_file", "/nonexistent/ca.crt"),
        ("--auth", "basic"),
        ("--auth_reads",),
    ],
)
def test_misconfiguration_exits_2(flags) -> None:
    process, stderr = launch(["--http_port", str(free_port()), "--state", "memory", *flags])
    try:
        assert process.wait(20) == 2
        assert "auth" in stderr.read_text() or "oidc" in stderr.read_text()
    finally:
        stderr.unlink()
