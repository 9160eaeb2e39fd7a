"""CloudEvents over HTTP: decode any content mode into events, encode reply events.

This is the HTTP binding, pure (no I/O, no tornado): a transport hands its headers and body to
:func:`decode_request` and gets :class:`IncomingEvent` objects, which the ingest core takes
whatever the transport; a reply is a :class:`ReplyEvent` until :func:`binary_headers` spells it
for HTTP.

The receiver picks the mode from Content-Type (batched, structured) and the ``ce-specversion``
header (binary), as the HTTP binding says; anything else is a plain JSON POST. Attributes are
validated by the ``cloudevents`` SDK 2.x core; data is parsed here with orjson, whatever the
Content-Type claims (KServe labels JSON as form data), and NaN/Infinity are refused.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any
from urllib.parse import quote, unquote

import orjson
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.v1.event import CloudEvent

from adserver.catalogue import reasons
from adserver.catalogue.wire import (
    CE_PREFIX,
    CE_SPECVERSION,
    CONTENT_TYPE_CE_BATCH,
    CONTENT_TYPE_CE_STRUCTURED,
    CONTENT_TYPE_JSON,
    CORRELATION_EXTENSIONS,
    HEADER_SELDON_PUID,
)
from adserver.errors import BadRequest
from adserver.wire import json_body

REQUIRED_ATTRIBUTES = ("id", "source", "type")
ATTRIBUTE_NAME = re.compile(r"^[a-z0-9]+$")
HEADER_SAFE_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
HEADER_SAFE = re.compile(f"[{re.escape(HEADER_SAFE_CHARS)}]*")


@dataclass(frozen=True)
class IncomingEvent:
    """One event's attributes (empty for a plain POST) and its parsed JSON data.

    A binary event whose body is not JSON keeps the parse error (and, in ``raw``, the body)
    instead of failing at once: a logged inference may legitimately carry raw bytes, feedback
    never does, and a Knative KafkaSource delivers a record's Avro value as is. ``puid`` is the
    Seldon-Puid the transport carried beside the event (a header, not an attribute), which a
    label may be joined by.
    """

    attributes: Mapping[str, Any]
    data: Any
    error: BadRequest | None = None
    puid: str | None = None
    raw: bytes | None = None

    def payload(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.data

    @property
    def is_cloudevent(self) -> bool:
        return "specversion" in self.attributes

    @property
    def key(self) -> tuple[str, str] | None:
        """The deduplication key (source, id); None for a plain POST."""
        if not self.is_cloudevent:
            return None
        return (str(self.attributes["source"]), str(self.attributes["id"]))


def parse_json(body: bytes | str, what: str = "body") -> Any:
    if not body:
        raise BadRequest(f"{what} is empty", reasons.EMPTY_BODY)
    try:
        return json_body.loads(body)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith(json_body.DEPTH_LIMIT_ERROR):  # valid JSON, but nested too deep
            raise BadRequest(f"{what} nests too deep: {exc}", reasons.TOO_DEEP) from exc
        raise BadRequest(f"{what} is not valid JSON: {exc}", reasons.INVALID_JSON) from exc


def media_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def decode_request(headers: Mapping[str, str], body: bytes) -> list[IncomingEvent]:
    """All events in one HTTP request. ``headers`` has lower-case names."""
    kind = media_type(headers)
    puid = headers.get(HEADER_SELDON_PUID)
    if kind.startswith(CONTENT_TYPE_CE_BATCH):
        batch = parse_json(body)
        if not isinstance(batch, list) or not batch:
            raise BadRequest(
                "a CloudEvents batch must be a non-empty JSON array", reasons.INVALID_BATCH
            )
        return [structured_event(item, puid) for item in batch]
    if kind.startswith(CONTENT_TYPE_CE_STRUCTURED):
        return [structured_event(parse_json(body), puid)]
    if CE_PREFIX + "specversion" in headers:
        return [binary_event(headers, body)]
    extensions = {k[len(CE_PREFIX) :]: v for k, v in headers.items() if k.startswith(CE_PREFIX)}
    return [IncomingEvent(attributes=extensions, data=parse_json(body), puid=puid)]


def supported_version(specversion: Any) -> None:
    """Knative and both payload loggers speak 1.0; anything else is refused the same way."""
    if specversion != CE_SPECVERSION:
        raise BadRequest(
            f"CloudEvents specversion {specversion!r} is not supported (expected 1.0)",
            reasons.UNSUPPORTED_SPECVERSION,
        )


def binary_event(
    headers: Mapping[str, str],
    body: bytes,
    prefix: str = CE_PREFIX,
    percent_encoded: bool = True,
) -> IncomingEvent:
    """Attributes from ``ce-*`` headers (percent-decoded), data from the body.

    Decoded here rather than by the SDK's ``from_binary``: this is the hot path, and the SDK
    builds and re-validates an object per event that we discard. The Kafka binding names its
    headers ``ce_*`` and does not percent-encode them (``prefix``, ``percent_encoded``).
    """
    attributes: dict[str, Any] = {}
    for name, value in headers.items():
        if name.startswith(prefix):
            attribute = name[len(prefix) :]
            if not ATTRIBUTE_NAME.match(attribute):
                raise BadRequest(
                    f"invalid CloudEvent attribute name {attribute!r} (only a-z and 0-9)",
                    reasons.INVALID_CLOUDEVENT,
                )
            attributes[attribute] = unquote(value) if percent_encoded and "%" in value else value
    missing = [a for a in REQUIRED_ATTRIBUTES if not attributes.get(a)]
    if missing:
        raise BadRequest(
            f"binary CloudEvent lacks {', '.join(prefix + a for a in missing)}",
            reasons.INVALID_CLOUDEVENT,
        )
    supported_version(attributes["specversion"].strip())
    if "time" in attributes:
        attributes["time"] = parse_time(attributes["time"])
    if "content-type" in headers:
        attributes["datacontenttype"] = headers["content-type"]
    puid = headers.get(HEADER_SELDON_PUID)
    try:
        return IncomingEvent(attributes=attributes, data=parse_json(body), puid=puid)
    except BadRequest as error:
        return IncomingEvent(attributes=attributes, data=None, error=error, puid=puid, raw=body)


def parse_time(value: str) -> datetime:
    """RFC 3339 ``time`` (nanoseconds are truncated to microseconds)."""
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise BadRequest(
            f"ce-time {value!r} is not an RFC 3339 time", reasons.INVALID_CLOUDEVENT
        ) from exc


def structured_event(document: Any, puid: str | None = None) -> IncomingEvent:
    if not isinstance(document, dict):
        raise BadRequest(
            "a structured CloudEvent must be a JSON object", reasons.INVALID_CLOUDEVENT
        )
    attributes = {k: v for k, v in document.items() if k not in ("data", "data_base64")}
    missing = [a for a in (*REQUIRED_ATTRIBUTES, "specversion") if not attributes.get(a)]
    if missing:
        raise BadRequest(f"CloudEvent lacks {', '.join(missing)}", reasons.INVALID_CLOUDEVENT)
    supported_version(attributes["specversion"])
    try:
        CloudEvent(attributes={k: v for k, v in attributes.items() if k != "time"})
    except (BaseCloudEventException, ValueError, TypeError) as exc:
        raise BadRequest(
            f"invalid CloudEvent attributes: {exc}", reasons.INVALID_CLOUDEVENT
        ) from exc
    return IncomingEvent(attributes=attributes, data=structured_data(document), puid=puid)


def structured_data(document: dict[str, Any]) -> Any:
    if "data_base64" in document:
        try:
            raw = base64.b64decode(document["data_base64"], validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise BadRequest("data_base64 is not valid base64", reasons.INVALID_CLOUDEVENT) from exc
        return parse_json(raw, "data_base64")
    data = document.get("data")
    return parse_json(data, "data") if isinstance(data, str) else data


@dataclass(frozen=True)
class ReplyEvent:
    """A reply CloudEvent before any binding: string attributes, and JSON data."""

    attributes: Mapping[str, str]
    data: bytes

    @cached_property
    def binary_headers(self) -> dict[str, str]:
        """Its HTTP binary-mode headers, spelled once for the answer and the queued reply."""
        return binary_headers(self.attributes)


def reply_event(
    incoming: IncomingEvent, event_type: str, event_source: str, data: bytes
) -> ReplyEvent:
    """The reply to an event: same id, configured type and source, correlation extensions only.

    Knative-internal extensions are not copied, and the type differs from the Trigger's filter,
    so a reply never loops back into this server.
    """
    attributes = {
        "specversion": CE_SPECVERSION,
        "id": str(incoming.attributes.get("id") or uuid.uuid4()),
        "type": event_type,
        "source": event_source,
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
    for name in CORRELATION_EXTENSIONS:
        if name in incoming.attributes:
            attributes[name] = attribute_text(incoming.attributes[name])
    return ReplyEvent(attributes, data)  # JSON data, encoded by the caller


def binary_headers(attributes: Mapping[str, str]) -> dict[str, str]:
    """The HTTP binary-mode headers of a reply's attributes (its data is JSON)."""
    headers = {CE_PREFIX + name: encode_header(value) for name, value in attributes.items()}
    headers["content-type"] = CONTENT_TYPE_JSON
    return headers


def attribute_text(value: Any) -> str:
    """CloudEvents' canonical string of an attribute (a JSON ``true`` is ``true``, not ``True``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def encode_header(value: str) -> str:
    """Percent-encode as the HTTP binding asks (space, quote, percent, non-printable ASCII).

    Written here rather than via the SDK's ``to_binary`` (which builds and validates an event
    object first): replies are on the hot path. Both SDKs parse these replies (tests).
    """
    return value if HEADER_SAFE.fullmatch(value) else quote(value, safe=HEADER_SAFE_CHARS)
