"""Buckets of prediction time: several granularities, each kept for its own retention.

A row counts in the bucket of its prediction at every granularity at once (a minute, its hour,
its day), so a coarser bucket is always the exact roll-up of its finer ones, and ageing is only
deleting: the minutes of a day older than their retention go, its hours and the day stay. A range
is read as the fewest buckets that tile it (:meth:`TimeBuckets.cover`): coarse ones in the middle,
fine ones at the edges, each of a granularity still kept at its age.

A bucket is one integer, ``(level + 1) << LEVEL_SHIFT | start // seconds``, so the buckets of one
granularity are one contiguous, ordered range (what retention deletes, what a range reads), apart
from every other granularity's and from :data:`~cm_models.statistics.ALL_TIME`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL_SHIFT = 40  # 2**40 minutes is two million years: every index of a level fits below it

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


def parse_duration(text: str) -> int:
    """``90s``, ``48h``, ``90d``, ``2w``: whole seconds (a positive number and one unit)."""
    found = _DURATION.match(text)
    if found is None or int(found[1]) <= 0:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m, 48h, 90d or 2w")
    return int(found[1]) * UNITS[found[2]]


def format_duration(seconds: int) -> str:
    """The shortest spelling :func:`parse_duration` reads back (``86400`` -> ``1d``)."""
    for unit, size in sorted(UNITS.items(), key=lambda item: -item[1]):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    raise ValueError(f"{seconds} is not a whole number of seconds")  # pragma: no cover


@dataclass(frozen=True)
class Granularity:
    seconds: int  # a bucket's length
    retention: int  # seconds a bucket is kept after it ends


class NotKept(ValueError):
    """A time range that no kept granularity tiles (too old for the buckets that would fit it,
    or not aligned to any granularity)."""


class TimeBuckets:
    """The configured granularities, finest first; each divides the next and is kept no longer."""

    def __init__(self, levels: Sequence[Granularity]) -> None:
        if not levels:
            raise ValueError("at least one granularity is needed")
        for finer, coarser in itertools.pairwise(levels):
            if coarser.seconds <= finer.seconds or coarser.seconds % finer.seconds:
                raise ValueError(
                    f"{format_duration(coarser.seconds)} is not a multiple of "
                    f"{format_duration(finer.seconds)}: each granularity must divide the next"
                )
            if coarser.retention < finer.retention or finer.retention < coarser.seconds:
                raise ValueError(
                    f"{format_duration(finer.seconds)} buckets must be kept at least one "
                    f"{format_duration(coarser.seconds)} bucket long, and no longer than "
                    f"{format_duration(coarser.seconds)} buckets (so that every range is tiled "
                    "by buckets still kept)"
                )
        self.levels = tuple(levels)

    @classmethod
    def parse(cls, text: str) -> TimeBuckets:
        """``1m=48h,1h=90d,1d=730d``: each granularity and how long its buckets are kept."""
        levels = []
        for part in text.split(","):
            size, equals, kept = part.partition("=")
            if not equals:
                raise ValueError(f"{part.strip()!r} is not <granularity>=<retention>, e.g. 1m=48h")
            levels.append(Granularity(parse_duration(size), parse_duration(kept)))
        return cls(levels)

    def __str__(self) -> str:
        return ",".join(
            f"{format_duration(g.seconds)}={format_duration(g.retention)}" for g in self.levels
        )

    @property
    def finest(self) -> int:
        return self.levels[0].seconds

    def encode(self, level: int, start: int) -> int:
        return (level + 1) << LEVEL_SHIFT | start // self.levels[level].seconds

    def decode(self, bucket: int) -> tuple[int, int]:
        """(level, start in epoch seconds) of a bucket."""
        level = (bucket >> LEVEL_SHIFT) - 1
        return level, (bucket & ((1 << LEVEL_SHIFT) - 1)) * self.levels[level].seconds

    def span(self, bucket: int) -> tuple[int, int]:
        """[start, end) of a bucket, in epoch seconds."""
        level, start = self.decode(bucket)
        return start, start + self.levels[level].seconds

    def level_range(self, level: int) -> tuple[int, int]:
        """Every bucket of a level is in [lo, hi)."""
        return (level + 1) << LEVEL_SHIFT, (level + 2) << LEVEL_SHIFT

    def kept(self, level: int, start: int, now: float) -> bool:
        granularity = self.levels[level]
        return start + granularity.seconds > now - granularity.retention

    def keys(self, time: float, now: float) -> tuple[int, ...]:
        """The buckets a prediction at ``time`` counts in: one per granularity still kept at its
        age. None for a time before 1970 (no bucket holds it) or later than one coarsest bucket
        (a day) after ``now``: a clock that far ahead would make buckets no read reaches (a
        range ends at most that far ahead) and no sweep deletes for years."""
        if not 0 <= time <= now + self.levels[-1].seconds:
            return ()
        found = []
        for level, granularity in enumerate(self.levels):
            start = int(time // granularity.seconds) * granularity.seconds
            if self.kept(level, start, now):
                found.append(self.encode(level, start))
        return tuple(found)

    def first_kept(self, level: int, now: float) -> int:
        """The oldest bucket of a level still kept: those below it (in its range) are due to go."""
        granularity = self.levels[level]
        start = max(0, math.floor((now - granularity.retention) / granularity.seconds))
        return self.encode(level, start * granularity.seconds)

    def cover(self, start: int, end: int, now: float) -> list[int]:
        """The fewest kept buckets that tile [start, end) exactly, in time order.

        From the left, each step takes the coarsest bucket that starts there, fits before
        ``end`` and is still kept; nested granularities make that the fewest. Raises
        :class:`NotKept` where none does.
        """
        found: list[int] = []
        position = start
        while position < end:
            for level in range(len(self.levels) - 1, -1, -1):
                size = self.levels[level].seconds
                if (
                    position >= 0
                    and position % size == 0
                    and position + size <= end
                    and self.kept(level, position, now)
                ):
                    found.append(self.encode(level, position))
                    position += size
                    break
            else:
                raise NotKept(self._why(position, end, now))
        return found

    def _why(self, position: int, end: int, now: float) -> str:
        if any(position % g.seconds == 0 and position + g.seconds <= end for g in self.levels):
            return (
                f"predictions at {position} (epoch seconds) are older than every granularity "
                f"that fits them is kept ({self})"
            )
        return (
            f"{position} (epoch seconds) is not a multiple of any granularity "
            f"({', '.join(format_duration(g.seconds) for g in self.levels)})"
        )

    def window(self, seconds: int, now: float) -> tuple[int, list[int]]:
        """The last ``seconds`` of prediction time, up to and including the current finest
        bucket: its start and its buckets. Where the finest buckets at the window's start are no
        longer kept, it starts at the next boundary of the finest granularity still kept there
        (a ``7d`` window over minutes kept 48 h starts on an hour)."""
        end = (int(now // self.finest) + 1) * self.finest
        start = end - seconds
        for level, granularity in enumerate(self.levels):
            aligned = -(-start // granularity.seconds) * granularity.seconds
            if self.kept(level, aligned, now):
                start = aligned
                break
        else:
            start = end  # older than everything kept: an empty window
        return start, self.cover(max(start, 0), end, now)

    def step_granularity(self, step: int) -> bool:
        """Whether a step is a whole number of buckets of some granularity."""
        return step > 0 and any(step % g.seconds == 0 for g in self.levels)


#: Minutes for two days, hours for 90 days, days for two years.
DEFAULT_BUCKETS = "1m=48h,1h=90d,1d=730d"
