"""PostgreSQL fixtures: one server per test session, a fresh database per test.

Registered for every test module by tests/conftest.py (``pytest_plugins``). Tests that stop,
kill or restart the server take ``private_postgres`` (their own cluster) so the shared one stays
up for everyone else. Missing binaries skip the tests on a developer machine and fail them in
CI (``tests.prometheus.require``). Tests using them are marked ``postgres`` and ``e2e``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from bench.postgres import PostgresServer, find_bindir
from tests.prometheus import require

INSTALL = "apt-get install postgresql"
_databases = itertools.count(1)


def require_postgres() -> None:
    """Skip (or fail in CI) unless PostgreSQL's server binaries are installed."""
    bindir = find_bindir()
    require("PostgreSQL server binaries", str(bindir) if bindir else None, INSTALL)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (initdb once, about a second); never stop it in a test."""
    require_postgres()
    with PostgresServer() as server:
        yield server


def fresh_database(server: PostgresServer) -> str:
    """The DSN of a new, empty database (its name unique in the session)."""
    return server.create_database(f"test_{next(_databases)}")


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """The DSN of a new, empty database on the session's server: tests never see each
    other's keyspaces."""
    return fresh_database(postgres_server)


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A server of the test's own, free to stop, kill and restart; removed afterwards."""
    require_postgres()
    with PostgresServer() as server:
        yield server
