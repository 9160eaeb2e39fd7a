"""``decode_tftensor``: the JSON form of a TensorFlow ``TensorProto``, decoded without TensorFlow.

Seldon's encoder sends base64 ``tensorContent``; hand-written protos use typed value lists
(camelCase or snake_case, int64 as strings). Whatever protobuf's own JSON parser would refuse
is a 400 naming the problem, never a silently different tensor.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from adserver.catalogue import reasons
from adserver.errors import BadRequest
from adserver.wire.shapes import MAX_EMPTY_POSITIONS
from adserver.wire.tftensor import DTYPES, MAX_FILLED_VALUES, decode_tftensor, snake_case


def dims(*sizes: int | str) -> dict[str, Any]:
    return {"dim": [{"size": str(size)} for size in sizes]}


def content(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode()


def refused(proto: Any, reason: str) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        decode_tftensor(proto)
    assert caught.value.reason == reason, caught.value.message
    return caught.value


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(DTYPES)).flatmap(
        lambda name: st.tuples(
            st.just(name),
            hnp.arrays(np.dtype(DTYPES[name]), hnp.array_shapes(min_dims=0, max_dims=3)),
        )
    )
)
def test_tensor_content_round_trips_every_dtype(case: tuple[str, np.ndarray]) -> None:
    """What ``tf.make_tensor_proto`` encodes (little-endian bytes) comes back bit for bit."""
    name, array = case
    proto = {"dtype": name, "tensorShape": dims(*array.shape), "tensorContent": content(array)}
    decoded = decode_tftensor(proto)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()


def test_seldon_example_int64_as_strings() -> None:
    """protocols.md 1.1: ``{"dtype":"DT_INT64","int64Val":["1"],"tensorShape":{"dim":[...]}}``."""
    proto = {"dtype": "DT_INT64", "int64Val": ["1"], "tensorShape": {"dim": [{"size": "1"}]}}
    decoded = decode_tftensor(proto)
    assert decoded.dtype == np.int64 and decoded.tolist() == [1]


@pytest.mark.parametrize(
    ("name", "field", "values", "expected"),
    [
        ("DT_FLOAT", "floatVal", [0.5, 1, "2"], [0.5, 1.0, 2.0]),
        ("DT_DOUBLE", "doubleVal", [0.25, -3], [0.25, -3.0]),
        ("DT_INT32", "intVal", [1, -2, 3.0], [1, -2, 3]),
        ("DT_INT8", "intVal", [-128, 127], [-128, 127]),
        ("DT_UINT8", "intVal", [0, 255], [0, 255]),
        ("DT_INT64", "int64Val", ["9223372036854775807", -1], [2**63 - 1, -1]),
        ("DT_UINT32", "uint32Val", [4294967295], [4294967295]),
        ("DT_UINT64", "uint64Val", ["18446744073709551615"], [2**64 - 1]),
        ("DT_BOOL", "boolVal", [True, False], [True, False]),
        ("DT_HALF", "halfVal", [15360, 14336], [1.0, 0.5]),  # half_val holds the bit patterns
    ],
)
def test_typed_value_lists(name: str, field: str, values: list[Any], expected: list[Any]) -> None:
    proto = {"dtype": name, "tensorShape": dims(len(values)), field: values}
    decoded = decode_tftensor(proto)
    assert decoded.dtype == np.dtype(DTYPES[name])
    assert decoded.tolist() == expected


def test_camel_and_snake_case_keys_are_the_same_proto() -> None:
    camel = {"dtype": "DT_FLOAT", "tensorShape": dims(2, 2), "floatVal": [1, 2, 3, 4]}
    snake = {"dtype": "DT_FLOAT", "tensor_shape": dims(2, 2), "float_val": [1, 2, 3, 4]}
    np.testing.assert_array_equal(decode_tftensor(camel), decode_tftensor(snake))
    assert decode_tftensor(camel).shape == (2, 2)
    assert snake_case("tensorShape") == "tensor_shape" and snake_case("int64Val") == "int64_val"


def test_one_value_fills_the_shape_as_tensorflow_does() -> None:
    decoded = decode_tftensor({"dtype": "DT_INT32", "tensorShape": dims(2, 3), "intVal": [7]})
    assert decoded.shape == (2, 3) and (decoded == 7).all()


def test_no_shape_is_a_scalar_and_no_values_an_empty_tensor() -> None:
    assert decode_tftensor({"dtype": "DT_DOUBLE", "doubleVal": [2.5]}).shape == ()
    empty = decode_tftensor({"dtype": "DT_FLOAT", "tensorShape": dims(0, 3)})
    assert empty.shape == (0, 3)
    missing_size = decode_tftensor({"dtype": "DT_FLOAT", "tensorShape": {"dim": [{}]}})
    assert missing_size.shape == (0,)  # protobuf's default size is 0


@pytest.mark.parametrize(
    ("proto", "reason"),
    [
        ([1, 2], reasons.INVALID_TFTENSOR),
        ({"dtype": "DT_STRING", "stringVal": ["YQ=="]}, reasons.INVALID_TFTENSOR),
        ({"floatVal": [1]}, reasons.INVALID_TFTENSOR),  # no dtype
        ({"dtype": "DT_FLOAT", "tensorContent": "abc"}, reasons.INVALID_TFTENSOR),
        ({"dtype": "DT_FLOAT", "tensorContent": content(np.zeros(3, "u1"))}, "invalid_tftensor"),
        ({"dtype": "DT_INT64", "int64Val": ["a"]}, reasons.INVALID_TFTENSOR),
        ({"dtype": "DT_INT64", "int64Val": [2**64]}, reasons.INVALID_TFTENSOR),
        ({"dtype": "DT_INT8", "intVal": [300]}, reasons.INVALID_TFTENSOR),
        ({"dtype": "DT_UINT8", "intVal": [-1]}, reasons.INVALID_TFTENSOR),
        ({"dtype": "DT_FLOAT", "floatVal": [1e300]}, reasons.INVALID_TFTENSOR),
        ({"dtype": "DT_HALF", "halfVal": [70000]}, reasons.INVALID_TFTENSOR),
        ({"dtype": "DT_FLOAT", "tensorShape": {"dim": {"size": 1}}}, reasons.INVALID_TFTENSOR),
        ({"dtype": "DT_FLOAT", "tensorShape": {"dim": [{"size": "x"}]}}, reasons.INVALID_TFTENSOR),
        ({"dtype": "DT_FLOAT", "tensorShape": {"dim": ["1"]}}, reasons.INVALID_TFTENSOR),
        ({"dtype": "DT_FLOAT", "tensorShape": dims(-1)}, reasons.INVALID_TFTENSOR),
        ({"dtype": "DT_FLOAT", "tensorShape": dims(0, 10**30)}, reasons.INVALID_TFTENSOR),
        (
            {"dtype": "DT_FLOAT", "tensorShape": dims(1, 3), "floatVal": [0, 1]},
            reasons.TENSOR_SHAPE_MISMATCH,
        ),
        ({"dtype": "DT_FLOAT", "tensorShape": dims(2**31, 0)}, reasons.TENSOR_TOO_LARGE),
        (
            {"dtype": "DT_FLOAT", "tensorShape": dims(MAX_FILLED_VALUES + 1), "floatVal": [1]},
            reasons.TENSOR_TOO_LARGE,
        ),
    ],
    ids=[
        "not_an_object",
        "string_dtype",
        "no_dtype",
        "content_not_base64",
        "content_not_whole_floats",
        "int64_not_a_number",
        "int64_overflow",
        "int8_overflow",
        "uint8_negative",
        "float_overflow",
        "half_bits_overflow",
        "dim_not_a_list",
        "size_not_a_number",
        "dim_not_an_object",
        "negative_size",
        "impossible_empty_shape",
        "count_mismatch",
        "many_empty_rows",
        "fill_too_large",
    ],
)
def test_refused_protos(proto: Any, reason: str) -> None:
    assert refused(proto, reason).message.startswith("tftensor")


def test_empty_rows_up_to_the_cap_are_accepted() -> None:
    proto = {"dtype": "DT_FLOAT", "tensorShape": dims(MAX_EMPTY_POSITIONS, 0)}
    assert decode_tftensor(proto).shape == (MAX_EMPTY_POSITIONS, 0)


@pytest.mark.parametrize(
    ("name", "field", "values"),
    [
        ("DT_INT32", "intVal", [1.7]),  # was decoded as 1: a label counted as another class
        ("DT_INT64", "int64Val", [2, 0.5]),
        ("DT_UINT8", "intVal", [1e20]),
        ("DT_BOOL", "boolVal", [2]),  # was decoded as True
    ],
)
def test_values_the_dtype_cannot_hold_exactly_are_refused(
    name: str, field: str, values: list[Any]
) -> None:
    """protobuf's parser refuses them ("Couldn't parse integer"); truncating miscounts."""
    refused({"dtype": name, field: values, "tensorShape": dims(len(values))}, "invalid_tftensor")


@pytest.mark.parametrize("size", [1.5, True])
def test_dimension_sizes_must_be_integers(size: Any) -> None:
    """A size of 1.5 was read as 1; protobuf refuses it (and a boolean)."""
    proto = {"dtype": "DT_FLOAT", "tensorShape": {"dim": [{"size": size}]}, "floatVal": [1]}
    refused(proto, reasons.INVALID_TFTENSOR)


def test_integral_floats_and_sizes_are_integers() -> None:
    """``3.0`` is an integer to protobuf's parser too (JSON has only numbers)."""
    proto = {"dtype": "DT_INT32", "tensorShape": {"dim": [{"size": 2.0}]}, "intVal": [3.0, 4]}
    assert decode_tftensor(proto).tolist() == [3, 4]
