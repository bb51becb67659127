"""The query engine: compilation, every refusal code, buckets, filters and limits."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import itertools
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hansa.node.engine as engine_module
from hansa.federation.sketch import DEFAULT_ALPHA, sketch_from_values
from hansa.node.catalog import Catalog, DatasetSpec, DisclosureSettings
from hansa.node.engine import EngineResult, QueryEngine, ResultCache, _Watchdog, compile_query
from hansa.protocol.codec import decode_as, encode
from hansa.protocol.errors import (
    ErrorCode,
    HansaError,
    PolicyDenied,
    ProtocolError,
    QueryError,
)
from hansa.protocol.messages import (
    Aggregate,
    ColumnRole,
    Count,
    CountState,
    Decision,
    Dimension,
    Filter,
    FilterOp,
    Group,
    GroupKey,
    Histogram,
    HistogramState,
    Max,
    Mean,
    Min,
    MinMaxState,
    MomentsState,
    PolicyTags,
    Quantiles,
    Query,
    QueryRequest,
    ResultScope,
    Scalar,
    SketchState,
    Stddev,
    Sum,
    SumState,
    SuppressionReason,
    TimeBucket,
    TimeUnit,
    Variance,
)

NASTY = "O'Brien; DROP TABLE stays; --"
COLUMNS = ("id", "name", "district", "zone", "flag", "price", "score", "day", "at", "note")


def make_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i in range(60):
        rows.append(
            {
                "id": 1000 + i,
                "name": f"person {i}",
                "district": None if i % 13 == 0 else ("North", "South", "East", "West")[i % 4],
                "zone": i % 3,
                "flag": i % 2 == 0,
                "price": 100_000 if i == 59 else (i * 37) % 200 + 10,
                "score": None if i % 11 == 0 else round((i * 7.3) % 50 - 10, 2),
                "day": dt.date(2021, 1, 1) + dt.timedelta(days=5 * i),
                "at": dt.datetime(2021, 3, 1) + dt.timedelta(hours=7 * i, minutes=i),
                "note": NASTY if i == 3 else ('say "hi"' if i == 4 else f"n{i % 5}"),
            }
        )
    return rows


ROWS = make_rows()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow(["" if r[c] is None else r[c] for c in COLUMNS])
    return path


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalog]:
    root = tmp_path_factory.mktemp("engine")
    src = write_csv(root / "stays.csv", ROWS)
    cat = Catalog(root / "node")
    roles = {"zone": ColumnRole.DIMENSION}
    cat.add("stays", src, roles=roles)
    cat.configure("stays", min_group_size=1, dominance_p=100)
    cat.add("strict", src, roles=roles)
    cat.configure("strict", min_group_size=5, dominance_p=50, max_groups=5)
    yield cat
    cat.close()


@pytest.fixture(scope="module")
def engine(catalog: Catalog) -> Iterator[QueryEngine]:
    eng = QueryEngine(catalog.data_dir, catalog=catalog, timeout_s=30)
    yield eng
    eng.close()


def request(query: Query, purpose: str = "research") -> QueryRequest:
    return QueryRequest(
        requester="ana@example",
        issued_at=1,
        expires_at=2,
        nonce=bytes(16),
        roster_version=0,
        policy=PolicyTags(
            purpose=purpose, legal_basis="test", scope=ResultScope.ALLIANCE, analyst="ana@example"
        ),
        query=query,
        targets=("austin",),
        quorum=1,
    )


def ask(
    engine: QueryEngine,
    aggregates: tuple[Aggregate, ...] = (Count(),),
    *,
    filters: tuple[Filter, ...] = (),
    group_by: tuple[GroupKey, ...] = (),
    dataset: str = "stays",
    max_groups: int = 1000,
    purpose: str = "research",
) -> EngineResult:
    query = Query(
        dataset=dataset,
        aggregates=aggregates,
        filters=filters,
        group_by=group_by,
        max_groups=max_groups,
    )
    return engine.answer(request(query, purpose))


def refused(code: ErrorCode, call: Callable[[], object]) -> HansaError:
    with pytest.raises(HansaError) as info:
        call()
    assert info.value.code is code, info.value.message
    return info.value


def counts(result: EngineResult) -> dict[tuple[Any, ...], int]:
    out = {}
    for g in result.groups:
        state = g.states[0]
        assert isinstance(state, CountState)
        out[g.key] = state.n
    return out


# --- answers ----------------------------------------------------------------------------------


def test_grouped_states_match_python(engine: QueryEngine) -> None:
    result = ask(
        engine,
        (
            Count(),
            Count("score"),
            Sum("price"),
            Sum("score"),
            Mean("score"),
            Variance("price"),
            Stddev("price"),
            Min("score"),
            Max("price"),
        ),
        group_by=(Dimension("district"),),
    )
    assert result.decision is Decision.ANSWERED and result.suppressed == ()
    assert result.dataset_version == engine.catalog.get("stays").version
    assert result.disclosure_version == engine.catalog.get("stays").disclosure.version
    keys = [g.key for g in result.groups]
    assert keys == [("East",), ("North",), ("South",), ("West",), (None,)]  # ordered, NULL last
    for group in result.groups:
        rows = [r for r in ROWS if r["district"] == group.key[0]]
        prices = [r["price"] for r in rows]
        scores = [r["score"] for r in rows if r["score"] is not None]
        n, n_score, s_price, s_score, mean, var, std, mn, mx = group.states
        assert n == CountState(n=len(rows))
        assert n_score == CountState(n=len(scores))
        assert s_price == SumState(n=len(prices), total=sum(prices))
        assert isinstance(s_price.total, int)
        assert isinstance(s_score, SumState) and s_score.n == len(scores)
        assert math.isclose(s_score.total, math.fsum(scores), abs_tol=1e-9)
        assert isinstance(mean, MomentsState)
        assert math.isclose(mean.mean, statistics.fmean(scores))
        for m in (var, std):
            assert isinstance(m, MomentsState) and m.n == len(prices)
            assert math.isclose(m.m2, statistics.pvariance(prices) * len(prices), rel_tol=1e-9)
        assert mn == MinMaxState(n=len(scores), value=min(scores))
        assert mx == MinMaxState(n=len(prices), value=max(prices))


def test_scalar_answer_and_empty_states(engine: QueryEngine) -> None:
    result = ask(engine, (Count(), Sum("price"), Min("score"), Mean("score")))
    assert [g.key for g in result.groups] == [()]
    assert result.groups[0].states[0] == CountState(n=60)
    # A filter that matches nothing: with k = 1 the empty scalar cell is suppressed.
    empty = ask(engine, (Count(),), filters=(Filter("price", FilterOp.LT, (0,)),))
    assert empty.groups == ()
    assert [(c.key, c.reason) for c in empty.suppressed] == [((), SuppressionReason.MIN_GROUP_SIZE)]
    assert empty.decision is Decision.SUPPRESSED
    # All-null measure in a released cell: n = 0 states.
    only_null = ask(
        engine,
        (Count(), Sum("score"), Min("score"), Mean("score"), Quantiles("score", (0.5,))),
        filters=(Filter("score", FilterOp.IS_NULL),),
    )
    _, total, low, moments, sketch = only_null.groups[0].states
    assert total == SumState(n=0, total=0.0)
    assert low == MinMaxState(n=0, value=None)
    assert moments == MomentsState(n=0, mean=0.0, m2=0.0)
    assert sketch == SketchState(alpha=DEFAULT_ALPHA, zero_count=0, positive=(), negative=())


def test_histogram_bins(engine: QueryEngine) -> None:
    edges = (20.0, 50.0, 100.0, 150.0, 209.0)
    result = ask(engine, (Histogram("price", edges),))
    state = result.groups[0].states[0]
    prices = [r["price"] for r in ROWS]
    expected = [sum(1 for p in prices if lo <= p < hi) for lo, hi in itertools.pairwise(edges)]
    expected[-1] += sum(1 for p in prices if p == edges[-1])  # last bin closed
    assert state == HistogramState(
        counts=tuple(expected),
        below=sum(1 for p in prices if p < edges[0]),
        above=sum(1 for p in prices if p > edges[-1]),
    )
    assert sum(1 for p in prices if p == 209) == 1  # the closed upper edge is exercised


def test_quantile_sketch_equals_sketch_of_values(engine: QueryEngine) -> None:
    result = ask(
        engine,
        (Quantiles("score", (0.1, 0.5)), Quantiles("price", (0.9,)), Quantiles("score", (1.0,))),
        group_by=(Dimension("flag"),),
    )
    for group in result.groups:
        rows = [r for r in ROWS if r["flag"] == group.key[0]]
        scores = sketch_from_values([r["score"] for r in rows if r["score"] is not None])
        prices = sketch_from_values([r["price"] for r in rows])
        assert group.states == (scores, prices, scores)
        assert scores.negative and scores.positive  # both stores exercised


def test_dominance_and_min_group_size_suppress(engine: QueryEngine) -> None:
    result = ask(
        engine,
        (Count(), Sum("price")),
        group_by=(Dimension("district"),),
        dataset="strict",
    )
    reasons = {c.key: c.reason for c in result.suppressed}
    # Row 59 (West) has price 100000: it dominates the West cell at p = 50 %.
    assert reasons[("West",)] is SuppressionReason.DOMINANCE
    # Five rows have a NULL district (i % 13 == 0): exactly k, so released.
    assert (None,) in {g.key for g in result.groups}
    assert result.decision is Decision.SUPPRESSED
    # Count alone is not guarded by dominance.
    plain = ask(engine, (Count(),), group_by=(Dimension("district"),), dataset="strict")
    assert plain.suppressed == ()
    # With k = 5, cells of fewer rows are suppressed.
    small = ask(
        engine,
        (Count(),),
        filters=(Filter("price", FilterOp.LT, (40,)),),
        group_by=(Dimension("district"),),
        dataset="strict",
    )
    for cell in small.suppressed:
        n = sum(1 for r in ROWS if r["district"] == cell.key[0] and r["price"] < 40)
        assert n < 5 and cell.reason is SuppressionReason.MIN_GROUP_SIZE
    for group in small.groups:
        assert counts(small)[group.key] >= 5


# --- time buckets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "unit", "bucket"),
    [
        ("at", TimeUnit.HOUR, lambda t: t.replace(minute=0).isoformat(timespec="seconds")),
        ("at", TimeUnit.DAY, lambda t: t.date().isoformat()),
        ("day", TimeUnit.DAY, lambda d: d.isoformat()),
        ("at", TimeUnit.WEEK, lambda t: (t.date() - dt.timedelta(days=t.weekday())).isoformat()),
        ("day", TimeUnit.WEEK, lambda d: (d - dt.timedelta(days=d.weekday())).isoformat()),
        ("day", TimeUnit.MONTH, lambda d: d.replace(day=1).isoformat()),
        ("at", TimeUnit.MONTH, lambda t: t.date().replace(day=1).isoformat()),
        ("day", TimeUnit.YEAR, lambda d: d.replace(month=1, day=1).isoformat()),
        ("day", TimeUnit.DAY_OF_WEEK, lambda d: d.isoweekday()),
        ("at", TimeUnit.DAY_OF_WEEK, lambda t: t.isoweekday()),
        ("at", TimeUnit.HOUR_OF_DAY, lambda t: t.hour),
    ],
)
def test_time_buckets(
    engine: QueryEngine, column: str, unit: TimeUnit, bucket: Callable[[Any], Any]
) -> None:
    result = ask(engine, (Count(),), group_by=(TimeBucket(column, unit),))
    expected: dict[tuple[Any, ...], int] = {}
    for r in ROWS:
        key = (bucket(r[column]),)
        expected[key] = expected.get(key, 0) + 1
    assert counts(result) == expected
    assert [g.key for g in result.groups] == sorted(expected)


def test_two_buckets_on_one_column_and_dimension_dates(engine: QueryEngine) -> None:
    result = ask(
        engine,
        (Count(),),
        group_by=(
            TimeBucket("at", TimeUnit.DAY_OF_WEEK),
            TimeBucket("at", TimeUnit.HOUR_OF_DAY),
            Dimension("flag"),
            Dimension("zone"),
        ),
    )
    assert sum(counts(result).values()) == 60
    assert all(isinstance(k[0], int) and isinstance(k[2], bool) for k in counts(result))


# --- filters ----------------------------------------------------------------------------------

FILTER_CASES: list[tuple[Filter, Callable[[dict[str, Any]], bool]]] = [
    (Filter("district", FilterOp.EQ, ("North",)), lambda r: r["district"] == "North"),
    (
        Filter("district", FilterOp.NE, ("North",)),
        lambda r: r["district"] is not None and r["district"] != "North",
    ),
    (Filter("zone", FilterOp.IN, (0, 2)), lambda r: r["zone"] in (0, 2)),
    (
        Filter("district", FilterOp.NOT_IN, ("North", "South")),
        lambda r: r["district"] is not None and r["district"] not in ("North", "South"),
    ),
    (Filter("price", FilterOp.LT, (100,)), lambda r: r["price"] < 100),
    (Filter("price", FilterOp.LE, (101.5,)), lambda r: r["price"] <= 101.5),
    (Filter("score", FilterOp.GT, (0,)), lambda r: r["score"] is not None and r["score"] > 0),
    (
        Filter("score", FilterOp.GE, (-3.6,)),
        lambda r: r["score"] is not None and r["score"] >= -3.6,
    ),
    (Filter("price", FilterOp.BETWEEN, (47, 121)), lambda r: 47 <= r["price"] <= 121),
    (Filter("score", FilterOp.IS_NULL), lambda r: r["score"] is None),
    (Filter("district", FilterOp.NOT_NULL), lambda r: r["district"] is not None),
    (Filter("flag", FilterOp.EQ, (True,)), lambda r: r["flag"] is True),
    (
        Filter("day", FilterOp.BETWEEN, ("2021-03-01", "2021-06-30")),
        lambda r: dt.date(2021, 3, 1) <= r["day"] <= dt.date(2021, 6, 30),
    ),
    (
        Filter("at", FilterOp.LT, ("2021-03-05T12:00:00",)),
        lambda r: r["at"] < dt.datetime(2021, 3, 5, 12),
    ),
    (
        # With an offset the literal is converted to UTC: 14:00+02:00 is 12:00 UTC.
        Filter("at", FilterOp.LT, ("2021-03-05T14:00:00+02:00",)),
        lambda r: r["at"] < dt.datetime(2021, 3, 5, 12),
    ),
    (Filter("day", FilterOp.GE, ("2021-08-01",)), lambda r: r["day"] >= dt.date(2021, 8, 1)),
    (Filter("note", FilterOp.EQ, (NASTY,)), lambda r: r["note"] == NASTY),
    (Filter("note", FilterOp.IN, ('say "hi"', "n0")), lambda r: r["note"] in ('say "hi"', "n0")),
    (Filter("note", FilterOp.LT, ("n",)), lambda r: r["note"] < "n"),
]


@pytest.mark.parametrize(("flt", "keep"), FILTER_CASES)
def test_filters(engine: QueryEngine, flt: Filter, keep: Callable[[dict[str, Any]], bool]) -> None:
    expected = sum(1 for r in ROWS if keep(r))
    assert expected > 0
    result = ask(engine, (Count(),), filters=(flt,))
    assert result.groups[0].states[0] == CountState(n=expected)


def test_filters_are_a_conjunction(engine: QueryEngine) -> None:
    filters = (
        Filter("zone", FilterOp.EQ, (1,)),
        Filter("flag", FilterOp.EQ, (False,)),
        Filter("price", FilterOp.GE, (50,)),
    )
    expected = sum(1 for r in ROWS if r["zone"] == 1 and not r["flag"] and r["price"] >= 50)
    assert ask(engine, filters=filters).groups[0].states[0] == CountState(n=expected)


def test_literals_are_bound_never_spliced(engine: QueryEngine) -> None:
    compiled = compile_query(
        Query(
            dataset="stays",
            aggregates=(Count(),),
            filters=(Filter("note", FilterOp.EQ, (NASTY,)),),
        ),
        engine.catalog.get("stays"),
    )
    assert NASTY not in compiled.sql and "O'Brien" not in compiled.sql
    assert compiled.params == (NASTY,)
    assert "$1" in compiled.sql
    result = ask(engine, filters=(Filter("note", FilterOp.EQ, (NASTY,)),))
    assert result.groups[0].states[0] == CountState(n=1)
    # The table the literal names is still there.
    assert ask(engine).groups[0].states[0] == CountState(n=60)


def _swap(raw: Any, old: str, new: str) -> Any:
    if isinstance(raw, list):
        return [_swap(item, old, new) for item in raw]
    return new if raw == old else raw


EVIL_NAMES = ("x; DROP TABLE stays", 'x"; DROP TABLE stays; --', "a b", "1x", "x" * 64)


@pytest.mark.parametrize("evil", EVIL_NAMES)
def test_metacharacter_identifiers_cannot_be_decoded(evil: str) -> None:
    placeholder = "placeholder"
    for query in (
        Query(dataset=placeholder, aggregates=(Count(),)),
        Query(dataset="stays", aggregates=(Sum(placeholder),)),
        Query(dataset="stays", aggregates=(Count(),), group_by=(Dimension(placeholder),)),
        Query(
            dataset="stays",
            aggregates=(Count(),),
            filters=(Filter(placeholder, FilterOp.IS_NULL),),
        ),
        Query(
            dataset="stays",
            aggregates=(Count(),),
            group_by=(TimeBucket(placeholder, TimeUnit.DAY),),
        ),
    ):
        # Put the name into the wire bytes directly, bypassing every Python constructor.
        raw = msgspec.msgpack.decode(encode(request(query)))
        tampered = msgspec.msgpack.encode(_swap(raw, placeholder, evil))
        with pytest.raises(ProtocolError):
            decode_as(tampered, QueryRequest)


def test_metacharacter_identifiers_never_reach_sql(engine: QueryEngine) -> None:
    # Even an in-process caller holding a request with a forged name (set behind the
    # constructors' backs) only ever gets schema refusals; no SQL is built from it.
    evil = 'x"; DROP TABLE stays; --'
    total = Sum("price")
    dimension = Dimension("district")
    flt = Filter("district", FilterOp.IS_NULL)
    cases: list[tuple[ErrorCode, Query, Any, str]] = [
        (ErrorCode.UNKNOWN_COLUMN, Query(dataset="stays", aggregates=(total,)), total, "column"),
        (
            ErrorCode.UNKNOWN_COLUMN,
            Query(dataset="stays", aggregates=(Count(),), group_by=(dimension,)),
            dimension,
            "column",
        ),
        (
            ErrorCode.UNKNOWN_COLUMN,
            Query(dataset="stays", aggregates=(Count(),), filters=(flt,)),
            flt,
            "column",
        ),
    ]
    dataset_query = Query(dataset="stays", aggregates=(Count(),))
    cases.append((ErrorCode.UNKNOWN_DATASET, dataset_query, dataset_query, "dataset"))
    for code, query, target, field in cases:
        req = request(query)
        msgspec.structs.force_setattr(target, field, evil)
        refused(code, lambda req=req: engine.answer(req))  # type: ignore[misc]
    assert ask(engine).groups[0].states[0] == CountState(n=60)


# --- refusals ----------------------------------------------------------------------------------


def test_unknown_dataset_and_columns(engine: QueryEngine) -> None:
    refused(ErrorCode.UNKNOWN_DATASET, lambda: ask(engine, dataset="nope"))
    refused(ErrorCode.UNKNOWN_COLUMN, lambda: ask(engine, (Sum("nope"),)))
    refused(ErrorCode.UNKNOWN_COLUMN, lambda: ask(engine, (Count("nope"),)))
    refused(ErrorCode.UNKNOWN_COLUMN, lambda: ask(engine, group_by=(Dimension("nope"),)))
    refused(
        ErrorCode.UNKNOWN_COLUMN,
        lambda: ask(engine, group_by=(TimeBucket("nope", TimeUnit.DAY),)),
    )
    refused(
        ErrorCode.UNKNOWN_COLUMN,
        lambda: ask(engine, filters=(Filter("nope", FilterOp.EQ, (1,)),)),
    )


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("price", "100"),
        ("price", True),
        ("price", 2**63),
        ("score", "1.5"),
        ("district", 1),
        ("district", False),
        ("flag", 1),
        ("flag", "true"),
        ("day", "2021-01-01T00:00:00"),
        ("day", "2021-13-01"),
        ("day", "yesterday"),
        ("day", 20210101),
        ("at", "2021-03-01 25:00"),
        ("at", 1.5),
    ],
)
def test_type_mismatch(engine: QueryEngine, column: str, value: Scalar) -> None:
    err = refused(
        ErrorCode.TYPE_MISMATCH,
        lambda: ask(engine, filters=(Filter(column, FilterOp.EQ, (value,)),)),
    )
    assert isinstance(err, QueryError)
    # The same literal inside IN or BETWEEN is checked too.
    refused(
        ErrorCode.TYPE_MISMATCH,
        lambda: ask(engine, filters=(Filter(column, FilterOp.IN, (value,)),)),
    )


@pytest.mark.parametrize(
    "query_part",
    [
        {"group_by": (Dimension("id"),)},  # identifier
        {"group_by": (Dimension("price"),)},  # measure
        {"group_by": (Dimension("day"),)},  # time: use a bucket
        {"group_by": (Dimension("name"),)},  # hidden
        {"group_by": (TimeBucket("district", TimeUnit.DAY),)},  # not a time column
        {"filters": (Filter("id", FilterOp.EQ, (1000,)),)},  # identifier
        {"filters": (Filter("name", FilterOp.NOT_NULL),)},  # hidden
        {"aggregates": (Count("name"),)},  # hidden
        {"aggregates": (Sum("district"),)},  # dimension
        {"aggregates": (Mean("id"),)},  # identifier
        {"aggregates": (Max("day"),)},  # time
        {"aggregates": (Quantiles("zone", (0.5,)),)},  # dimension
    ],
)
def test_column_role_forbidden(engine: QueryEngine, query_part: dict[str, Any]) -> None:
    refused(ErrorCode.COLUMN_ROLE_FORBIDDEN, lambda: ask(engine, **query_part))


def test_identifier_may_be_counted(engine: QueryEngine) -> None:
    assert ask(engine, (Count("id"),)).groups[0].states[0] == CountState(n=60)


def test_aggregate_not_allowed_and_purpose(engine: QueryEngine, catalog: Catalog) -> None:
    catalog.configure("strict", aggregates={"price": ["count", "sum"], "id": []})
    try:
        refused(
            ErrorCode.AGGREGATE_NOT_ALLOWED, lambda: ask(engine, (Mean("price"),), dataset="strict")
        )
        refused(
            ErrorCode.AGGREGATE_NOT_ALLOWED, lambda: ask(engine, (Count("id"),), dataset="strict")
        )
        cheap = (Filter("price", FilterOp.LT, (1000,)),)  # without the dominating row
        assert ask(engine, (Sum("price"),), filters=cheap, dataset="strict").groups
    finally:
        catalog.configure("strict", aggregates={"price": None, "id": None})
    err = refused(ErrorCode.PURPOSE_NOT_ALLOWED, lambda: ask(engine, purpose="marketing"))
    assert isinstance(err, PolicyDenied)


def test_invalid_queries(engine: QueryEngine) -> None:
    # A repeated group key cannot even be built (the compiler re-checks it anyway).
    with pytest.raises(ValueError):
        Query(
            dataset="stays",
            aggregates=(Count(),),
            group_by=(Dimension("district"), Dimension("district")),
        )
    refused(
        ErrorCode.INVALID_QUERY, lambda: ask(engine, group_by=(TimeBucket("day", TimeUnit.HOUR),))
    )
    refused(
        ErrorCode.INVALID_QUERY,
        lambda: ask(engine, group_by=(TimeBucket("day", TimeUnit.HOUR_OF_DAY),)),
    )


def test_group_cap(engine: QueryEngine) -> None:
    by_district = (Dimension("district"),)
    assert len(ask(engine, group_by=by_district, max_groups=5).groups) == 5
    refused(ErrorCode.TOO_MANY_GROUPS, lambda: ask(engine, group_by=by_district, max_groups=4))
    # The dataset's own cap (5 on "strict") applies even when the query allows more.
    assert len(ask(engine, group_by=by_district, dataset="strict").groups) <= 5
    refused(
        ErrorCode.TOO_MANY_GROUPS,
        lambda: ask(
            engine,
            group_by=(TimeBucket("at", TimeUnit.DAY_OF_WEEK),),
            dataset="strict",
            max_groups=100,
        ),
    )
    # Suppressed cells count towards the cap: with few rows per cell, all 5 districts
    # are suppressed by k = 5, and a cap of 4 still refuses.
    few = (Filter("price", FilterOp.LT, (50,)),)
    result = ask(engine, filters=few, group_by=by_district, dataset="strict")
    assert result.groups == () and len(result.suppressed) == 5
    refused(
        ErrorCode.TOO_MANY_GROUPS,
        lambda: ask(engine, filters=few, group_by=by_district, dataset="strict", max_groups=4),
    )


# --- execution limits ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big")
    src = root / "big.parquet"
    con = duckdb.connect()
    con.execute(
        "COPY (SELECT range AS k, (range % 5000)::VARCHAR AS g, random() * 1000 AS x"
        f" FROM range(400000)) TO '{src}' (FORMAT parquet)"
    )
    con.close()
    with Catalog(root / "node") as cat:
        cat.add("big", src, roles={"k": ColumnRole.MEASURE})
        cat.configure("big", min_group_size=1, max_groups=100_000)
    return root / "node"


def test_timeout(big_dir: Path) -> None:
    # The default engine: read-only, no file access from SQL.
    engine = QueryEngine(big_dir, timeout_s=0.001)
    try:
        heavy = Query(
            dataset="big",
            aggregates=(
                Count(),
                Quantiles("x", (0.5,)),
                Variance("k"),
                Histogram("x", (0.0, 1.0, 2.0)),
            ),
            group_by=(Dimension("g"),),
            max_groups=100_000,
        )
        refused(ErrorCode.QUERY_TIMEOUT, lambda: engine.answer(request(heavy)))
        # The engine keeps working once the limit allows the query.
        engine.timeout_s = 60.0
        result = engine.answer(request(heavy))
        assert len(result.groups) == 5000
        assert sum(counts(result).values()) == 400_000
    finally:
        engine.close()


class FailingCursor:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def execute(self, *args: object) -> FailingCursor:
        if args and args[0] in ("BEGIN TRANSACTION", "ROLLBACK"):
            return self
        raise self.exc

    def interrupt(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (duckdb.OutOfMemoryException("out of memory"), ErrorCode.RESOURCE_LIMIT),
        (duckdb.InterruptException("interrupted"), ErrorCode.QUERY_TIMEOUT),
        (duckdb.IOException("disk on fire"), ErrorCode.INTERNAL),
        (RuntimeError("bug"), ErrorCode.INTERNAL),
    ],
)
def test_duckdb_errors_are_translated(
    engine: QueryEngine, monkeypatch: pytest.MonkeyPatch, exc: Exception, code: ErrorCode
) -> None:
    monkeypatch.setattr(engine.catalog, "cursor", lambda: FailingCursor(exc))
    engine.clear_cache()  # a cached answer would not reach the failing cursor
    err = refused(code, lambda: ask(engine))
    assert not isinstance(err, duckdb.Error)
    assert type(err) is HansaError
    assert err.__cause__ is exc


def test_memory_limit_is_applied(big_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(HansaError):
        QueryEngine(tmp_path, memory_limit="lots")
    with pytest.raises(HansaError):
        QueryEngine(tmp_path, timeout_s=0)
    engine = QueryEngine(big_dir, memory_limit="64MB", threads=1)
    try:
        cur = engine.catalog.cursor()
        limit = cur.execute("SELECT current_setting('memory_limit')").fetchone()
        cur.close()
        assert limit is not None and str(limit[0]).startswith(("61", "64"))  # 64MB or 61.0 MiB
    finally:
        engine.close()


def test_concurrent_answers_agree(engine: QueryEngine) -> None:
    queries: list[tuple[tuple[Aggregate, ...], tuple[GroupKey, ...]]] = [
        ((Count(), Sum("price")), (Dimension("district"),)),
        ((Mean("score"), Quantiles("price", (0.5,))), (TimeBucket("at", TimeUnit.DAY_OF_WEEK),)),
        ((Histogram("price", (0.0, 100.0, 300.0)),), (Dimension("zone"), Dimension("flag"))),
    ]
    expected = [ask(engine, aggs, group_by=keys) for aggs, keys in queries]
    failures: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for i in range(6):
                aggs, keys = queries[(i + offset) % len(queries)]
                assert ask(engine, aggs, group_by=keys) == expected[(i + offset) % len(queries)]
        except BaseException as exc:  # collected and re-raised in the main thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures


def test_reload_and_datasets(engine: QueryEngine, catalog: Catalog) -> None:
    infos = engine.datasets()
    assert [i.name for i in infos] == ["stays", "strict"]
    before = ask(engine, dataset="strict").disclosure_version
    catalog.configure("strict", purposes=["research", "audit"])
    engine.reload()
    assert ask(engine, dataset="strict", purpose="audit").disclosure_version == before + 1
    assert engine.datasets()[1].disclosure.version == before + 1


def test_bigint_minimum_is_exact_under_dominance(tmp_path: Path) -> None:
    # ABS(-2**63) overflows BIGINT; the engine recomputes the magnitudes as HUGEINT.
    src = tmp_path / "extreme.csv"
    src.write_text(f"g,x\na,{-(2**63)}\na,5\na,10\nb,7\nb,8\n")
    with Catalog(tmp_path / "node") as cat:
        cat.add("extreme", src)
        cat.configure("extreme", min_group_size=1, dominance_p=100)
        engine = QueryEngine(tmp_path / "node", catalog=cat)
        result = ask(engine, (Sum("x"), Mean("x")), group_by=(Dimension("g"),), dataset="extreme")
        assert result.groups[0].states[0] == SumState(n=3, total=-(2**63) + 15)
        assert result.groups[1].states[0] == SumState(n=2, total=15)
        cat.configure("extreme", dominance_p=99.9)
        result = ask(engine, (Sum("x"),), group_by=(Dimension("g"),), dataset="extreme")
        # 2**63 / (2**63 + 15) > 99.9 %: cell a is dominated; b (8 / 15) is not.
        assert [(c.key, c.reason) for c in result.suppressed] == [
            (("a",), SuppressionReason.DOMINANCE)
        ]
        assert [g.key for g in result.groups] == [("b",)]


# --- result cache and watchdog ---------------------------------------------------------------


@pytest.fixture()
def own_catalog(tmp_path: Path) -> Iterator[Catalog]:
    """A writable catalog of its own (tests here change data and settings)."""
    cat = Catalog(tmp_path / "node")
    cat.add("stays", write_csv(tmp_path / "stays.csv", ROWS), roles={"zone": ColumnRole.DIMENSION})
    cat.configure("stays", min_group_size=1, dominance_p=100)
    yield cat
    cat.close()


def test_cache_hit_returns_identical_states(engine: QueryEngine, catalog: Catalog) -> None:
    aggregates = (Count(), Sum("price"), Histogram("price", (0.0, 50.0, 150.0)), Min("score"))
    by = (Dimension("district"), Dimension("zone"))
    engine.clear_cache()
    before = engine.cache_info()
    first = ask(engine, aggregates, group_by=by)
    second = ask(engine, aggregates, group_by=by)
    after = engine.cache_info()
    assert second == first
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 1)
    # ... and equal to what an engine without a cache computes.
    uncached = QueryEngine(catalog.data_dir, catalog=catalog, cache_entries=0)
    try:
        assert ask(uncached, aggregates, group_by=by) == first
        assert uncached.cache_info().entries == 0
    finally:
        uncached.close()


def test_cache_key_is_the_encoded_query_not_python_equality(engine: QueryEngine) -> None:
    # True == 1 in Python, so Query objects with these literals compare equal;
    # on the wire they differ, and 1 is not a boolean: it must still be refused.
    assert ask(engine, filters=(Filter("flag", FilterOp.EQ, (True,)),)).groups
    refused(
        ErrorCode.TYPE_MISMATCH, lambda: ask(engine, filters=(Filter("flag", FilterOp.EQ, (1,)),))
    )


def test_request_rules_run_on_every_cache_hit(engine: QueryEngine) -> None:
    by = (Dimension("district"),)
    ask(engine, group_by=by)  # cached now
    denied = request(Query(dataset="stays", aggregates=(Count(),), group_by=by), "marketing")
    refused(ErrorCode.PURPOSE_NOT_ALLOWED, lambda: engine.answer(denied))
    refused(ErrorCode.PURPOSE_NOT_ALLOWED, lambda: engine.cached_answer(denied))


def test_cached_answer_never_touches_duckdb(
    engine: QueryEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    query = Query(dataset="stays", aggregates=(Count(),), group_by=(Dimension("zone"),))
    engine.clear_cache()
    assert engine.cached_answer(request(query)) is None  # a miss: nothing computed
    expected = engine.answer(request(query))
    monkeypatch.setattr(
        engine.catalog, "cursor", lambda: FailingCursor(duckdb.IOException("no DuckDB here"))
    )
    assert engine.cached_answer(request(query)) == expected
    assert engine.answer(request(query)) == expected


def test_cache_is_invalidated_when_the_dataset_is_replaced(
    own_catalog: Catalog, tmp_path: Path
) -> None:
    engine = QueryEngine(own_catalog.data_dir, catalog=own_catalog)
    try:
        by = (Dimension("district"),)
        first = ask(engine, group_by=by)
        assert ask(engine, group_by=by) == first  # a hit
        own_catalog.add("stays", write_csv(tmp_path / "fewer.csv", ROWS[:30]), mode="replace")
        second = ask(engine, group_by=by)
        assert second.dataset_version != first.dataset_version
        assert second.dataset_version == own_catalog.get("stays").version
        assert sum(counts(second).values()) == 30 < sum(counts(first).values())
    finally:
        engine.close()


def test_cache_is_invalidated_when_disclosure_settings_change(own_catalog: Catalog) -> None:
    engine = QueryEngine(own_catalog.data_dir, catalog=own_catalog)
    try:
        by = (Dimension("note"),)  # n0..n4 have 11-12 rows each; two notes have 1 row
        first = ask(engine, group_by=by)
        assert ask(engine, group_by=by) == first
        assert first.suppressed == ()
        own_catalog.configure("stays", min_group_size=5)
        second = ask(engine, group_by=by)
        assert second.disclosure_version == first.disclosure_version + 1
        assert {c.reason for c in second.suppressed} == {SuppressionReason.MIN_GROUP_SIZE}
        assert len(second.groups) + len(second.suppressed) == len(first.groups)
        # An explicit reload empties the cache outright.
        assert engine.cache_info().entries > 0
        engine.reload()
        assert engine.cache_info().entries == 0
        assert ask(engine, group_by=by) == second
    finally:
        engine.close()


def test_cache_hit_is_checked_against_the_whole_spec(own_catalog: Catalog) -> None:
    # Same versions, different spec (as after a hand edit that kept the numbers):
    # the entry is not used.
    engine = QueryEngine(own_catalog.data_dir, catalog=own_catalog)
    try:
        query = Query(dataset="stays", aggregates=(Count(),), group_by=(Dimension("zone"),))
        result = engine.answer(request(query))
        spec = own_catalog.get("stays")
        key = (spec.name, spec.version, spec.disclosure.version, encode(query))
        cache = engine._cache
        assert cache.get(key, spec) == result
        altered = dataclasses.replace(spec, row_count=spec.row_count + 1)
        assert cache.get(key, altered) is None
        assert cache.get(key, spec) is None  # dropped, not kept for the old spec
    finally:
        engine.close()


def _result(n: int, cells: int = 1) -> EngineResult:
    groups = tuple(Group(key=(f"k{i}",), states=(CountState(n=n),)) for i in range(cells))
    return EngineResult("v1-abc", 1, Decision.ANSWERED, groups, ())


def test_result_cache_is_bounded_by_entries_lru(own_catalog: Catalog) -> None:
    spec = own_catalog.get("stays")
    cache = ResultCache(max_entries=3, max_bytes=1 << 20)
    keys = [("stays", spec.version, 1, bytes([i])) for i in range(5)]
    for i, key in enumerate(keys[:3]):
        cache.put(key, spec, _result(i))
    assert cache.get(keys[0], spec) == _result(0)  # now the most recently used
    cache.put(keys[3], spec, _result(3))
    cache.put(keys[4], spec, _result(4))
    assert len(cache) == 3
    assert [cache.get(k, spec) is not None for k in keys] == [True, False, False, True, True]


@given(cells=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_result_cache_is_bounded_by_bytes(cells: list[int]) -> None:
    spec = _SPEC
    cache = ResultCache(max_entries=1000, max_bytes=4096)
    for i, n in enumerate(cells):
        cache.put(("d", "v1", 1, i.to_bytes(2, "big")), spec, _result(7, n))
        info = cache.info()
        assert info.size <= 4096
        assert info.entries <= i + 1
    # A result over an eighth of the budget is never cached.
    cache.put(("d", "v1", 1, b"big"), spec, _result(7, 200))
    assert cache.get(("d", "v1", 1, b"big"), spec) is None


_SPEC = DatasetSpec(
    name="d", version="v1", columns=(), disclosure=DisclosureSettings(), row_count=0
)


def test_result_cache_off_and_bounds_checked(catalog: Catalog) -> None:
    off = ResultCache(max_entries=0)
    off.put(("d", "v1", 1, b"q"), _SPEC, _result(1))
    assert len(off) == 0 and not off.enabled
    with pytest.raises(HansaError):
        ResultCache(max_entries=-1)
    with pytest.raises(HansaError):
        ResultCache(max_bytes=-1)
    engine = QueryEngine(catalog.data_dir, catalog=catalog, cache_entries=2)
    try:
        for zone in range(4):
            ask(engine, filters=(Filter("zone", FilterOp.NE, (zone,)),))
        assert engine.cache_info().entries == 2
        assert engine.cache_info().max_entries == 2
    finally:
        engine.close()


@settings(max_examples=25, deadline=None)
@given(picks=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=12))
def test_cached_answers_equal_uncached_ones(catalog: Catalog, picks: list[int]) -> None:
    menu: list[tuple[tuple[Aggregate, ...], tuple[GroupKey, ...], tuple[Filter, ...]]] = [
        ((Count(),), (Dimension("district"),), ()),
        ((Count(), Sum("price")), (Dimension("zone"),), ()),
        ((Histogram("price", (0.0, 100.0, 300.0)),), (Dimension("flag"),), ()),
        ((Count(),), (TimeBucket("day", TimeUnit.MONTH),), (Filter("price", FilterOp.LT, (150,)),)),
        ((Max("price"), Min("price")), (), (Filter("zone", FilterOp.EQ, (1,)),)),
        ((Count("score"),), (Dimension("note"),), ()),
    ]
    cached = QueryEngine(catalog.data_dir, catalog=catalog, cache_entries=3)
    plain = QueryEngine(catalog.data_dir, catalog=catalog, cache_entries=0)
    try:
        for pick in picks:
            aggs, keys, filters = menu[pick]
            assert ask(cached, aggs, group_by=keys, filters=filters) == ask(
                plain, aggs, group_by=keys, filters=filters
            )
        assert cached.cache_info().entries <= 3
    finally:
        cached.close()
        plain.close()


class CountingCursor:
    """Records interrupts (a stand-in for a DuckDB cursor)."""

    def __init__(self) -> None:
        self.interrupts = 0

    def interrupt(self) -> None:
        self.interrupts += 1


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def test_one_watchdog_interrupts_only_overdue_cursors() -> None:
    watchdog = _Watchdog()
    try:
        slow, fast = CountingCursor(), CountingCursor()
        with watchdog.watch(fast, 60.0) as fast_watch:  # type: ignore[arg-type]
            with watchdog.watch(slow, 0.01) as slow_watch:  # type: ignore[arg-type]
                # Interrupted, and again while it runs (DuckDB may drop the first).
                assert _wait_for(lambda: slow.interrupts >= 2)
                assert slow_watch.fired
            settled = slow.interrupts
            time.sleep(0.1)
            assert slow.interrupts == settled  # released: never interrupted again
            assert not fast_watch.fired and fast.interrupts == 0
        assert watchdog.watching == 0
        # Many short answers share the one thread and leave no work behind.
        for _ in range(200):
            with watchdog.watch(CountingCursor(), 60.0):  # type: ignore[arg-type]
                pass
        assert watchdog.watching == 0
        assert len(watchdog._heap) <= 64 + 4
    finally:
        watchdog.close()
    with pytest.raises(HansaError):
        watchdog.watch(CountingCursor(), 1.0)  # type: ignore[arg-type]


def test_watchdog_thread_ends_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "_WATCHDOG_IDLE_S", 0.02)
    watchdog = _Watchdog()
    try:
        with watchdog.watch(CountingCursor(), 60.0):  # type: ignore[arg-type]
            thread = watchdog._thread
            assert thread is not None and thread.is_alive()
        thread.join(timeout=10)
        assert not thread.is_alive()
        cursor = CountingCursor()
        with watchdog.watch(cursor, 0.01):  # type: ignore[arg-type]
            assert _wait_for(lambda: cursor.interrupts >= 1)  # a new thread took over
    finally:
        watchdog.close()


def test_timeouts_and_answers_interleave_on_one_engine(big_dir: Path) -> None:
    # The engine's one watchdog times out a slow query while fast ones keep being
    # answered, and a cursor that was interrupted is never reused.
    engine = QueryEngine(big_dir, timeout_s=0.001, cache_entries=0)
    try:
        heavy = Query(
            dataset="big",
            aggregates=(Count(), Quantiles("x", (0.5,)), Variance("k")),
            group_by=(Dimension("g"),),
            max_groups=100_000,
        )
        light = Query(dataset="big", aggregates=(Count(),))
        for _ in range(3):
            engine.timeout_s = 0.001
            refused(ErrorCode.QUERY_TIMEOUT, lambda: engine.answer(request(heavy)))
            engine.timeout_s = 60.0
            (group,) = engine.answer(request(light)).groups
            assert group.states == (CountState(n=400_000),)
    finally:
        engine.close()


def test_non_finite_float_group_keys_never_reach_the_wire(tmp_path: Path) -> None:
    # The wire allows only finite floats in cell keys (spec §7.2). The catalog
    # stores NaN/inf as NULL on import, and the engine refuses a non-finite key
    # should one reach it, so every answer it produces is one receivers accept.
    from hansa.node.engine import _float_key
    from hansa.protocol.codec import decode_as, encode
    from hansa.protocol.messages import QueryAnswer

    src = tmp_path / "floats.csv"
    src.write_text("band,v\n1.5,1\n2.5,2\nnan,3\ninf,4\n-inf,5\n", encoding="utf-8")
    cat = Catalog(tmp_path / "node")
    try:
        cat.add("floats", src, roles={"band": ColumnRole.DIMENSION})
        cat.configure("floats", min_group_size=1, dominance_p=100)
        eng = QueryEngine(cat.data_dir, catalog=cat, timeout_s=30)
        try:
            result = ask(eng, group_by=(Dimension("band"),), dataset="floats")
        finally:
            eng.close()
    finally:
        cat.close()
    assert counts(result) == {(1.5,): 1, (2.5,): 1, (None,): 3}
    answer = QueryAnswer(
        request_id=bytes(32),
        responder="austin",
        requester="ana@example",
        issued_at=1,
        dataset="floats",
        dataset_version=result.dataset_version,
        disclosure_version=result.disclosure_version,
        decision=result.decision,
        groups=result.groups,
        suppressed=result.suppressed,
    )
    assert decode_as(encode(answer), QueryAnswer) == answer
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(HansaError) as info:
            _float_key(bad)
        assert info.value.code is ErrorCode.INVALID_QUERY
    assert _float_key(2.5) == 2.5
    assert _float_key(None) is None
