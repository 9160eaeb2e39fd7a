"""Fixtures for the HTTP-level tests (real server subprocesses, a real reply sink), markers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# ``from tests.support.<module> import ...`` must work however pytest is launched.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.processes import ServerFactory  # noqa: E402
from tests.support.sink import Sink  # noqa: E402

# The PostgreSQL fixtures (postgres_server, postgres_dsn, private_postgres) for every module.
pytest_plugins = ("tests.support.postgres",)
WIRE = Path(__file__).resolve().parent / "wire"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The pure decoders' tests (tests/wire/) are the fast suite: ``pytest -m unit``."""
    for item in items:
        if item.path.is_relative_to(WIRE):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="module")
def module_servers() -> Iterator[ServerFactory]:
    """Servers shared by one module's tests (they compare state before/after, not absolutes)."""
    factory = ServerFactory()
    yield factory
    factory.close()


@pytest.fixture
def servers() -> Iterator[ServerFactory]:
    """Servers owned by one test: for absolute counts or settings no other test wants."""
    factory = ServerFactory()
    yield factory
    factory.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    """A reply sink answering 200 at once; tests may set ``delay`` or ``status``."""
    with Sink() as running:
        yield running
