"""The dependency direction of ARCHITECTURE.md's table, checked on every import statement.

Each package may import only the packages listed for it; only ``adserver/app.py`` (the
composition root) imports everything, and only ``http/`` and ``replies/`` (which speak HTTP)
import Tornado. A new import that breaks the direction fails here, not in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = {"errors", "logs"}  # modules every package may use
#: What each part may import (besides itself and SHARED), lowest first, as in ARCHITECTURE.md.
ALLOWED: dict[str, set[str]] = {
    "catalogue": set(),
    "cm_models": {"catalogue"},
    "wire": {"catalogue", "cm_models"},
    "state": {"catalogue", "cm_models"},
    "exposition": {"catalogue", "cm_models", "state"},
    "replies": {"catalogue", "wire", "tornado"},
    "ingest": {"catalogue", "cm_models", "wire", "state", "exposition", "replies"},
    "http": {"catalogue", "wire", "exposition", "ingest", "tornado"},
    "kafka": {"catalogue", "wire", "ingest"},
    "settings": {"catalogue"},
    "loader": {"cm_models", "settings"},
    "models_config": {"catalogue", "cm_models", "loader", "settings"},
    "errors": set(),
    "logs": set(),
    "__main__": {"app", "settings"},
}


def part(module: str) -> str | None:
    """The part of ours a dotted module belongs to (None for the standard library and others);
    Tornado counts as a part, since only the HTTP-speaking packages may use it."""
    names = module.split(".")
    if names[0] in ("cm_models", "tornado"):
        return names[0]
    if names[0] != "adserver" or len(names) < 2:
        return None
    return "cm_models" if names[1] == "cm_models" else names[1]


def sources() -> list[Path]:
    return sorted([*(ROOT / "adserver").rglob("*.py"), *(ROOT / "cm_models").rglob("*.py")])


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "adserver":  # from adserver import x
                found.update(f"adserver.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_follows_the_dependency_direction(path: Path) -> None:
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    own = part(module)
    assert own is not None
    if own in ("app", "__init__"):
        return  # the composition root, and the package's own docstring
    allowed = ALLOWED[own] | SHARED | {own}
    wrong = {m for m in imports(path) if (p := part(m)) is not None and p not in allowed}
    assert not wrong, f"{module} ({own}/) may not import {sorted(wrong)}"


def test_the_table_names_every_part() -> None:
    """A new package or top-level module gets its row here (and in ARCHITECTURE.md)."""
    parts = {part(".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in sources()}
    assert parts - {"app", "__init__"} == set(ALLOWED)
