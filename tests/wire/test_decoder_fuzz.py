"""Whatever a body holds, the decoders answer with the project's own errors, never a crash.

Random JSON documents and near-valid payloads (SeldonMessage ndarray/tensor/tftensor with odd
shapes, KServe V1/V2 bodies, Feedback bodies, binData/strData/jsonData) go through the same
steps as an event: ``parse_json`` (orjson or the simdjson path), the payload decoders, then every
built-in model's ``rows``/``observe`` and :func:`first_axis_rows`. The only exceptions allowed are
the ones the server maps to a 4xx (or counts as ignored); every row that could be stored must be
a JSON value (what a stored row holds).
"""

from __future__ import annotations

import base64
import json
import math
from contextlib import suppress
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adserver.errors import RequestError
from adserver.wire.cloudevents import parse_json
from adserver.wire.inference import Unscorable, prediction_payload, request_payload
from adserver.wire.json_body import SMALL_BODY_BYTES
from adserver.wire.seldon_feedback import parse_feedback
from adserver.wire.seldon_message import decode_message
from adserver.wire.tftensor import DTYPES, MAX_FILLED_VALUES, VALUE_FIELDS, decode_tftensor
from cm_models.base import InvalidFeedback, first_axis_rows
from cm_models.binary_metrics import BinaryMetrics
from cm_models.multiclass_numeric import MultiClassNumeric
from cm_models.multiclass_one_hot import MulticlassOneHot
from cm_models.seldon_adapter import SeldonMetricsAdapter

EXPECTED = (RequestError, InvalidFeedback, Unscorable)


class NoMetrics:
    """A user model that accepts anything (its own failures are ``model_rejected``)."""

    def transform(self, truth: Any, response: Any, request: Any = None) -> list[Any]:
        return []


MODELS = (
    BinaryMetrics(),
    MultiClassNumeric(),
    MulticlassOneHot(),
    SeldonMetricsAdapter(NoMetrics(), "user"),
)

# --------------------------------------------------------------------------- strategies

numbers = st.one_of(
    st.integers(min_value=-3, max_value=3),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(min_value=2**64, max_value=2**80),  # orjson turns these into floats
    st.floats(allow_nan=False, allow_infinity=False),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=4))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
sizes = st.one_of(
    st.integers(min_value=0, max_value=3),
    st.sampled_from([2**31, 2**62, 2**63 - 1, 10**30, -1]),
)
shapes = st.one_of(
    st.lists(sizes, max_size=4),
    st.lists(st.integers(min_value=0, max_value=1), min_size=60, max_size=70),  # > 64 dims
    st.lists(st.one_of(sizes, st.floats(), st.booleans(), st.text(max_size=2)), max_size=3),
)


@st.composite
def values_for(draw: st.DrawFn, shape: list[Any]) -> list[Any]:
    """Usually as many numbers as ``shape`` holds (flat or nested), else any list."""
    valid = all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    count = math.prod(shape) if valid else -1
    if not 0 <= count <= 12 or draw(st.integers(0, 4)) == 0:
        return draw(st.lists(st.one_of(numbers, json_values), max_size=5))
    flat = draw(st.lists(numbers, min_size=count, max_size=count))
    if draw(st.booleans()) or not shape or 0 in shape:
        return flat
    for size in reversed(shape[1:]):
        flat = [flat[i : i + size] for i in range(0, len(flat), size)]
    return flat


def nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


ndarrays = st.one_of(
    st.lists(st.lists(numbers, min_size=1, max_size=3), min_size=1, max_size=4),
    st.lists(numbers, min_size=1, max_size=4),
    json_values,
    st.builds(nested, st.integers(min_value=60, max_value=70), numbers),  # numpy's 64-dim limit
)
tensors = shapes.flatmap(
    lambda shape: st.fixed_dictionaries({"shape": st.just(shape), "values": values_for(shape)})
)


@st.composite
def tftensors(draw: st.DrawFn) -> dict[str, Any]:
    shape = draw(shapes)
    dtype = draw(st.one_of(st.sampled_from([*DTYPES, "DT_STRING"]), st.text(max_size=3)))
    dims = [{"size": str(d) if draw(st.booleans()) else d} for d in shape]
    proto: dict[str, Any] = {"dtype": dtype, "tensorShape": {"dim": dims}}
    if draw(st.booleans()):
        itemsize = 8 if dtype not in DTYPES else int(DTYPES[dtype][-1].replace("?", "1"))
        valid = all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        count = math.prod(shape) if valid and math.prod(shape) <= 12 else draw(st.integers(0, 4))
        content = draw(st.binary(min_size=count * itemsize, max_size=count * itemsize))
        proto["tensorContent"] = base64.b64encode(content).decode()
    else:
        field = draw(st.sampled_from(VALUE_FIELDS))
        camel = field.split("_")[0] + "".join(w.title() for w in field.split("_")[1:])
        proto[camel if draw(st.booleans()) else field] = draw(values_for(shape))
    return proto


base64_texts = st.one_of(
    st.binary(max_size=8).map(lambda raw: base64.b64encode(raw).decode()), st.text(max_size=6)
)
metrics = st.lists(
    st.fixed_dictionaries(
        {
            "key": st.one_of(st.sampled_from(["k", "x_total", "__x"]), st.text(max_size=3)),
            "type": st.sampled_from(["COUNTER", "GAUGE", "TIMER", "X"]),
            "value": st.one_of(numbers, st.text(max_size=2)),
        },
        optional={"tags": st.one_of(st.dictionaries(st.text(max_size=3), json_values), scalars)},
    ),
    max_size=3,
)
data_forms = st.one_of(
    st.fixed_dictionaries({"ndarray": ndarrays}),
    st.fixed_dictionaries({"tensor": st.one_of(tensors, json_values)}),
    st.fixed_dictionaries({"tftensor": st.one_of(tftensors(), json_values)}),
    st.dictionaries(st.sampled_from(["names", "ndarray", "tensor", "x"]), json_values, max_size=2),
    json_values,
)
messages = st.one_of(
    st.fixed_dictionaries({"data": data_forms}, optional={"meta": st.just({})}),
    st.fixed_dictionaries(
        {"data": data_forms, "meta": st.fixed_dictionaries({"metrics": metrics})}
    ),
    st.fixed_dictionaries({"binData": base64_texts}),
    st.fixed_dictionaries({"strData": st.one_of(st.text(max_size=6), json_values)}),
    st.fixed_dictionaries({"jsonData": json_values}),
    json_values,
)
feedbacks = st.fixed_dictionaries(
    {"truth": messages}, optional={"response": messages, "request": messages}
)
v2_tensors = shapes.flatmap(
    lambda shape: st.fixed_dictionaries(
        {
            "name": st.just("t"),
            "shape": st.just(shape),
            "datatype": st.sampled_from(["FP32", "INT64", "BOOL", "BYTES"]),
            "data": values_for(shape),
        }
    )
)
kserve = st.one_of(
    st.dictionaries(st.sampled_from(["predictions", "instances"]), ndarrays, min_size=1),
    st.dictionaries(
        st.sampled_from(["outputs", "inputs"]),
        st.one_of(st.lists(v2_tensors, min_size=1, max_size=2), json_values),
        min_size=1,
    ),
)
documents = st.one_of(feedbacks, messages, kserve, json_values)

# --------------------------------------------------------------------------- the pipeline


def body_of(document: Any, padded: bool) -> bytes:
    """JSON text of ``document``; padded bodies take json_body's simdjson path."""
    if padded and isinstance(document, dict):
        document = {**document, "pad": "x" * SMALL_BODY_BYTES}
    return json.dumps(document).encode()


def storable(rows: list[Any]) -> None:
    """A stored row is one JSON document."""
    for row in rows:
        orjson.dumps(row)


def bounded(values: Any) -> None:
    """A decoded array holds no more positions than the values sent or the documented caps.

    An empty array's rows (``[n, 0]`` is n of them) cost the server as much as full ones.
    """
    if isinstance(values, np.ndarray):
        shape = values.shape
        positions = math.prod(shape[: shape.index(0)] if 0 in shape else shape)
        assert positions <= MAX_FILLED_VALUES, shape


def through_models(values: Any, what: str) -> None:
    """As a label's truth or a logged prediction: each model's rows, then the stored rows."""
    bounded(values)
    for model in MODELS:
        with suppress(*EXPECTED):
            storable(first_axis_rows(model.rows(values, what)))
    with suppress(*EXPECTED):
        storable(first_axis_rows(values))


def as_feedback(document: Any) -> None:
    feedback = parse_feedback(document)
    for what in ("truth", "response", "request"):
        if getattr(feedback, what) is not None:
            through_models(getattr(feedback, what), what)
    if feedback.response is not None:
        for model in MODELS:
            with suppress(*EXPECTED):
                model.observe(feedback.truth, feedback.response, feedback.request)


def as_logged(document: Any) -> None:
    for extract, what in ((prediction_payload, "response"), (request_payload, "request")):
        with suppress(*EXPECTED):
            through_models(extract(document), what)


def as_parts(document: Any) -> None:
    """The decoders called directly, as a part of a message could reach them."""
    for decode in (lambda d: decode_message(d, "truth"), decode_tftensor):
        with suppress(*EXPECTED):
            through_models(decode(document), "truth")


def decode_everything(body: bytes) -> None:
    try:
        document = parse_json(body)
    except RequestError:
        return
    for step in (as_feedback, as_logged, as_parts):
        with suppress(*EXPECTED):
            step(document)


FUZZ = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# The bugs this test found (issue 11), kept as fixed examples.
TENSOR_65_DIMS = {"data": {"tensor": {"shape": [1] * 65, "values": [1]}}}
TENSOR_EMPTY_HUGE = {"data": {"tensor": {"shape": [0, 2**62], "values": []}}}
V2_EMPTY_HUGE = {"outputs": [{"name": "t", "shape": [0, 2**62], "datatype": "FP32", "data": []}]}
EMPTY_ROWS = {"inputs": [{"name": "t", "shape": [2**31, 0], "datatype": "FP32", "data": []}]}
BIN_DATA = {"binData": base64.b64encode(b"\x89PNG").decode()}


@pytest.mark.filterwarnings("error::RuntimeWarning")  # e.g. a silent overflow to infinity
@FUZZ
@given(documents, st.booleans())
@example(TENSOR_65_DIMS, False)
@example({"truth": TENSOR_EMPTY_HUGE}, True)
@example(V2_EMPTY_HUGE, False)
@example(EMPTY_ROWS, False)
@example({"truth": {"data": {"tensor": {"shape": [2**31, 0], "values": []}}}}, False)
@example(BIN_DATA, False)  # a logged request of an image model
@example({"truth": BIN_DATA}, False)  # a label: the user model's rows
def test_decoders_raise_only_request_errors(document: Any, padded: bool) -> None:
    decode_everything(body_of(document, padded))


@pytest.mark.filterwarnings("error::RuntimeWarning")
@settings(max_examples=300, deadline=None)
@given(tensors, tftensors())
def test_tensors_raise_only_request_errors(tensor: dict[str, Any], proto: dict[str, Any]) -> None:
    """Odd shapes reach every tensor decoder: Seldon ``tensor``, ``tftensor`` and KServe V2."""
    decode_everything(body_of({"data": {"tensor": tensor}}, False))
    decode_everything(body_of({"data": {"tftensor": proto}}, False))
    v2 = {"name": "t", "datatype": "FP32", "shape": tensor["shape"], "data": tensor["values"]}
    decode_everything(body_of({"outputs": [v2]}, False))
    decode_everything(body_of({"inputs": [v2]}, True))
