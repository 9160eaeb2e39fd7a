"""The README is the user's reference: every setting and every exported family is in it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from adserver.settings import Settings
from tests.helpers import MULTICLASS_NUMERIC, feedback, scrape, send_event

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


def test_every_error_reason_is_documented() -> None:
    """Reason codes are part of the API: each one raised in the code is listed in the README."""
    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(
        r"(?:BadRequest|InvalidFeedback|PayloadTooLarge|Unavailable|HeadersTooLarge"
        r"|UnsupportedEncoding|RequestTimeout)\("
        r'(?:[^()]|\([^()]*\))*?,\s*"([a-z_]+)"\s*,?\s*\)',
        re.S,
    )
    sources = [*root.joinpath("adserver").rglob("*.py"), *root.joinpath("cm_models").rglob("*.py")]
    reasons = {m.group(1) for path in sources for m in pattern.finditer(path.read_text())}
    assert len(reasons) > 30  # the pattern still finds them
    assert not {r for r in reasons if f"`{r}`" not in README}
