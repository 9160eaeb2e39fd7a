"""Vector values in two encodings (dense, and sparse when smaller): they round-trip, SQL adds and
sums any mix of them exactly as numpy does, malformed bytes are refused, and a wide classifier's
score histograms stay bounded by the non-zero bins rather than by classes x bins."""

from __future__ import annotations

import datetime
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import roc_auc_score

from adserver.state.sqlite.functions import VectorSum, vector_add
from adserver.state.sqlite.store import SQLiteDialect, state_path
from cm_models.statistics import vector_array, vector_bytes, vector_width
from tests.support.events import feedback
from tests.support.http import send_event
from tests.support.processes import ONE_HOT, ServerFactory
from tests.support.scores import assert_auc_within


@st.composite
def same_width_vectors(draw: st.DrawFn) -> list[np.ndarray]:
    """Vectors of one width, each from empty to full (so both encodings mix), of integral
    counts (so any order of addition is exact)."""
    width = draw(st.integers(1, 300))
    vectors = []
    for _ in range(draw(st.integers(1, 8))):
        density = draw(st.sampled_from([0.0, 0.02, 0.2, 0.5, 1.0]))
        seed = draw(st.integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        values = rng.integers(1, 2**40, width).astype(np.float64)
        vectors.append(np.where(rng.random(width) < density, values, 0.0))
    return vectors


def sparse_size(values: np.ndarray) -> int:
    """What the sparse encoding costs: a 5-byte header, 12 bytes per non-zero."""
    return 5 + 12 * int(np.count_nonzero(values))


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float64, st.integers(0, 300), elements=st.one_of(st.just(0.0), st.floats())))
def test_either_encoding_round_trips_at_the_smaller_size(values: np.ndarray) -> None:
    stored = vector_bytes(values)
    assert len(stored) == min(8 * values.size, sparse_size(values))
    assert vector_width(stored) == values.size
    assert np.array_equal(vector_array(stored), values, equal_nan=True)


def test_the_two_encodings_and_a_dense_blob_from_before() -> None:
    one_row = np.zeros(200)
    one_row[17] = 1.0
    assert vector_bytes(one_row) == struct.pack("<BIId", 0x53, 200, 17, 1.0)
    full = np.arange(1.0, 201.0)
    assert vector_bytes(full) == full.astype("<f8").tobytes()  # the format stored before
    assert vector_array(full.astype("<f8").tobytes()).tolist() == full.tolist()
    assert len(vector_bytes(np.zeros(200))) == 5


@pytest.fixture
def connection() -> Iterator[sqlite3.Connection]:
    opened = SQLiteDialect.open(None, "m").connection
    yield opened
    opened.close()


@settings(max_examples=60, deadline=None)
@given(same_width_vectors())
def test_add_and_sum_of_mixed_encodings_equal_numpy(vectors: list[np.ndarray]) -> None:
    """Each result is stored in the smaller encoding."""
    connection = SQLiteDialect.open(None, "m").connection
    try:
        stored = [vector_bytes(v) for v in vectors]
        total = np.sum(vectors, axis=0)
        added = stored[0]
        for other in stored[1:]:
            (added,) = connection.execute("SELECT vector_add(?, ?)", (added, other)).fetchone()
        connection.execute("CREATE TABLE v (x BLOB)")
        connection.executemany("INSERT INTO v VALUES (?)", [(s,) for s in stored])
        (summed,) = connection.execute("SELECT vector_sum(x) FROM v").fetchone()
    finally:
        connection.close()
    for result in (added, summed):
        assert vector_array(result).tolist() == total.tolist()
        assert result == vector_bytes(total)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 120).flatmap(
        lambda width: st.tuples(
            *(
                hnp.arrays(
                    np.float64,
                    width,
                    elements=st.sampled_from([0.0, 0.0, 0.0, -0.0, 1.0, -1.0, 2.5, 1e300]),
                )
                for _ in range(2)
            )
        )
    )
)
def test_vector_add_is_numpys_sum_byte_for_byte(pair: tuple[np.ndarray, np.ndarray]) -> None:
    """Signed values, so sums cancel to zero and -0.0 meets 0.0: each fast path (a few sparse
    elements merged, or added into a dense copy) stores what numpy's sum would."""
    first, second = (vector_bytes(v) for v in pair)
    expected = vector_bytes(vector_array(first) + vector_array(second))
    assert vector_add(first, second) == expected
    assert vector_add(second, first) == expected


def sparse_blob(width: int, indices: list[int], values: list[float]) -> bytes:
    return struct.pack(f"<BI{len(indices)}I{len(values)}d", 0x53, width, *indices, *values)


MALFORMED = {
    "too short": b"S\x05\x00",
    "bad magic": b"T" + sparse_blob(5, [1], [1.0])[1:],
    "torn element": sparse_blob(5, [1], [1.0])[:-2],
    "index past the width": sparse_blob(5, [5], [1.0]),
    "indices out of order": sparse_blob(5, [3, 1], [1.0, 1.0]),
    "a repeated index": sparse_blob(5, [2, 2], [1.0, 1.0]),
}


@pytest.mark.parametrize("blob", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_vectors_are_refused(connection: sqlite3.Connection, blob: bytes) -> None:
    good = vector_bytes(np.ones(5))
    with pytest.raises(ValueError):
        vector_array(blob)
    with pytest.raises(sqlite3.OperationalError):
        connection.execute("SELECT vector_add(?, ?)", (good, blob)).fetchone()
    connection.execute("CREATE TABLE v (x BLOB)")
    connection.executemany("INSERT INTO v VALUES (?)", [(good,), (blob,)])
    with pytest.raises(sqlite3.OperationalError):
        connection.execute("SELECT vector_sum(x) FROM v").fetchone()


def test_widths_differ_across_encodings() -> None:
    """A sparse vector's header carries its width, so it is checked against a dense one's; a
    sparse vector torn to a multiple of 8 bytes reads as dense, of another width, refused."""
    dense, sparse = vector_bytes(np.ones(5)), vector_bytes(np.eye(6)[0])
    with pytest.raises(ValueError, match="5 and 6"):
        vector_add(dense, sparse)
    with pytest.raises(ValueError, match="5 and 2"):
        vector_add(dense, sparse_blob(5, [1], [1.0])[:-1])
    aggregate = VectorSum()
    aggregate.step(sparse)
    with pytest.raises(ValueError, match="6 and 5"):
        aggregate.step(dense)


# --------------------------------------------------------------------------- the bound

CLASSES = 1000
MINUTES = 60
#: The documented bound (README, "Probabilistic metrics"): the blob of a class's histogram row
#: in a bucket takes 5 + 12 bytes per non-zero bin; with one row per minute, a minute's row
#: has one or two non-zero bins, and coarser buckets at most one a row.
BYTES_PER_CLASS_AND_BUCKET = 100


def test_a_wide_classifier_stores_its_histograms_by_their_non_zero_bins(
    servers: ServerFactory, tmp_path: Path
) -> None:
    """1000 classes, one row a minute for an hour: 1000 histogram rows in every minute, hour, day
    and all-time bucket, each one vector of 2 x 200 bins (3.2 KB dense), stored in < 100 bytes."""
    rng = np.random.default_rng(14)
    truth = rng.integers(0, CLASSES, MINUTES)
    scores = rng.dirichlet(np.full(CLASSES, 0.05), MINUTES)  # peaked, as a softmax is
    scores[np.arange(MINUTES), truth] += rng.random(MINUTES)  # often right, to spread the AUCs
    scores /= scores.sum(axis=1, keepdims=True)
    server = servers(
        "--storage_uri", ONE_HOT, "--state", "sqlite", "--score_range", "0,1",
        env={"STATE_DIR": str(tmp_path)},
    )
    start = (int(datetime.datetime.now(datetime.UTC).timestamp()) // 60 - MINUTES) * 60
    for minute in range(MINUTES):
        at = datetime.datetime.fromtimestamp(start + 60 * minute + 1, datetime.UTC)
        body = feedback(
            np.eye(CLASSES)[truth[minute : minute + 1]].tolist(), [scores[minute].tolist()]
        )
        send_event(server.url, body, time=at.isoformat().replace("+00:00", "Z"))
    section = requests.get(f"{server.url}/v1/metrics", params={"format": "json"}, timeout=30)
    auc = section.json()["models"]["model"]["scores"]["roc_auc"]["per_class"]
    for k in np.unique(truth).tolist():
        assert_auc_within(auc[str(k)], roc_auc_score(truth == k, scores[:, k]))
    with sqlite3.connect(f"file:{state_path(str(tmp_path))}?mode=ro", uri=True) as db:
        rows, stored, buckets = db.execute(
            "SELECT COUNT(*), SUM(LENGTH(counts)), COUNT(DISTINCT time_bucket) FROM score_histogram"
        ).fetchone()
    assert rows == CLASSES * buckets and buckets >= MINUTES + 3
    assert stored / rows < BYTES_PER_CLASS_AND_BUCKET
