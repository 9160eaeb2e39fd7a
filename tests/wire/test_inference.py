"""Logged inference payloads: KServe V1 ``instances``/``predictions``, V2 ``inputs``/``outputs``
and Seldon messages, down to the tensor whose first axis is the batch.

Payloads with no rows to store (``BYTES`` tensors, ``binData``) are :class:`Unscorable`: the
server acknowledges and counts them instead of answering 400.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adserver.catalogue import reasons
from adserver.errors import BadRequest
from adserver.wire.inference import Unscorable, prediction_payload, request_payload
from tests.support.events import ndarray

#: protocols.md 2.3.
V2_REQUEST = {
    "id": "42",
    "parameters": {},
    "inputs": [
        {
            "name": "input-0",
            "shape": [2, 4],
            "datatype": "FP32",
            "data": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]],
        }
    ],
    "outputs": [{"name": "predict"}],
}
V2_RESPONSE = {
    "model_name": "iris-classifier",
    "model_version": None,
    "id": "823248cc",
    "outputs": [
        {"name": "predict", "shape": [2], "datatype": "FP32", "parameters": None, "data": [1, 2]}
    ],
}


def v2(data: Any, shape: Any, datatype: str = "FP32", name: str = "t") -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def test_v1_bodies_give_their_values_as_sent() -> None:
    instances = [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]
    assert request_payload({"instances": instances}) == instances
    assert prediction_payload({"predictions": [1, 1]}) == [1, 1]


def test_v2_bodies_are_shaped_as_declared() -> None:
    """The request carries ``outputs`` too (the outputs asked for): a request reads ``inputs``."""
    assert request_payload(V2_REQUEST).shape == (2, 4)
    assert prediction_payload(V2_RESPONSE).tolist() == [1, 2]


def test_flat_v2_data_is_row_major() -> None:
    body = {"outputs": [v2([0.1, 0.9, 0.8, 0.2], [2, 2])]}
    assert prediction_payload(body).tolist() == [[0.1, 0.9], [0.8, 0.2]]


def test_only_the_first_v2_tensor_counts() -> None:
    body = {"outputs": [v2([1, 0], [2], "INT64"), v2(["a", "b"], [2], "BYTES")]}
    assert prediction_payload(body).tolist() == [1, 0]


@pytest.mark.parametrize(
    ("datatype", "data", "kind"),
    [("FP32", [0.5, 1.5], "f"), ("INT64", [1, 2], "i"), ("BOOL", [True, False], "b")],
)
def test_v2_datatypes(datatype: str, data: list[Any], kind: str) -> None:
    assert prediction_payload({"outputs": [v2(data, [2], datatype)]}).dtype.kind == kind


def test_a_seldon_response() -> None:
    assert prediction_payload(ndarray([[0.1, 0.9]])).shape == (1, 2)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"outputs": [v2(["cat", "dog"], [2], "BYTES")]}, reasons.BYTES_TENSOR),
        ({"binData": "iVBORw=="}, reasons.BIN_DATA),
    ],
)
def test_payloads_without_rows_are_unscorable(body: dict[str, Any], reason: str) -> None:
    with pytest.raises(Unscorable) as caught:
        prediction_payload(body)
    assert str(caught.value) == reason


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([1, 1], reasons.INVALID_BODY),
        ({"outputs": []}, reasons.INVALID_V2),
        ({"outputs": {"name": "t"}}, reasons.INVALID_V2),
        ({"outputs": [[1, 2]]}, reasons.INVALID_V2),
        ({"outputs": [{"name": "t", "shape": [2], "datatype": "FP32"}]}, reasons.INVALID_TENSOR),
        ({"outputs": [v2([1, 2], [2.0])]}, reasons.INVALID_TENSOR),
        ({"outputs": [v2([[1], [2, 3]], [2])]}, reasons.INVALID_TENSOR),
        ({"outputs": [v2([1, 2, 3], [2, 2])]}, reasons.TENSOR_SHAPE_MISMATCH),
        ({"outputs": [v2([], [2**31, 0])]}, reasons.TENSOR_TOO_LARGE),
        ({"model_name": "m"}, reasons.MISSING_DATA),
    ],
    ids=[
        "not_an_object",
        "no_tensors",
        "tensors_not_a_list",
        "tensor_not_an_object",
        "no_data",
        "float_shape",
        "ragged",
        "count_mismatch",
        "many_empty_rows",
        "nothing_to_score",
    ],
)
def test_refused_payloads(body: Any, reason: str) -> None:
    with pytest.raises(BadRequest) as caught:
        prediction_payload(body)
    assert caught.value.reason == reason, caught.value.message


def test_errors_say_which_side() -> None:
    with pytest.raises(BadRequest, match=r"^inputs must be"):
        request_payload({"inputs": []})
    with pytest.raises(BadRequest, match=r"^a logged request"):
        request_payload("x")


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=3).flatmap(
        lambda shape: st.tuples(
            st.just(shape),
            st.lists(
                st.floats(allow_nan=False, allow_infinity=False, width=32),
                min_size=int(np.prod(shape)),
                max_size=int(np.prod(shape)),
            ),
        )
    )
)
def test_v2_flat_and_nested_data_are_one_tensor(case: tuple[list[int], list[float]]) -> None:
    shape, flat = case
    nested = np.asarray(flat).reshape(shape).tolist()
    outputs = prediction_payload({"outputs": [v2(flat, shape)]})
    inputs = request_payload({"inputs": [v2(nested, shape)]})
    assert outputs.shape == tuple(shape)
    np.testing.assert_array_equal(outputs, inputs)
