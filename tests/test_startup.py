"""Start-up refuses what would silently go wrong later: bad settings, a state file that is empty,
in use by another server, or written by another kind of model. Each refusal exits 2 with a
message that says what to do, and leaves the state as it was."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from adserver.state.sqlite.schema import migrate
from adserver.state.view import COUNTERS
from cm_models import MultiClassNumeric
from cm_models.statistics import Sums
from tests.support.events import feedback
from tests.support.http import model_doc, scrape, send_event
from tests.support.processes import (
    DATA,
    MULTICLASS_NUMERIC,
    ROOT,
    ServerFactory,
    child_env,
    free_port,
)

USER_MODELS = str(DATA / "user_models")
STATE_FILE = "feedback-state.sqlite3"


def refused(*args: str, env: dict[str, str] | None = None) -> str:
    """Run a server that must refuse to start: exit code 2, no traceback; returns stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "adserver", "--http_host", "127.0.0.1", "--http_port",
         str(free_port()), *args, "MetricsServer"],
        cwd=ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (("--reply_retries", "-1"), {}, "--reply_retries"),
        (("--classes", "0,1,2", "--max_classes", "2"), {}, "--max_classes"),
        ((), {"CLASSES": "0,1,2", "MAX_CLASSES": "2"}, "--max_classes"),
        (("--reply_timeout_seconds", "0"), {}, "--reply_timeout_seconds"),
        (("--join_ttl_seconds", "-5"), {}, "--join_ttl_seconds"),
        ((), {"DEDUP_RETENTION_SECONDS": "0"}, "--dedup_retention_seconds"),
        (("--dedup_retention_seconds", "nan"), {}, "--dedup_retention_seconds"),
        (("--time_buckets", "1h=90d,1m=48h"), {}, "--time_buckets"),
        ((), {"TIME_BUCKETS": "1m"}, "--time_buckets"),
        (("--error_buckets", "1,0.5"), {}, "--error_buckets"),
        ((), {"ERROR_BUCKETS": "0,1"}, "--error_buckets"),
    ],
)
def test_invalid_settings_exit_2(args: tuple[str, ...], env: dict[str, str], named: str) -> None:
    assert named in refused("--state", "memory", *args, env=env)


class ClashingStatistics(MultiClassNumeric):
    """Declares a statistic under the name of one the server keeps itself."""

    statistics = (Sums(COUNTERS, keys=[("truth", "int")], values=[("rows", "int")]),)


def test_a_statistic_named_like_a_built_in_one_is_refused() -> None:
    message = refused("--state", "memory", "--storage_uri", "tests.test_startup.ClashingStatistics")
    assert f"statistics named [{COUNTERS!r}]" in message and "rename" in message


def test_second_server_on_one_state_dir_is_refused(servers: ServerFactory, tmp_path: Path) -> None:
    """One state file, one writer: the second server names the first and leaves it alone."""
    first = servers("--state_dir", str(tmp_path), "--storage_uri", MULTICLASS_NUMERIC)
    send_event(first.url, feedback([1], [1]))
    message = refused("--state_dir", str(tmp_path), "--storage_uri", MULTICLASS_NUMERIC)
    assert "in use by another running server" in message
    assert f"pid {first.process.pid}" in message
    # --reset_state must not move the file from under the running server either
    refused("--state_dir", str(tmp_path), "--storage_uri", MULTICLASS_NUMERIC, "--reset_state")
    assert sorted(p.name for p in tmp_path.iterdir() if ".reset-" in p.name) == []
    send_event(first.url, feedback([2], [2]))
    assert model_doc(first.url)["events"] == 2
    assert first.stop() == 0
    second = servers("--state_dir", str(tmp_path), "--storage_uri", MULTICLASS_NUMERIC)
    assert model_doc(second.url)["events"] == 2  # the lock went with the first process


def test_a_state_file_keeps_its_time_buckets(servers: ServerFactory, tmp_path: Path) -> None:
    """Stored buckets are read by the granularities that wrote them: other ones are refused
    (they would read the rows as other times and never age them out)."""
    first = servers("--state_dir", str(tmp_path), "--time_buckets", "1m=48h,1h=90d")
    send_event(first.url, feedback([1], [1]))
    assert first.stop() == 0
    message = refused("--state_dir", str(tmp_path), "--time_buckets", "1m=48h,1d=730d")
    assert "--time_buckets" in message and "'1m=2d,1h=90d'" in message
    again = servers("--state_dir", str(tmp_path), "--time_buckets", "1m=2d,1h=90d")  # the same
    assert model_doc(again.url)["events"] == 1


def test_memory_mode_takes_no_lock(servers: ServerFactory, tmp_path: Path) -> None:
    for _ in range(2):
        servers("--state", "memory", "--state_dir", str(tmp_path))


def test_empty_state_file_is_refused_not_started_from_zero(
    servers: ServerFactory, tmp_path: Path
) -> None:
    (tmp_path / STATE_FILE).touch()
    message = refused("--state_dir", str(tmp_path))
    assert "empty (0 bytes)" in message and "--reset_state" in message
    assert (tmp_path / STATE_FILE).stat().st_size == 0
    server = servers("--state_dir", str(tmp_path), "--reset_state")
    assert model_doc(server.url)["events"] == 0
    assert [p.name for p in tmp_path.glob(f"{STATE_FILE}.reset-*")] != []


def test_a_new_state_file_is_built_aside_and_renamed(
    servers: ServerFactory, tmp_path: Path
) -> None:
    """Never a 0-byte file that the next start would refuse: a draft left by a crash during the
    first start is discarded, and the file appears complete."""
    (tmp_path / f"{STATE_FILE}.new").write_bytes(b"half-written draft")
    server = servers("--state_dir", str(tmp_path))
    send_event(server.url, feedback([[1, 0]], [[1, 0]]))
    assert (tmp_path / STATE_FILE).stat().st_size > 0
    assert not list(tmp_path.glob("*.new*"))
    assert server.stop() == 0
    assert model_doc(servers("--state_dir", str(tmp_path)).url)["events"] == 1


def test_switching_to_a_user_model_is_refused(servers: ServerFactory, tmp_path: Path) -> None:
    """The stored counts are the built-in model's; spellings of built-in models are one kind."""
    state = ("--state_dir", str(tmp_path))
    first = servers(*state, "--storage_uri", MULTICLASS_NUMERIC)
    send_event(first.url, feedback([1], [1]))
    assert first.stop() == 0
    message = refused(
        *state, "--storage_uri", "my_metrics.MyMetrics", env={"PYTHONPATH": USER_MODELS}
    )
    assert "--storage_uri 'cm_models.*', not 'my_metrics.MyMetrics'" in message
    assert "--reset_state" in message
    for uri in ("adserver.cm_models.multiclass_numeric.MultiClassNumeric", "MulticlassOneHot"):
        server = servers(*state, "--storage_uri", uri)
        assert model_doc(server.url)["events"] == 1
        assert server.stop() == 0


def test_a_user_models_families_never_meet_the_built_in_ones(
    servers: ServerFactory, tmp_path: Path
) -> None:
    """A user model may name a counter seldon_metric_*; a built-in model on its file would
    export that family twice (two TYPE blocks, a scrape Prometheus rejects)."""
    state = ("--state_dir", str(tmp_path))
    user = ("--storage_uri", "my_metrics.SeldonNamedMetrics")
    first = servers(*state, *user, env={"PYTHONPATH": USER_MODELS})
    send_event(first.url, feedback([[1]], [[1]]))
    assert first.stop() == 0
    message = refused(*state, "--storage_uri", MULTICLASS_NUMERIC)
    assert "'my_metrics.SeldonNamedMetrics', not 'cm_models.*'" in message
    other_user_model = refused(
        *state, "--storage_uri", "my_metrics.MyMetrics", env={"PYTHONPATH": USER_MODELS}
    )
    assert "not 'my_metrics.MyMetrics'" in other_user_model
    again = servers(*state, *user, env={"PYTHONPATH": USER_MODELS})
    names = Counter(name for name, _ in scrape(again.url))
    assert names["seldon_metric_true_positive_total"] == 1


def test_a_file_from_before_the_model_kind_takes_the_current_one(
    servers: ServerFactory, tmp_path: Path
) -> None:
    connection = sqlite3.connect(tmp_path / STATE_FILE, isolation_level=None)
    migrate(connection, "model")  # what older servers wrote: no model kind
    connection.close()
    server = servers("--state_dir", str(tmp_path), "--storage_uri", MULTICLASS_NUMERIC)
    send_event(server.url, feedback([3], [3]))
    assert server.stop() == 0
    refused(
        "--state_dir", str(tmp_path), "--storage_uri", "my_metrics.MyMetrics",
        env={"PYTHONPATH": USER_MODELS},
    )  # fmt: skip
