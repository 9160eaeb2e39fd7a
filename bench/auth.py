"""Credentials of the auth variants: `seed-token`'s token files, `seed-oidc`'s issuer.

`seed-token`: the server's --auth_token_file holds tokens as a mounted Secret would (a
comment, the previous token kept during a rotation, the current one); wrk sends the current
one, read from a file of its own.

`seed-oidc`: a small OIDC issuer, discovery and JWKS over HTTPS, and one token. It stands for
the cluster's service-account issuer (`https://kubernetes.default.svc`): a CA of its own signs
the issuer's certificate (the server trusts it through --oidc_ca_file), an RSA key signs one
RS256 token shaped like a projected service-account token for the server's audience, which wrk
sends on every request. The server fetches discovery and keys at start and caches
them, so the issuer serves a handful of requests per run; it runs on a thread of the bench
process (the load core) and counts what it served for the report.

The bench does not import tests/: tests/support/certs.py makes the test suite's certificates,
this module only the one chain the bench needs.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "127.0.0.1"
AUDIENCE = "feedback-metrics"
SUBJECT = "system:serviceaccount:knative-eventing:bench-sender"
SUBJECTS = "system:serviceaccount:knative-eventing:*"  # --oidc_subjects: a prefix
KID = "bench-rsa-1"
DISCOVERY = "/.well-known/openid-configuration"
JWKS = "/openid/v1/jwks"  # where the Kubernetes API server publishes its keys
TOKEN_LIFETIME = datetime.timedelta(hours=6)  # longer than any run; the server caches it


def write_tokens(directory: Path, name: str) -> tuple[Path, Path]:
    """(the server's --auth_token_file, the file of the token wrk sends) for server `name`."""
    sender = secrets.token_urlsafe(32)
    accepted = directory / f"tokens-{name}"
    accepted.write_text(
        f"# {name}: the previous token stays valid while senders move to the new one\n"
        f"{secrets.token_urlsafe(32)}\n\n  {sender}  \n"
    )
    sent = directory / f"token-{name}"
    sent.write_text(sender + "\n")
    return accepted, sent


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    signer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
) -> x509.Certificate:
    """A self-signed CA certificate (`signer` None) or a server certificate for 127.0.0.1
    signed by `signer` (its name and key), valid for a day, with the extensions strict
    verifiers ask for (key identifiers, key usage, server auth)."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signing_key = signer or (name, key)
    is_ca = signer is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def write_chain(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 it signs, as files: (ca, cert, key)."""
    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = _certificate("bench issuer CA", ca_key)
    server = _certificate("bench issuer", server_key, (ca.subject, ca_key))
    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    paths = (directory / "ca.crt", directory / "tls.crt", directory / "tls.key")
    for path, data in zip(paths, (_pem(ca), _pem(server), key_pem)):
        path.write_bytes(data)
    return paths


@dataclass
class Served:
    """What the issuer answered, for the report: the server should fetch keys once per start."""

    discovery: int = 0
    jwks: int = 0
    with_pod_token: int = 0  # requests that carried the --oidc_token_file token
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def note(self) -> str:
        return (
            f"issuer served {self.discovery} discovery and {self.jwks} JWKS requests "
            f"({self.with_pod_token} with the pod's token)"
        )


class Issuer:
    """The running issuer: its URL, the files the server and wrk read, and what it served."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file, cert_file, key_file = write_chain(directory)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        self.served = Served()
        self._httpd = http.server.ThreadingHTTPServer((HOST, 0), self._handler())
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.url = f"https://{HOST}:{self._httpd.server_address[1]}"
        signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signing.public_key()))
        self._documents = {
            DISCOVERY: {
                "issuer": self.url,
                "jwks_uri": self.url + JWKS,
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            },
            JWKS: {"keys": [{**jwk, "kid": KID, "use": "sig", "alg": "RS256"}]},
        }
        now = int(time.time())
        claims = {
            "iss": self.url,
            "aud": [AUDIENCE],  # a service-account token's aud is a list
            "sub": SUBJECT,
            "iat": now,
            "nbf": now,
            "exp": now + int(TOKEN_LIFETIME.total_seconds()),
        }
        token = jwt.encode(claims, signing, algorithm="RS256", headers={"kid": KID})
        self.token_file = directory / "sender.token"  # what wrk sends (feedback.lua)
        self.token_file.write_text(token + "\n")
        self.pod_token = f"bench-pod-token-{now}"  # --oidc_token_file: the server's own token
        self.pod_token_file = directory / "pod.token"
        self.pod_token_file.write_text(self.pod_token)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def server_flags(self) -> list[str]:
        """The server's --auth oidc flags against this issuer."""
        return [
            "--auth",
            "oidc",
            "--oidc_issuer",
            self.url,
            "--oidc_audience",
            AUDIENCE,
            "--oidc_subjects",
            SUBJECTS,
            "--oidc_ca_file",
            str(self.ca_file),
            "--oidc_token_file",
            str(self.pod_token_file),
        ]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                document: Any = issuer._documents.get(self.path)
                served = issuer.served
                with served.lock:
                    served.discovery += self.path == DISCOVERY
                    served.jwks += self.path == JWKS
                    authorization = self.headers.get("Authorization", "")
                    served.with_pod_token += authorization == f"Bearer {issuer.pod_token}"
                body = json.dumps(document).encode() if document is not None else b"{}"
                self.send_response(200 if document is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the bench prints its own report."""

        return Handler
