"""``shaped``: values plus a declared shape (Seldon ``tensor``, KServe V2), checked one way."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adserver.catalogue import reasons
from adserver.errors import BadRequest
from adserver.wire.shapes import MAX_EMPTY_POSITIONS, shaped

small_shapes = st.lists(st.integers(min_value=0, max_value=4), max_size=4)
numbers = st.one_of(st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False))


def refused(values: Any, shape: Any, reason: str, *, flat: bool = False) -> str:
    with pytest.raises(BadRequest) as caught:
        shaped(values, shape, "truth.data.tensor", flat=flat)
    assert caught.value.reason == reason, caught.value.message
    return caught.value.message


@given(
    small_shapes.flatmap(
        lambda s: st.tuples(
            st.just(s), st.lists(numbers, min_size=math.prod(s), max_size=math.prod(s))
        )
    )
)
def test_flat_values_take_the_declared_shape(case: tuple[list[int], list[Any]]) -> None:
    """Row-major: the array has the shape and, read flat, the values as sent."""
    shape, values = case
    array = shaped(values, shape, "t", flat=True)
    assert array.shape == tuple(shape)
    assert array.ravel().tolist() == np.asarray(values).tolist()


@given(small_shapes.filter(lambda s: len(s) > 1 and 0 not in s), st.data())
def test_nested_values_equal_their_flat_form(shape: list[int], data: st.DataObject) -> None:
    """V2 ``data`` may be flat or nested: both give the same tensor."""
    flat = data.draw(st.lists(numbers, min_size=math.prod(shape), max_size=math.prod(shape)))
    nested = np.asarray(flat).reshape(shape).tolist()
    np.testing.assert_array_equal(shaped(nested, shape, "t"), shaped(flat, shape, "t"))


def test_numpy_values_from_the_fast_json_path_are_reshaped_too() -> None:
    array = shaped(np.arange(6), [2, 3], "t", flat=True)
    assert array.shape == (2, 3) and array[1].tolist() == [3, 4, 5]


@pytest.mark.parametrize(
    "shape", [None, 3, "2,3", [2, -1], [2.0, 3], [True, 3], [[2], 3]], ids=repr
)
def test_a_shape_is_a_list_of_sizes(shape: Any) -> None:
    message = refused([1, 2, 3, 4, 5, 6], shape, reasons.INVALID_TENSOR)
    assert message == "truth.data.tensor.shape must be a list of sizes"


@pytest.mark.parametrize("values", [None, 1, "123", {"0": 1}], ids=repr)
def test_values_are_a_list(values: Any) -> None:
    refused(values, [1], reasons.INVALID_TENSOR)


def test_ragged_and_nested_values() -> None:
    assert "ragged" in refused([[1], [2, 3]], [3], reasons.INVALID_TENSOR)
    assert "flat" in refused([[1, 2]], [1, 2], reasons.INVALID_TENSOR, flat=True)


def test_a_count_that_does_not_fill_the_shape() -> None:
    message = refused([0, 0, 1], [2, 3], reasons.TENSOR_SHAPE_MISMATCH)
    assert message == "truth.data.tensor has 3 values for shape [2, 3]"


def test_more_than_numpys_dimensions() -> None:
    refused([1], [1] * 65, reasons.INVALID_TENSOR)
    assert shaped([1], [1] * 64, "t").ndim == 64


def test_empty_rows_are_capped() -> None:
    """``[n, 0]`` is n rows of nothing: each costs a stored row, so n is bounded."""
    assert shaped([], [MAX_EMPTY_POSITIONS, 0], "t").shape == (MAX_EMPTY_POSITIONS, 0)
    refused([], [MAX_EMPTY_POSITIONS + 1, 0], reasons.TENSOR_TOO_LARGE)
    refused([], [0, 2**62], reasons.INVALID_TENSOR)  # no rows, but more than numpy can hold
