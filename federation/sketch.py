"""DDSketch helpers: relative-error quantile sketches that merge exactly.

Theory of operation
-------------------
A DDSketch (Masson, Rim & Lee, VLDB 2019) with relative accuracy ``alpha``
puts every value into a logarithmic bucket. With
``gamma = (1 + alpha) / (1 - alpha)``, a value ``x > 0`` goes to bucket

    ``i = ceil(ln(x) / ln(gamma))``, which covers ``(gamma**(i-1), gamma**i]``,

a value ``x < 0`` goes to bucket ``i(|x|)`` of a second (``negative``) store,
and a value with ``|x| < ZERO_THRESHOLD`` (``1e-9``) is counted in
``zero_count``: such tiny magnitudes would need thousands of extra buckets
and are, for the measures cities publish, indistinguishable from zero. The
state is :class:`~hansa.protocol.messages.SketchState`: each store is a tuple
of ``(index, count)`` pairs, sorted by index, every count positive. The
state has no randomness and no insertion-order dependence, so the sketch of
a multiset is a function of the multiset alone.

Merging adds bucket counts index by index. Because bucketing is a function
of each value alone, ``sketch(A ∪ B) == merge_sketches(sketch(A),
sketch(B))`` holds *exactly* (as struct equality), which is what lets the
federation combine per-city sketches without loss (DESIGN "Federated answer
= central answer").

Guarantee. For the rank convention of the node contract — the
``q``-quantile of ``n`` values is the element ``v`` of 0-based rank
``floor(q * (n - 1))`` in sorted order — :func:`sketch_quantile` returns an
estimate ``v̂`` with

    ``|v̂ - v| <= alpha * |v|``            when ``|v| >= ZERO_THRESHOLD``,
    ``v̂ == 0`` (so ``|v̂ - v| < 1e-9``)    when ``|v| < ZERO_THRESHOLD``,

up to floating-point rounding of relative size about ``1e-13`` (the bucket
boundaries are computed with double ``ln`` and division, so a value within
a few ulps of a boundary may land in the neighbouring bucket; the error
bound then exceeds ``alpha`` by that rounding only). Why: the bucket index is
monotone in the value, so the rank-``r`` element lies in the bucket where
the cumulative count first exceeds ``r``, and the representative
``2 * gamma**i / (gamma + 1)`` of bucket ``(gamma**(i-1), gamma**i]`` is
within relative distance ``(gamma - 1) / (gamma + 1) == alpha`` of every
point of the bucket.

SQL pushdown. The node computes sketches inside DuckDB with
``GROUP BY`` on :data:`SKETCH_SQL_INDEX` (see :func:`sketch_sql_index`) and
rebuilds the state with :func:`sketch_from_buckets`. Both sides compute
the index with the same double operations — cast to DOUBLE, ``|x|``,
natural log, divide by the double ``ln(gamma)`` (rendered as a string cast
so the literal round-trips exactly), ceiling — so a value gets the same
index in SQL and in :func:`bucket_index` (checked by ``tests/test_sketch.py``
against DuckDB, including exact powers of ``gamma`` and their neighbours).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from typing import Final

from hansa.protocol.errors import ErrorCode, ProtocolError, TooLargeError
from hansa.protocol.messages import MAX_SKETCH_BUCKETS, SketchState

__all__ = [
    "DEFAULT_ALPHA",
    "MAX_ALPHA",
    "MIN_ALPHA",
    "SKETCH_SQL_INDEX",
    "SKETCH_SQL_SIGN",
    "ZERO_THRESHOLD",
    "bucket_index",
    "empty_sketch",
    "gamma",
    "ln_gamma",
    "merge_sketch_many",
    "merge_sketches",
    "sketch_count",
    "sketch_from_buckets",
    "sketch_from_values",
    "sketch_quantile",
    "sketch_quantiles",
    "sketch_sql_index",
    "sketch_sql_sign",
    "validate_sketch",
]

DEFAULT_ALPHA: Final = 0.01
"""Default relative accuracy of quantile sketches (node contract)."""

MIN_ALPHA: Final = 1e-6
"""Smallest supported ``alpha``; below it ``ln(gamma)`` loses most of its digits."""

MAX_ALPHA: Final = 0.5
"""Largest supported ``alpha`` (a 50 % relative error is already useless)."""

ZERO_THRESHOLD: Final = 1e-9
"""Values with ``|x| < ZERO_THRESHOLD`` are counted in ``zero_count``."""

SKETCH_SQL_INDEX: Final = (
    "CASE WHEN ABS(CAST({col} AS DOUBLE)) < {zero} THEN NULL"
    " ELSE CAST(CEIL(LN(ABS(CAST({col} AS DOUBLE))) / {ln_gamma}) AS BIGINT) END"
)
"""SQL template of :func:`bucket_index` for DuckDB (BIGINT; NULL for null and zero-bucket values).

Placeholders: ``{col}`` is an already-quoted column expression, ``{zero}`` and
``{ln_gamma}`` DOUBLE expressions equal to :data:`ZERO_THRESHOLD` and
:func:`ln_gamma` — render with :func:`sketch_sql_index`, which writes
``CAST('<repr>' AS DOUBLE)`` (a bare ``0.02…`` literal would be parsed as
DECIMAL and converted inexactly). The casts to DOUBLE come first so ``ABS``
never overflows on the ``BIGINT`` minimum and integers round to double as
Python's ``float(int)`` does. The column must hold finite values: the node
filters NaN and infinities before sketching (``CEIL(LN(inf))`` does not fit
a BIGINT).
"""

SKETCH_SQL_SIGN: Final = (
    "CASE WHEN {col} IS NULL THEN NULL"
    " WHEN ABS(CAST({col} AS DOUBLE)) < {zero} THEN 0"
    " WHEN {col} > 0 THEN 1 ELSE -1 END"
)
"""SQL template classifying a value: ``1`` positive store, ``-1`` negative, ``0`` zero bucket.

Placeholders ``{col}`` and ``{zero}``; render with :func:`sketch_sql_sign`.
"""


def _double_literal(x: float) -> str:
    """Render a double so DuckDB parses back the identical value."""
    return f"CAST('{x!r}' AS DOUBLE)"


def _is_real(x: object) -> bool:
    """A runtime check for values that arrive typed but may not be (decoded or hand-built)."""
    return isinstance(x, float | int) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_alpha(alpha: float) -> None:
    if not (_is_real(alpha) and MIN_ALPHA <= alpha <= MAX_ALPHA):
        raise ProtocolError(
            f"sketch alpha {alpha!r} outside the supported range [{MIN_ALPHA}, {MAX_ALPHA}]",
            ErrorCode.INVALID_FIELD,
        )


def gamma(alpha: float = DEFAULT_ALPHA) -> float:
    """Return the bucket growth factor ``(1 + alpha) / (1 - alpha)``.

    Args:
        alpha: relative accuracy, in ``[MIN_ALPHA, MAX_ALPHA]``.

    Returns:
        ``gamma > 1``.

    Raises:
        ProtocolError: ``INVALID_FIELD`` when ``alpha`` is out of range.
    """
    _check_alpha(alpha)
    return (1.0 + alpha) / (1.0 - alpha)


def ln_gamma(alpha: float = DEFAULT_ALPHA) -> float:
    """Return ``ln(gamma(alpha))``, the divisor of the bucket index (Python and SQL).

    Args:
        alpha: relative accuracy, in ``[MIN_ALPHA, MAX_ALPHA]``.

    Returns:
        The natural log of :func:`gamma`, as the double both sides use.

    Raises:
        ProtocolError: ``INVALID_FIELD`` when ``alpha`` is out of range.
    """
    return math.log(gamma(alpha))


def _index_bounds(alpha: float) -> tuple[int, int]:
    """Smallest and largest index any finite ``|x| >= ZERO_THRESHOLD`` can get."""
    lg = ln_gamma(alpha)
    return (
        math.ceil(math.log(ZERO_THRESHOLD) / lg),
        math.ceil(math.log(sys.float_info.max) / lg),
    )


def _as_double(x: float) -> float:
    try:
        value = float(x)
    except (OverflowError, TypeError, ValueError) as exc:
        raise ProtocolError(
            f"sketch value {x!r} is not representable as a double", ErrorCode.INVALID_FIELD
        ) from exc
    if not math.isfinite(value):
        raise ProtocolError(f"sketch value {value!r} is not finite", ErrorCode.INVALID_FIELD)
    return value


def bucket_index(x: float, alpha: float = DEFAULT_ALPHA) -> int:
    """Return the bucket index of a value's magnitude: ``ceil(ln|x| / ln(gamma))``.

    The value is first converted to a double (as the SQL template does). The
    index is monotone non-decreasing in ``|x|``.

    Args:
        x: a finite number with ``|x| >= ZERO_THRESHOLD`` (smaller magnitudes
            belong to the zero bucket and have no index).
        alpha: relative accuracy.

    Returns:
        The index ``i`` of the bucket ``(gamma**(i-1), gamma**i]`` holding ``|x|``.

    Raises:
        ProtocolError: ``INVALID_FIELD`` when ``x`` is not finite, too large for
            a double, below the zero threshold, or ``alpha`` is out of range.
    """
    magnitude = abs(_as_double(x))
    if magnitude < ZERO_THRESHOLD:
        raise ProtocolError(
            f"{x!r} is below the zero threshold and has no bucket index", ErrorCode.INVALID_FIELD
        )
    return math.ceil(math.log(magnitude) / ln_gamma(alpha))


def sketch_sql_index(column_sql: str, alpha: float = DEFAULT_ALPHA) -> str:
    """Render :data:`SKETCH_SQL_INDEX` for a column.

    Args:
        column_sql: a quoted, validated column expression (never user text).
        alpha: relative accuracy.

    Returns:
        A DuckDB expression of type BIGINT equal to :func:`bucket_index`
        (NULL for NULL and for values in the zero bucket).

    Raises:
        ProtocolError: ``INVALID_FIELD`` when ``alpha`` is out of range.
    """
    return SKETCH_SQL_INDEX.format(
        col=column_sql,
        zero=_double_literal(ZERO_THRESHOLD),
        ln_gamma=_double_literal(ln_gamma(alpha)),
    )


def sketch_sql_sign(column_sql: str) -> str:
    """Render :data:`SKETCH_SQL_SIGN` for a column.

    Args:
        column_sql: a quoted, validated column expression (never user text).

    Returns:
        A DuckDB expression: ``1``, ``-1``, ``0`` (zero bucket) or NULL.
    """
    return SKETCH_SQL_SIGN.format(col=column_sql, zero=_double_literal(ZERO_THRESHOLD))


def empty_sketch(alpha: float = DEFAULT_ALPHA) -> SketchState:
    """Return the sketch of no values (the identity of :func:`merge_sketches`).

    Args:
        alpha: relative accuracy.

    Returns:
        A sketch with no buckets and ``zero_count == 0``.

    Raises:
        ProtocolError: ``INVALID_FIELD`` when ``alpha`` is out of range.
    """
    _check_alpha(alpha)
    return SketchState(alpha=alpha, zero_count=0, positive=(), negative=())


def _store(counts: dict[int, int], which: str) -> tuple[tuple[int, int], ...]:
    # Bounded because the wire schema bounds it (messages.MAX_SKETCH_BUCKETS);
    # a state that cannot be sent must not be built.
    if len(counts) > MAX_SKETCH_BUCKETS:
        raise TooLargeError(
            f"sketch needs {len(counts)} {which} buckets, more than {MAX_SKETCH_BUCKETS}"
        )
    return tuple(sorted((i, c) for i, c in counts.items() if c > 0))


def sketch_from_values(values: Iterable[float | None], alpha: float = DEFAULT_ALPHA) -> SketchState:
    """Build the sketch of a multiset of values (``None`` entries are skipped, as SQL nulls).

    Args:
        values: finite numbers (ints are converted to doubles first).
        alpha: relative accuracy.

    Returns:
        The canonical sketch of the values.

    Raises:
        ProtocolError: ``INVALID_FIELD`` for a non-finite value or bad ``alpha``.
        TooLargeError: a store would exceed ``MAX_SKETCH_BUCKETS`` buckets.
    """
    lg = ln_gamma(alpha)
    zero = 0
    positive: dict[int, int] = {}
    negative: dict[int, int] = {}
    for x in values:
        if x is None:
            continue
        value = _as_double(x)
        magnitude = abs(value)
        if magnitude < ZERO_THRESHOLD:
            zero += 1
            continue
        store = positive if value > 0 else negative
        i = math.ceil(math.log(magnitude) / lg)
        store[i] = store.get(i, 0) + 1
    return SketchState(
        alpha=alpha,
        zero_count=zero,
        positive=_store(positive, "positive"),
        negative=_store(negative, "negative"),
    )


def sketch_from_buckets(
    rows: Iterable[tuple[int, int | None, int]], alpha: float = DEFAULT_ALPHA
) -> SketchState:
    """Build a sketch from ``(sign, index, count)`` rows, as a SQL ``GROUP BY`` returns them.

    ``sign`` is the value of :data:`SKETCH_SQL_SIGN` (``0`` for the zero bucket,
    whose index is ignored), ``index`` the value of :data:`SKETCH_SQL_INDEX`.
    Rows with the same ``(sign, index)`` are added; rows with count ``0`` are
    dropped.

    Args:
        rows: the bucket rows.
        alpha: the relative accuracy the SQL used.

    Returns:
        The canonical sketch.

    Raises:
        ProtocolError: ``INVALID_FIELD`` for a bad sign, a missing or
            impossible index, a negative count or bad ``alpha``.
        TooLargeError: a store would exceed ``MAX_SKETCH_BUCKETS`` buckets.
    """
    low, high = _index_bounds(alpha)
    zero = 0
    positive: dict[int, int] = {}
    negative: dict[int, int] = {}
    for sign, index, count in rows:
        if not _is_int(count) or count < 0:
            raise ProtocolError(f"bad sketch bucket count {count!r}", ErrorCode.INVALID_FIELD)
        if sign == 0:
            zero += count
            continue
        if sign not in (1, -1):
            raise ProtocolError(f"bad sketch bucket sign {sign!r}", ErrorCode.INVALID_FIELD)
        if not _is_int(index) or index is None or not low <= index <= high:
            raise ProtocolError(f"bad sketch bucket index {index!r}", ErrorCode.INVALID_FIELD)
        store = positive if sign == 1 else negative
        store[index] = store.get(index, 0) + count
    _check_alpha(alpha)
    return SketchState(
        alpha=alpha,
        zero_count=zero,
        positive=_store(positive, "positive"),
        negative=_store(negative, "negative"),
    )


def validate_sketch(state: SketchState) -> None:
    """Check the invariants a decoded sketch must satisfy before it is merged or read.

    The wire schema bounds sizes; this adds the semantic rules: supported
    ``alpha``, indices strictly increasing and reachable by some finite
    value, counts positive.

    Args:
        state: the sketch to check.

    Raises:
        ProtocolError: ``INVALID_FIELD`` naming the broken rule.
        TooLargeError: a store has more than ``MAX_SKETCH_BUCKETS`` buckets.
    """
    low, high = _index_bounds(state.alpha)
    if not _is_int(state.zero_count) or state.zero_count < 0:
        raise ProtocolError("sketch zero_count must be >= 0", ErrorCode.INVALID_FIELD)
    for name, store in (("positive", state.positive), ("negative", state.negative)):
        if len(store) > MAX_SKETCH_BUCKETS:
            raise TooLargeError(f"sketch {name} store has more than {MAX_SKETCH_BUCKETS} buckets")
        previous: int | None = None
        for index, count in store:
            if not _is_int(index) or not low <= index <= high:
                raise ProtocolError(
                    f"sketch {name} index {index} outside [{low}, {high}]", ErrorCode.INVALID_FIELD
                )
            if previous is not None and index <= previous:
                raise ProtocolError(
                    f"sketch {name} indices must be strictly increasing", ErrorCode.INVALID_FIELD
                )
            if not _is_int(count) or count <= 0:
                raise ProtocolError(
                    f"sketch {name} bucket counts must be positive", ErrorCode.INVALID_FIELD
                )
            previous = index


def merge_sketch_many(states: Sequence[SketchState]) -> SketchState:
    """Merge sketches by adding bucket counts; exact and independent of order.

    Args:
        states: at least one sketch, all with the same ``alpha``.

    Returns:
        The sketch of the union of the sketched multisets.

    Raises:
        ProtocolError: ``INVALID_FIELD`` for no input, differing ``alpha`` or an
            invalid sketch (see :func:`validate_sketch`).
        TooLargeError: the merged store exceeds ``MAX_SKETCH_BUCKETS`` buckets.
    """
    if not states:
        raise ProtocolError("no sketches to merge", ErrorCode.INVALID_FIELD)
    alpha = states[0].alpha
    zero = 0
    positive: dict[int, int] = {}
    negative: dict[int, int] = {}
    for state in states:
        # Bit-for-bit equal alpha: buckets of different widths cannot be added.
        if state.alpha != alpha:
            raise ProtocolError(
                f"cannot merge sketches with alpha {alpha!r} and {state.alpha!r}",
                ErrorCode.INVALID_FIELD,
            )
        validate_sketch(state)
        zero += state.zero_count
        for store, pairs in ((positive, state.positive), (negative, state.negative)):
            for index, count in pairs:
                store[index] = store.get(index, 0) + count
    return SketchState(
        alpha=alpha,
        zero_count=zero,
        positive=_store(positive, "positive"),
        negative=_store(negative, "negative"),
    )


def merge_sketches(a: SketchState, b: SketchState) -> SketchState:
    """Merge two sketches exactly: ``sketch(A ∪ B) == merge_sketches(sketch(A), sketch(B))``.

    Args:
        a: a sketch.
        b: a sketch with the same ``alpha``.

    Returns:
        The merged sketch.

    Raises:
        ProtocolError: ``INVALID_FIELD`` for differing ``alpha`` or an invalid sketch.
        TooLargeError: the merged store exceeds ``MAX_SKETCH_BUCKETS`` buckets.
    """
    return merge_sketch_many((a, b))


def sketch_count(state: SketchState) -> int:
    """Return the number of values a sketch holds.

    Args:
        state: the sketch.

    Returns:
        ``zero_count`` plus every bucket count.
    """
    return state.zero_count + sum(c for _, c in state.positive) + sum(c for _, c in state.negative)


def _representative(index: int, alpha: float) -> float:
    """``2 * gamma**index / (gamma + 1)``: within ``alpha`` of every point of the bucket."""
    g = gamma(alpha)
    try:
        return math.exp(index * math.log(g)) * (2.0 / (g + 1.0))
    except OverflowError:
        # Only the topmost reachable index can overflow; its values are <= DBL_MAX.
        return sys.float_info.max


def sketch_quantiles(state: SketchState, ranks: Sequence[float]) -> tuple[float | None, ...]:
    """Estimate several quantiles in one pass over the buckets.

    Args:
        state: a valid sketch.
        ranks: quantile ranks ``q`` in ``[0, 1]``.

    Returns:
        One estimate per rank (see :func:`sketch_quantile`), all ``None`` when
        the sketch is empty.

    Raises:
        ProtocolError: ``INVALID_FIELD`` for a rank outside ``[0, 1]`` or an
            invalid sketch.
    """
    validate_sketch(state)
    for q in ranks:
        if not (_is_real(q) and 0.0 <= q <= 1.0):
            raise ProtocolError(f"quantile rank {q!r} outside [0, 1]", ErrorCode.INVALID_FIELD)
    n = sketch_count(state)
    if n == 0:
        return tuple(None for _ in ranks)
    # Buckets in value order: most negative first (largest negative index),
    # then zero, then positive by increasing index.
    ordered: list[tuple[int, float]] = [
        (c, -_representative(i, state.alpha)) for i, c in reversed(state.negative)
    ]
    if state.zero_count:
        ordered.append((state.zero_count, 0.0))
    ordered.extend((c, _representative(i, state.alpha)) for i, c in state.positive)
    results: list[float | None] = []
    for q in ranks:
        # Node contract: the q-quantile is the element of 0-based rank floor(q*(n-1)).
        rank = min(max(math.floor(q * (n - 1)), 0), n - 1)
        seen = 0
        estimate = ordered[-1][1]
        for count, value in ordered:
            seen += count
            if seen > rank:
                estimate = value
                break
        results.append(estimate)
    return tuple(results)


def sketch_quantile(state: SketchState, q: float) -> float | None:
    """Estimate the ``q``-quantile (rank ``floor(q * (n - 1))``) from a sketch.

    The estimate ``v̂`` of the true element ``v`` satisfies
    ``|v̂ - v| <= alpha * |v|`` for ``|v| >= ZERO_THRESHOLD`` and ``v̂ == 0``
    otherwise, up to ~1e-13 relative floating-point rounding (module docstring).

    Args:
        state: a valid sketch.
        q: the quantile rank in ``[0, 1]``.

    Returns:
        The estimate, or ``None`` for an empty sketch.

    Raises:
        ProtocolError: ``INVALID_FIELD`` for ``q`` outside ``[0, 1]`` or an
            invalid sketch.
    """
    return sketch_quantiles(state, (q,))[0]
