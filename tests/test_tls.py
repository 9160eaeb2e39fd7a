"""HTTPS (``--tls_cert_file``/``--tls_key_file``) against real servers on loopback.

Certificates come from a test CA (tests/support/certs.py); every client verifies the server's
certificate against it. The files are mounted as Kubernetes mounts a Secret (each name a symlink
through ``..data``), so a rotation is the same atomic swap of ``..data`` the kubelet makes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import time
from pathlib import Path

import pytest
import requests

from tests.support.certs import Authority
from tests.support.events import feedback
from tests.support.http import post_json, scrape, value
from tests.support.processes import ServerFactory, ServerProcess
from tests.test_http_limits import address, closed_by_server, exchange, parse
from tests.test_startup import refused

GOOD = feedback([[0, 0, 1]], [[0.1, 0.2, 0.7]])
REJECTED = "feedback_events_rejected_total"
# The server checks its files at most every 5 s.
RELOAD_WITHIN = 12.0


class SecretMount:
    """A directory laid out like a mounted Secret: ``tls.crt -> ..data/tls.crt``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir(parents=True, exist_ok=True)
        for name in ("tls.crt", "tls.key"):
            (root / name).symlink_to(Path("..data") / name)

    def publish(self, authority: Authority) -> Path:
        """A new certificate from ``authority``, swapped in atomically; returns the CA file."""
        self.version += 1
        version = self.root / f"..v{self.version}"
        authority.write(version)
        staged = self.root / "..data_tmp"
        staged.symlink_to(version.name)
        os.replace(staged, self.root / "..data")
        return version / "ca.crt"

    def flags(self) -> tuple[str, ...]:
        return ("--tls_cert_file", str(self.root / "tls.crt"),
                "--tls_key_file", str(self.root / "tls.key"))  # fmt: skip


@pytest.fixture
def mount(tmp_path: Path) -> SecretMount:
    return SecretMount(tmp_path / "secret")


def https_server(
    servers: ServerFactory, mount: SecretMount, *args: str
) -> tuple[ServerProcess, Path]:
    ca = mount.publish(Authority.make())
    return servers("--state", "memory", *mount.flags(), *args, ca=ca), ca


def tls_connection(url: str, ca: Path) -> ssl.SSLSocket:
    """A handshaken connection that has sent nothing yet."""
    context = ssl.create_default_context(cafile=str(ca))
    return context.wrap_socket(
        socket.create_connection(address(url), timeout=5), server_hostname="127.0.0.1"
    )


def served_by(url: str, ca: Path) -> bool:
    """A new connection's certificate is signed by ``ca``."""
    try:
        return requests.get(url + "/health/live", verify=str(ca), timeout=5).status_code == 200
    except requests.exceptions.SSLError:
        return False


def test_events_and_metrics_over_https(
    servers: ServerFactory, mount: SecretMount, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, ca = https_server(servers, mount)
    assert server.url.startswith("https://")
    with pytest.raises(requests.exceptions.SSLError):  # the client does verify
        requests.get(server.url + "/v1/metrics", timeout=5)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    assert post_json(server.url, GOOD).status_code == 200
    assert value(scrape(server.url), "feedback_events_accepted_total") == 1
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with context.wrap_socket(
        socket.create_connection(address(server.url), timeout=5), server_hostname="127.0.0.1"
    ) as offered_h2:
        assert offered_h2.selected_alpn_protocol() == "http/1.1"  # HTTP/1.1 only


def test_plain_http_to_the_tls_port_is_refused_and_serving_goes_on(
    servers: ServerFactory, mount: SecretMount, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, ca = https_server(servers, mount)
    body = json.dumps(GOOD).encode()
    answer = parse(
        exchange(
            server.url.replace("https", "http"),
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        )
    )
    assert answer.status == 400 and answer.body["reason"] == "tls_required"
    for garbage in (b"\x16\x03\x01\x00\x05hello", b"\x00" * 64, b""):  # not TLS, not HTTP
        with socket.create_connection(address(server.url), timeout=5) as raw:
            raw.sendall(garbage)
            raw.shutdown(socket.SHUT_WR)
            received = b""
            with contextlib.suppress(ConnectionResetError):  # closed with bytes unread
                while chunk := raw.recv(4096):
                    received += chunk
            assert len(received) < 64 and not received.startswith(b"HTTP")  # an alert at most
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    assert post_json(server.url, GOOD).status_code == 200
    samples = scrape(server.url)
    assert value(samples, REJECTED, reason="tls_required") == 1
    assert value(samples, "feedback_events_accepted_total") == 1
    assert server.process.poll() is None
    # Three failed handshakes: one throttled warning (with the first's detail), not three.
    assert server.stderr().count("TLS handshakes failed") == 1
    assert server.stderr().count("SSL Error on") == 1


def test_a_rotated_certificate_reaches_new_connections(
    servers: ServerFactory, mount: SecretMount
) -> None:
    """A new CA swapped in: new connections get it within the check interval; a connection
    kept alive from before keeps its session."""
    server, old_ca = https_server(servers, mount)
    kept = requests.Session()
    kept.trust_env = False  # REQUESTS_CA_BUNDLE would override verify
    kept.verify = str(old_ca)
    assert kept.get(server.url + "/health/live", timeout=5).status_code == 200
    new_ca = mount.publish(Authority.make("rotated CA"))
    deadline = time.monotonic() + RELOAD_WITHIN
    while not served_by(server.url, new_ca):
        assert time.monotonic() < deadline, "the new certificate was not served"
        time.sleep(0.2)
    assert not served_by(server.url, old_ca)
    assert kept.get(server.url + "/health/live", timeout=5).status_code == 200
    assert "re-loaded" in server.stderr()


def test_a_broken_rotation_keeps_the_old_certificate(
    servers: ServerFactory, mount: SecretMount
) -> None:
    """A key that does not match the new certificate (half a rotation): the old pair stays."""
    server, ca = https_server(servers, mount)
    half = mount.root / "..half"
    Authority.make().write(half)
    (half / "tls.key").write_bytes(Authority.make().issue()[1])
    staged = mount.root / "..data_tmp"
    staged.symlink_to(half.name)
    os.replace(staged, mount.root / "..data")
    deadline = time.monotonic() + RELOAD_WITHIN
    while "cannot be loaded" not in server.stderr():  # checked when connections are accepted
        assert served_by(server.url, ca)
        assert time.monotonic() < deadline, "the broken pair was not noticed"
        time.sleep(0.2)
    assert served_by(server.url, ca)


def test_keep_alive_over_tls(servers: ServerFactory, mount: SecretMount) -> None:
    server, ca = https_server(servers, mount)
    host, port = address(server.url)
    connection = http.client.HTTPSConnection(
        host, port, context=ssl.create_default_context(cafile=str(ca)), timeout=5
    )
    body = json.dumps(GOOD)
    first = None
    for _ in range(3):
        connection.request("POST", "/", body, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        answer.read()
        assert answer.status == 200
        first = first or connection.sock
        assert connection.sock is first  # the same TLS connection each time
    connection.request("GET", "/v1/metrics")
    metrics = connection.getresponse().read().decode()
    assert 'feedback_events_accepted_total{model="model"} 3.0' in metrics
    assert connection.sock is first
    connection.close()


def test_connections_over_the_cap_are_closed_over_tls(
    servers: ServerFactory, mount: SecretMount, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, ca = https_server(servers, mount, "--max_connections", "2")
    held = [tls_connection(server.url, ca) for _ in range(2)]
    with pytest.raises((ssl.SSLError, OSError)):
        tls_connection(server.url, ca).close()
    for connection in held:
        connection.close()
    deadline = time.monotonic() + 5
    while not served_by(server.url, ca):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    assert value(scrape(server.url), "feedback_http_connections_refused_total") == 1


def test_idle_tls_connections_are_closed(servers: ServerFactory, mount: SecretMount) -> None:
    """After the handshake, and a connection that never starts one."""
    server, ca = https_server(servers, mount, "--idle_timeout_seconds", "0.5")
    handshaken = tls_connection(server.url, ca)
    silent = socket.create_connection(address(server.url), timeout=5)
    deadline = time.monotonic() + 5
    while not closed_by_server(silent):
        assert time.monotonic() < deadline, "a connection without a handshake stayed open"
    handshaken.settimeout(5)
    assert handshaken.recv(1) == b""  # the server closed it (close_notify or EOF)
    handshaken.close()
    silent.close()


def test_one_tls_flag_alone_exits_2(tmp_path: Path) -> None:
    _, cert, _ = Authority.make().write(tmp_path)
    assert "--tls_cert_file and --tls_key_file go together" in refused(
        "--state", "memory", "--tls_cert_file", str(cert)
    )


@pytest.mark.parametrize("broken", ["missing key", "mismatched key", "not a certificate"])
def test_a_bad_pair_exits_2_naming_the_file(tmp_path: Path, broken: str) -> None:
    _, cert, key = Authority.make().write(tmp_path)
    if broken == "missing key":
        key.unlink()
        named = f"--tls_key_file {key} cannot be read"
    elif broken == "mismatched key":
        key.write_bytes(Authority.make().issue()[1])
        named = f"the key in --tls_key_file {key} does not match --tls_cert_file {cert}"
    else:
        cert.write_text("not a certificate\n")
        named = f"--tls_cert_file {cert} holds no PEM certificate"
    message = refused("--state", "memory", "--tls_cert_file", str(cert), "--tls_key_file", str(key))
    assert named in message
