"""The lowest prometheus-client that setup.py allows runs the exposition tests.

The encoder uses prometheus_client's escaping API (0.23.1 on; 0.23.0 was yanked); with an older
library every scrape would answer 500. Here the floor is read from setup.py, installed on its own
into a temporary directory put first on the path, and the exposition tests run against it (their
server subprocesses inherit the path).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.prometheus import in_ci

ROOT = Path(__file__).resolve().parents[1]
EXPOSITION_TESTS = ["tests/test_exposition_encoder.py", "tests/test_exposition.py"]

pytestmark = pytest.mark.e2e


def lowest_allowed(package: str) -> str:
    found = re.search(rf'"{package}>=([0-9.]+)', (ROOT / "setup.py").read_text())
    assert found, f"setup.py gives no lower bound for {package}"
    return found.group(1)


def test_exposition_with_the_lowest_allowed_prometheus_client(tmp_path: Path) -> None:
    floor = lowest_allowed("prometheus-client")
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         f"prometheus-client=={floor}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if installed.returncode != 0:
        reason = f"cannot install prometheus-client=={floor}: {installed.stderr[-500:]}"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    show_version = "import importlib.metadata as m; print(m.version('prometheus-client'))"
    version = subprocess.run(
        [sys.executable, "-c", show_version],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    assert version == floor
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "--tb=short", "-p", "no:cacheprovider",
         "-p", "no:warnings", *EXPOSITION_TESTS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
