"""Prometheus text and OpenMetrics, rendered in slices off the event path, byte-identical to
prometheus_client.

prometheus_client's encoders validate and escape every label of every sample on every scrape, in
one call. With 1,000 classes a scrape has ~270k samples (20 MB): one long step during which no
event is served. Here:

- each distinct (sample name, labels) prefix is rendered once, with the library's own escaping
  functions for the negotiated format and escaping scheme, and kept (up to a bound);
- a :class:`Grid` (the confusion cells; :class:`Grids` for one per model) is rendered from a line
  template, block of rows by block of rows, never as one Python object per cell;
- rendering is a generator of chunks; :class:`Exposition` runs it on the IOLoop in slices of a
  few milliseconds, so events are served between slices, and runs one scrape at a time.

The output is the library's byte for byte (tests/test_exposition_encoder.py compares them). What
this encoder does not render (units, exemplars, timestamps, ``_created`` samples, other metric
types) goes to the library's encoder unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as om_format
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from prometheus_client.validation import _is_valid_legacy_metric_name

from adserver.catalogue.families import CREATED, TOTAL

Encoder = Callable[[CollectorRegistry], bytes]

SIMPLE_TYPES = frozenset({"counter", "gauge", "histogram"})
#: Label sets grow with classes squared (confusion cells) and with custom series; past this many,
#: new ones are rendered on every scrape instead of kept (a few MB at most).
MAX_CACHED_PREFIXES = 50_000
#: Samples per chunk, and confusion cells scanned per block of a grid: each a small part of a
#: slice.
CHUNK_SAMPLES = 500
GRID_BLOCK_CELLS = 5_000
#: How long a scrape renders before it lets the IOLoop serve events.
SLICE_SECONDS = 0.002
#: Below this a count renders as ``<n>.0``; from it on Go's exponent form (floatToGoString).
PLAIN_COUNT_LIMIT = 1_000_000
_ROW, _COLUMN = "\x01", "\x02"  # placeholders in a grid's line template


class Unrendered(Exception):
    """A family this encoder leaves to the library."""


@dataclass(frozen=True)
class Format:
    """What the scraper negotiated: text 0.0.4/1.0.0 or OpenMetrics, and a name escaping."""

    openmetrics: bool
    escaping: str


@dataclass(frozen=True)
class Grid:
    """The samples of one name over a 2-D count matrix (zero cells left out), row-major.

    Iterating yields prometheus_client samples (for the library's encoders); this module renders
    the same lines from a template instead. ``matrix`` must not change while a scrape reads it
    (the collector hands in a copy).
    """

    name: str
    fixed: Mapping[str, str]
    row_label: str
    row_values: Sequence[str]
    column_label: str
    column_values: Sequence[str]
    matrix: np.ndarray

    def blocks(self) -> Iterator[tuple[list[int], list[int], list[int]]]:
        """(row, column, count) of the non-zero cells, a bounded block of rows at a time."""
        step = max(1, GRID_BLOCK_CELLS // max(1, self.matrix.shape[1]))
        for start in range(0, self.matrix.shape[0], step):
            block = self.matrix[start : start + step]
            rows, columns = np.nonzero(block)
            counts = block[rows, columns]
            yield (rows + start).tolist(), columns.tolist(), counts.tolist()

    def __iter__(self) -> Iterator[Sample]:
        for rows, columns, counts in self.blocks():
            for row, column, count in zip(rows, columns, counts):
                labels = {
                    **self.fixed,
                    self.row_label: self.row_values[row],
                    self.column_label: self.column_values[column],
                }
                yield Sample(self.name, labels, count)


@dataclass(frozen=True)
class Grids:
    """Several grids of one family (each model's cells), rendered one after another."""

    grids: Sequence[Grid]

    def __iter__(self) -> Iterator[Sample]:
        for grid in self.grids:
            yield from grid


class PrefixCache:
    """``name{labels}`` of each sample, rendered on first sight, for one format."""

    def __init__(self, form: Format) -> None:
        self.form = form
        self.prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}

    def prefix(self, name: str, labels: Mapping[str, str]) -> str:
        key = (name, tuple(labels.items()))
        rendered = self.prefixes.get(key)
        if rendered is None:
            rendered = self.render(name, labels)
            if len(self.prefixes) < MAX_CACHED_PREFIXES:
                self.prefixes[key] = rendered
        return rendered

    def render(self, name: str, labels: Mapping[str, str]) -> str:
        """The library's ``sample_line`` (text) or ``generate_latest`` (OpenMetrics) prefix."""
        escaping = self.form.escaping
        utf8_name = escaping == om_format.ALLOWUTF8 and not _is_valid_legacy_metric_name(name)
        pairs = ",".join(
            f'{om_format.escape_label_name(k, escaping)}="{label_value(v)}"'
            for k, v in sorted(labels.items())
        )
        if self.form.openmetrics:
            inner = om_format.escape_metric_name(name, escaping) + ("," if labels else "")
            inner = (inner if utf8_name else "") + pairs
            braced = f"{{{inner}}}" if inner else ""
            if utf8_name:
                return braced
            return om_format._escape(name, escaping, om_format._is_legacy_labelname_rune) + braced
        escaped = om_format.escape_metric_name(name, escaping)
        if utf8_name:
            return f"{{{escaped}{',' if pairs else ''}{pairs}}}"
        return f"{escaped}{{{pairs}}}" if pairs else escaped

    def header(self, name: str, kind: str, documentation: str) -> str:
        """The ``# HELP`` and ``# TYPE`` lines of a family."""
        if self.form.openmetrics:
            help_text = label_value(documentation)
        else:
            help_text = documentation.replace("\\", r"\\").replace("\n", r"\n")
            if kind == "counter":
                name += TOTAL
        family = om_format.escape_metric_name(name, self.form.escaping)
        return f"# HELP {family} {help_text}\n# TYPE {family} {kind}\n"

    def grid_template(self, grid: Grid) -> tuple[str, str, str, bool] | None:
        """(head, middle, tail, row first) of the grid's lines, rendered once with placeholders.

        None if a fixed label holds a placeholder character: then the grid renders sample-wise.
        """
        template = self.render(
            grid.name, {**grid.fixed, grid.row_label: _ROW, grid.column_label: _COLUMN}
        )
        parts = template.replace(_COLUMN, _ROW).split(_ROW)
        if len(parts) != 3:
            return None
        return parts[0], parts[1], parts[2], template.index(_ROW) < template.index(_COLUMN)


def grid_chunks(grid: Grid, template: tuple[str, str, str, bool]) -> Iterator[str]:
    """Each block of the grid's cells as text: the template filled in, one f-string a cell."""
    head, middle, tail, row_first = template
    rows = [label_value(v) for v in grid.row_values]
    columns = [label_value(v) for v in grid.column_values]
    first, second = (rows, columns) if row_first else (columns, rows)
    for block_rows, block_columns, counts in grid.blocks():
        a, b = (block_rows, block_columns) if row_first else (block_columns, block_rows)
        yield "".join(
            [
                f"{head}{first[i]}{middle}{second[j]}{tail} {count_text(count)}\n"
                for i, j, count in zip(a, b, counts)
            ]
        )


def label_value(value: str) -> str:
    """Label values may be any UTF-8 in every format; only backslash, newline and quote escape."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def count_text(count: int) -> str:
    """``floatToGoString`` of a non-negative integer count, without a float for small ones."""
    return f"{count}.0" if count < PLAIN_COUNT_LIMIT else floatToGoString(count)


def negotiate(accept: str) -> tuple[Format | None, Encoder, str]:
    """prometheus_client's negotiation; the text and OpenMetrics forms it picks are ours."""
    library, content_type = text_format.choose_encoder(accept)
    form = None
    if library is text_format.generate_latest:
        form = Format(openmetrics=False, escaping=om_format.UNDERSCORES)
    elif isinstance(library, partial) and not library.args:
        keywords = library.keywords
        if library.func is text_format.generate_latest and set(keywords) == {"escaping"}:
            form = Format(openmetrics=False, escaping=keywords["escaping"])
        elif library.func is om_format.generate_latest and set(keywords) == {"escaping", "version"}:
            form = Format(openmetrics=True, escaping=keywords["escaping"])
    return form, library, content_type


def render_chunks(cache: PrefixCache, registry: CollectorRegistry) -> Iterator[str]:
    """The exposition in pieces of bounded work; raises :class:`Unrendered` for the library."""
    for metric in registry.collect():
        if metric.type not in SIMPLE_TYPES or metric.unit:
            raise Unrendered(metric.name)
        yield cache.header(metric.name, metric.type, metric.documentation)
        grids = grids_of(metric.samples)
        if grids is None:
            yield from sample_chunks(cache, metric.name, metric.samples)
            continue
        for grid in grids:
            template = cache.grid_template(grid)
            if template is not None:
                yield from grid_chunks(grid, template)
            else:
                yield from sample_chunks(cache, metric.name, grid)
    if cache.form.openmetrics:
        yield "# EOF\n"


def grids_of(samples: Iterable[Sample]) -> Sequence[Grid] | None:
    """The grids a family's samples are made of, rendered in bulk (None: render sample-wise)."""
    if isinstance(samples, Grid):
        return [samples]
    return samples.grids if isinstance(samples, Grids) else None


def sample_chunks(cache: PrefixCache, family: str, samples: Iterable[Sample]) -> Iterator[str]:
    # Samples the text format moves to a separate gauge, or OpenMetrics prints differently.
    special = {family + CREATED, family + "_gsum", family + "_gcount"}
    lines: list[str] = []
    for sample in samples:
        unusual = sample.timestamp is not None or sample.exemplar or sample.name in special
        if unusual or getattr(sample, "native_histogram", None):
            raise Unrendered(sample.name)
        prefix = cache.prefix(sample.name, sample.labels)
        lines.append(f"{prefix} {floatToGoString(sample.value)}\n")
        if len(lines) >= CHUNK_SAMPLES:
            yield "".join(lines)
            lines.clear()
    if lines:
        yield "".join(lines)


class CachingEncoder:
    """Encodes a registry in the negotiated format; one instance lives as long as the server."""

    def __init__(self) -> None:
        self.caches: dict[Format, PrefixCache] = {}

    def cache(self, form: Format) -> PrefixCache:
        if form not in self.caches:
            self.caches[form] = PrefixCache(form)
        return self.caches[form]

    def choose(self, accept: str) -> tuple[Encoder, str]:
        """A synchronous encoder for ``accept`` and its content type."""
        form, library, content_type = negotiate(accept)
        if form is None:
            return library, content_type
        return partial(self.encode, self.cache(form), library), content_type

    def encode(self, cache: PrefixCache, library: Encoder, registry: CollectorRegistry) -> bytes:
        try:
            return "".join(render_chunks(cache, registry)).encode("utf-8")
        except Unrendered:
            return library(registry)


class Exposition:
    """``GET /v1/metrics`` in Prometheus formats: one scrape at a time, in slices on the IOLoop.

    A slice renders for :data:`SLICE_SECONDS`, then the IOLoop serves whatever is ready (events,
    probes) before the next. Scrapes queue behind each other, so memory holds one scrape's
    snapshot and output, however many scrapers ask at once.
    """

    def __init__(self, registry: CollectorRegistry, encoder: CachingEncoder | None = None) -> None:
        self.registry = registry
        self.encoder = encoder or CachingEncoder()
        self._lock = asyncio.Lock()

    async def scrape(self, accept: str) -> tuple[list[bytes], str]:
        """The exposition as parts to send in order (joining 20 MB would be one long step)."""
        form, library, content_type = negotiate(accept)
        async with self._lock:
            if form is None:
                return [library(self.registry)], content_type
            try:
                return await self._sliced(self.encoder.cache(form)), content_type
            except Unrendered:
                return [library(self.registry)], content_type

    async def _sliced(self, cache: PrefixCache) -> list[bytes]:
        parts: list[bytes] = []
        deadline = time.perf_counter() + SLICE_SECONDS
        for chunk in render_chunks(cache, self.registry):
            parts.append(chunk.encode("utf-8"))
            if time.perf_counter() >= deadline:
                await asyncio.sleep(0)
                deadline = time.perf_counter() + SLICE_SECONDS
        return parts
