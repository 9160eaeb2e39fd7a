"""HTTPS: the server's certificate and key as an ``ssl.SSLContext``, re-loaded when they change.

The files are looked at at most once every :data:`CHECK_SECONDS`, by the accept loop
(:class:`~adserver.http.watched.WatchedFiles`): new connections get the new certificate, open
ones keep theirs. A pair that does not load (e.g. the certificate written, its key not yet) keeps
the old context and is tried again at the next check.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from adserver.errors import StartupError
from adserver.http.watched import WatchedFiles
from adserver.logs import ThrottledWarning

log = logging.getLogger(__name__)

CHECK_SECONDS = 5.0


class TLSFileError(Exception):
    """The certificate or key cannot be loaded; the message names the file and the flag."""


def diagnose(cert_file: str, key_file: str) -> str:
    """Which of the two files is wrong, for a pair OpenSSL refused (it does not say)."""
    try:
        x509.load_pem_x509_certificates(Path(cert_file).read_bytes())
    except ValueError:
        return f"--tls_cert_file {cert_file} holds no PEM certificate"
    try:
        serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except (ValueError, TypeError):  # TypeError: the key is encrypted
        return f"--tls_key_file {key_file} holds no unencrypted PEM private key"
    return f"the key in --tls_key_file {key_file} does not match --tls_cert_file {cert_file}"


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2 or later, HTTP/1.1 only (ALPN), no renegotiation."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    for flag, path in (("--tls_cert_file", cert_file), ("--tls_key_file", key_file)):
        if not os.access(path, os.R_OK):
            raise TLSFileError(f"{flag} {path} cannot be read")
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise TLSFileError(f"{diagnose(cert_file, key_file)} ({exc.reason})") from exc
    return context


class ServerTLS:
    """The current context, re-loaded when the certificate or key file changed."""

    def __init__(
        self,
        cert_file: str,
        key_file: str,
        check_seconds: float = CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Load the pair now: a pair that cannot be loaded fails start-up, naming the file."""
        try:
            self.watched = WatchedFiles(
                (cert_file, key_file),
                lambda: server_context(cert_file, key_file),
                check_seconds=check_seconds,
                errors=(OSError, TLSFileError),
                warning=ThrottledWarning(
                    log,
                    "the changed TLS certificate or key cannot be loaded: "
                    "still serving the old one",
                ),
                reloaded="TLS certificate re-loaded",
                clock=clock,
            )
        except (OSError, TLSFileError) as exc:
            raise StartupError(str(exc)) from exc

    def context(self) -> ssl.SSLContext:
        """The context for a new connection: one clock read, two ``stat`` calls a check."""
        return self.watched.current()
