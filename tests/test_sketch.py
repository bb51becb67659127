"""DDSketch helpers: bucketing, exact merges, the quantile bound, and SQL pushdown agreement."""

from __future__ import annotations

import math
import random
import sys

import duckdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hansa.federation.sketch import (
    DEFAULT_ALPHA,
    ZERO_THRESHOLD,
    bucket_index,
    empty_sketch,
    gamma,
    ln_gamma,
    merge_sketch_many,
    merge_sketches,
    sketch_count,
    sketch_from_buckets,
    sketch_from_values,
    sketch_quantile,
    sketch_quantiles,
    sketch_sql_index,
    sketch_sql_sign,
    validate_sketch,
)
from hansa.protocol.codec import decode_as, encode
from hansa.protocol.errors import ErrorCode, ProtocolError, TooLargeError
from hansa.protocol.messages import MAX_SKETCH_BUCKETS, SketchState

ALPHAS = st.sampled_from([DEFAULT_ALPHA, 0.001, 0.05, 0.2])

# Values spanning many magnitudes, with zeros, tiny values, negatives and duplicates.
magnitudes = st.floats(min_value=1e-9, max_value=1e12, allow_nan=False)
values = st.one_of(
    magnitudes,
    magnitudes.map(lambda x: -x),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-10, -5e-10, 2.5, 100.0]),
    st.integers(min_value=-(10**12), max_value=10**12),
)
value_lists = st.lists(values, max_size=80)

# Slack for the floating-point rounding of bucket boundaries (module docstring of sketch.py).
ROUNDING = 1e-12


def rank_element(data: list[float], q: float) -> float:
    """The node contract's q-quantile: the element of rank floor(q*(n-1))."""
    ordered = sorted(float(x) for x in data)
    return ordered[math.floor(q * (len(ordered) - 1))]


def within_bound(estimate: float, true: float, alpha: float) -> bool:
    if abs(true) < ZERO_THRESHOLD:
        return estimate == 0.0
    return abs(estimate - true) <= (alpha + ROUNDING) * abs(true)


# --- bucket index ---------------------------------------------------------------------------------


@given(a=magnitudes, b=magnitudes, alpha=ALPHAS)
def test_bucket_index_is_monotone(a: float, b: float, alpha: float) -> None:
    low, high = sorted((a, b))
    assert bucket_index(low, alpha) <= bucket_index(high, alpha)
    # Sign does not matter: negatives use the magnitude.
    assert bucket_index(-low, alpha) == bucket_index(low, alpha)


@given(x=magnitudes, alpha=ALPHAS)
def test_bucket_index_covers_value(x: float, alpha: float) -> None:
    i = bucket_index(x, alpha)
    g = gamma(alpha)
    # Bucket i is (gamma**(i-1), gamma**i], up to boundary rounding.
    assert g ** (i - 1) * (1 - ROUNDING) < x <= g**i * (1 + ROUNDING)


def test_bucket_index_at_powers_of_gamma() -> None:
    g = gamma(DEFAULT_ALPHA)
    for k in range(-1000, 1400, 7):
        x = math.exp(k * ln_gamma(DEFAULT_ALPHA))
        # Exactly on a boundary the index may be k or k+1 after rounding, never further.
        assert bucket_index(x) in (k, k + 1)
        assert bucket_index(math.nextafter(x, 0.0)) <= bucket_index(x)
        assert bucket_index(x * g * g) > bucket_index(x)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 10**400])
def test_bucket_index_rejects_non_finite(bad: float) -> None:
    with pytest.raises(ProtocolError) as info:
        bucket_index(bad)
    assert info.value.code == ErrorCode.INVALID_FIELD


def test_bucket_index_rejects_zero_bucket_values_and_bad_alpha() -> None:
    with pytest.raises(ProtocolError):
        bucket_index(0.0)
    with pytest.raises(ProtocolError):
        bucket_index(5e-10)
    for alpha in (0.0, -0.1, 0.9, 1e-300, math.nan):
        with pytest.raises(ProtocolError) as info:
            bucket_index(1.0, alpha)
        assert info.value.code == ErrorCode.INVALID_FIELD


# --- building and merging -------------------------------------------------------------------------


@given(data=value_lists, alpha=ALPHAS)
def test_sketch_is_canonical(data: list[float], alpha: float) -> None:
    sketch = sketch_from_values(data, alpha)
    validate_sketch(sketch)
    assert sketch_count(sketch) == len(data)
    assert sketch.zero_count == sum(1 for x in data if abs(x) < ZERO_THRESHOLD)
    shuffled = list(data)
    random.Random(len(data)).shuffle(shuffled)
    assert sketch_from_values(shuffled, alpha) == sketch
    # Wire round trip keeps it intact.
    assert decode_as(encode(sketch), SketchState) == sketch


@given(parts=st.lists(value_lists, min_size=1, max_size=6), alpha=ALPHAS)
def test_merge_is_exact(parts: list[list[float]], alpha: float) -> None:
    union = [x for part in parts for x in part]
    sketches = [sketch_from_values(part, alpha) for part in parts]
    assert merge_sketch_many(sketches) == sketch_from_values(union, alpha)
    folded = sketches[0]
    for sketch in sketches[1:]:
        folded = merge_sketches(folded, sketch)
    assert folded == sketch_from_values(union, alpha)
    assert merge_sketch_many(list(reversed(sketches))) == folded


@given(a=value_lists, b=value_lists)
def test_merge_with_empty_is_identity(a: list[float], b: list[float]) -> None:
    sketch = sketch_from_values(a + b)
    assert merge_sketches(sketch, empty_sketch()) == sketch
    assert merge_sketches(empty_sketch(), sketch) == sketch


def test_merge_rejects_different_alpha() -> None:
    with pytest.raises(ProtocolError) as info:
        merge_sketches(sketch_from_values([1.0], 0.01), sketch_from_values([1.0], 0.02))
    assert info.value.code == ErrorCode.INVALID_FIELD
    with pytest.raises(ProtocolError):
        merge_sketch_many([])


def test_nulls_are_skipped() -> None:
    assert sketch_from_values([None, 1.0, None]) == sketch_from_values([1.0])


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_sketch_rejects_non_finite(bad: float) -> None:
    with pytest.raises(ProtocolError) as info:
        sketch_from_values([1.0, bad])
    assert info.value.code == ErrorCode.INVALID_FIELD


def test_protocol_rejects_unsorted_buckets() -> None:
    # Ordering is a wire rule (messages.SketchState); validate_sketch relies on it.
    with pytest.raises(ValueError):
        SketchState(alpha=0.01, zero_count=0, positive=((2, 1), (1, 1)), negative=())


@pytest.mark.parametrize(
    "state",
    [
        SketchState(alpha=0.01, zero_count=0, positive=(), negative=((1, 0),)),
        SketchState(alpha=0.01, zero_count=0, positive=((10**9, 1),), negative=()),
        SketchState(alpha=0.01, zero_count=0, positive=((-5000, 1),), negative=()),
        SketchState(alpha=0.01, zero_count=-1, positive=(), negative=()),
        SketchState(alpha=0.9, zero_count=1, positive=(), negative=()),
    ],
)
def test_invalid_sketches_are_rejected(state: SketchState) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_sketch(state)
    assert info.value.code == ErrorCode.INVALID_FIELD
    with pytest.raises(ProtocolError):
        sketch_quantile(state, 0.5)


# --- quantiles ------------------------------------------------------------------------------------


def test_empty_sketch_has_no_quantiles() -> None:
    assert sketch_quantile(empty_sketch(), 0.5) is None
    assert sketch_quantiles(empty_sketch(0.05), (0.0, 1.0)) == (None, None)
    assert sketch_count(empty_sketch()) == 0


@given(
    data=st.lists(values, min_size=1, max_size=80),
    q=st.floats(min_value=0.0, max_value=1.0),
    alpha=ALPHAS,
)
def test_quantile_within_relative_bound(data: list[float], q: float, alpha: float) -> None:
    estimate = sketch_quantile(sketch_from_values(data, alpha), q)
    assert estimate is not None
    true = rank_element(data, q)
    assert within_bound(estimate, true, alpha), (estimate, true)


def test_quantile_bound_is_tight_enough_to_fail() -> None:
    # A value at the top of its bucket is estimated low by ~alpha: the check
    # above would catch an estimator that were off by one bucket.
    x = math.exp(100 * ln_gamma(DEFAULT_ALPHA))
    estimate = sketch_quantile(sketch_from_values([x]), 0.5)
    assert estimate is not None
    assert abs(estimate - x) > 0.9 * DEFAULT_ALPHA * x
    assert within_bound(estimate, x, DEFAULT_ALPHA)
    assert not within_bound(estimate * (1 + 2 * DEFAULT_ALPHA), x, DEFAULT_ALPHA)


def test_quantile_extremes_and_signs() -> None:
    data = [-1000.0, -1.0, 0.0, 0.0, 3.0, 1e6]
    sketch = sketch_from_values(data)
    low, median, high = sketch_quantiles(sketch, (0.0, 0.5, 1.0))
    assert low is not None and median is not None and high is not None
    assert within_bound(low, -1000.0, DEFAULT_ALPHA)
    assert median == 0.0  # rank floor(0.5 * 5) = 2 -> the first 0.0
    assert within_bound(high, 1e6, DEFAULT_ALPHA)


def test_largest_double_does_not_overflow() -> None:
    sketch = sketch_from_values([sys.float_info.max, -sys.float_info.max])
    low, high = sketch_quantiles(sketch, (0.0, 1.0))
    assert low is not None and high is not None
    assert math.isfinite(low) and math.isfinite(high)
    assert within_bound(high, sys.float_info.max, DEFAULT_ALPHA)


@pytest.mark.parametrize("q", [-0.1, 1.5, math.nan])
def test_bad_rank_is_rejected(q: float) -> None:
    with pytest.raises(ProtocolError):
        sketch_quantile(sketch_from_values([1.0]), q)


# --- bucket cap -----------------------------------------------------------------------------------


def test_bucket_cap_raises_typed_error() -> None:
    lg = ln_gamma(0.001)
    # Bucket midpoints, so every value lands in its own bucket.
    wide = [math.exp((k - 0.5) * lg) for k in range(MAX_SKETCH_BUCKETS + 10)]
    with pytest.raises(TooLargeError) as info:
        sketch_from_values(wide, 0.001)
    assert info.value.code == ErrorCode.TOO_LARGE
    # Each half fits; their union does not.
    half = len(wide) // 2
    a = sketch_from_values(wide[:half], 0.001)
    b = sketch_from_values(wide[half:], 0.001)
    with pytest.raises(TooLargeError):
        merge_sketches(a, b)
    # Negative store counts separately.
    both = sketch_from_values(wide[:half] + [-x for x in wide[:half]], 0.001)
    assert len(both.positive) == len(both.negative) == half


def test_realistic_range_fits_the_cap() -> None:
    lg = ln_gamma(DEFAULT_ALPHA)
    span = [math.exp((k - 0.5) * lg) for k in range(bucket_index(1e-9), bucket_index(1e12) + 1)]
    sketch = sketch_from_values(span + [-x for x in span])
    # ~2400 buckets per sign for 1e-9..1e12 at alpha = 1 %, under the cap of 4096.
    assert 2000 < len(sketch.positive) == len(sketch.negative) <= MAX_SKETCH_BUCKETS


# --- SQL pushdown ---------------------------------------------------------------------------------


def sql_indices(con: duckdb.DuckDBPyConnection, xs: list[float], alpha: float) -> list[int | None]:
    expr = sketch_sql_index("x", alpha)
    row = con.execute(f"SELECT list_transform(?::DOUBLE[], lambda x: {expr})", [xs]).fetchone()
    assert row is not None
    result: list[int | None] = row[0]
    return result


@pytest.mark.parametrize("alpha", [DEFAULT_ALPHA, 0.001, 0.05])
def test_sql_index_equals_python_index(alpha: float) -> None:
    rng = random.Random(1234)
    lg = ln_gamma(alpha)
    low, high = bucket_index(1e-9, alpha), bucket_index(1e300, alpha)
    boundaries = [math.exp(k * lg) for k in range(low, high, max(1, (high - low) // 3000))]
    powers = [gamma(alpha) ** k for k in range(low, min(high, low + 3000))]
    xs = boundaries + powers
    xs += [math.nextafter(x, 0.0) for x in xs] + [math.nextafter(x, math.inf) for x in xs]
    xs += [math.exp(rng.uniform(math.log(1e-9), math.log(1e300))) for _ in range(5000)]
    xs += [rng.uniform(1e-9, 1e6) for _ in range(2000)]
    xs += [ZERO_THRESHOLD, math.nextafter(ZERO_THRESHOLD, 0.0), sys.float_info.max]
    xs += [-x for x in xs[::5]]
    con = duckdb.connect()
    try:
        got = sql_indices(con, xs, alpha)
    finally:
        con.close()
    want = [None if abs(x) < ZERO_THRESHOLD else bucket_index(x, alpha) for x in xs]
    mismatches = [(x, g, w) for x, g, w in zip(xs, got, want, strict=True) if g != w]
    assert not mismatches, mismatches[:5]


def test_sql_index_on_bigint_column() -> None:
    ints = [1, 2, 3, 10**6, 2**53 + 1, 2**62, 2**63 - 1, -(2**63), -7, 0]
    con = duckdb.connect()
    try:
        con.execute("CREATE TABLE t (pos INTEGER, x BIGINT)")
        con.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(ints)))
        rows = con.execute(
            f"SELECT {sketch_sql_sign('x')}, {sketch_sql_index('x')} FROM t ORDER BY pos"
        ).fetchall()
    finally:
        con.close()
    for x, (sign, index) in zip(ints, rows, strict=True):
        if x == 0:
            assert (sign, index) == (0, None)
        else:
            assert sign == (1 if x > 0 else -1)
            assert index == bucket_index(x)


@given(data=st.lists(st.one_of(st.none(), values.map(float)), max_size=60), alpha=ALPHAS)
def test_sql_group_by_pushdown_equals_python_sketch(data: list[float | None], alpha: float) -> None:
    con = duckdb.connect()
    try:
        con.execute("CREATE TABLE t (x DOUBLE)")
        if data:
            con.execute("INSERT INTO t SELECT UNNEST(?::DOUBLE[])", [data])
        sign, index = sketch_sql_sign('"x"'), sketch_sql_index('"x"', alpha)
        rows = con.execute(
            f"SELECT {sign} AS s, {index} AS i, COUNT(*) FROM t WHERE x IS NOT NULL GROUP BY s, i"
        ).fetchall()
    finally:
        con.close()
    assert sketch_from_buckets(rows, alpha) == sketch_from_values(data, alpha)


@pytest.mark.parametrize(
    "rows",
    [[(2, 1, 1)], [(1, None, 1)], [(1, 10**9, 1)], [(1, 3, -1)], [(-1, True, 1)]],
)
def test_sketch_from_buckets_rejects_bad_rows(rows: list[tuple[int, int | None, int]]) -> None:
    with pytest.raises(ProtocolError) as info:
        sketch_from_buckets(rows)
    assert info.value.code == ErrorCode.INVALID_FIELD
