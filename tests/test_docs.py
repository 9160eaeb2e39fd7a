"""The README is the user's reference: every setting and every exported family is in it."""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from adserver.catalogue import families, reasons
from adserver.catalogue.wire import METRIC_PREFIX, SELDON_METRIC_PREFIX
from adserver.settings import Settings
from tests.support.events import feedback
from tests.support.http import scrape, send_event
from tests.support.processes import MULTICLASS_NUMERIC

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("item", dataclasses.fields(Settings), ids=lambda f: f.name)
def test_every_setting_is_documented(item: dataclasses.Field) -> None:
    assert f"`--{item.name}`" in README
    assert f"`{item.metadata['env']}`" in README


def test_every_exported_family_is_documented(servers, sink) -> None:
    server = servers(
        "--storage_uri",
        MULTICLASS_NUMERIC,
        "--state",
        "memory",
        "--reply_url",
        sink.url.rstrip("/"),
        "--event_type",
        "t",
        "--event_source",
        "s",
    )
    send_event(server.url, feedback([[1], [2]], [[1], [1]]))
    families = {name for name, _ in scrape(server.url) if not name.startswith("process_")}
    documented = set(re.findall(r"`((?:feedback|seldon_metric)_[a-z_0-9]+)`", README))
    bases = {re.sub(r"_(bucket|count|sum)$", "", name) for name in families}
    missing = {name for name in bases if name not in documented}
    assert not missing, f"exported but not in the README: {sorted(missing)}"


def readme_table(header: str) -> list[list[str]]:
    """The cells of the README table whose header row is ``header``."""
    table = README[README.index(header) :].split("\n\n", 1)[0]
    return [line.split("|")[1:-1] for line in table.splitlines()[2:]]


def readme_families() -> dict[str, tuple[str, tuple[str, ...], set[str]]]:
    """The README's metric table: family -> (type, label names, label values in backquotes).

    A row may name several families (``a`` / ``b``); labels ``same`` are the row above's, and
    "Seldon default labels" stands for them; parentheses hold a label's values.
    """
    documented: dict[str, tuple[str, tuple[str, ...], set[str]]] = {}
    labels: tuple[str, ...] = ()
    values: set[str] = set()
    for names, kind, cell, _ in readme_table("| family | type | labels | meaning |"):
        if cell.strip() != "same":
            parts = [part.strip() for part in outside(cell).split(",")]
            labels = tuple(
                label
                for part in parts
                for label in (
                    families.SELDON_DEFAULT_LABELS
                    if part == "Seldon default labels"
                    else re.findall(r"`([a-z_]+)`", part)
                )
            )
            values = set(re.findall(r"`([a-z_*]+)`", "".join(re.findall(r"\([^()]*\)", cell))))
        for name in re.findall(r"`((?:feedback|seldon_metric)_[a-z_0-9]+)`", names):
            documented[name] = (kind.strip(), labels, values)
    return documented


def test_the_readme_metric_table_is_the_catalogue() -> None:
    """Each family of adserver/catalogue/families.py is a README row with its type and labels,
    and its closed sets of label values; the README lists no other family of ours."""
    documented = readme_families()
    declared = {f.exposed: (f.kind, f.labels) for f in families.DOCUMENTED}
    assert {name: row[:2] for name, row in documented.items()} == declared
    for family in families.DOCUMENTED:
        for values in family.values.values():
            assert set(values) <= documented[family.exposed][2], family.exposed


def readme_reasons() -> dict[str, set[str]]:
    """The README's reason table: area -> the codes in backquotes; parentheses are comments."""
    return {
        outside(area).strip(): set(re.findall(r"`([a-z][a-z0-9_]*)`", outside(codes)))
        for area, codes in readme_table("| area | reasons |")
    }


def outside(text: str) -> str:
    return re.sub(r"\([^()]*\)", "", text)


def test_the_readme_reason_table_is_the_catalogue() -> None:
    """Reason codes are part of the API: the README lists exactly the catalogue, by area."""
    catalogue = {area: set(codes) for area, codes in reasons.AREAS.items()}
    assert readme_reasons() == catalogue
    assert sum(map(len, reasons.AREAS.values())) == len(reasons.ALL)  # each in one area


ERRORS = {"BadRequest", "InvalidFeedback", "PayloadTooLarge", "Unavailable", "RequestError"}
ERRORS |= {"InternalError", "Unscorable", "reject"}
ERRORS |= {"HeadersTooLarge", "UnsupportedEncoding", "RequestTimeout"}
ERRORS |= {"Unauthenticated", "Forbidden"}


def calls(tree: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            yield name, node


def test_every_reason_comes_from_the_catalogue() -> None:
    """No raise site spells a reason: each names a constant of adserver/catalogue/reasons.py."""
    root = Path(__file__).resolve().parents[1]
    sources = [*root.joinpath("adserver").rglob("*.py"), *root.joinpath("cm_models").rglob("*.py")]
    literal, used = [], set()
    for path in sources:
        tree = ast.parse(path.read_text())
        for name, call in calls(tree):
            if name in ERRORS:
                reason = call.args[1:] if name not in ("Unscorable", "reject") else call.args[:1]
                reason += [k.value for k in call.keywords if k.arg == "reason"]
                literal += [
                    f"{path.name}:{call.lineno}" for a in reason if isinstance(a, ast.Constant)
                ]
        used |= {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "reasons"
        }
    assert len(used) > 40  # the scan still finds them
    assert not literal, (
        f"reasons spelled out instead of taken from adserver.catalogue.reasons: {literal}"
    )
    assert {getattr(reasons, name) for name in used} <= reasons.ALL


#: What only the catalogue may spell: reasons, counter names, label values and family names.
CATALOGUED = (
    reasons.ALL
    | set(families.COUNTED)
    | set(families.LABEL_OUTCOMES)
    | set(families.EVICTION_REASONS)
    | {name for f in families.DOCUMENTED for name in (f.name, f.exposed)}
)
CATALOGUED_PREFIXES = (families.IGNORED_PREFIX, METRIC_PREFIX, SELDON_METRIC_PREFIX)
LOGGING = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def exempt(tree: ast.AST) -> set[int]:
    """Strings that are no count: log messages and fields, and SQL parameter names (ids of their
    nodes)."""
    found = set()
    for name, call in calls(tree):
        if name in LOGGING:
            found |= {id(a) for a in call.args}
            found |= {
                id(k) for w in call.keywords if isinstance(w.value, ast.Dict) for k in w.value.keys
            }
        elif name in ("execute", "executemany"):
            found |= {id(k) for a in call.args if isinstance(a, ast.Dict) for k in a.keys}
    return found


def spelled_out(found: Callable[[ast.AST], Iterator[ast.Constant]]) -> list[str]:
    """Where, outside adserver/catalogue/, ``found`` finds a string of a module's tree (but log
    text and SQL parameter names)."""
    root = Path(__file__).resolve().parents[1]
    sources = [*root.joinpath("adserver").rglob("*.py"), *root.joinpath("cm_models").rglob("*.py")]
    assert len(sources) > 40  # the scan still reads the packages
    spelled = []
    for path in sources:
        if path.parent.name == "catalogue":
            continue
        tree = ast.parse(path.read_text())
        skip = exempt(tree)
        spelled += [
            f"{path.relative_to(root)}:{node.lineno}: {node.value!r}"
            for node in found(tree)
            if id(node) not in skip
        ]
    return spelled


def test_no_reason_name_or_label_value_is_spelled_out() -> None:
    """Outside adserver/catalogue/, no string is a catalogued reason, counter name, label
    value (an outcome, an eviction reason, an ``ignored_`` kind) or family name."""

    def catalogued(tree: ast.AST) -> Iterator[ast.Constant]:
        strings = (
            n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
        )
        for node in strings:
            if node.value in CATALOGUED or node.value.startswith(CATALOGUED_PREFIXES):
                yield node

    spelled = spelled_out(catalogued)
    assert not spelled, f"spelled out instead of taken from adserver/catalogue/: {spelled}"


def test_no_seldon_label_name_is_spelled_out() -> None:
    """No label set names a Seldon label (``method``, the default labels) by a string of its own:
    a dict key is the catalogue's constant."""

    def seldon_keys(tree: ast.AST) -> Iterator[ast.Constant]:
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for key in node.keys:
                    if isinstance(key, ast.Constant) and key.value in families.SELDON_LABELS:
                        yield key

    spelled = spelled_out(seldon_keys)
    assert not spelled, f"spelled out instead of taken from adserver/catalogue/: {spelled}"


def test_tornado_reasons_are_in_the_catalogue(servers) -> None:
    """404 and 405 take their reason from Tornado's phrase: those codes are catalogued too."""
    url = servers("--state", "memory").url
    answers = [requests.get(url + "/nowhere", timeout=5), requests.put(url + "/", timeout=5)]
    assert [a.status_code for a in answers] == [404, 405]
    assert {a.json()["reason"] for a in answers} <= reasons.ALL
