"""``decode_message``: every SeldonMessage payload form, as Seldon's ``extract_request_parts``.

``data.ndarray`` / ``data.tensor`` / ``data.tftensor`` become numpy arrays (``names`` ignored);
``jsonData`` and ``strData`` pass through as sent, ``binData`` as the decoded bytes.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adserver.catalogue import reasons
from adserver.errors import BadRequest
from adserver.wire import json_body
from adserver.wire.seldon_message import decode_message
from tests.support.events import ndarray, tensor, tftensor_content


def refused(message: Any, reason: str) -> str:
    with pytest.raises(BadRequest) as caught:
        decode_message(message, "truth")
    assert caught.value.reason == reason, caught.value.message
    return caught.value.message


def test_ndarray_as_in_the_seldon_feedback_example() -> None:
    message = {
        "data": {"names": ["t:0", "t:1", "t:2"], "ndarray": [[0.0007, 0.0037, 0.9956]]},
        "meta": {"requestPath": {"classifier": "seldonio/sklearnserver:1.5.0"}},
    }
    decoded = decode_message(message, "response")
    assert decoded.shape == (1, 3) and decoded.dtype == np.float64
    assert decoded.tolist() == [[0.0007, 0.0037, 0.9956]]


def test_ndarray_keeps_what_numpy_makes_of_it() -> None:
    """Strings and 1-D lists reach the model as Seldon hands them over; the model judges."""
    assert decode_message(ndarray([0, 0, 1]), "truth").shape == (3,)
    assert decode_message(ndarray([["a", "b"]]), "truth").dtype.kind == "U"


def test_an_ndarray_from_the_fast_json_path_is_used_as_it_is() -> None:
    array = np.array([[1, 0], [0, 1]])
    assert decode_message(ndarray(array), "truth") is array


def test_tensor_is_reshaped() -> None:
    decoded = decode_message(tensor([2, 3], [0, 0, 1, 0, 1, 0]), "truth")
    assert decoded.tolist() == [[0, 0, 1], [0, 1, 0]]


def test_the_executors_empty_tensor_reply() -> None:
    """``{"data":{"tensor":{"shape":[0]}}}``: no values at all is an empty tensor."""
    assert decode_message({"data": {"tensor": {"shape": [0]}}}, "response").shape == (0,)


def test_tftensor_as_seldons_encoder_makes_it() -> None:
    array = np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    decoded = decode_message(tftensor_content(array), "response")
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"jsonData": {"any": ["json", 1]}}, {"any": ["json", 1]}),
        ({"strData": "some text"}, "some text"),
        ({"binData": base64.b64encode(b"\x89PNG").decode()}, b"\x89PNG"),
        ({"strData": "s", "meta": {"puid": "p"}}, "s"),
    ],
    ids=["jsonData", "strData", "binData", "with_meta"],
)
def test_other_payloads_pass_through(message: dict[str, Any], expected: Any) -> None:
    assert decode_message(message, "truth") == expected


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ([[0, 0, 1]], reasons.INVALID_MESSAGE),
        ({"meta": {"tags": {"a": "b"}}}, reasons.MISSING_DATA),
        ({"data": [[0, 0, 1]]}, reasons.INVALID_MESSAGE),
        ({"data": {"names": ["t:0"]}}, reasons.UNKNOWN_DATA_FORM),
        ({"data": {"ndarray": 1}}, reasons.INVALID_NDARRAY),
        ({"data": {"ndarray": "[1]"}}, reasons.INVALID_NDARRAY),
        (ndarray([[0, 1], [1]]), reasons.RAGGED_ROWS),
        (ndarray(json.loads("[" * 70 + "1" + "]" * 70)), reasons.TOO_DEEP),
        ({"data": {"tensor": [1, 2]}}, reasons.INVALID_TENSOR),
        (tensor([2, 3], [0, 0, 1]), reasons.TENSOR_SHAPE_MISMATCH),
        ({"data": {"tftensor": {"dtype": "DT_STRING"}}}, reasons.INVALID_TFTENSOR),
        ({"binData": "!!not base64"}, reasons.INVALID_MESSAGE),
        ({"binData": 12}, reasons.INVALID_MESSAGE),
        ({"binData": "é"}, reasons.INVALID_MESSAGE),
    ],
    ids=[
        "not_an_object",
        "no_data",
        "data_not_an_object",
        "names_only",
        "ndarray_scalar",
        "ndarray_string",
        "ragged",
        "too_deep",
        "tensor_not_an_object",
        "tensor_count",
        "tftensor_strings",
        "bin_data_not_base64",
        "bin_data_a_number",
        "bin_data_not_ascii",
    ],
)
def test_refused_messages(message: Any, reason: str) -> None:
    refused(message, reason)


def test_errors_name_the_part_of_the_body() -> None:
    assert refused({"data": {"ndarray": 1}}, reasons.INVALID_NDARRAY).startswith("truth.data")
    with pytest.raises(BadRequest, match=r"^request\.data\.tensor"):
        decode_message(tensor([-1], [1]), "request")


rows = st.integers(min_value=1, max_value=5).flatmap(
    lambda width: st.lists(
        st.lists(
            st.one_of(
                st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False)
            ),
            min_size=width,
            max_size=width,
        ),
        min_size=1,
        max_size=400,
    )
)


@settings(max_examples=100, deadline=None)
@given(rows, st.booleans())
def test_the_fast_json_path_decodes_the_same_array(values: list[list[Any]], padded: bool) -> None:
    """A body parsed by simdjson (big) or orjson (small) gives the model the same array."""
    body = {"truth": ndarray(values), "pad": "x" * (json_body.SMALL_BODY_BYTES if padded else 0)}
    decoded = decode_message(json_body.loads(json.dumps(body))["truth"], "truth")
    expected = np.asarray(values)
    assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
    np.testing.assert_array_equal(decoded, expected)
