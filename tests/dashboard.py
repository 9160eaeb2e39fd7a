"""The PromQL of config/grafana-dashboard.json, ready to run against a Prometheus.

Grafana fills in template variables before it queries; these helpers do the same, so tests can
check that every panel query parses and returns what the recording rules return.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parent.parent / "config" / "grafana-dashboard.json"

# $name, ${name}, ${name:format}; label_replace's `$1` is no variable (starts with a digit)
_VARIABLE = re.compile(r"\$\{(?P<braced>[A-Za-z_]\w*)(?::[^}]*)?\}|\$(?P<plain>[A-Za-z_]\w*)")


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    """The dashboard as parsed JSON."""
    return json.loads(path.read_text())


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana variables in expr; an unknown variable raises KeyError."""

    def value(match: re.Match[str]) -> str:
        return variables[match.group("braced") or match.group("plain")]

    return _VARIABLE.sub(value, expr)


def dashboard_targets(
    model: str = ".*", rate_interval: str = "5m", path: Path = DASHBOARD
) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) of every panel query, variables filled in.

    `model` goes into `model=~"$model"`, so the default `.*` selects every model; every
    segment, the 1h window, and segments named canary and default are compared.
    """
    variables = {
        "model": model,
        "__rate_interval": rate_interval,
        "segment": ".*",
        "window": "1h",
        "canary": "canary",
        "baseline": "default",
    }
    return [
        (panel["title"], target["refId"], substitute(target["expr"], variables))
        for panel in iter_panels(load_dashboard(path))
        for target in panel.get("targets", [])
    ]


def dashboard_exprs(model: str = ".*", rate_interval: str = "5m") -> list[str]:
    """PromQL of every panel query of the dashboard, variables filled in."""
    return [expr for _, _, expr in dashboard_targets(model, rate_interval)]
