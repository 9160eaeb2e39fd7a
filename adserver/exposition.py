"""Prometheus text 0.0.4 and OpenMetrics 1.0.0, with every label set rendered only once.

prometheus_client's encoders validate and escape every label of every sample on every scrape.
With 100 classes a scrape has ~1,500 samples, 400 of them with Seldon's 12 labels: about 10 ms of
escaping the same strings as last time. Here each distinct (sample name, labels) prefix is
rendered once, with the library's own escaping functions, and kept; the output is the library's
byte for byte (tests/test_exposition_encoder.py compares them). What this encoder does not render
(other escaping schemes, units, exemplars, timestamps, ``_created`` samples, other metric types)
goes to the library's encoder unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as om_format
from prometheus_client.utils import floatToGoString

Encoder = Callable[[CollectorRegistry], bytes]

SIMPLE_TYPES = frozenset({"counter", "gauge", "histogram"})
#: Label sets grow with classes squared (confusion cells); past this many the cache restarts
#: (a few MB at most; a scrape that large pays what the library would).
MAX_CACHED_PREFIXES = 20_000


class Unrendered(Exception):
    """A family this encoder leaves to the library."""


class PrefixCache:
    """``name{labels}`` of each sample, rendered on first sight, per format."""

    def __init__(self, openmetrics: bool) -> None:
        self.openmetrics = openmetrics
        self.prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}

    def prefix(self, name: str, labels: Mapping[str, str]) -> str:
        key = (name, tuple(labels.items()))
        rendered = self.prefixes.get(key)
        if rendered is None:
            if len(self.prefixes) >= MAX_CACHED_PREFIXES:
                self.prefixes.clear()
            rendered = self.prefixes[key] = self.render(name, labels)
        return rendered

    def render(self, name: str, labels: Mapping[str, str]) -> str:
        if self.openmetrics:
            escaped = om_format._escape(
                name, om_format.UNDERSCORES, om_format._is_legacy_labelname_rune
            )
        else:
            escaped = om_format.escape_metric_name(name, om_format.UNDERSCORES)
        if not labels:
            return escaped
        pairs = ",".join(f'{label_name(k)}="{label_value(v)}"' for k, v in sorted(labels.items()))
        return f"{escaped}{{{pairs}}}"


def label_name(name: str) -> str:
    return om_format.escape_label_name(name, om_format.UNDERSCORES)


def label_value(value: str) -> str:
    """Label values may be any UTF-8 in both formats; only backslash, newline and quote escape."""
    return om_format._escape(value, om_format.ALLOWUTF8, None)


class CachingEncoder:
    """Encodes a registry in the negotiated format; one instance lives as long as the server."""

    def __init__(self) -> None:
        self.text_prefixes = PrefixCache(openmetrics=False)
        self.om_prefixes = PrefixCache(openmetrics=True)

    def choose(self, accept: str) -> tuple[Encoder, str]:
        """prometheus_client's negotiation; its default text and OpenMetrics forms are ours."""
        library, content_type = text_format.choose_encoder(accept)
        if library is text_format.generate_latest:
            return partial(self.encode, self.text_prefixes, library), content_type
        if (
            isinstance(library, partial)
            and library.func is om_format.generate_latest
            and library.keywords == {"escaping": om_format.UNDERSCORES, "version": "1.0.0"}
        ):
            return partial(self.encode, self.om_prefixes, library), content_type
        return library, content_type

    def encode(self, cache: PrefixCache, library: Encoder, registry: CollectorRegistry) -> bytes:
        try:
            return render(cache, registry)
        except Unrendered:
            return library(registry)


def render(cache: PrefixCache, registry: CollectorRegistry) -> bytes:
    openmetrics = cache.openmetrics
    output: list[str] = []
    for metric in registry.collect():
        if metric.type not in SIMPLE_TYPES or metric.unit:
            raise Unrendered(metric.name)
        family = metric.name
        if metric.type == "counter" and not openmetrics:
            family += "_total"
        family = om_format.escape_metric_name(family, om_format.UNDERSCORES)
        if openmetrics:
            help_text = om_format._escape(metric.documentation, om_format.ALLOWUTF8, None)
        else:
            help_text = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        output.append(f"# HELP {family} {help_text}\n# TYPE {family} {metric.type}\n")
        created = metric.name + "_created"
        for sample in metric.samples:
            unusual = sample.timestamp is not None or sample.exemplar
            if unusual or getattr(sample, "native_histogram", None) or sample.name == created:
                raise Unrendered(sample.name)
            output.append(
                f"{cache.prefix(sample.name, sample.labels)} {floatToGoString(sample.value)}\n"
            )
    if openmetrics:
        output.append("# EOF\n")
    return "".join(output).encode("utf-8")
