"""Time buckets: every range is tiled exactly, by buckets still kept, at any granularity."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adserver.state.buckets import (
    DEFAULT_BUCKETS,
    NotKept,
    TimeBuckets,
    format_duration,
    parse_duration,
)

BUCKETS = TimeBuckets.parse(DEFAULT_BUCKETS)
NOW = 1_780_000_000.5
THIS_MINUTE = 1_780_000_000 // 60 * 60
MINUTE, HOUR, DAY = 60, 3600, 86400


def test_parse_and_format_round_trip() -> None:
    assert TimeBuckets.parse(str(BUCKETS)).levels == BUCKETS.levels
    assert str(BUCKETS) == "1m=2d,1h=90d,1d=730d"
    assert [g.seconds for g in BUCKETS.levels] == [MINUTE, HOUR, DAY]
    assert parse_duration("90d") == 90 * DAY and format_duration(7 * DAY) == "1w"
    for bad in ("", "5", "5x", "0m", "-1h", "1.5h"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    for bad in ("1m", "1m=48h,90s=90d", "1h=1d,1m=48h", "1m=48h,1h=1d", "1m=30m,1h=90d"):
        with pytest.raises(ValueError):
            TimeBuckets.parse(bad)


@given(st.floats(min_value=0, max_value=NOW + DAY))
def test_a_prediction_counts_once_per_kept_granularity(time: float) -> None:
    keys = BUCKETS.keys(time, NOW)
    for bucket in keys:
        start, end = BUCKETS.span(bucket)
        assert start <= time < end
    levels = [BUCKETS.decode(bucket)[0] for bucket in keys]
    assert levels == sorted(set(levels))
    minute = int(time // MINUTE) * MINUTE
    assert (0 in levels) == BUCKETS.kept(0, minute, NOW) == (minute + MINUTE > NOW - 48 * HOUR)
    assert 2 in levels or NOW - time > 729 * DAY


def test_nothing_before_1970_and_everything_distinct() -> None:
    assert BUCKETS.keys(-1.0, NOW) == ()
    assert BUCKETS.keys(float("nan"), NOW) == ()
    assert BUCKETS.keys(NOW + DAY + 1, NOW) == () and BUCKETS.keys(float("inf"), NOW) == ()
    assert len(BUCKETS.keys(NOW + DAY, NOW)) == 3  # a clock a little ahead still counts
    ranges = [BUCKETS.level_range(level) for level in range(3)]
    assert ranges[0][1] == ranges[1][0] and ranges[1][1] == ranges[2][0]
    for level, (lo, hi) in enumerate(ranges):
        assert lo <= BUCKETS.encode(level, 0) < BUCKETS.encode(level, int(NOW)) < hi


@given(
    st.integers(min_value=0, max_value=800 * DAY // MINUTE),
    st.integers(min_value=0, max_value=800 * DAY // MINUTE),
)
def test_cover_tiles_exactly_with_kept_buckets(a: int, b: int) -> None:
    start, end = sorted(
        (
            THIS_MINUTE - a * MINUTE,
            THIS_MINUTE - b * MINUTE + MINUTE,
        )
    )
    try:
        tiles = BUCKETS.cover(start, end, NOW)
    except NotKept:
        old = NOW - 48 * HOUR
        assert start < old  # only what is older than the minutes may be refused
        return
    position = start
    for bucket in tiles:
        level, tile_start = BUCKETS.decode(bucket)
        assert tile_start == position and BUCKETS.kept(level, tile_start, NOW)
        position = BUCKETS.span(bucket)[1]
    assert position == end
    assert len(tiles) <= 2 * (60 + 24) + (end - start) // DAY + 1


@pytest.mark.parametrize("window", ["1h", "24h", "7d", "90d"])
def test_windows_are_tiled_and_end_with_the_current_minute(window: str) -> None:
    start, tiles = BUCKETS.window(parse_duration(window), NOW)
    assert BUCKETS.span(tiles[-1]) == (
        THIS_MINUTE,
        THIS_MINUTE + MINUTE,
    )
    assert BUCKETS.span(tiles[0])[0] == start
    assert 0 <= parse_duration(window) - (THIS_MINUTE + MINUTE - start) < DAY
    assert len(tiles) <= 2 * (60 + 24) + 1


def test_retention_cutoff() -> None:
    first = BUCKETS.first_kept(0, NOW)
    level, start = BUCKETS.decode(first)
    assert level == 0 and BUCKETS.kept(0, start, NOW) and not BUCKETS.kept(0, start - MINUTE, NOW)
