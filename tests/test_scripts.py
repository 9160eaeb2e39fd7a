"""What the project's scripts may do on a developer's machine."""

from __future__ import annotations

import re

from tests.support.processes import ROOT


def test_scripts_stop_no_process_by_name() -> None:
    """``pkill -x prometheus`` killed any Prometheus the developer ran; tests stop what they
    started by PID, and package services never start (policy-rc.d in scripts/test.sh)."""
    scripts = [*ROOT.glob("scripts/*.sh"), *ROOT.glob("config/*.sh"), ROOT / ".ci" / "run"]
    assert scripts
    for path in scripts:
        assert not re.search(r"\b(pkill|killall)\b", path.read_text()), path.name
