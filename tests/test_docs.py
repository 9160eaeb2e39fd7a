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
