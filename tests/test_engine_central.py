"""The central property at node level: federated answer = central answer.

Random rows are split across 1..4 cities, each with its own data directory,
catalog and (read-only) query engine. Every city answers the same random
query; the answers travel through the wire codec and are merged with
``hansa.federation.combine.combine_answers``. The result is compared with
DuckDB SQL, written independently of the engine, over the union of the raw
rows: exact for counts, integer sums, min, max and histograms; within float
tolerance for float sums, means and variances; within the sketch bound for
quantiles. With a minimum group size ``k``, each city must suppress exactly
the cells where it has fewer than ``k`` rows, and the combined cells must
equal the central query over the union of the rows of the cells each city
released.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hansa.federation.combine import HistogramCounts, combine_answers
from hansa.federation.sketch import DEFAULT_ALPHA
from hansa.node.catalog import Catalog
from hansa.node.engine import QueryEngine
from hansa.protocol.codec import decode_as, encode
from hansa.protocol.messages import (
    Aggregate,
    ColumnRole,
    Count,
    Dimension,
    Filter,
    FilterOp,
    GroupKey,
    Histogram,
    Max,
    Mean,
    Min,
    PolicyTags,
    Quantiles,
    Query,
    QueryAnswer,
    QueryRequest,
    ResultScope,
    Stddev,
    Sum,
    SuppressionReason,
    TimeBucket,
    TimeUnit,
    Variance,
)

SCHEMA = (
    ("cat", "VARCHAR"),
    ("num", "BIGINT"),
    ("flag", "BOOLEAN"),
    ("iv", "BIGINT"),
    ("fv", "DOUBLE"),
    ("ts", "TIMESTAMP"),
    ("d", "DATE"),
)
ROLES = {"num": ColumnRole.DIMENSION, "flag": ColumnRole.DIMENSION}
EDGES = (-500.0, 0.0, 250.0, 1000.0)
RANKS = (0.0, 0.25, 0.5, 0.9, 1.0)

row_strategy = st.tuples(
    st.sampled_from(["a", "b", "c", None]),
    st.sampled_from([1, 2, 3]),
    st.booleans(),
    # Values on and next to the histogram edges and bucket boundaries are drawn often.
    st.one_of(
        st.none(),
        st.sampled_from([-501, -500, 0, 249, 250, 999, 1000, 1001]),
        st.integers(-1000, 1500),
    ),
    st.one_of(
        st.none(),
        st.sampled_from([0.0, -0.0, 1e-12, 1.5]),
        st.floats(-1000, 1000, allow_nan=False, allow_infinity=False),
    ),
    st.one_of(
        st.none(),
        st.sampled_from(
            [
                dt.datetime(2021, 1, 31, 23, 59, 59),
                dt.datetime(2021, 2, 1, 0, 0, 0),
                dt.datetime(2021, 2, 7, 23, 0, 0, 999_999),
                dt.datetime(2021, 2, 8, 0, 59, 59),
            ]
        ),
        st.datetimes(min_value=dt.datetime(2021, 1, 1), max_value=dt.datetime(2021, 3, 31)),
    ),
    st.one_of(st.none(), st.dates(min_value=dt.date(2021, 1, 1), max_value=dt.date(2021, 3, 31))),
)

# (aggregate, expected SQL over the kept rows or None when computed from the value list)
AGGREGATES: list[tuple[Aggregate, str]] = [
    (Count(), "COUNT(*)"),
    (Count("fv"), "COUNT(fv)"),
    (Count("cat"), "COUNT(cat)"),
    (Sum("iv"), "SUM(iv)"),
    (Sum("fv"), "SUM(fv)"),
    (Mean("fv"), "AVG(fv)"),
    (Mean("iv"), "AVG(iv)"),
    (Variance("iv"), "VAR_SAMP(iv)"),
    (Stddev("fv"), "STDDEV_SAMP(fv)"),
    (Min("iv"), "MIN(iv)"),
    (Max("fv"), "MAX(fv)"),
    (Min("fv"), "MIN(fv)"),
    (Histogram("iv", EDGES), "LIST(iv) FILTER (WHERE iv IS NOT NULL)"),
    (Quantiles("fv", RANKS), "LIST(fv) FILTER (WHERE fv IS NOT NULL)"),
    (Quantiles("iv", (0.5,)), "LIST(iv) FILTER (WHERE iv IS NOT NULL)"),
]
FILTERS: list[tuple[Filter, str]] = [
    (Filter("iv", FilterOp.GT, (0,)), "iv > 0"),
    (Filter("cat", FilterOp.IN, ("a", "b")), "cat IN ('a', 'b')"),
    (Filter("fv", FilterOp.NOT_NULL), "fv IS NOT NULL"),
    (Filter("num", FilterOp.NE, (2,)), "num <> 2"),
    (Filter("flag", FilterOp.EQ, (True,)), "flag"),
    (Filter("ts", FilterOp.LT, ("2021-02-15T00:00:00",)), "ts < TIMESTAMP '2021-02-15 00:00:00'"),
    (
        Filter("d", FilterOp.BETWEEN, ("2021-01-10", "2021-02-20")),
        "d BETWEEN DATE '2021-01-10' AND DATE '2021-02-20'",
    ),
    (Filter("fv", FilterOp.LE, (10.5,)), "fv <= 10.5"),
]
GROUP_KEYS: list[tuple[GroupKey, str]] = [
    (Dimension("cat"), "cat"),
    (Dimension("num"), "num"),
    (Dimension("flag"), "flag"),
    (TimeBucket("ts", TimeUnit.DAY), "strftime(ts, '%Y-%m-%d')"),
    (TimeBucket("ts", TimeUnit.MONTH), "strftime(ts, '%Y-%m-01')"),
    (TimeBucket("ts", TimeUnit.HOUR), "strftime(ts, '%Y-%m-%dT%H:00:00')"),
    (TimeBucket("ts", TimeUnit.HOUR_OF_DAY), "CAST(strftime(ts, '%H') AS BIGINT)"),
    (TimeBucket("d", TimeUnit.WEEK), "strftime(d - CAST(isodow(d) - 1 AS INTEGER), '%Y-%m-%d')"),
    (TimeBucket("d", TimeUnit.DAY_OF_WEEK), "CAST(strftime(d, '%u') AS BIGINT)"),
]


@dataclass(frozen=True)
class Case:
    cities: list[list[tuple[Any, ...]]]
    aggregates: list[tuple[Aggregate, str]]
    filters: list[tuple[Filter, str]]
    group_by: list[tuple[GroupKey, str]]
    k: int


cases = st.builds(
    Case,
    cities=st.lists(st.lists(row_strategy, max_size=25), min_size=1, max_size=4),
    aggregates=st.lists(st.sampled_from(AGGREGATES), min_size=1, max_size=5),
    filters=st.lists(st.sampled_from(FILTERS), max_size=2, unique_by=lambda f: f[1]),
    group_by=st.lists(st.sampled_from(GROUP_KEYS), max_size=2, unique_by=lambda g: g[1]),
    k=st.sampled_from([1, 1, 2, 3]),
)


def load_city(root: Path, rows: list[tuple[Any, ...]], k: int) -> Path:
    """Write the rows with explicit types to Parquet and register them in a new catalog."""
    root.mkdir(parents=True)
    src = root / "rows.parquet"
    con = duckdb.connect()
    con.execute("CREATE TABLE t (" + ", ".join(f"{n} {t}" for n, t in SCHEMA) + ")")
    if rows:
        con.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    con.execute(f"COPY t TO '{src}' (FORMAT parquet)")
    con.close()
    data_dir = root / "node"
    with Catalog(data_dir) as catalog:
        catalog.add("t", src, roles=ROLES)
        catalog.configure("t", min_group_size=k, dominance_p=100, max_groups=100_000)
    return data_dir


def request(query: Query, city: str, targets: tuple[str, ...]) -> QueryRequest:
    return QueryRequest(
        requester="ana@example",
        issued_at=1,
        expires_at=2,
        nonce=bytes(16),
        roster_version=0,
        policy=PolicyTags(
            purpose="research",
            legal_basis="test",
            scope=ResultScope.ALLIANCE,
            analyst="ana@example",
        ),
        query=query,
        targets=targets,
        quorum=1,
    )


def close(a: Any, b: Any, *, rel: float = 1e-9, abs_: float = 1e-6) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=abs_)


def check_value(aggregate: Aggregate, got: Any, expected: Any) -> None:
    if isinstance(aggregate, Count | Min | Max) or (
        isinstance(aggregate, Sum) and aggregate.column == "iv"
    ):
        assert got == expected, (aggregate, got, expected)
        if isinstance(got, float) or isinstance(expected, float):
            assert type(got) is type(expected)
    elif isinstance(aggregate, Sum | Mean):
        assert close(got, expected), (aggregate, got, expected)
    elif isinstance(aggregate, Variance | Stddev):
        assert close(got, expected, rel=1e-6), (aggregate, got, expected)
    elif isinstance(aggregate, Histogram):
        values = expected or []
        edges = aggregate.edges
        bins = [
            sum(1 for v in values if lo <= v < hi or (i == len(edges) - 2 and v == hi))
            for i, (lo, hi) in enumerate(itertools.pairwise(edges))
        ]
        assert isinstance(got, HistogramCounts)
        assert list(got.counts) == bins
        assert got.below == sum(1 for v in values if v < edges[0])
        assert got.above == sum(1 for v in values if v > edges[-1])
    elif isinstance(aggregate, Quantiles):
        values = sorted(expected or [])
        assert len(got) == len(aggregate.ranks)
        for q, estimate in zip(aggregate.ranks, got, strict=True):
            if not values:
                assert estimate is None
                continue
            true = values[math.floor(q * (len(values) - 1))]
            # DDSketch bound (sketch module): relative alpha, zero bucket below 1e-9.
            bound = DEFAULT_ALPHA * abs(true) * (1 + 1e-9) + 1e-9
            assert abs(estimate - true) <= bound, (q, estimate, true)
    else:  # pragma: no cover
        raise AssertionError(aggregate)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@example(
    case=Case(
        cities=[
            [
                (
                    "a",
                    1,
                    True,
                    1000,
                    0.0,
                    dt.datetime(2021, 1, 31, 23, 59, 59),
                    dt.date(2021, 2, 7),
                ),
                ("a", 2, False, -500, -2.5, dt.datetime(2021, 2, 1), dt.date(2021, 2, 8)),
                ("b", 3, True, 250, None, None, None),
            ],
            [("a", 1, True, 1001, 1e-12, dt.datetime(2021, 2, 1, 0, 0, 1), dt.date(2021, 1, 4))],
            [],
        ],
        aggregates=[AGGREGATES[12], AGGREGATES[13], AGGREGATES[3]],
        filters=[],
        group_by=[GROUP_KEYS[0], GROUP_KEYS[4]],
        k=1,
    )
)
@example(
    case=Case(
        cities=[
            [("a", 1, True, 5, 1.0, None, None)] * 2,
            [("b", 2, False, 7, 2.0, None, None)],
            [],
        ],
        aggregates=[AGGREGATES[0], AGGREGATES[4]],
        filters=[],
        group_by=[],
        k=2,
    )
)
@given(case=cases)
def test_federated_answer_equals_central_answer(case: Case) -> None:
    query = Query(
        dataset="t",
        aggregates=tuple(a for a, _ in case.aggregates),
        filters=tuple(f for f, _ in case.filters),
        group_by=tuple(g for g, _ in case.group_by),
        max_groups=100_000,
    )
    names = tuple(f"c{i}" for i in range(len(case.cities)))
    answers: list[QueryAnswer] = []
    with tempfile.TemporaryDirectory() as tmp:
        for city, rows in zip(names, case.cities, strict=True):
            data_dir = load_city(Path(tmp) / city, rows, case.k)
            engine = QueryEngine(data_dir)  # read-only, as a serving node opens it
            try:
                result = engine.answer(request(query, city, names))
            finally:
                engine.close()
            answer = QueryAnswer(
                request_id=bytes(32),
                responder=city,
                requester="ana@example",
                issued_at=1,
                dataset="t",
                dataset_version=result.dataset_version,
                disclosure_version=result.disclosure_version,
                decision=result.decision,
                groups=result.groups,
                suppressed=result.suppressed,
            )
            # Whatever the engine releases must survive the wire unchanged.
            assert decode_as(encode(answer), QueryAnswer) == answer
            answers.append(answer)
    combined = combine_answers(query, answers)

    # --- the central computation, in SQL written independently of the engine ---------------
    con = duckdb.connect()
    con.execute("CREATE TABLE u (city VARCHAR, " + ", ".join(f"{n} {t}" for n, t in SCHEMA) + ")")
    for city, rows in zip(names, case.cities, strict=True):
        if rows:
            con.executemany(
                "INSERT INTO u VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [(city, *r) for r in rows]
            )
    where = " AND ".join(f"({sql})" for _, sql in case.filters) or "TRUE"
    keys = [f"{sql} AS g{i}" for i, (_, sql) in enumerate(case.group_by)]
    gnames = [f"g{i}" for i in range(len(keys))]
    base = f"SELECT *{''.join(', ' + k for k in keys)} FROM u WHERE {where}"

    # Each city suppresses exactly its cells with fewer than k rows.
    per_city = con.execute(
        f"SELECT city{''.join(', ' + g for g in gnames)}, COUNT(*) FROM ({base}) GROUP BY ALL"
    ).fetchall()
    counts = {(r[0], tuple(r[1:-1])): int(r[-1]) for r in per_city}
    for city, answer in zip(names, answers, strict=True):
        got = {c.key for c in answer.suppressed}
        assert all(c.reason is SuppressionReason.MIN_GROUP_SIZE for c in answer.suppressed)
        if gnames:
            want = {key for (c, key), n in counts.items() if c == city and n < case.k}
            released = {key for (c, key), n in counts.items() if c == city and n >= case.k}
        else:
            n = counts.get((city, ()), 0)
            want = {()} if n < case.k else set()
            released = set() if n < case.k else {()}
        assert got == want
        assert {g.key for g in answer.groups} == released

    # The merged cells equal the central query over the rows of the released cells.
    partition = ", ".join(["city", *gnames])
    kept = f"SELECT * FROM ({base}) QUALIFY COUNT(*) OVER (PARTITION BY {partition}) >= {case.k}"
    aggs = ", ".join(sql for _, sql in case.aggregates)
    group_clause = f"GROUP BY {', '.join(gnames)}" if gnames else ""
    central = con.execute(
        f"SELECT {''.join(g + ', ' for g in gnames)}{aggs} FROM ({kept}) {group_clause}"
        " HAVING COUNT(*) > 0"
    ).fetchall()
    con.close()
    expected = {tuple(r[: len(gnames)]): r[len(gnames) :] for r in central}
    released_rows = {row.key: row for row in combined.rows if row.released}
    assert set(released_rows) == set(expected)
    for key, values in expected.items():
        row = released_rows[key]
        for (aggregate, _), value, want in zip(case.aggregates, row.values, values, strict=True):
            check_value(aggregate, value, want)
    # Cells no city released are reported as suppressed by every city that has them.
    for row in combined.rows:
        suppressed_by = {c for c, _ in row.suppressed}
        for city in names:
            n = counts.get((city, row.key), 0)
            assert (city in suppressed_by) == (0 < n < case.k or (not gnames and n < case.k))
