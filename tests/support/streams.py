"""Random streams of predictions and labels for several models and segments, as real peers send
them: KServe V1/V2 payload-logger events, Seldon executor events, labels and direct feedback.

A stream is a list of :class:`Item` (one prediction: its model, request id, segment values,
prediction time, truth and predicted class ids, and how its label comes) and the exact HTTP
:class:`Request` of every step, in the order they are sent. Prediction times are random over
the last days, so they arrive out of order, and a label arrives days after its prediction.
:func:`generate` makes one from a seed; :func:`streams` is the hypothesis strategy over seeds.
``tests/support/oracle.py`` computes what a server must show after them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from hypothesis import strategies as st

from adserver.catalogue.wire import (
    BODY_MODEL_VERSION,
    KSERVE_REQUEST_TYPE,
    KSERVE_RESPONSE_TYPE,
    SELDON_FEEDBACK_TYPE,
    SELDON_REQUEST_TYPE,
    SELDON_RESPONSE_TYPE,
)
from tests.support.events import ce_headers

Peer = Literal["kserve_v1", "kserve_v2", "seldon"]
Kind = Literal["numeric", "binary", "one_hot"]
#: How an item's label comes: with its response (one feedback event), after the logged
#: prediction, before it (parked, then joined), or never (a prediction nobody labels).
Flow = Literal["direct", "logged_then_label", "label_then_logged", "logged_only"]
FLOWS: tuple[Flow, ...] = ("direct", "logged_then_label", "label_then_logged", "logged_only")
#: What a request is, for the oracle: a step of an item, or noise that must change no rows.
Role = Literal["request", "response", "label", "feedback", "redelivery", "ignored"]

KSERVE_SOURCE = "http://localhost:9081/"  # the agent's default: the same for every pod
OVERLONG = "x" * 65  # a segment value the server must not keep as a label value


@dataclass(frozen=True)
class ModelSpec:
    """A configured model and what its peer puts on the wire (where segment values come from)."""

    name: str
    storage_uri: str
    peer: Peer
    kind: Kind
    match: Mapping[str, str]
    segment_by: tuple[str, ...] = ()
    classes: tuple[int, ...] = ()
    threshold: float | None = None
    max_segments: int | None = None
    width: int = 3  # classes drawn from range(width)
    service: str = ""  # ce-inferenceservicename (KServe ISVC or SeldonDeployment)
    namespace: str = "default"
    component: str = "predictor"
    modelid: str = ""  # Seldon graph node
    v2_model_name: str = ""
    # Segment values drawn per dimension (None: not on the event at all).
    values: Mapping[str, tuple[str | None, ...]] = field(default_factory=dict)

    def draw_class(self, rng: random.Random) -> int:
        return rng.randrange(self.width)


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="iris",
        storage_uri="MultiClassNumeric",
        peer="kserve_v1",
        kind="numeric",
        match={"inferenceservicename": "sklearn-iris"},
        segment_by=("endpoint",),
        classes=(0, 1, 2),
        service="sklearn-iris",
        values={"endpoint": ("default", "canary", "")},
    ),
    ModelSpec(
        name="churn",
        storage_uri="BinaryMetrics",
        peer="kserve_v1",
        kind="binary",
        match={"inferenceservicename": "churn", "namespace": "crm"},
        segment_by=("annotation:rollout",),
        threshold=0.5,
        max_segments=2,  # stable, canary and __missing__: one of them overflows
        width=2,
        service="churn",
        namespace="crm",
        values={"annotation:rollout": ("stable", "canary", None)},
    ),
    ModelSpec(
        name="fraud",
        storage_uri="MultiClassNumeric",
        peer="kserve_v1",
        kind="numeric",
        match={"inferenceservicename": "fraud-detector", "component": "predictor"},
        segment_by=("endpoint", "tag:region"),
        width=4,
        service="fraud-detector",
        values={"endpoint": ("default",), "tag:region": ("eu", "us", None, OVERLONG)},
    ),
    ModelSpec(
        name="digits-v2",
        storage_uri="MultiClassNumeric",
        peer="kserve_v2",
        kind="numeric",
        match={"model_name": "digits"},
        segment_by=("model_version",),
        width=5,
        service="digits",
        v2_model_name="digits",
        values={"model_version": ("v1", "v2", None)},
    ),
    ModelSpec(
        name="classifier",
        storage_uri="MulticlassOneHot",
        peer="seldon",
        kind="one_hot",
        match={"inferenceservicename": "seldon-graph", "modelid": "classifier"},
        segment_by=("endpoint",),
        service="seldon-graph",
        namespace="seldon",
        modelid="classifier",
        values={"endpoint": ("default", "canary")},
    ),
    ModelSpec(
        name="ranker",
        storage_uri="MultiClassNumeric",
        peer="seldon",
        kind="numeric",
        match={"modelid": "ranker"},
        service="seldon-graph",
        namespace="seldon",
        modelid="ranker",
    ),
)
#: A logger event for this InferenceService matches no model: 200, ignored, no rows.
UNKNOWN_SERVICE = "not-configured"


@dataclass(frozen=True)
class Item:
    """One prediction and its label. ``time`` is the prediction time in whole microseconds
    (None: direct feedback without ce-time, counted at its arrival)."""

    index: int
    model: ModelSpec
    request_id: str
    flow: Flow
    time_us: int | None
    truth: tuple[int, ...]
    predicted: tuple[int, ...]
    # dimension -> value on the prediction's events / on the label (tags only)
    prediction_values: Mapping[str, str | None]
    label_values: Mapping[str, str | None]
    scores: tuple[Any, ...]  # the response's rows as sent (class ids or probabilities)

    @property
    def time(self) -> float | None:
        return None if self.time_us is None else self.time_us / 1e6


@dataclass(frozen=True)
class Request:
    """One HTTP request exactly as sent; ``item`` is the index of the item it belongs to."""

    path: str
    headers: Mapping[str, str]
    body: bytes
    role: Role
    item: int | None = None
    status: int = 200  # what the server must answer

    def lower_headers(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self.headers.items()}


@dataclass(frozen=True)
class Stream:
    items: tuple[Item, ...]
    requests: tuple[Request, ...]
    now: float
    models: tuple[ModelSpec, ...] = MODELS


def rfc3339(time_us: int, nanos: bool = False) -> str:
    """ce-time as Go's RFC 3339 with fractions (KServe and Seldon send nanoseconds)."""
    moment = datetime.fromtimestamp(time_us // 1_000_000, UTC)
    fraction = f"{time_us % 1_000_000:06d}" + ("000" if nanos else "")
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + fraction + "Z"


def fresh(rng: random.Random) -> str:
    """A uuid-like id drawn from the stream's own generator (a seed replays the same ids)."""
    return f"{rng.getrandbits(128):032x}"


def dump(body: Any) -> bytes:
    return json.dumps(body).encode()


# ---- payloads -------------------------------------------------------------------------------


def draw_scores(model: ModelSpec, predicted: int, rng: random.Random) -> Any:
    """A response row predicting ``predicted``: a class id, a probability, or a score row."""
    if model.kind == "numeric":
        return predicted
    if model.kind == "binary":
        threshold = model.threshold or 0.5
        low, high = (threshold, 1.0) if predicted else (0.0, threshold - 0.01)
        return round(rng.uniform(low, high), 3)  # rounding keeps the side of the threshold
    weights = [round(rng.uniform(0.0, 0.4), 3) for _ in range(model.width)]
    weights[predicted] = 0.9  # a clear argmax
    return weights


def truth_rows(item: Item) -> list[Any]:
    if item.model.kind == "one_hot":
        return [[1 if j == t else 0 for j in range(item.model.width)] for t in item.truth]
    return list(item.truth)


def truth_message(item: Item) -> dict[str, Any]:
    """The truth SeldonMessage; ``truth.meta.tags`` carries the label's tag dimensions."""
    message: dict[str, Any] = {"data": {"ndarray": truth_rows(item)}}
    tags = {
        dimension.split(":", 1)[1]: value
        for dimension, value in item.label_values.items()
        if dimension.startswith("tag:") and value is not None
    }
    if tags:
        message["meta"] = {"tags": tags}
    return message


def seldon_message(item: Item) -> dict[str, Any]:
    names = [f"t:{i}" for i in range(item.model.width)] if item.model.kind == "one_hot" else []
    return {"data": {"names": names, "ndarray": list(item.scores)}, "meta": {}}


def logged_bodies(item: Item) -> tuple[dict[str, Any], dict[str, Any]]:
    """The inference request and response bodies the logger copies verbatim."""
    rows = len(item.truth)
    features = [[round(0.1 * (i + j), 1) for j in range(4)] for i in range(rows)]
    if item.model.peer == "kserve_v1":
        return {"instances": features}, {"predictions": list(item.scores)}
    if item.model.peer == "kserve_v2":
        request = {
            "id": item.request_id,
            "inputs": [
                {"name": "input-0", "shape": [rows, 4], "datatype": "FP32", "data": features}
            ],
        }
        response = {
            "model_name": item.model.v2_model_name,
            "model_version": item.prediction_values.get("model_version"),
            "id": item.request_id,
            "parameters": None,
            "outputs": [
                {
                    "name": "predict",
                    "shape": [rows],
                    "datatype": "INT64",
                    "parameters": None,
                    "data": list(item.scores),
                }
            ],
        }
        return request, response
    return {"data": {"ndarray": features}}, seldon_message(item)


# ---- extensions -----------------------------------------------------------------------------


def annotations(values: Mapping[str, str | None]) -> dict[str, str]:
    return {
        dimension.split(":", 1)[1]: value
        for dimension, value in values.items()
        if dimension.startswith("annotation:") and value is not None
    }


def kserve_extensions(item: Item) -> dict[str, str]:
    """What the KServe agent adds to both logged events (protocols.md 2.1)."""
    model = item.model
    extensions = {
        "inferenceservicename": model.service,
        "namespace": model.namespace,
        "component": model.component,
        "endpoint": item.prediction_values.get("endpoint") or "",
        # allow-listed request headers: a request id is here, and must never become a label
        "metadata": json.dumps({"X-Request-Id": [item.request_id]}),
        "recordedtime": rfc3339((item.time_us or 0) + 9_000),  # sent after the prediction
    }
    extra = annotations(item.prediction_values)
    if extra:
        extensions["annotations"] = json.dumps(extra)
    return extensions


def seldon_extensions(item: Item) -> dict[str, str]:
    """What the Seldon executor adds to each message it logs (protocols.md 1.5)."""
    return {
        "requestid": item.request_id,
        "modelid": item.model.modelid,
        "inferenceservicename": item.model.service,
        "namespace": item.model.namespace,
        "endpoint": item.prediction_values.get("endpoint") or "default",
        "protocol": "seldon",
    }


def executor_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Header names as Go's net/http spells them (``Ce-Requestid``): names are case-blind."""
    return {name.title() if name.startswith("ce-") else name: v for name, v in headers.items()}


def seldon_source(item: Item) -> str:
    return f"http://{item.model.service}-default-0-{item.model.modelid}-7d9f-xk2p:8000/"


def routing_extensions(model: ModelSpec) -> dict[str, str]:
    """The match keys a label names its model by (the body keys are no extensions)."""
    return {k: v for k, v in model.match.items() if k not in ("model_name", "model_version")}


# ---- requests -------------------------------------------------------------------------------


def logged_requests(item: Item, rng: random.Random) -> list[Request]:
    """The logger's request and response events for one prediction."""
    assert item.time_us is not None
    request_body, response_body = logged_bodies(item)
    nanos = rng.random() < 0.5
    if item.model.peer == "seldon":
        extensions = seldon_extensions(item)
        found = []
        for kind, body, when in (
            (SELDON_REQUEST_TYPE, request_body, item.time_us - 4_000),
            (SELDON_RESPONSE_TYPE, response_body, item.time_us),
        ):
            headers = ce_headers(
                fresh(rng),  # the executor mints an id per message; requestid joins them
                source=seldon_source(item),
                event_type=kind,
                time=rfc3339(when, nanos),
                **extensions,
            )
            role: Role = "request" if kind == SELDON_REQUEST_TYPE else "response"
            found.append(Request("/", executor_headers(headers), dump(body), role, item.index))
        return found
    extensions = kserve_extensions(item)
    # curl -d without a Content-Type: KServe labels the JSON as form data on both events
    content_type = rng.choice(("application/json", "application/x-www-form-urlencoded"))
    found = []
    for kind, body, when in (
        (KSERVE_REQUEST_TYPE, request_body, item.time_us - 4_000),
        (KSERVE_RESPONSE_TYPE, response_body, item.time_us),
    ):
        headers = ce_headers(
            item.request_id,  # request and response share the inference call's ce-id
            source=KSERVE_SOURCE,
            event_type=kind,
            content_type=content_type,
            time=rfc3339(when, nanos),
            **extensions,
        )
        role = "request" if kind == KSERVE_REQUEST_TYPE else "response"
        found.append(Request("/", headers, dump(body), role, item.index))
    return found


def label_request(item: Item, rng: random.Random) -> Request:
    """Truth naming the request id: Seldon's executor logs it per graph node; a KServe user's
    labeller posts it to the model's path or as an event naming the InferenceService."""
    body: dict[str, Any] = {"truth": truth_message(item)}
    model = item.model
    if model.peer == "seldon":
        body["reward"] = 0
        headers = ce_headers(
            fresh(rng),
            source=seldon_source(item),
            event_type=SELDON_FEEDBACK_TYPE,
            **seldon_extensions(item),
        )
        return Request("/", executor_headers(headers), dump(body), "label", item.index)
    if model.peer == "kserve_v2" or rng.random() < 0.5:
        if rng.random() < 0.5:  # a plain POST: the id in a ce- header, no CloudEvent
            headers = {"Content-Type": "application/json", "ce-requestid": item.request_id}
        else:
            headers = ce_headers(fresh(rng), requestid=item.request_id)
        return Request(f"/v1/models/{model.name}", headers, dump(body), "label", item.index)
    headers = ce_headers(fresh(rng), requestid=item.request_id, **routing_extensions(model))
    return Request("/", headers, dump(body), "label", item.index)


def feedback_request(item: Item, rng: random.Random) -> Request:
    """Feedback carrying its response: its own ce-time is the prediction time (none: arrival)."""
    model = item.model
    response = (
        seldon_message(item)
        if model.kind == "one_hot"
        else {"data": {"ndarray": list(item.scores)}}
    )
    body = {"truth": truth_message(item), "response": response}
    when = {} if item.time_us is None else {"time": rfc3339(item.time_us)}
    if model.peer == "seldon":
        headers = ce_headers(
            fresh(rng),
            source=seldon_source(item),
            event_type=SELDON_FEEDBACK_TYPE,
            **seldon_extensions(item),
            **when,
        )
        return Request("/", executor_headers(headers), dump(body), "feedback", item.index)
    if model.peer == "kserve_v2":  # no V2 body to match on: the path names the model
        if item.time_us is None:
            headers = {"Content-Type": "application/json"}
        else:
            headers = ce_headers(fresh(rng), **when)
        return Request(f"/v1/models/{model.name}", headers, dump(body), "feedback", item.index)
    extensions = routing_extensions(model)
    endpoint = item.prediction_values.get("endpoint")
    if endpoint:
        extensions["endpoint"] = endpoint
    extra = annotations(item.prediction_values)
    if extra:
        extensions["annotations"] = json.dumps(extra)
    headers = ce_headers(fresh(rng), **extensions, **when)
    return Request("/", headers, dump(body), "feedback", item.index)


def item_requests(item: Item, rng: random.Random) -> list[Request]:
    """An item's steps in the order they must be sent."""
    if item.flow == "direct":
        return [feedback_request(item, rng)]
    logged = logged_requests(item, rng)
    if item.flow == "logged_only":
        return logged
    label = label_request(item, rng)
    return [*logged, label] if item.flow == "logged_then_label" else [label, *logged]


def ignored_request(rng: random.Random, time_us: int) -> Request:
    """A prediction of an InferenceService no model is configured for: 200, nothing counted."""
    headers = ce_headers(
        fresh(rng),
        source=KSERVE_SOURCE,
        event_type=KSERVE_RESPONSE_TYPE,
        time=rfc3339(time_us),
        inferenceservicename=UNKNOWN_SERVICE,
        namespace="default",
        component="predictor",
        endpoint="default",
        metadata="{}",
    )
    return Request("/", headers, dump({"predictions": [rng.randrange(3)]}), "ignored")


# ---- items ----------------------------------------------------------------------------------


def draw_item(
    index: int, model: ModelSpec, request_id: str, rng: random.Random, now_us: int, days: float
) -> Item:
    rows = rng.randint(1, 4)
    truth = tuple(model.draw_class(rng) for _ in range(rows))
    # mostly right, so accuracy is neither 0 nor 1
    predicted = tuple(t if rng.random() < 0.6 else model.draw_class(rng) for t in truth)
    flow: Flow = rng.choice(FLOWS)
    time_us: int | None = now_us - rng.randrange(1, int(days * 86400e6))
    if flow == "direct" and rng.random() < 0.25:
        time_us = None
    prediction_values: dict[str, str | None] = {}
    label_values: dict[str, str | None] = {}
    for dimension in model.segment_by:
        value = rng.choice(model.values.get(dimension, (None,)))
        if dimension.startswith("tag:"):
            label_values[dimension] = value  # tags ride on the truth
        else:
            prediction_values[dimension] = value
    if flow == "direct":  # one event carries both, but no V2 body to tell a model_version
        prediction_values = {**prediction_values, **label_values}
        if BODY_MODEL_VERSION in prediction_values:
            prediction_values[BODY_MODEL_VERSION] = None
    scores = tuple(draw_scores(model, p, rng) for p in predicted)
    return Item(
        index,
        model,
        request_id,
        flow,
        time_us,
        truth,
        predicted,
        prediction_values,
        label_values,
        scores,
    )


def interleave(groups: Sequence[list[Request]], rng: random.Random) -> list[Request]:
    """A random merge of the groups keeping each group's own order."""
    pending = [list(group) for group in groups if group]
    merged: list[Request] = []
    while pending:
        group = rng.choice(pending)
        merged.append(group.pop(0))
        if not group:
            pending.remove(group)
    return merged


def generate(
    seed: int,
    items: int = 40,
    *,
    models: Sequence[ModelSpec] = MODELS,
    now: float,
    days: float = 3.0,
    noise: float = 0.1,
) -> Stream:
    """A stream of ``items`` predictions over the last ``days``; ``noise`` is the share of extra
    requests that must count nothing (redeliveries of CloudEvents, unknown services)."""
    rng = random.Random(seed)
    now_us = int(now * 1e6)
    drawn: list[Item] = []
    for index in range(items):
        model = rng.choice(models)
        request_id = fresh(rng)
        taken = {it.request_id for it in drawn if it.model == model}
        shared = [
            it
            for it in drawn
            if model.peer == it.model.peer == "seldon" and it.request_id not in taken
        ]
        if shared and rng.random() < 0.5:
            # one prediction through a Seldon graph: each node logs it under the same puid
            request_id = rng.choice(shared).request_id
        drawn.append(draw_item(index, model, request_id, rng, now_us, days))
    sent = interleave([item_requests(item, rng) for item in drawn], rng)
    for _ in range(int(len(sent) * noise)):
        position = rng.randrange(len(sent) + 1)
        earlier = [r for r in sent[:position] if "ce-specversion" in r.lower_headers()]
        if earlier and rng.random() < 0.7:
            again = rng.choice(earlier)
            extra = Request(again.path, again.headers, again.body, "redelivery", again.item)
        else:
            extra = ignored_request(rng, now_us - rng.randrange(1, int(days * 86400e6)))
        sent.insert(position, extra)
    return Stream(tuple(drawn), tuple(sent), now, tuple(models))


def streams(now: float, models: Sequence[ModelSpec] = MODELS, max_items: int = 40) -> Any:
    """Hypothesis strategy: streams of 1..max_items predictions (shrinks by seed and size)."""
    return st.builds(
        lambda seed, size: generate(seed, size, models=models, now=now),
        st.integers(0, 2**32 - 1),
        st.integers(1, max_items),
    )
