"""A real Prometheus scrapes a server whose reads need a bearer token (``--auth_reads``).

Two jobs scrape the same server (``--auth token``): one sends the token from the mounted file
(``authorization: {type: Bearer, credentials_file: ...}``, what a ServiceMonitor's bearer
token becomes), the other sends none. The first must see the target up and our samples,
including the refusals the second caused; the second must see it down with a 401.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.prometheus import Prometheus, by_label, host_port, job, require_program, run_prometheus
from tests.support.events import ce_headers, feedback
from tests.support.http import post_json
from tests.support.processes import MULTICLASS_NUMERIC, ServerFactory, ServerProcess

pytestmark = pytest.mark.e2e

MODEL = "guarded"
WITH_TOKEN, WITHOUT = "with-token", "without-token"
ROWS = 3


@dataclass(frozen=True)
class Guarded:
    """The Prometheus, the server's target and the token it accepts."""

    prometheus: Prometheus
    instance: str
    token: str


def start_guarded(servers: ServerFactory, token_file: Path) -> ServerProcess:
    """The server with token auth on every read; skipped only if it does not know the flags.

    A server without them exits 2 with argparse's usage, which then lists no ``--auth``; any
    other failure to start (a misconfiguration message, a crash) fails the test.
    """
    flags = ("--state", "memory", "--storage_uri", MULTICLASS_NUMERIC, "--model_name", MODEL)
    auth = ("--auth", "token", "--auth_token_file", str(token_file), "--auth_reads")
    try:
        return servers(*flags, *auth)
    except RuntimeError as exc:
        message = str(exc)
        if "exited with 2" in message and "usage:" in message and "[--auth " not in message:
            pytest.skip(f"this server has no --auth flag: {message.splitlines()[-1]}")
        raise


@pytest.fixture(scope="module")
def guarded(
    module_servers: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guarded]:
    require_program("prometheus")  # before starting a server for nothing
    token = secrets.token_urlsafe(32)
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(f"{token}\n")  # as a Secret's key is mounted: one token, a newline
    server = start_guarded(module_servers, token_file)
    instance = host_port(server.url)
    jobs = [
        job(
            [instance],
            WITH_TOKEN,
            authorization={"type": "Bearer", "credentials_file": str(token_file)},
        ),
        job([instance], WITHOUT),
    ]
    body = feedback([[c] for c in range(ROWS)], [[c] for c in range(ROWS)])
    answer = post_json(server.url, body, {**ce_headers(), "Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    with run_prometheus(jobs=jobs) as prometheus:
        yield Guarded(prometheus, instance, token)


def test_the_job_with_the_token_scrapes_our_samples(guarded: Guarded) -> None:
    """Prometheus sends the file's token (whitespace trimmed) and the server accepts it."""
    query = guarded.prometheus.wait_for
    up = query(f'up{{job="{WITH_TOKEN}"}}', lambda result: bool(result))
    assert by_label(up, "instance") == {guarded.instance: 1.0}
    rows = query(
        f'feedback_rows_accepted_total{{job="{WITH_TOKEN}", model="{MODEL}"}}',
        lambda result: bool(result),
    )
    assert by_label(rows, "model") == {MODEL: ROWS}


def test_the_job_without_a_token_is_refused_with_401_and_counted(guarded: Guarded) -> None:
    prometheus = guarded.prometheus
    down = prometheus.wait_for(f'up{{job="{WITHOUT}"}}', lambda result: bool(result))
    assert by_label(down, "instance") == {guarded.instance: 0.0}
    (target,) = [t for t in prometheus.target_health() if t["scrapePool"] == WITHOUT]
    assert "401" in (target["lastError"] or ""), target
    refused = prometheus.wait_for(
        f'feedback_auth_refused_total{{job="{WITH_TOKEN}", model="{MODEL}"}}',
        lambda result: by_label(result, "reason").get("missing_token", 0) > 0,
    )
    assert by_label(refused, "reason").get("invalid_token", 0) == 0, "the good token refused"
