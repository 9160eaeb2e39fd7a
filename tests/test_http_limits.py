"""The HTTP layer under abuse: malformed requests get JSON, compressed bodies stay within the
limit, idle connections are closed, and running out of file descriptors does not spin.

Everything goes over raw sockets to a real server process, so the tests see the bytes a client
would.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import resource
import socket
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.events import ce_headers, feedback
from tests.support.http import model_doc, post_json, scrape, value
from tests.support.processes import ServerFactory, ServerProcess
from tests.support.timing import wait_until

GOOD = json.dumps(feedback([[0, 0, 1]], [[0.1, 0.2, 0.7]])).encode()
REJECTED = "feedback_events_rejected_total"


def address(url: str) -> tuple[str, int]:
    host, port = url.partition("://")[2].split(":")
    return host, int(port)


def exchange(url: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes and read everything until the server closes the connection."""
    with socket.create_connection(address(url), timeout=timeout) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return Answer(int(lines[0].split(" ")[1]), headers, json.loads(body) if body else None)


def rejections(url: str) -> dict[str, float]:
    return {
        dict(labels)["reason"]: count
        for (name, labels), count in scrape(url).items()
        if name == REJECTED
    }


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {r: n - before.get(r, 0) for r, n in after.items() if n != before.get(r, 0)}


def request(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body


EVENT = "POST / HTTP/1.1\nHost: x\nContent-Type: application/json\n"
MALFORMED = {
    "control_character": (
        request(EVENT + "X-Note: a\x01b\nContent-Length: 2\n", b"{}"),
        400,
        "malformed_headers",
    ),
    "control_character_before_a_large_body": (
        request(EVENT + "X-Note: a\x01b\nContent-Length: 900000\n", b" " * 900_000),
        400,
        "malformed_headers",
    ),
    "bad_request_line": (request("POST  / HTTP/1.1\nHost: x\n"), 400, "malformed_headers"),
    "content_length_abc": (
        request(EVENT + "Content-Length: abc\n", b"{}"),
        400,
        "invalid_content_length",
    ),
    "content_length_superscript": (
        request(EVENT + "Content-Length: \xb2\n", b"{}"),
        400,
        "invalid_content_length",
    ),
    "two_content_lengths": (
        request(EVENT + "Content-Length: 2\nContent-Length: 3\n", b"{}"),
        400,
        "invalid_content_length",
    ),
    "content_length_and_chunked": (
        request(EVENT + "Content-Length: 2\nTransfer-Encoding: chunked\n", b"2\r\n{}\r\n0\r\n\r\n"),
        400,
        "content_length_with_transfer_encoding",
    ),
    "transfer_encoding_gzip": (
        request(EVENT + "Transfer-Encoding: gzip\n"),
        400,
        "unsupported_transfer_encoding",
    ),
    "bad_chunk_size": (
        request(EVENT + "Transfer-Encoding: chunked\n", b"zz\r\n{}\r\n0\r\n\r\n"),
        400,
        "malformed_chunked_body",
    ),
    "oversized_headers": (
        request(EVENT + f"X-Big: {'a' * 70_000}\nContent-Length: 2\n", b"{}"),
        431,
        "headers_too_large",
    ),
    "huge_headers": (
        request(EVENT + f"X-Big: {'a' * 2_000_000}\nContent-Length: 2\n", b"{}"),
        431,
        "headers_too_large",
    ),
    "content_length_abc_before_a_large_body": (
        request(EVENT + "Content-Length: abc\n", b" " * 900_000),
        400,
        "invalid_content_length",
    ),
    "scrape_with_content_length_abc": (
        request("GET /v1/metrics HTTP/1.1\nHost: x\nContent-Length: abc\n"),
        400,
        "invalid_content_length",
    ),
}


@pytest.fixture(scope="module")
def url(module_servers: ServerFactory) -> str:
    return module_servers("--state", "memory", "--max_body_bytes", str(1 << 20)).url


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_http_is_a_json_4xx_and_counted(url: str, name: str) -> None:
    data, status, reason = MALFORMED[name]
    doc, before = model_doc(url), rejections(url)
    answer = parse(exchange(url, data))
    assert answer.status == status
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["connection"] == "close"
    assert set(answer.body) == {"error", "reason"} and answer.body["reason"] == reason
    wait_until(lambda: moved(before, rejections(url)) == {reason: 1}, 5, f"{reason} counted")
    assert model_doc(url) == doc


def test_equal_repeated_content_lengths_are_one_length(url: str) -> None:
    """As in Tornado (proxies repeat the field): the event is read and counted."""
    before = model_doc(url)["events"]
    head = EVENT + "Connection: close\n" + f"Content-Length: {len(GOOD)}\n" * 2
    assert parse(exchange(url, request(head, GOOD))).status == 200
    assert model_doc(url)["events"] == before + 1


# --------------------------------------------------------------------------- Content-Encoding


def deflate(data: bytes) -> bytes:
    return zlib.compress(data)


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", deflate), ("identity", bytes)],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_compressed_event_is_counted(url: str, encoding: str, compress: Any, chunked: bool) -> None:
    before = model_doc(url)["events"]
    payload = compress(GOOD)
    data = (payload[i : i + 7] for i in range(0, len(payload), 7)) if chunked else payload
    answer = requests.post(
        url + "/", data=data, headers={**ce_headers(), "Content-Encoding": encoding}, timeout=5
    )
    assert answer.status_code == 200, answer.text
    assert model_doc(url)["events"] == before + 1


@pytest.mark.parametrize(
    ("encoding", "body", "status", "reason"),
    [
        ("br", GOOD, 415, "unsupported_content_encoding"),
        ("gzip, gzip", gzip.compress(gzip.compress(GOOD)), 415, "unsupported_content_encoding"),
        ("gzip", gzip.compress(GOOD)[:-9], 400, "invalid_compressed_body"),
        ("gzip", gzip.compress(GOOD) + b"junk", 400, "invalid_compressed_body"),
        ("gzip", GOOD, 400, "invalid_compressed_body"),
        ("deflate", gzip.compress(GOOD), 400, "invalid_compressed_body"),
    ],
    ids=["brotli", "twice", "truncated", "trailing_data", "not_compressed", "gzip_as_deflate"],
)
def test_bad_compressed_body_is_refused(
    url: str, encoding: str, body: bytes, status: int, reason: str
) -> None:
    doc, before = model_doc(url), rejections(url)
    answer = post_json(url, body, {**ce_headers(), "Content-Encoding": encoding})
    assert answer.status_code == status, answer.text
    assert answer.json()["reason"] == reason
    assert moved(before, rejections(url)) == {reason: 1}
    assert model_doc(url) == doc


def peak_rss_kib(server: ServerProcess) -> int:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def test_gzip_bomb_is_413_without_inflating_it(servers: ServerFactory) -> None:
    """100 MB of zeros in 100 KB of gzip: refused after inflating at most the 1 MB limit."""
    server = servers("--state", "memory", "--max_body_bytes", str(1 << 20))
    bomb = gzip.compress(bytes(100 << 20), compresslevel=9)
    assert len(bomb) < 1 << 20
    post_json(server.url, GOOD, ce_headers())  # warm: the first event allocates its own things
    before = peak_rss_kib(server)
    answer = post_json(server.url, bomb, {**ce_headers(), "Content-Encoding": "gzip"})
    assert answer.status_code == 413, answer.text
    assert answer.json()["reason"] == "body_too_large"
    assert peak_rss_kib(server) - before < 30 << 10


# --------------------------------------------------------------------------- connections


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def idle_connections(url: str, count: int) -> Iterator[list[socket.socket]]:
    """Connections that never send a byte (the kernel completes them even when not accepted)."""
    sockets = [socket.create_connection(address(url), timeout=5) for _ in range(count)]
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_idle_connection_is_closed_after_the_idle_timeout(servers: ServerFactory) -> None:
    server = servers("--state", "memory", "--idle_timeout_seconds", "0.5")
    with idle_connections(server.url, 2) as (idle, used):
        used.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert used.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.2)
        assert not closed_by_server(idle) and not closed_by_server(used)
        wait_until(lambda: closed_by_server(idle) and closed_by_server(used), 5, "idle closed")


def test_connections_over_the_cap_get_503(servers: ServerFactory) -> None:
    server = servers("--state", "memory", "--max_connections", "3")
    with idle_connections(server.url, 3):
        answer = parse(exchange(server.url, b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert answer.status == 503
        assert answer.body["reason"] == "too_many_connections"
    wait_until(
        lambda: requests.get(server.url + "/health/live", timeout=5).status_code == 200, 5, "free"
    )
    assert value(scrape(server.url), "feedback_http_connections_refused_total") == 1
    wait_until(
        lambda: value(scrape(server.url), "feedback_http_connections") == 1,  # the scrape's own
        5,
        "closed connections no longer counted",
    )
    assert server.stderr().count("refusing connections over --max_connections") == 1


def test_out_of_file_descriptors_backs_off_quietly(servers: ServerFactory) -> None:
    """More idle connections than the fd limit: no spinning, one warning, and it recovers.

    The limit is lowered once the server runs (its start-up opens what it needs); the cap is
    set above it, so accept() itself fails with EMFILE.
    """
    server = servers(
        "--state", "memory", "--idle_timeout_seconds", "1.5", "--max_connections", "1000"
    )
    pid = server.process.pid
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (64, 64))
    log_before = len(server.stderr())
    with idle_connections(server.url, 100):
        time.sleep(0.3)  # the fds are used up
        cpu = cpu_seconds(pid)
        time.sleep(1.0)
        assert cpu_seconds(pid) - cpu < 0.3  # spinning would use the whole second
    # The server closes the idle ones, then accepts and times out those left in the backlog.
    wait_until(
        lambda: requests.get(server.url + "/health/live", timeout=5).status_code == 200,
        15,
        "accepting again",
    )
    log = server.stderr()[log_before:]
    assert len(log) < 5000, log[:2000]
    assert log.count("cannot accept connections") == 1
    assert value(scrape(server.url), "feedback_http_accept_errors_total") >= 1


def test_slow_body_gets_408_after_the_body_timeout(servers: ServerFactory) -> None:
    server = servers("--state", "memory", "--body_timeout_seconds", "0.5")
    before = rejections(server.url)
    with socket.create_connection(address(server.url), timeout=5) as connection:
        connection.sendall(request(EVENT + "Content-Length: 100\n", b'{"truth": '))
        started = time.monotonic()
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        waited = time.monotonic() - started
    answer = parse(received)
    assert (answer.status, answer.body["reason"]) == (408, "body_timeout")
    assert 0.4 < waited < 3
    wait_until(lambda: moved(before, rejections(server.url)) == {"body_timeout": 1}, 5, "counted")


def test_bodies_over_the_in_flight_budget_get_503(servers: ServerFactory) -> None:
    """Two half-sent bodies hold the budget: a third gets 503 at once, whatever its framing;
    once the first two are answered (or their client left), bodies are taken again."""
    limit = 100_000
    server = servers(
        "--state", "memory", "--max_body_bytes", str(limit),
        "--max_body_bytes_in_flight", str(2 * limit),
    )  # fmt: skip
    before = rejections(server.url)
    padded = GOOD + b" " * (limit - len(GOOD))
    head = EVENT + f"Content-Length: {limit}\n"
    held = [socket.create_connection(address(server.url), timeout=5) for _ in range(2)]
    try:
        for connection in held:
            connection.sendall(request(head, padded[: limit // 2]))
        wait_until(lambda: value(scrape(server.url), "feedback_http_connections") >= 3, 5, "held")
        declared = parse(exchange(server.url, request(head, padded)))
        chunked = EVENT + "Transfer-Encoding: chunked\n"
        with socket.create_connection(address(server.url), timeout=5) as streaming:
            # a chunk over the budget's room, the rest still to come: answered at once
            streaming.sendall(
                request(chunked, b"%x\r\n%s\r\n" % (limit // 2, padded[: limit // 2]))
            )
            streamed = parse(streaming.recv(65536))
        for answer in (declared, streamed):
            assert (answer.status, answer.body["reason"]) == (503, "bodies_in_flight")
        held[0].sendall(padded[limit // 2 :])
        assert parse(held[0].recv(65536)).status == 200
    finally:
        for connection in held:
            connection.close()  # the second one leaves half-way: its bytes come back too
    wait_until(lambda: post_json(server.url, padded).status_code == 200, 5, "bodies taken again")
    assert moved(before, rejections(server.url)) == {"bodies_in_flight": 2}
