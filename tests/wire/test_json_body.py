"""The fast JSON path decodes exactly what orjson + ``np.asarray`` would, or steps aside.

Every body is compared with orjson on the same bytes: tensors may come back as numpy arrays, and
then they must equal ``np.asarray`` of orjson's list (values, shape and dtype); anything numpy
would refuse (ragged rows, nested rows, mixed kinds) must come back as the plain list.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adserver.catalogue.wire import TENSOR_KEYS
from adserver.wire import json_body

PAD = "x" * json_body.SMALL_BODY_BYTES  # pushes a body onto the simdjson path


def assert_same_as_orjson(body: bytes) -> None:
    expected = orjson.loads(body)
    assert_equivalent(json_body.loads(body), expected)


def assert_equivalent(actual: Any, expected: Any) -> None:
    if isinstance(actual, np.ndarray):
        reference = np.asarray(expected)  # must not raise: numpy accepts it too
        assert actual.shape == reference.shape
        assert actual.dtype == reference.dtype
        np.testing.assert_array_equal(actual, reference)
    elif isinstance(actual, dict):
        assert isinstance(expected, dict) and list(actual) == list(expected)
        for key in actual:
            assert_equivalent(actual[key], expected[key])
    elif isinstance(actual, list):
        assert isinstance(expected, list) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_equivalent(a, e)
    else:
        assert type(actual) is type(expected) and actual == expected


def padded(document: dict[str, Any]) -> bytes:
    return orjson.dumps({**document, "pad": PAD})


numbers = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=2**63, max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=5))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)
rows = st.integers(min_value=1, max_value=6).flatmap(
    lambda width: st.lists(st.lists(numbers, min_size=width, max_size=width), min_size=1)
)
tensors = st.one_of(
    rows,  # rectangular
    st.lists(numbers, min_size=1),  # 1-D
    st.lists(st.lists(numbers, max_size=4), min_size=1),  # often ragged
    st.lists(st.one_of(numbers, st.lists(numbers, max_size=2)), min_size=1),  # nested rows
    json_values,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from([*sorted(TENSOR_KEYS), "meta", "names"]), tensors),
    st.booleans(),
)
def test_random_documents_decode_as_orjson_would(document: dict[str, Any], nest: bool) -> None:
    if nest:  # e.g. a Seldon feedback body: {"truth": {"data": {"ndarray": ...}}}
        document = {"truth": {"data": document}, "batch": [document, {"k": "[v]"}]}
    assert_same_as_orjson(padded(document))


@pytest.mark.parametrize(
    "tensor",
    [
        [[1, 0, 0], [0, 1, 0]],
        [[0.5, 0.25], [1, 2]],
        [1, 2, 3],
        [[[1], 2], [3, 4]],  # a nested row with the right counts
        [[[], [1, 2]], [3, 4]],
        [[1, 2], [3], [4, 5, 6]],  # ragged with a rectangular total
        [[1, 2], 3],
        [1, [2]],
        [[True, False], [False, True]],
        [[1, "2"], [3, 4]],
        [[2**63, 1], [1, 1]],
        [],
        [[]],
    ],
)
def test_tensors_numpy_would_refuse_stay_lists(tensor: list[Any]) -> None:
    assert_same_as_orjson(padded({"ndarray": tensor}))


def test_large_rectangular_tensors_become_numpy() -> None:
    body = padded({"ndarray": [[1, 0, 0]] * 500, "values": [0.5] * 10})
    decoded = json_body.loads(body)
    assert isinstance(decoded["ndarray"], np.ndarray) and decoded["ndarray"].dtype == np.int64
    assert decoded["ndarray"].shape == (500, 3)
    assert isinstance(decoded["values"], np.ndarray) and decoded["values"].dtype == np.float64


def test_only_tensor_keys_are_converted() -> None:
    decoded = json_body.loads(padded({"metrics": [1, 2, 3], "shape": [2, 3]}))
    assert decoded["metrics"] == [1, 2, 3] and decoded["shape"] == [2, 3]


@pytest.mark.parametrize(
    "body",
    [
        b'{"ndarray": [[1, 2]], "pad": "' + PAD.encode() + b'", "pad": 1}',  # duplicate key
        b'{"pad": "\\u005b", "ndarray": [[[1], 2], [3, 4]], "p": "' + PAD.encode() + b'"}',
        b'{"pad": "[' + PAD.encode() + b'", "ndarray": [[1, 2], [3, 4]]}',
    ],
)
def test_escapes_duplicates_and_brackets_in_strings(body: bytes) -> None:
    assert_same_as_orjson(body)


@pytest.mark.parametrize(
    "body",
    [b"[" * 2000 + b"]" * 2000, b'{"a": 1e999, "p": "' + PAD.encode() + b'"}', b"{" + PAD.encode()],
)
def test_invalid_or_extreme_bodies_get_orjsons_verdict(body: bytes) -> None:
    try:
        expected: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        with pytest.raises(orjson.JSONDecodeError):
            json_body.loads(body)
    else:
        assert_equivalent(json_body.loads(body), expected)
