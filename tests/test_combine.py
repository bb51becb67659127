"""Federated answer = central answer, at the pure level (DESIGN, "Core ideas").

Random raw rows are split across 1..6 cities; each city's states come from a
small reference builder (plain Python, exact arithmetic where it matters) or
from DuckDB itself; :func:`combine_answers` merges them; the result must equal
the same aggregates computed over the union of the rows — exactly for
counts, integer sums, min/max and histograms, within float tolerance for
float sums and moments, within the sketch bound for quantiles.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hansa.federation import (
    CombinedResult,
    HistogramCounts,
    combine_answers,
    empty_state,
    finalize,
    key_sort_key,
    merge_many,
    merge_states,
    sketch_from_buckets,
    sketch_from_values,
    sketch_sql_index,
    sketch_sql_sign,
)
from hansa.federation.combine import check_answer
from hansa.federation.sketch import DEFAULT_ALPHA, ZERO_THRESHOLD
from hansa.protocol.codec import decode_as, encode
from hansa.protocol.errors import ErrorCode, HansaError, ProtocolError, TooLargeError
from hansa.protocol.messages import (
    INT_MAX,
    Aggregate,
    AggregateState,
    CellValue,
    Count,
    CountState,
    Decision,
    Dimension,
    Group,
    Histogram,
    HistogramState,
    Max,
    Mean,
    Min,
    MinMaxState,
    MomentsState,
    Quantiles,
    Query,
    QueryAnswer,
    SketchState,
    Stddev,
    Sum,
    SumState,
    SuppressedCell,
    SuppressionReason,
    Variance,
)

CITIES = ("aachen", "bergen", "cadiz", "danzig", "edinburgh", "fez")
EDGES = (-100.0, 0.0, 10.0, 1000.0)
RANKS = (0.0, 0.1, 0.5, 0.9, 1.0)
AGGREGATES: tuple[Aggregate, ...] = (
    Count(),
    Count("i"),
    Count("f"),
    Sum("i"),
    Sum("f"),
    Min("i"),
    Max("i"),
    Min("f"),
    Max("f"),
    Mean("i"),
    Mean("f"),
    Variance("i"),
    Variance("f"),
    Stddev("f"),
    Histogram("f", EDGES),
    Histogram("i", EDGES),
    Quantiles("f", RANKS),
    Quantiles("i", (0.5,)),
)
GROUPED = Query(dataset="listings", aggregates=AGGREGATES, group_by=(Dimension("g"),))
GLOBAL = Query(dataset="listings", aggregates=AGGREGATES)
TOL = {"rel_tol": 1e-9, "abs_tol": 1e-9}


@dataclass(frozen=True)
class Row:
    city: int
    g: str | None
    i: int | None
    f: float | None


# --- strategies -----------------------------------------------------------------------------------

ints = st.one_of(
    st.integers(min_value=-1000, max_value=1000), st.sampled_from([0, -1, 1, 2**40, 2**53 + 1])
)
floats = st.one_of(
    st.floats(min_value=-1e4, max_value=1e4, allow_nan=False),
    st.sampled_from([0.0, -0.0, 1.5, -2.25, 1e-10]),
)


@st.composite
def datasets(draw: st.DrawFn) -> tuple[int, list[Row], set[tuple[int, str | None]]]:
    """k cities, rows split randomly among them, and some (city, key) cells to suppress."""
    k = draw(st.integers(min_value=1, max_value=len(CITIES)))
    rows = draw(
        st.lists(
            st.builds(
                Row,
                city=st.integers(min_value=0, max_value=k - 1),
                g=st.sampled_from(["a", "b", "c", None]),
                i=st.none() | ints,
                f=st.none() | floats,
            ),
            max_size=60,
        )
    )
    suppress = draw(
        st.sets(
            st.tuples(st.integers(min_value=0, max_value=k - 1), st.sampled_from(["a", "b", None])),
            max_size=4,
        )
    )
    return k, rows, suppress


# --- reference state builder (what a node computes, in plain Python) ------------------------------


def column(rows: Sequence[Row], name: str | None) -> list[int | float]:
    out: list[int | float] = []
    for row in rows:
        value = getattr(row, name) if name is not None else 1
        if value is not None:
            out.append(value)
    return out


def exact_moments(values: Sequence[int | float]) -> tuple[Fraction, Fraction]:
    exact = [Fraction(v) for v in values]
    mean = sum(exact, Fraction(0)) / len(exact)
    return mean, sum(((v - mean) ** 2 for v in exact), Fraction(0))


def histogram(values: Sequence[int | float], edges: Sequence[float]) -> tuple[list[int], int, int]:
    counts = [0] * (len(edges) - 1)
    below = above = 0
    for v in values:
        if v < edges[0]:
            below += 1
        elif v > edges[-1]:
            above += 1
        else:
            # [e_i, e_{i+1}) for every bin but the last, which is closed.
            index = max(j for j in range(len(edges) - 1) if edges[j] <= v)
            counts[index] += 1
    return counts, below, above


def ref_state(aggregate: Aggregate, rows: Sequence[Row]) -> AggregateState:
    match aggregate:
        case Count(column=name):
            return CountState(n=len(column(rows, name)))
        case Sum(column=name):
            values = column(rows, name)
            total = sum(values) if name == "i" else math.fsum(values)
            return SumState(n=len(values), total=total)
        case Min(column=name):
            values = column(rows, name)
            return MinMaxState(n=len(values), value=min(values) if values else None)
        case Max(column=name):
            values = column(rows, name)
            return MinMaxState(n=len(values), value=max(values) if values else None)
        case Mean(column=name) | Variance(column=name) | Stddev(column=name):
            values = column(rows, name)
            if not values:
                return MomentsState(n=0, mean=0.0, m2=0.0)
            mean, m2 = exact_moments(values)
            return MomentsState(n=len(values), mean=float(mean), m2=float(m2))
        case Histogram(column=name, edges=edges):
            counts, below, above = histogram(column(rows, name), edges)
            return HistogramState(counts=tuple(counts), below=below, above=above)
        case Quantiles(column=name):
            return sketch_from_values(column(rows, name))
    raise AssertionError(aggregate)


def key_of(query: Query, row: Row) -> tuple[CellValue, ...]:
    return (row.g,) if query.group_by else ()


def answer(
    city: str,
    groups: Sequence[Group],
    suppressed: Sequence[SuppressedCell] = (),
    *,
    dataset: str = "listings",
) -> QueryAnswer:
    return QueryAnswer(
        request_id=bytes(32),
        responder=city,
        requester="ana@aachen",
        issued_at=0,
        dataset=dataset,
        dataset_version="v1",
        disclosure_version=0,
        decision=Decision.SUPPRESSED if suppressed else Decision.ANSWERED,
        groups=tuple(groups),
        suppressed=tuple(suppressed),
    )


def city_answers(
    query: Query, k: int, rows: Sequence[Row], suppress: set[tuple[int, str | None]]
) -> list[QueryAnswer]:
    answers = []
    for c in range(k):
        mine = [r for r in rows if r.city == c]
        # A grouped query has one cell per key present; a global query always one cell.
        keys = list(dict.fromkeys(key_of(query, r) for r in mine)) if query.group_by else [()]
        groups, withheld = [], []
        for key in keys:
            cell = [r for r in mine if key_of(query, r) == key]
            if query.group_by and (c, key[0]) in suppress:
                withheld.append(SuppressedCell(key=key, reason=SuppressionReason.MIN_GROUP_SIZE))
            else:
                groups.append(
                    Group(key=key, states=tuple(ref_state(a, cell) for a in query.aggregates))
                )
        answers.append(answer(CITIES[c], groups, withheld))
    return answers


# --- the central reference ------------------------------------------------------------------------


def assert_central(aggregate: Aggregate, value: object, rows: Sequence[Row]) -> None:
    """Compare a combined final value with the aggregate computed over the union ``rows``."""
    match aggregate:
        case Count(column=name):
            assert value == len(column(rows, name))
        case Sum(column=name):
            values = column(rows, name)
            if not values:
                assert value is None
            elif name == "i":
                assert type(value) is int and value == sum(values)
            else:
                assert isinstance(value, float) and math.isclose(value, math.fsum(values), **TOL)
        case Min(column=name) | Max(column=name):
            values = column(rows, name)
            want = (min if isinstance(aggregate, Min) else max)(values) if values else None
            assert value == want and type(value) is type(want)
        case Mean(column=name):
            values = column(rows, name)
            if not values:
                assert value is None
            else:
                assert isinstance(value, float)
                assert math.isclose(value, float(exact_moments(values)[0]), **TOL)
        case Variance(column=name) | Stddev(column=name):
            values = column(rows, name)
            if len(values) < 2:
                assert value is None
            else:
                variance = float(exact_moments(values)[1] / (len(values) - 1))
                want_f = math.sqrt(variance) if isinstance(aggregate, Stddev) else variance
                assert isinstance(value, float) and math.isclose(value, want_f, **TOL)
        case Histogram(column=name, edges=edges):
            counts, below, above = histogram(column(rows, name), edges)
            assert value == HistogramCounts(edges, tuple(counts), below, above)
        case Quantiles(column=name, ranks=ranks):
            values = sorted(float(v) for v in column(rows, name))
            assert isinstance(value, tuple) and len(value) == len(ranks)
            for q, estimate in zip(ranks, value, strict=True):
                if not values:
                    assert estimate is None
                    continue
                true = values[math.floor(q * (len(values) - 1))]
                assert estimate is not None
                if abs(true) < ZERO_THRESHOLD:
                    assert estimate == 0.0
                else:
                    assert abs(estimate - true) <= (DEFAULT_ALPHA + 1e-12) * abs(true)


def check_against_union(
    query: Query,
    result: CombinedResult,
    k: int,
    rows: Sequence[Row],
    suppress: set[tuple[int, str | None]],
) -> None:
    def withheld(row: Row) -> bool:
        return bool(query.group_by) and (row.city, row.g) in suppress

    expected_keys: set[tuple[CellValue, ...]] = {key_of(query, r) for r in rows}
    if not query.group_by:
        expected_keys = {()}
    assert [row.key for row in result.rows] == sorted(expected_keys, key=key_sort_key)
    assert result.cities == tuple(sorted(CITIES[:k]))
    for combined in result.rows:
        cell = [r for r in rows if key_of(query, r) == combined.key]
        released = [r for r in cell if not withheld(r)]
        contributors = {CITIES[r.city] for r in released}
        suppressors = {CITIES[r.city] for r in cell if withheld(r)}
        if not query.group_by:
            contributors = set(CITIES[:k])
        assert combined.contributors == tuple(sorted(contributors))
        assert combined.suppressed_by == tuple(sorted(suppressors))
        assert combined.partial == bool(suppressors)
        if not contributors:
            assert combined.values == (None,) * len(query.aggregates)
            assert combined.states == tuple(empty_state(a) for a in query.aggregates)
            continue
        for aggregate, value, state in zip(
            query.aggregates, combined.values, combined.states, strict=True
        ):
            assert_central(aggregate, value, released)
            assert finalize(aggregate, state) == value
            if isinstance(aggregate, Quantiles):
                # Sketch merges are exact: the merged sketch is the union's sketch.
                assert state == ref_state(aggregate, released)


# --- the property ---------------------------------------------------------------------------------


@given(data=datasets(), grouped=st.booleans())
def test_federated_equals_central(
    data: tuple[int, list[Row], set[tuple[int, str | None]]], grouped: bool
) -> None:
    k, rows, suppress = data
    query = GROUPED if grouped else GLOBAL
    answers = city_answers(query, k, rows, suppress)
    result = combine_answers(query, answers)
    check_against_union(query, result, k, rows, suppress)
    # The result does not depend on the order the answers arrived in.
    shuffled = list(answers)
    random.Random(len(rows)).shuffle(shuffled)
    assert combine_answers(query, shuffled) == result
    # Nor on the wire: answers survive encoding unchanged.
    assert combine_answers(query, [decode_as(encode(a), QueryAnswer) for a in answers]) == result
    # Answers the fan-out already checked one by one combine to the same, unchecked again.
    for answer in answers:
        check_answer(query, answer)
    assert combine_answers(query, answers, checked=True) == result


@given(
    parts=st.lists(
        st.lists(st.builds(Row, st.just(0), st.just(None), ints, floats)), min_size=3, max_size=3
    )
)
def test_merge_is_commutative_and_associative(parts: list[list[Row]]) -> None:
    a, b, c = parts
    for aggregate in AGGREGATES:
        sa, sb, sc = (ref_state(aggregate, p) for p in parts)
        ab = merge_states(sa, sb, aggregate=aggregate)
        assert ab == merge_states(sb, sa, aggregate=aggregate)
        left = merge_states(ab, sc, aggregate=aggregate)
        right = merge_states(sa, merge_states(sb, sc, aggregate=aggregate), aggregate=aggregate)
        many = merge_many([sc, sa, sb], aggregate=aggregate)
        inexact = isinstance(sa, MomentsState) or (
            isinstance(aggregate, Sum) and aggregate.column == "f"
        )
        if inexact:
            for state in (left, right, many):
                assert_central(aggregate, finalize(aggregate, state), a + b + c)
        else:
            assert left == right == many == ref_state(aggregate, a + b + c)
        # The empty state is the identity.
        assert merge_states(sa, empty_state(aggregate), aggregate=aggregate) == sa


# --- DuckDB cross-check ---------------------------------------------------------------------------

DUCK_INTS = st.one_of(
    st.integers(min_value=-(10**4), max_value=10**4), st.sampled_from([2**53 + 1, -(2**60)])
)
DUCK_FLOATS = st.one_of(
    st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), st.sampled_from([0.0, -0.0])
)
DUCK_AGGREGATES: tuple[Aggregate, ...] = (
    Count(),
    Count("f"),
    Sum("i"),
    Sum("f"),
    Min("i"),
    Max("i"),
    Min("f"),
    Max("f"),
    Mean("i"),
    Mean("f"),
    Variance("i"),
    Variance("f"),
    Stddev("f"),
    Histogram("f", EDGES),
    Quantiles("f", RANKS),
)
DUCK_QUERY = Query(dataset="listings", aggregates=DUCK_AGGREGATES, group_by=(Dimension("g"),))


def histogram_sql(col: str, edges: Sequence[float]) -> list[str]:
    parts = [f"COUNT(*) FILTER (WHERE {col} < {edges[0]!r})"]
    for j in range(len(edges) - 1):
        upper = "<=" if j == len(edges) - 2 else "<"
        parts.append(
            f"COUNT(*) FILTER (WHERE {col} >= {edges[j]!r} AND {col} {upper} {edges[j + 1]!r})"
        )
    parts.append(f"COUNT(*) FILTER (WHERE {col} > {edges[-1]!r})")
    return parts


def duck_states(
    con: duckdb.DuckDBPyConnection,
) -> dict[tuple[int, str | None], list[AggregateState]]:
    """Per (city, g) states computed by DuckDB, the way a node pushes them down."""
    hist = ", ".join(histogram_sql("f", EDGES))
    rows = con.execute(
        "SELECT city, g, COUNT(*), COUNT(i), COALESCE(SUM(i), 0), MIN(i), MAX(i),"
        " COUNT(f), COALESCE(SUM(f), 0.0), MIN(f), MAX(f),"
        " COALESCE(AVG(i), 0.0), COALESCE(VAR_POP(i) * COUNT(i), 0.0),"
        f" COALESCE(AVG(f), 0.0), COALESCE(VAR_POP(f) * COUNT(f), 0.0), {hist}"
        " FROM t GROUP BY city, g"
    ).fetchall()
    states: dict[tuple[int, str | None], list[AggregateState]] = {}
    for city, g, n, ni, si, mini, maxi, nf, sf, minf, maxf, ai, m2i, af, m2f, *h in rows:
        moments_i = MomentsState(n=ni, mean=float(ai), m2=float(m2i))
        moments_f = MomentsState(n=nf, mean=float(af), m2=float(m2f))
        states[(city, g)] = [
            CountState(n=n),
            CountState(n=nf),
            SumState(n=ni, total=int(si)),
            SumState(n=nf, total=float(sf)),
            MinMaxState(n=ni, value=mini),
            MinMaxState(n=ni, value=maxi),
            MinMaxState(n=nf, value=minf),
            MinMaxState(n=nf, value=maxf),
            moments_i,
            moments_f,
            moments_i,
            moments_f,
            moments_f,
            HistogramState(counts=tuple(h[1:-1]), below=h[0], above=h[-1]),
        ]
    sign, index = sketch_sql_sign("f"), sketch_sql_index("f")
    buckets: dict[tuple[int, str | None], list[tuple[int, int | None, int]]] = {}
    for city, g, s, idx, count in con.execute(
        f"SELECT city, g, {sign} AS s, {index} AS ix, COUNT(*) FROM t"
        " WHERE f IS NOT NULL GROUP BY city, g, s, ix"
    ).fetchall():
        buckets.setdefault((city, g), []).append((s, idx, count))
    for cell, cell_states in states.items():
        cell_states.append(sketch_from_buckets(buckets.get(cell, [])))
    return states


@settings(max_examples=40)
@given(
    rows=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=5),
            st.sampled_from(["a", "b", "c", None]),
            st.none() | DUCK_INTS,
            st.none() | DUCK_FLOATS,
        ),
        max_size=50,
    )
)
def test_matches_duckdb_over_the_union(
    rows: list[tuple[int, str | None, int | None, float | None]],
) -> None:
    con = duckdb.connect()
    try:
        con.execute("CREATE TABLE t (city INTEGER, g VARCHAR, i BIGINT, f DOUBLE)")
        if rows:
            con.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", rows)
        answers = []
        per_cell = duck_states(con)
        for c in sorted({city for city, _ in per_cell}):
            groups = [
                Group(key=(g,), states=tuple(states))
                for (city, g), states in per_cell.items()
                if city == c
            ]
            answers.append(answer(CITIES[c], groups))
        result = combine_answers(DUCK_QUERY, answers)
        central = con.execute(
            "SELECT g, COUNT(*), COUNT(f), SUM(i), SUM(f), MIN(i), MAX(i), MIN(f), MAX(f),"
            " AVG(i), AVG(f), VAR_SAMP(i), VAR_SAMP(f), STDDEV_SAMP(f),"
            f" {', '.join(histogram_sql('f', EDGES))}"
            " FROM t GROUP BY g ORDER BY g"
        ).fetchall()
        union_buckets = con.execute(
            f"SELECT {sketch_sql_sign('f')} AS s, {sketch_sql_index('f')} AS ix, COUNT(*), g"
            " FROM t WHERE f IS NOT NULL GROUP BY g, s, ix"
        ).fetchall()
    finally:
        con.close()
    # Same cells, in the same order as DuckDB's ORDER BY g (NULLS LAST).
    assert [row.key for row in result.rows] == [(r[0],) for r in central]
    for combined, want in zip(result.rows, central, strict=True):
        got = combined.values
        exact = (got[0], got[1], got[2], got[4], got[5], got[6], got[7])
        assert exact == (want[1], want[2], want[3], want[5], want[6], want[7], want[8])
        assert got[2] is None or type(got[2]) is int
        for position, column_index in ((3, 4), (8, 9), (9, 10), (10, 11), (11, 12), (12, 13)):
            value, reference = got[position], want[column_index]
            if reference is None:
                assert value is None
            else:
                assert isinstance(value, float) and math.isclose(value, reference, **TOL)
        histogram_value = got[13]
        assert isinstance(histogram_value, HistogramCounts)
        h = want[14:]
        assert (histogram_value.below, *histogram_value.counts, histogram_value.above) == h
        sketch = combined.states[14]
        union = sketch_from_buckets([(s, ix, n) for s, ix, n, g in union_buckets if g == want[0]])
        assert sketch == union


# --- typed keys and ordering ----------------------------------------------------------------------


ONE_COUNT = Query(dataset="listings", aggregates=(Count(),), group_by=(Dimension("g"),))


def counts(*keys: CellValue) -> list[Group]:
    return [Group(key=(k,), states=(CountState(n=1),)) for k in keys]


def test_keys_match_by_type() -> None:
    result = combine_answers(
        ONE_COUNT,
        [
            # One answer cannot hold both 1 and True (the wire rejects equal keys),
            # so each typed twin comes from its own city.
            answer("aachen", counts(1, "1", None, 0.0)),
            answer("bergen", counts(1.0, None, -0.0)),
            answer("cadiz", counts(True, 2)),
            answer("danzig", counts(1)),
        ],
    )
    by_key = {(type(row.key[0]).__name__, row.key[0]): row.values[0] for row in result.rows}
    assert by_key == {
        ("int", 1): 2,
        ("float", 1.0): 1,
        ("bool", True): 1,
        ("str", "1"): 1,
        ("NoneType", None): 2,
        ("float", 0.0): 2,  # -0.0 and 0.0 are one SQL group
        ("int", 2): 1,
    }
    # Booleans, then numbers (int before an equal float), then strings, then NULL.
    assert [row.key[0] for row in result.rows] == [True, 0.0, 1, 1.0, 2, "1", None]
    assert math.copysign(1.0, result.rows[1].key[0]) == 1.0  # type: ignore[arg-type]
    row = result.get((1.0,))
    assert row is not None and type(row.key[0]) is float and row.contributors == ("bergen",)
    assert result.cities == ("aachen", "bergen", "cadiz", "danzig")
    assert result.get(("missing",)) is None


@given(
    st.lists(
        st.one_of(
            st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=3)
        ),
        max_size=20,
    )
)
def test_key_order_is_total(values: list[CellValue]) -> None:
    keys = [(v,) for v in values]
    ordered = sorted(keys, key=key_sort_key)
    assert sorted(reversed(keys), key=key_sort_key) == ordered
    for a, b in itertools.pairwise(ordered):
        assert key_sort_key(a) <= key_sort_key(b)


# --- suppression ----------------------------------------------------------------------------------


def test_suppressed_cells_are_excluded_and_recorded() -> None:
    query = Query(dataset="listings", aggregates=(Count(), Sum("i")), group_by=(Dimension("g"),))
    withheld = SuppressedCell(key=("b",), reason=SuppressionReason.DOMINANCE)
    result = combine_answers(
        query,
        [
            answer("aachen", [Group(key=("a",), states=(CountState(3), SumState(3, 30)))]),
            answer(
                "bergen",
                [Group(key=("a",), states=(CountState(2), SumState(2, 5)))],
                [withheld, SuppressedCell(key=("c",), reason=SuppressionReason.MIN_GROUP_SIZE)],
            ),
            answer("cadiz", [Group(key=("b",), states=(CountState(7), SumState(7, 70)))]),
        ],
    )
    a, b, c = result.rows
    assert a.values == (5, 35) and a.suppressed == () and not a.partial
    assert b.values == (7, 70) and b.contributors == ("cadiz",)
    assert b.suppressed == (("bergen", SuppressionReason.DOMINANCE),) and b.partial
    assert c.values == (None, None) and not c.released and c.suppressed_by == ("bergen",)
    assert result.partial_rows == (b, c)


# --- invalid answers are rejected, naming the city ------------------------------------------------


def rejects(query: Query, answers: Sequence[QueryAnswer], city: str) -> None:
    with pytest.raises(ProtocolError) as info:
        combine_answers(query, answers)
    assert info.value.code == ErrorCode.INVALID_FIELD
    assert city in info.value.message


def test_wrong_arity_and_kind_are_rejected() -> None:
    query = Query(dataset="listings", aggregates=(Count(), Mean("f")), group_by=(Dimension("g"),))
    good = answer("aachen", [Group(key=("a",), states=(CountState(1), MomentsState(1, 2.0, 0.0)))])
    assert combine_answers(query, [good]).rows[0].values == (1, 2.0)
    rejects(query, [good, answer("bergen", [Group(key=("a",), states=(CountState(1),))])], "bergen")
    rejects(
        query,
        [good, answer("bergen", [Group(key=("a",), states=(CountState(1), SumState(1, 2.0)))])],
        "bergen",
    )
    rejects(
        query,
        [answer("fez", [Group(key=("a", "x"), states=(CountState(1), MomentsState(0, 0.0, 0.0)))])],
        "fez",
    )
    rejects(
        query,
        [answer("fez", [Group(key=("a",), states=(CountState(1), MomentsState(2, 1.0, -1.0)))])],
        "fez",
    )
    rejects(query, [good, good], "aachen")
    rejects(query, [answer("cadiz", [], dataset="other")], "cadiz")
    hist = Query(dataset="listings", aggregates=(Histogram("f", EDGES),))
    rejects(hist, [answer("danzig", [Group(key=(), states=(HistogramState((1, 2)),))])], "danzig")
    sums = Query(dataset="listings", aggregates=(Sum("i"),))
    rejects(sums, [answer("danzig", [Group(key=(), states=(SumState(0, 5),))])], "danzig")
    quantiles = Query(dataset="listings", aggregates=(Quantiles("f", (0.5,)),))
    rejects(
        quantiles,
        [
            answer("edinburgh", [Group(key=(), states=(sketch_from_values([1.0], 0.01),))]),
            answer("fez", [Group(key=(), states=(sketch_from_values([1.0], 0.02),))]),
        ],
        "edinburgh, fez",
    )
    # Overflowing the wire keeps its own error type, with the cities named.
    with pytest.raises(TooLargeError, match="aachen, bergen"):
        combine_answers(
            sums,
            [
                answer("aachen", [Group(key=(), states=(SumState(1, INT_MAX),))]),
                answer("bergen", [Group(key=(), states=(SumState(1, 1),))]),
            ],
        )


def test_merge_states_rejects_kind_mismatch() -> None:
    pairs: list[tuple[AggregateState, AggregateState]] = [
        (CountState(1), SumState(1, 1)),
        (MomentsState(1, 1.0, 0.0), SketchState(0.01, 1, (), ())),
        (HistogramState((1,)), HistogramState((1, 2))),
    ]
    for a, b in pairs:
        with pytest.raises(ProtocolError) as info:
            merge_states(a, b)
        assert info.value.code == ErrorCode.INVALID_FIELD
    with pytest.raises(ProtocolError):
        merge_states(CountState(1), CountState(1), aggregate=Sum("i"))
    with pytest.raises(ProtocolError):
        merge_many([])
    with pytest.raises(ProtocolError):
        finalize(Count(), SumState(1, 1))


def test_min_max_need_the_aggregate() -> None:
    a, b = MinMaxState(1, 3), MinMaxState(1, -2.5)
    with pytest.raises(HansaError) as info:
        merge_states(a, b)
    assert info.value.code == ErrorCode.INTERNAL
    assert merge_states(a, b, aggregate=Min("x")) == MinMaxState(2, -2.5)
    assert merge_states(a, b, aggregate=Max("x")) == MinMaxState(2, 3)
    # Ties keep the exact int, whichever comes first.
    for agg in (Min("x"), Max("x")):
        for pair in (
            (MinMaxState(1, 1), MinMaxState(1, 1.0)),
            (MinMaxState(1, 1.0), MinMaxState(1, 1)),
        ):
            merged = merge_states(*pair, aggregate=agg)
            assert isinstance(merged, MinMaxState) and type(merged.value) is int


def test_integer_sums_stay_exact_and_bounded() -> None:
    big = SumState(1, 2**62)
    merged = merge_many([big] * 3)
    assert isinstance(merged, SumState) and merged.total == 3 * 2**62 and type(merged.total) is int
    assert finalize(Sum("i"), merge_states(SumState(1, 2**53 + 1), SumState(1, 1))) == 2**53 + 2
    with pytest.raises(TooLargeError):
        merge_many([SumState(1, INT_MAX), SumState(1, 1)])


def test_finalize_follows_sql() -> None:
    assert finalize(Sum("i"), SumState(0, 0)) is None
    assert finalize(Mean("f"), MomentsState(0, 0.0, 0.0)) is None
    assert finalize(Variance("f"), MomentsState(1, 4.0, 0.0)) is None
    assert finalize(Variance("f"), MomentsState(3, 4.0, 8.0)) == 4.0
    assert finalize(Stddev("f"), MomentsState(3, 4.0, 8.0)) == 2.0
    assert finalize(Quantiles("f", (0.5, 1.0)), sketch_from_values([])) == (None, None)
    assert finalize(Min("f"), MinMaxState(0, None)) is None
