"""The node's Prometheus metrics: histogram bucketing and exposition (hansa.node.metrics)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hansa.node.metrics import Histogram

BOUNDS = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=12, unique=True
).map(sorted)
VALUES = st.floats(allow_nan=True, allow_infinity=True)


def _slot(bounds: list[float], value: float) -> int:
    """The reference rule: the first bucket whose upper bound is >= value, else +Inf."""
    for i, bound in enumerate(bounds):
        if value <= bound:
            return i
    return len(bounds)


def _cumulative(h: Histogram) -> list[int]:
    """The le-bucket counts as rendered, +Inf last."""
    return [
        int(line.rsplit(" ", 1)[1]) for line in h.render() if line.startswith(f"{h.name}_bucket")
    ]


@given(BOUNDS, st.lists(VALUES, max_size=40))
def test_observations_land_in_the_first_bucket_at_or_above_them(
    bounds: list[float], values: list[float]
) -> None:
    h = Histogram("t_seconds", "test", bounds)
    for v in values:
        h.observe(v)
    expected = [0] * (len(bounds) + 1)
    for v in values:
        expected[_slot(bounds, v)] += 1
    running, cumulative = 0, []
    for n in expected:
        running += n
        cumulative.append(running)
    assert _cumulative(h) == cumulative
    assert h.count == len(values)


def test_edges_nan_and_infinities() -> None:
    h = Histogram("t_seconds", "test", [0.1, 1.0])
    for v in (0.1, 1.0, 1.0000001, -math.inf, math.inf, math.nan):
        h.observe(v)
    # 0.1 and -inf in le=0.1; 1.0 in le=1; the rest only in +Inf.
    assert _cumulative(h) == [2, 3, 6]


@pytest.mark.parametrize("bounds", [[], [1.0, 1.0], [2.0, 1.0], [math.inf], [math.nan]])
def test_bad_buckets_are_refused(bounds: list[float]) -> None:
    with pytest.raises(ValueError):
        Histogram("t_seconds", "test", bounds)
