"""Events from the real CloudEvents SDKs are counted; our replies parse with the same SDKs.

Senders build events with the Python ``cloudevents`` SDK (2.x core API) or the npm
``cloudevents`` SDK (tests/node), in binary and structured mode, the Node ones also with a
chunked body. Both SDKs must accept the server's reply event, in the HTTP response and as
POSTed to the reply sink, with the right id, type, source, extension and data.

Without node or the npm module (``cd tests/node && npm install``) the Node tests skip on a
developer machine and fail in CI (CI=true).
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cloudevents.core.bindings.http import (
    HTTPMessage,
    from_http_event,
    to_binary_event,
    to_structured_event,
)
from cloudevents.core.v1.event import CloudEvent

from tests.prometheus import require, require_program
from tests.support.events import FEEDBACK_TYPE, REPLY_SOURCE, REPLY_TYPE, feedback, new_id
from tests.support.http import Progress, model_doc, progress, reply_data, send_event
from tests.support.processes import MULTICLASS_NUMERIC, REPLY_FLAGS, ServerFactory
from tests.support.sink import Sink

pytestmark = pytest.mark.e2e

NODE_DIR = Path(__file__).resolve().parent / "node"
# Dict data: the Python SDK 2.x serialises list data with str(), so lists are not sent bare.
BODY = feedback([[1], [2], [0]], [[1], [0], [0]])
COUNTED = Progress(events=1, rows=3, cells=Counter({(1, 1): 1, (2, 0): 1, (0, 0): 1}))
EXTENSION = {"modelid": "classifier"}  # a correlation extension the reply must carry back


@dataclass(frozen=True)
class Served:
    """The module's server and the sink its replies are POSTed to."""

    url: str
    sink: Sink


@pytest.fixture(scope="module")
def served(module_servers: ServerFactory) -> Iterator[Served]:
    with Sink() as sink:
        url = module_servers(
            "--state",
            "memory",
            "--storage_uri",
            MULTICLASS_NUMERIC,
            "--reply_url",
            sink.url,
            *REPLY_FLAGS,
        ).url
        yield Served(url, sink)


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, once tests/node has the npm ``cloudevents`` module installed."""
    binary = require_program("node", "install Node.js 18 or later")
    module = NODE_DIR / "node_modules" / "cloudevents"
    require(
        "npm module cloudevents",
        str(module) if module.is_dir() else None,
        "cd tests/node && npm install",
    )
    return binary


def run_node(node: str, script: str, *args: str, stdin: str | None = None) -> dict[str, Any]:
    """Run tests/node/<script> and return the JSON it prints."""
    result = subprocess.run(
        [node, str(NODE_DIR / script), *args],
        input=stdin,
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, f"{script} failed: {result.stderr}"
    return json.loads(result.stdout)


def node_send(node: str, url: str, mode: str, transport: str, event_id: str) -> dict[str, Any]:
    """POST a feedback event built by the npm SDK; its reply as parsed by ``HTTP.toEvent``."""
    attributes = {
        "id": event_id,
        "type": FEEDBACK_TYPE,
        "source": "tests/node",
        "datacontenttype": "application/json",
        **EXTENSION,
    }
    return run_node(
        node, "send.mjs", url, mode, transport, json.dumps({**attributes, "data": BODY})
    )


def python_event(event_id: str, data: dict[str, Any] | bytes = BODY) -> CloudEvent:
    """A feedback event; bytes data goes out as ``data_base64`` in structured mode."""
    attributes = {
        "id": event_id,
        "type": FEEDBACK_TYPE,
        "source": "tests/python",
        "datacontenttype": "application/json",
        **EXTENSION,
    }
    return CloudEvent(attributes=attributes, data=data)


def assert_python_reply(event: CloudEvent, event_id: str, doc: Mapping[str, Any]) -> None:
    assert event.get_id() == event_id
    assert event.get_type() == REPLY_TYPE
    assert event.get_source() == REPLY_SOURCE
    assert event.get_extension("modelid") == EXTENSION["modelid"]
    assert event.get_data() == reply_data(doc)


def assert_node_reply(event: Mapping[str, Any], event_id: str, doc: Mapping[str, Any]) -> None:
    assert event["specversion"] == "1.0"
    assert (event["id"], event["type"], event["source"]) == (event_id, REPLY_TYPE, REPLY_SOURCE)
    assert event["modelid"] == EXTENSION["modelid"]
    assert event["data"] == reply_data(doc)


PythonCase = tuple[Callable[[CloudEvent], HTTPMessage], dict[str, Any] | bytes]
PYTHON_CASES: dict[str, PythonCase] = {
    "binary": (to_binary_event, BODY),
    "structured": (to_structured_event, BODY),
    "structured data_base64": (to_structured_event, json.dumps(BODY).encode()),
}


@pytest.mark.parametrize("case", PYTHON_CASES.values(), ids=PYTHON_CASES.keys())
def test_python_sdk_event_is_counted_and_the_reply_parses(served: Served, case: PythonCase) -> None:
    encode, data = case
    before, event_id = model_doc(served.url), new_id()
    message = encode(python_event(event_id, data))
    answer = requests.post(served.url + "/", data=message.body, headers=message.headers, timeout=10)
    assert answer.status_code == 200, answer.text
    after = model_doc(served.url)
    assert progress(before, after) == COUNTED
    reply = from_http_event(HTTPMessage(dict(answer.headers), answer.content))
    assert_python_reply(reply, event_id, after)


@pytest.mark.parametrize("transport", ["fetch", "chunked"])
@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_node_sdk_event_is_counted_and_the_reply_parses(
    node: str, served: Served, mode: str, transport: str
) -> None:
    before, event_id = model_doc(served.url), new_id()
    sent = node_send(node, served.url + "/", mode, transport, event_id)
    assert sent["status"] == 200, sent
    after = model_doc(served.url)
    assert progress(before, after) == COUNTED
    assert_node_reply(sent["reply"], event_id, after)


def test_node_chunked_transport_really_chunks(node: str, sink: Sink) -> None:
    """The harness can fail: the 'chunked' request arrives without Content-Length."""
    event_id = new_id()
    assert node_send(node, sink.url, "binary", "chunked", event_id)["status"] == 200
    (received,) = sink.requests_with(event_id)
    assert received.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in received.headers
    assert json.loads(received.body) == BODY


def test_posted_reply_parses_with_both_sdks(node: str, served: Served) -> None:
    """The reply POSTed to --reply_url (asynchronously) is the same valid event."""
    event_id = send_event(served.url, BODY, **EXTENSION)
    doc = model_doc(served.url)
    served.sink.wait_for(lambda: bool(served.sink.requests_with(event_id)))
    (posted,) = served.sink.requests_with(event_id)
    assert_python_reply(from_http_event(HTTPMessage(posted.headers, posted.body)), event_id, doc)
    message = json.dumps({"headers": posted.headers, "body": posted.body.decode()})
    assert_node_reply(run_node(node, "parse.mjs", stdin=message), event_id, doc)
