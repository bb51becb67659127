"""Query compilation and execution: a validated :class:`Query` in, mergeable states out.

Theory of operation
-------------------
A query is data, never SQL text (spec §6). :func:`compile_query` checks
every part of it against the dataset's schema and roles — unknown columns,
roles that forbid a use, literal types, bucket units — and only then builds
SQL in which every identifier comes from the validated schema (quoted) and
every literal is a bound parameter (``$1``, ``$2``, …). Nothing a requester
sends is ever spliced into SQL text.

One answer takes at most two statements, run in one read transaction:

1. the *cell statement* — ``GROUP BY`` the group keys (dimension columns
   and time buckets) with, per cell, ``COUNT(*)`` (the cell size the
   disclosure rules judge), the states of every requested aggregate except
   quantiles (histograms as ``COUNT(*) FILTER (WHERE …)`` per bin), and for
   the dominance rule ``MAX(|x|)`` and ``SUM(|x|)`` per guarded column;
   ordered by key and limited to ``cap + 1`` rows so that exceeding the cap
   on groups is detected without materialising the rest (``TOO_MANY_GROUPS``);
2. the *sketch statement*, only for ``Quantiles`` — ``GROUP BY`` the group
   keys plus the DDSketch bucket (sign, index) of each value, pushed down
   with the expressions of :mod:`hansa.federation.sketch` so a node's
   buckets match the federation's bit for bit.

An answer always cites the version of the rows it was computed from: a
read-only catalog (a serving node's) cannot change under the engine, and
with a writable catalog both statements run in one transaction whose first
read re-checks the dataset's version in the catalog's meta table.

Disclosure control (:mod:`hansa.node.disclosure`) runs before (purpose,
offered aggregates) and after (k, dominance) the cell statement. Suppressed
cells are listed with their reason and never carry states.

State conventions (node contract): Count → ``CountState(n)``; Sum →
``SumState(COUNT(col), SUM(col))`` with an int total for integer columns and
0 when empty; Min/Max → ``MinMaxState(COUNT(col), value)``; Mean, Variance,
Stddev → ``MomentsState(n, SUM / n, VAR_POP * n)``; Histogram → bin counts, the
last bin closed; Quantiles → ``SketchState`` with ``alpha = DEFAULT_ALPHA``.

Group key values are wire values: text, integers, floats, booleans and
None as they are; dates as ``YYYY-MM-DD``; timestamps as
``YYYY-MM-DDTHH:MM:SS``; ``hour`` buckets as timestamps, ``day``/``week``
(ISO, Monday)/``month``/``year`` buckets as dates — decided by the unit, not
the column type, so cities storing DATE and TIMESTAMP still merge —
``day_of_week`` as 1 (Monday) … 7 and ``hour_of_day`` as 0 … 23.

Execution is blocking and thread-safe: each answer runs on a DuckDB
cursor of its own for its duration (cursors of an engine-owned catalog are
pooled and reused; a cursor that saw any error is closed, never reused).
One watchdog thread per engine keeps the deadlines of running answers in a
heap and interrupts a cursor once its deadline passes (``QUERY_TIMEOUT``);
DuckDB's ``memory_limit`` bounds memory (``RESOURCE_LIMIT``). No
``duckdb.Error`` escapes :meth:`QueryEngine.answer`.

Result cache
------------
Answers are exact and deterministic for unchanged data and settings, so the
engine keeps a bounded LRU of :class:`EngineResult` values
(:class:`ResultCache`, sized by ``cache_entries`` and ``cache_bytes``; 0
entries disables it). The key is ``(dataset name, data version, disclosure
version, canonical MessagePack encoding of the Query)``: the encoded bytes,
not the ``Query`` object, because Python equality would merge literals the
wire keeps apart (``1``, ``1.0`` and ``true``; spec §7.2). A hit is also
checked against the full :class:`DatasetSpec` it was computed under, so a
hand-edited ``datasets.toml`` that kept its version numbers cannot serve a
stale answer, and :meth:`QueryEngine.reload` empties the cache.

Only the aggregate computation is reused. Every request still runs the
request rules (purpose allow-list, offered aggregates) against the current
settings before the cache is consulted, and the server still verifies the
signature, principal, freshness and replay of every request and signs
every answer afresh. Only successful results are cached, never refusals.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import duckdb
import msgspec

from hansa.federation.sketch import (
    DEFAULT_ALPHA,
    empty_sketch,
    sketch_from_buckets,
    sketch_sql_index,
    sketch_sql_sign,
)
from hansa.node.catalog import (
    META_TABLE,
    ROLE_AGGREGATES,
    Catalog,
    DatasetSpec,
    quote_identifier,
)
from hansa.node.disclosure import (
    CellStats,
    DisclosurePolicy,
    aggregate_kind,
    dominance_columns,
)
from hansa.protocol.codec import encode
from hansa.protocol.errors import ConfigError, ErrorCode, HansaError, ProtocolError, QueryError
from hansa.protocol.messages import (
    MAX_SKETCH_BUCKETS,
    MAX_TEXT,
    Aggregate,
    AggregateState,
    CellValue,
    ColumnInfo,
    ColumnRole,
    ColumnType,
    Count,
    CountState,
    DatasetInfo,
    Decision,
    Dimension,
    Filter,
    FilterOp,
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
    QueryRequest,
    Scalar,
    SketchState,
    Stddev,
    Sum,
    SumState,
    SuppressedCell,
    TimeBucket,
    TimeUnit,
    Variance,
)

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_CACHE_ENTRIES",
    "CacheInfo",
    "CompiledQuery",
    "EngineResult",
    "QueryEngine",
    "ResultCache",
    "compile_query",
]

_log = logging.getLogger(__name__)

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_WIRE_INT_MAX: Final = 2**64 - 1
_MEMORY_RE: Final = re.compile(r"^\d+(?:\.\d+)?\s*(?:[KMGT]i?B|B)\Z", re.IGNORECASE)
_NUMERIC: Final = frozenset({ColumnType.INTEGER, ColumnType.FLOAT})
_FILTER_ROLES: Final = frozenset({ColumnRole.DIMENSION, ColumnRole.MEASURE, ColumnRole.TIME})
_WATCHDOG_REPEAT_S: Final = 0.02
_WATCHDOG_IDLE_S: Final = 2.0
_MAX_IDLE_CURSORS: Final = 8
"""Pooled cursors kept for reuse; more concurrent answers get fresh ones, closed after use."""

DEFAULT_CACHE_ENTRIES: Final = 1024
"""Default bound on the number of cached results (:class:`ResultCache`)."""
DEFAULT_CACHE_BYTES: Final = 32 * 1024 * 1024
"""Default bound on the cached results' size, in encoded bytes (:class:`ResultCache`)."""

Row = tuple[Any, ...]


@dataclass(frozen=True)
class EngineResult:
    """What the engine decided and released for one request (node contract).

    Attributes:
        dataset_version: the data version the answer was computed from.
        disclosure_version: the disclosure settings version applied.
        decision: ``answered`` or ``answered_suppressed``.
        groups: released cells, ordered by key.
        suppressed: withheld cells with their reasons.
    """

    dataset_version: str
    disclosure_version: int
    decision: Decision
    groups: tuple[Group, ...]
    suppressed: tuple[SuppressedCell, ...]


# --- compilation ---------------------------------------------------------------------------


class _Params:
    """Numbered bound parameters: values never enter the SQL text."""

    def __init__(self) -> None:
        self.values: list[object] = []

    def bind(self, value: object) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


class _Select:
    """The cell statement's select list, each distinct expression once."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, expr: str) -> int:
        if expr not in self._index:
            self._index[expr] = len(self.items)
            self.items.append(expr)
        return self._index[expr]


StateBuilder = Callable[[Row, Mapping[str, SketchState]], AggregateState]


@dataclass(frozen=True)
class CompiledQuery:
    """A validated query as parameterised SQL plus the code that reads its rows.

    Attributes:
        sql: the cell statement (group keys first, then the select items).
        params: its bound parameters.
        sketch_sql: the sketch statement, or None without quantiles.
        sketch_params: its bound parameters (the filter parameters).
        key_count: number of group keys.
        cap: the cap on cells; the statement returns at most ``cap + 1`` rows.
        size_index: column of ``COUNT(*)`` in a cell row.
        dominance_index: per guarded column, the ``(MAX(|x|), SUM(|x|))`` columns.
        sketch_columns: the quantile columns, in sketch-branch order.
    """

    sql: str
    params: tuple[object, ...]
    sketch_sql: str | None
    sketch_params: tuple[object, ...]
    key_count: int
    cap: int
    size_index: int
    dominance_index: tuple[tuple[int, int], ...]
    sketch_columns: tuple[str, ...]
    _renderers: tuple[Callable[[Any], CellValue], ...] = field(repr=False)
    _builders: tuple[StateBuilder, ...] = field(repr=False)
    _plain_keys: bool = field(init=False, repr=False)
    _text_keys: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        renderers = self._renderers
        plain = all(r is _plain_key or r is _text_key for r in renderers)
        object.__setattr__(self, "_plain_keys", plain)
        text = tuple(i for i, r in enumerate(renderers) if r is _text_key)
        object.__setattr__(self, "_text_keys", text)

    def render_key(self, row: Row) -> tuple[CellValue, ...]:
        """Turn the key part of a row into wire values (module docstring).

        Args:
            row: a cell or sketch row (keys first).

        Returns:
            The wire key.

        Raises:
            HansaError: ``RESOURCE_LIMIT`` when a text key exceeds the wire limit.
        """
        if self._plain_keys:
            # Fast path: DuckDB already returns wire values; only text length is checked.
            key = tuple(row[: self.key_count])
            for i in self._text_keys:
                _text_key(key[i])
            return key
        return tuple(r(v) for r, v in zip(self._renderers, row, strict=False))

    def states(self, row: Row, sketches: Mapping[str, SketchState]) -> tuple[AggregateState, ...]:
        """Build one state per aggregate from a cell row and its sketches.

        Args:
            row: the cell row, keys first.
            sketches: per quantile column, the cell's SketchState.

        Returns:
            The states, in aggregate order.
        """
        values = row[self.key_count :]
        return tuple([build(values, sketches) for build in self._builders])


def _refuse(code: ErrorCode, message: str) -> QueryError:
    return QueryError(message, code)


def _column(spec: DatasetSpec, name: str, use: str) -> ColumnInfo:
    info = spec.column(name)
    if info is None:
        raise _refuse(ErrorCode.UNKNOWN_COLUMN, f"no column {name!r} in dataset {spec.name!r}")
    if info.role is ColumnRole.HIDDEN:
        raise _refuse(ErrorCode.COLUMN_ROLE_FORBIDDEN, f"column {name!r} may not be used")
    return info


def _literal(info: ColumnInfo, value: Scalar) -> object:
    """Check a literal against its column's type; return the value to bind."""

    def mismatch(expected: str) -> QueryError:
        return _refuse(
            ErrorCode.TYPE_MISMATCH,
            f"column {info.name!r} is {info.type.value}; {value!r} is not {expected}",
        )

    t = info.type
    if t in _NUMERIC:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise mismatch("a number")
        if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
            raise mismatch("a 64-bit integer")
        if isinstance(value, float) and not math.isfinite(value):
            raise mismatch("a finite number")
        return value
    if t is ColumnType.TEXT:
        if not isinstance(value, str):
            raise mismatch("a string")
        return value
    if t is ColumnType.BOOLEAN:
        if not isinstance(value, bool):
            raise mismatch("a boolean")
        return value
    if not isinstance(value, str):
        raise mismatch("an ISO-8601 string")
    try:
        if t is ColumnType.DATE:
            if len(value) != 10:
                raise ValueError(value)
            return dt.date.fromisoformat(value)
        stamp = dt.datetime.fromisoformat(value)
    except ValueError:
        raise mismatch("an ISO-8601 " + t.value) from None
    if stamp.tzinfo is not None:
        # Timestamps are stored as naive UTC (catalog): compare in UTC.
        stamp = stamp.astimezone(dt.UTC).replace(tzinfo=None)
    return stamp


_OPS: Final[Mapping[FilterOp, str]] = {
    FilterOp.EQ: "=",
    FilterOp.NE: "<>",
    FilterOp.LT: "<",
    FilterOp.LE: "<=",
    FilterOp.GT: ">",
    FilterOp.GE: ">=",
}


def _filter_sql(spec: DatasetSpec, flt: Filter, params: _Params) -> str:
    info = _column(spec, flt.column, "filter")
    if info.role not in _FILTER_ROLES:
        raise _refuse(
            ErrorCode.COLUMN_ROLE_FORBIDDEN,
            f"{info.role.value} column {info.name!r} may not be filtered on",
        )
    col = quote_identifier(info.name)
    op = flt.op
    if op is FilterOp.IS_NULL:
        return f"{col} IS NULL"
    if op is FilterOp.NOT_NULL:
        return f"{col} IS NOT NULL"
    bound = [params.bind(_literal(info, v)) for v in flt.values]
    if op in _OPS:
        return f"{col} {_OPS[op]} {bound[0]}"
    if op is FilterOp.BETWEEN:
        return f"{col} BETWEEN {bound[0]} AND {bound[1]}"
    listed = ", ".join(bound)
    if op is FilterOp.IN:
        return f"{col} IN ({listed})"
    if op is FilterOp.NOT_IN:
        return f"{col} NOT IN ({listed})"
    raise _refuse(ErrorCode.INVALID_QUERY, f"unsupported filter operator {op!r}")


def _text_key(value: Any) -> CellValue:
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise HansaError(
            f"a group key value is longer than {MAX_TEXT} characters and cannot be sent",
            ErrorCode.RESOURCE_LIMIT,
        )
    return value  # type: ignore[no-any-return]  # str | None from DuckDB VARCHAR


def _iso_key(value: Any) -> CellValue:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, dt.date):
        return value.isoformat()
    raise HansaError(f"unexpected time value {value!r}", ErrorCode.INTERNAL)


def _plain_key(value: Any) -> CellValue:
    return value  # type: ignore[no-any-return]  # int | float | bool | None from DuckDB


def _float_key(value: Any) -> CellValue:
    # The wire allows only finite floats in cell keys (spec §7.2); a NaN or
    # infinite group would be refused by every receiver, so refuse it here.
    if value is not None and not math.isfinite(value):
        raise HansaError(
            "a float group-by column holds NaN or infinite values; filter them out first",
            ErrorCode.INVALID_QUERY,
        )
    return value  # type: ignore[no-any-return]


def _group_key(
    spec: DatasetSpec, key: Dimension | TimeBucket
) -> tuple[str, Callable[[Any], CellValue]]:
    if isinstance(key, Dimension):
        info = _column(spec, key.column, "group by")
        if info.role is not ColumnRole.DIMENSION:
            raise _refuse(
                ErrorCode.COLUMN_ROLE_FORBIDDEN,
                f"{info.role.value} column {info.name!r} may not be grouped by"
                + (" (use a time bucket)" if info.role is ColumnRole.TIME else ""),
            )
        col = quote_identifier(info.name)
        if info.type is ColumnType.TEXT:
            return col, _text_key
        if info.type in (ColumnType.DATE, ColumnType.TIMESTAMP):
            return col, _iso_key
        if info.type is ColumnType.FLOAT:
            return col, _float_key
        return col, _plain_key
    info = _column(spec, key.column, "time bucket")
    if info.role is not ColumnRole.TIME:
        raise _refuse(
            ErrorCode.COLUMN_ROLE_FORBIDDEN,
            f"{info.role.value} column {info.name!r} may not be bucketed by time",
        )
    col = quote_identifier(info.name)
    unit = key.unit
    if unit in (TimeUnit.HOUR, TimeUnit.HOUR_OF_DAY) and info.type is ColumnType.DATE:
        raise _refuse(
            ErrorCode.INVALID_QUERY, f"date column {info.name!r} has no time of day ({unit.value})"
        )
    if unit is TimeUnit.HOUR:
        return f"date_trunc('hour', {col})", _iso_key
    if unit in (TimeUnit.DAY, TimeUnit.WEEK, TimeUnit.MONTH, TimeUnit.YEAR):
        # The unit is an enum value, never requester text.
        return f"CAST(date_trunc('{unit.value}', {col}) AS DATE)", _iso_key
    if unit is TimeUnit.DAY_OF_WEEK:
        return f"isodow({col})", _plain_key
    if unit is TimeUnit.HOUR_OF_DAY:
        return f"hour({col})", _plain_key
    raise _refuse(ErrorCode.INVALID_QUERY, f"unsupported time unit {unit!r}")


def _int_total(value: Any) -> int:
    total = int(value) if value is not None else 0
    if not _INT64_MIN <= total <= _WIRE_INT_MAX:
        raise HansaError("a sum exceeds the 64-bit wire range", ErrorCode.RESOURCE_LIMIT)
    return total


def _float_value(value: Any) -> float:
    out = float(value) if value is not None else 0.0
    if not math.isfinite(out):
        raise HansaError("an aggregate overflowed to infinity", ErrorCode.RESOURCE_LIMIT)
    return out


def _aggregate(spec: DatasetSpec, agg: Aggregate, select: _Select, params: _Params) -> StateBuilder:
    """Validate one aggregate, add its SQL to ``select``, return its state builder."""
    if isinstance(agg, Count) and agg.column is None:
        i = select.add("COUNT(*)")
        return lambda r, _s: CountState(n=int(r[i]))
    column = agg.column
    assert column is not None  # only Count has an optional column
    info = _column(spec, column, "aggregate")
    kind = aggregate_kind(agg)
    if kind not in ROLE_AGGREGATES[info.role]:
        raise _refuse(
            ErrorCode.COLUMN_ROLE_FORBIDDEN,
            f"{kind.value} is not possible on {info.role.value} column {column!r}",
        )
    col = quote_identifier(column)
    n = select.add(f"COUNT({col})")
    if isinstance(agg, Count):
        return lambda r, _s: CountState(n=int(r[n]))
    if info.type not in _NUMERIC:  # roles guarantee this; checked again to fail closed
        raise _refuse(ErrorCode.TYPE_MISMATCH, f"column {column!r} is not numeric")
    integer = info.type is ColumnType.INTEGER
    if isinstance(agg, Sum):
        s = select.add(f"SUM({col})")
        if integer:
            return lambda r, _s: SumState(n=int(r[n]), total=_int_total(r[s]))
        return lambda r, _s: SumState(n=int(r[n]), total=_float_value(r[s]))
    if isinstance(agg, Min | Max):
        m = select.add(f"{'MIN' if isinstance(agg, Min) else 'MAX'}({col})")

        def minmax(r: Row, _s: Mapping[str, SketchState]) -> AggregateState:
            value = r[m]
            if value is None:
                return MinMaxState(n=0, value=None)
            return MinMaxState(n=int(r[n]), value=int(value) if integer else float(value))

        return minmax
    if isinstance(agg, Mean | Variance | Stddev):
        # mean = SUM / n in Python: for integer columns the HUGEINT sum is exact and
        # int / int rounds correctly; the SUM is shared with a Sum on the same column.
        t = select.add(f"SUM({col})")
        v = select.add(f"VAR_POP({col})")

        def moments(r: Row, _s: Mapping[str, SketchState]) -> AggregateState:
            count = int(r[n])
            if count == 0:
                return MomentsState(n=0, mean=0.0, m2=0.0)
            try:
                mean = r[t] / count
            except OverflowError as exc:
                raise HansaError("a mean overflowed", ErrorCode.RESOURCE_LIMIT) from exc
            return MomentsState(
                n=count, mean=_float_value(mean), m2=max(0.0, _float_value(r[v]) * count)
            )

        return moments
    if isinstance(agg, Histogram):
        edges = [params.bind(float(e)) for e in agg.edges]
        bins: list[int] = []
        last = len(edges) - 1
        for i in range(last):
            upper = "<=" if i == last - 1 else "<"
            bins.append(
                select.add(
                    f"COUNT(*) FILTER (WHERE {col} >= {edges[i]} AND {col} {upper} {edges[i + 1]})"
                )
            )
        below = select.add(f"COUNT(*) FILTER (WHERE {col} < {edges[0]})")
        above = select.add(f"COUNT(*) FILTER (WHERE {col} > {edges[last]})")
        return lambda r, _s: HistogramState(
            counts=tuple(int(r[b]) for b in bins), below=int(r[below]), above=int(r[above])
        )
    if isinstance(agg, Quantiles):
        return lambda _r, s: s.get(column) or empty_sketch(DEFAULT_ALPHA)
    raise _refuse(ErrorCode.INVALID_QUERY, f"unsupported aggregate {type(agg).__name__}")


def compile_query(
    query: Query, spec: DatasetSpec, *, max_groups: int | None = None, wide_abs: bool = False
) -> CompiledQuery:
    """Validate ``query`` against ``spec`` and compile it to parameterised SQL.

    Args:
        query: the query (already a valid wire object).
        spec: the dataset it names.
        max_groups: the cap on cells; defaults to the smaller of the query's
            and the dataset's caps.
        wide_abs: compute ``SUM(|x|)`` over HUGEINT (slower; needed only when a
            column holds the BIGINT minimum, whose ABS overflows).

    Returns:
        The compiled query.

    Raises:
        QueryError: ``UNKNOWN_DATASET`` (name differs from ``spec``),
            ``UNKNOWN_COLUMN``, ``TYPE_MISMATCH``, ``COLUMN_ROLE_FORBIDDEN``
            or ``INVALID_QUERY``.
    """
    if query.dataset != spec.name:
        raise _refuse(ErrorCode.UNKNOWN_DATASET, f"no dataset named {query.dataset!r}")
    cap = (
        max_groups if max_groups is not None else min(query.max_groups, spec.disclosure.max_groups)
    )
    params = _Params()
    # Filters first, so the filter parameters are $1..$f in both statements.
    where = [_filter_sql(spec, f, params) for f in query.filters]
    filter_params = tuple(params.values)
    where_sql = " AND ".join(f"({w})" for w in where) if where else "TRUE"

    if len(set(query.group_by)) != len(query.group_by):
        raise _refuse(ErrorCode.INVALID_QUERY, "a group key appears twice in group_by")
    keys = [_group_key(spec, k) for k in query.group_by]
    key_sql = [k for k, _ in keys]

    select = _Select()
    size_index = select.add("COUNT(*)")
    builders = tuple(_aggregate(spec, agg, select, params) for agg in query.aggregates)
    dominance: list[tuple[int, int]] = []
    # p = 100 % can never be exceeded (spec §8.4): no statistics needed then.
    guarded = dominance_columns(query) if spec.disclosure.dominance_p < 100 else ()
    for column in guarded:
        col = quote_identifier(column)
        # ABS on the column's own type is cheap but overflows on the BIGINT minimum;
        # the engine then recompiles with ``wide_abs`` (HUGEINT: exact, slower).
        magnitude = f"ABS(CAST({col} AS HUGEINT))" if wide_abs else f"ABS({col})"
        dominance.append((select.add(f"MAX({magnitude})"), select.add(f"SUM({magnitude})")))

    table = quote_identifier(spec.name)
    nkeys = len(key_sql)
    columns = [f"{k} AS _k{i}" for i, k in enumerate(key_sql)] + [
        f"{item} AS _a{i}" for i, item in enumerate(select.items)
    ]
    sql = f"SELECT {', '.join(columns)} FROM {table} WHERE {where_sql}"  # noqa: S608
    if nkeys:
        positions = ", ".join(str(i + 1) for i in range(nkeys))
        order = ", ".join(f"{i + 1} NULLS LAST" for i in range(nkeys))
        sql += f" GROUP BY {positions} ORDER BY {order} LIMIT {params.bind(cap + 1)}"

    sketch_columns = tuple(
        dict.fromkeys(a.column for a in query.aggregates if isinstance(a, Quantiles))
    )
    sketch_sql: str | None = None
    if sketch_columns:
        branches = []
        group = ", ".join(str(i + 1) for i in range(nkeys + 3))
        for j, column in enumerate(sketch_columns):
            col = quote_identifier(column)
            sign = sketch_sql_sign(col)
            index = (
                f"CASE WHEN {sign} = 0 THEN NULL ELSE {sketch_sql_index(col, DEFAULT_ALPHA)} END"
            )
            items = [f"{j} AS _j"] + [f"{k} AS _k{i}" for i, k in enumerate(key_sql)]
            items += [f"{sign} AS _s", f"{index} AS _i", "COUNT(*) AS _c"]
            branches.append(
                f"SELECT {', '.join(items)} FROM {table}"  # noqa: S608
                f" WHERE ({where_sql}) AND {col} IS NOT NULL GROUP BY {group}"
            )
        sketch_sql = " UNION ALL ".join(branches)

    return CompiledQuery(
        sql=sql,
        params=tuple(params.values),
        sketch_sql=sketch_sql,
        sketch_params=filter_params,
        key_count=nkeys,
        cap=cap,
        size_index=nkeys + size_index,
        dominance_index=tuple((nkeys + a, nkeys + b) for a, b in dominance),
        sketch_columns=sketch_columns,
        _renderers=tuple(r for _, r in keys),
        _builders=builders,
    )


# --- execution ---------------------------------------------------------------------------------


class _Watch:
    """One running answer as the watchdog sees it (a context manager).

    Attributes:
        cursor: the cursor to interrupt (None once released).
        fired: set once the deadline passed and the cursor was interrupted.
        done: set when the answer finished; the watchdog then never touches
            the cursor again.
    """

    __slots__ = ("_watchdog", "cursor", "done", "fired")

    def __init__(self, watchdog: _Watchdog, cursor: duckdb.DuckDBPyConnection) -> None:
        self._watchdog = watchdog
        self.cursor: duckdb.DuckDBPyConnection | None = cursor
        self.fired = False
        self.done = False

    def __enter__(self) -> _Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._watchdog.release(self)


class _Watchdog:
    """One thread per engine that interrupts the cursors of overdue answers.

    Starting a thread per answer cost about as much as a small query itself,
    so deadlines sit in a heap served by a single long-lived thread, started
    on first use and ended after about ``2 * _WATCHDOG_IDLE_S`` with nothing
    to watch.
    Watching an answer costs a lock, a heap push and, only when its deadline
    is the earliest, a notify; a finished answer is merely marked done and
    dropped lazily (when it reaches the top of the heap, or when finished
    entries outnumber running ones, so the heap stays small).

    DuckDB drops an interrupt that arrives before a statement starts, so a
    fired watch is interrupted again every ``_WATCHDOG_REPEAT_S`` until it is
    released, and the engine also checks :attr:`_Watch.fired` after each
    statement. Interrupts happen under the lock :meth:`release` takes, so
    once ``release`` returns the cursor is never interrupted again and may be
    reused.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._live = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, cursor: duckdb.DuckDBPyConnection, timeout_s: float) -> _Watch:
        """Start watching ``cursor``: interrupt it once ``timeout_s`` has passed.

        Args:
            cursor: the answer's cursor.
            timeout_s: seconds from now.

        Returns:
            The watch; leave its context (or :meth:`release` it) when done.

        Raises:
            HansaError: ``UNAVAILABLE`` after :meth:`close`.
        """
        watch = _Watch(self, cursor)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if self._closed:
                raise HansaError("the query engine is closed", ErrorCode.UNAVAILABLE)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="hansa-query-watchdog", daemon=True
                )
                self._thread.start()
            heap = self._heap
            self._live += 1
            if len(heap) > 64 + 4 * self._live:
                heap[:] = [entry for entry in heap if not entry[2].done]
                heapq.heapify(heap)
            heapq.heappush(heap, (deadline, next(self._seq), watch))
            if heap[0][2] is watch:  # the thread sleeps until a later deadline: wake it
                self._cond.notify()
        return watch

    def release(self, watch: _Watch) -> None:
        """Stop watching (idempotent)."""
        with self._cond:
            if not watch.done:
                watch.done = True
                watch.cursor = None  # the heap may hold the watch a while; not the cursor
                self._live -= 1

    @property
    def watching(self) -> int:
        """Answers being watched right now."""
        return self._live

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop the thread (running answers are no longer interrupted)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        cond, heap = self._cond, self._heap
        with cond:
            while not self._closed:
                while heap and heap[0][2].done:
                    heapq.heappop(heap)
                if not heap:
                    # An idle engine keeps no thread: a forgotten, unclosed engine leaves
                    # none behind, and the next answer starts a new one.
                    if not cond.wait(_WATCHDOG_IDLE_S) and not heap:
                        self._thread = None
                        return
                    continue
                deadline, _, watch = heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    # Released watches are not announced (no wake-up per answer); waking
                    # at least every _WATCHDOG_IDLE_S drops them, so an idle thread ends.
                    cond.wait(min(delay, _WATCHDOG_IDLE_S))
                    continue
                heapq.heappop(heap)
                cursor = watch.cursor
                if cursor is None:
                    continue
                watch.fired = True
                try:
                    cursor.interrupt()
                except duckdb.Error:  # the cursor is gone; nothing left to stop
                    continue
                heapq.heappush(
                    heap, (time.monotonic() + _WATCHDOG_REPEAT_S, next(self._seq), watch)
                )


CacheKey = tuple[str, str, int, bytes]
"""(dataset name, data version, disclosure version, encoded Query) — module docstring."""

_CACHE_ENTRY_OVERHEAD: Final = 256
"""Bytes charged per cached entry on top of its encoded size (key, bookkeeping)."""


@dataclass(frozen=True)
class CacheInfo:
    """A snapshot of a :class:`ResultCache`.

    Attributes:
        entries: results held.
        size: their charged size in bytes (see :class:`ResultCache`).
        hits: lookups answered from the cache since it was created.
        misses: lookups that were not.
        max_entries: the bound on ``entries`` (0: the cache is off).
        max_bytes: the bound on ``size``.
    """

    entries: int
    size: int
    hits: int
    misses: int
    max_entries: int
    max_bytes: int


class ResultCache:
    """A bounded, thread-safe LRU of engine results (module docstring, "Result cache").

    Each entry is charged the MessagePack size of its groups and suppressed
    cells plus its key and a fixed overhead; the Python objects behind it
    take a small multiple of that. The least recently used entries are
    evicted until both bounds hold; a result charged more than an eighth of
    ``max_bytes`` is not cached at all, so one large answer cannot flush the
    rest.

    NOTE: the cache holds *exact, pre-noise* states. Should a rule ever add
    noise or charge a privacy budget per answer (spec §8 leaves room for
    it), that rule must run after the cache on every request — charging the
    budget even on a hit — and must never store its noised output here.

    Args:
        max_entries: most results held (0 disables the cache).
        max_bytes: most charged bytes held.

    Raises:
        ConfigError: a bound is negative or absurdly large.
    """

    def __init__(
        self, max_entries: int = DEFAULT_CACHE_ENTRIES, max_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        if not 0 <= max_entries <= 10_000_000:
            raise ConfigError(f"result cache entries {max_entries!r} is not in [0, 10000000]")
        if not 0 <= max_bytes <= 2**40:
            raise ConfigError(f"result cache bytes {max_bytes!r} is not in [0, 2**40]")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[CacheKey, tuple[DatasetSpec, EngineResult, int]] = OrderedDict()
        self._size = 0
        self._hits = 0
        self._misses = 0

    @property
    def enabled(self) -> bool:
        """Whether results are cached at all."""
        return self.max_entries > 0 and self.max_bytes > 0

    def get(self, key: CacheKey, spec: DatasetSpec) -> EngineResult | None:
        """Return the result cached under ``key`` for exactly ``spec``, or None.

        Args:
            key: the cache key.
            spec: the dataset spec in effect now; an entry computed under a
                different spec is dropped.

        Returns:
            The cached result, or None.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            cached_spec, result, size = entry
            if cached_spec is not spec and cached_spec != spec:
                del self._entries[key]
                self._size -= size
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return result

    def put(self, key: CacheKey, spec: DatasetSpec, result: EngineResult) -> None:
        """Cache ``result`` (computed under ``spec``), evicting the least recently used.

        Args:
            key: the cache key.
            spec: the dataset spec the result was computed under.
            result: the result.
        """
        if not self.enabled:
            return
        size = (
            len(_size_encoder.encode((result.groups, result.suppressed)))
            + len(key[3])
            + _CACHE_ENTRY_OVERHEAD
        )
        if size > self.max_bytes // 8:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._size -= old[2]
            self._entries[key] = (spec, result, size)
            self._size += size
            while len(self._entries) > self.max_entries or self._size > self.max_bytes:
                _, (_, _, evicted) = self._entries.popitem(last=False)
                self._size -= evicted

    def clear(self) -> None:
        """Drop every entry (the hit and miss counts stay)."""
        with self._lock:
            self._entries.clear()
            self._size = 0

    def info(self) -> CacheInfo:
        """Return a snapshot of the cache's size and counters."""
        with self._lock:
            return CacheInfo(
                entries=len(self._entries),
                size=self._size,
                hits=self._hits,
                misses=self._misses,
                max_entries=self.max_entries,
                max_bytes=self.max_bytes,
            )

    def __len__(self) -> int:
        return len(self._entries)


_size_encoder: Final = msgspec.msgpack.Encoder()


class QueryEngine:
    """Answers aggregate queries over a node's catalog (node contract).

    Args:
        data_dir: the node's data directory.
        timeout_s: wall-clock limit per answer (``QUERY_TIMEOUT``).
        memory_limit: DuckDB memory limit, e.g. ``"1GB"`` (``RESOURCE_LIMIT``).
        threads: DuckDB worker threads.
        catalog: an open catalog to use instead of opening ``data_dir``
            read-only (its DuckDB settings are then changed to the limits above).
        cache_entries: most results in the result cache (0 disables it).
        cache_bytes: most bytes in the result cache (see :class:`ResultCache`).

    Raises:
        ConfigError: the catalog cannot be opened or is invalid, or a limit is malformed.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        timeout_s: float = 10.0,
        memory_limit: str = "1GB",
        threads: int = 2,
        catalog: Catalog | None = None,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        if not 0 < timeout_s <= 3600:
            raise ConfigError(f"query timeout {timeout_s!r} s is not in (0, 3600]")
        if not _MEMORY_RE.match(memory_limit):
            raise ConfigError(f"memory limit {memory_limit!r} is not like '512MB' or '2GB'")
        if not 1 <= threads <= 256:
            raise ConfigError(f"threads {threads!r} is not in [1, 256]")
        self.timeout_s = float(timeout_s)
        self._cache = ResultCache(cache_entries, cache_bytes)
        self._policies: dict[str, tuple[DatasetSpec, DisclosurePolicy]] = {}
        self._cursor_lock = threading.Lock()
        self._idle: list[duckdb.DuckDBPyConnection] = []
        self._watchdog = _Watchdog()
        if catalog is None:
            self._owns_catalog = True
            self._catalog = Catalog(
                data_dir,
                read_only=True,
                # The query path only reads tables: no file access from SQL at all.
                duckdb_config={
                    "memory_limit": memory_limit,
                    "threads": threads,
                    "enable_external_access": False,
                },
            )
        else:
            self._owns_catalog = False
            self._catalog = catalog
            try:
                cur = catalog.cursor()
            except HansaError:
                cur = None
            if cur is not None:
                try:
                    cur.execute(f"SET memory_limit = '{memory_limit}'")
                    cur.execute(f"SET threads = {threads}")
                finally:
                    cur.close()

    @property
    def catalog(self) -> Catalog:
        """The catalog the engine answers from."""
        return self._catalog

    def datasets(self) -> tuple[DatasetInfo, ...]:
        """Return the published datasets, for the capability document.

        Returns:
            One DatasetInfo per dataset, sorted by name.
        """
        return tuple(spec.info() for spec in self._catalog.list())

    def reload(self) -> None:
        """Re-read the catalog (roles, disclosure settings, versions) and empty the result cache.

        Raises:
            ConfigError: the new configuration is invalid; the old one stays in
                effect, and so do the cached results computed under it.
        """
        self._catalog.reload()
        self._cache.clear()

    def cache_info(self) -> CacheInfo:
        """Return a snapshot of the result cache (module docstring, "Result cache")."""
        return self._cache.info()

    def clear_cache(self) -> None:
        """Drop every cached result."""
        self._cache.clear()

    def close(self) -> None:
        """Stop the watchdog, close pooled cursors, release the database (only when owned)."""
        self._watchdog.close()
        with self._cursor_lock:
            idle, self._idle = self._idle, []
        for cursor in idle:
            cursor.close()
        self._cache.clear()
        if self._owns_catalog:
            self._catalog.close()

    def answer(self, request: QueryRequest) -> EngineResult:
        """Validate, run and disclosure-check one request (blocking, thread-safe).

        Args:
            request: a verified request addressed to this node.

        Returns:
            The released and suppressed cells with the versions applied.

        Raises:
            QueryError: ``UNKNOWN_DATASET``, ``UNKNOWN_COLUMN``, ``TYPE_MISMATCH``,
                ``COLUMN_ROLE_FORBIDDEN``, ``AGGREGATE_NOT_ALLOWED``,
                ``TOO_MANY_GROUPS`` or ``INVALID_QUERY``.
            PolicyDenied: ``PURPOSE_NOT_ALLOWED``.
            HansaError: ``QUERY_TIMEOUT``, ``RESOURCE_LIMIT``, ``UNAVAILABLE``
                (the data changed mid-query or nothing is stored) or ``INTERNAL``.
        """
        try:
            return self._answer(request)
        except HansaError:
            raise
        except Exception as exc:  # fail closed: no stray exception reaches the server
            _log.exception("query engine failure")
            raise HansaError(
                f"internal error while answering ({type(exc).__name__})", ErrorCode.INTERNAL
            ) from exc

    def cached_answer(self, request: QueryRequest) -> EngineResult | None:
        """Answer from the result cache only; never touches DuckDB.

        Runs the same request rules as :meth:`answer` first, so a refusal is
        raised here exactly as there. Cheap enough to call on an event loop:
        a dictionary lookup, the request rules and one small encode.

        Args:
            request: a verified request addressed to this node.

        Returns:
            The cached result, or None when :meth:`answer` has to compute it.

        Raises:
            QueryError: ``UNKNOWN_DATASET`` or ``AGGREGATE_NOT_ALLOWED``.
            PolicyDenied: ``PURPOSE_NOT_ALLOWED``.
            HansaError: ``INTERNAL`` on an unexpected failure.
        """
        if not self._cache.enabled:
            return None
        try:
            spec, _, key = self._admit(request)
            return self._cache.get(key, spec)
        except HansaError:
            raise
        except Exception as exc:
            _log.exception("query engine failure")
            raise HansaError(
                f"internal error while answering ({type(exc).__name__})", ErrorCode.INTERNAL
            ) from exc

    def _admit(self, request: QueryRequest) -> tuple[DatasetSpec, DisclosurePolicy, CacheKey]:
        """Find the dataset, run the request rules, return the cache key."""
        query = request.query
        spec = self._catalog.get(query.dataset)
        known = self._policies.get(spec.name)
        if known is not None and known[0] is spec:
            policy = known[1]
        else:
            # The policy is a pure function of the spec: built once per published spec.
            policy = DisclosurePolicy.for_dataset(spec)
            self._policies[spec.name] = (spec, policy)
        policy.enforce_request(request, spec)
        return spec, policy, (spec.name, spec.version, spec.disclosure.version, encode(query))

    def _answer(self, request: QueryRequest) -> EngineResult:
        spec, policy, key = self._admit(request)
        cache = self._cache
        if cache.enabled:
            hit = cache.get(key, spec)
            if hit is not None:
                return hit
        query = request.query
        compiled = compile_query(query, spec)
        cursor = self._acquire_cursor()
        reusable = False
        try:
            with self._watchdog.watch(cursor, self.timeout_s) as watchdog:
                try:
                    try:
                        rows, sketch_rows = self._execute(cursor, spec, compiled, watchdog)
                    except (duckdb.ConversionException, duckdb.OutOfRangeException):
                        if not compiled.dominance_index or watchdog.fired:
                            raise
                        # ABS overflowed on the BIGINT minimum: redo with exact HUGEINT sums.
                        compiled = compile_query(query, spec, wide_abs=True)
                        rows, sketch_rows = self._execute(cursor, spec, compiled, watchdog)
                except duckdb.InterruptException as exc:
                    raise self._timeout() from exc
                except duckdb.OutOfMemoryException as exc:
                    raise HansaError(
                        "the query exceeded the node's memory limit", ErrorCode.RESOURCE_LIMIT
                    ) from exc
                except duckdb.Error as exc:
                    if watchdog.fired:
                        raise self._timeout() from exc
                    _log.error("query execution failed: %s", exc)
                    raise HansaError(
                        f"query execution failed ({type(exc).__name__})", ErrorCode.INTERNAL
                    ) from exc
                # Only a cursor whose answer completed without any interrupt goes back to the pool.
                reusable = not watchdog.fired
        finally:
            self._release_cursor(cursor, reusable)
        result = self._decide(spec, policy, compiled, rows, sketch_rows)
        if cache.enabled:
            cache.put(key, spec, result)
        return result

    def _acquire_cursor(self) -> duckdb.DuckDBPyConnection:
        with self._cursor_lock:
            if self._idle:
                return self._idle.pop()
            return self._catalog.cursor()

    def _release_cursor(self, cursor: duckdb.DuckDBPyConnection, reusable: bool) -> None:
        # Only an engine-owned (read-only) catalog's connection is known to outlive the
        # cursor; a catalog lent to the engine may be closed or reopened by its owner.
        if reusable and self._owns_catalog:
            with self._cursor_lock:
                if len(self._idle) < _MAX_IDLE_CURSORS and not self._watchdog.closed:
                    self._idle.append(cursor)
                    return
        cursor.close()

    def _timeout(self) -> HansaError:
        return HansaError(
            f"the query exceeded the node's time limit of {self.timeout_s:g} s",
            ErrorCode.QUERY_TIMEOUT,
        )

    def _execute(
        self,
        cursor: duckdb.DuckDBPyConnection,
        spec: DatasetSpec,
        compiled: CompiledQuery,
        watchdog: _Watch,
    ) -> tuple[list[Row], list[Row]]:
        # A read-only catalog holds DuckDB's shared file lock, so no writer can change
        # the data under it and the version loaded with the catalog is the version of
        # the rows read. A writable catalog may be changed by its owner meanwhile: then
        # both statements run in one transaction that first re-reads the version.
        pinned = not self._catalog.read_only
        if pinned:
            cursor.execute("BEGIN TRANSACTION")
        try:
            if pinned:
                meta = cursor.execute(
                    f"SELECT counter, chain FROM {META_TABLE} WHERE dataset = $1",  # noqa: S608
                    [spec.name],
                ).fetchone()
                if meta is None or f"v{meta[0]}-{str(meta[1])[:12]}" != spec.version:
                    raise HansaError(
                        f"dataset {spec.name!r} changed while answering; retry",
                        ErrorCode.UNAVAILABLE,
                    )
            rows: list[Row] = cursor.execute(compiled.sql, list(compiled.params)).fetchall()
            if watchdog.fired:
                raise self._timeout()
            if len(rows) > compiled.cap:
                raise _refuse(
                    ErrorCode.TOO_MANY_GROUPS,
                    f"the answer would have more than {compiled.cap} groups",
                )
            sketch_rows: list[Row] = []
            if compiled.sketch_sql is not None and rows:
                sketch_rows = cursor.execute(
                    compiled.sketch_sql, list(compiled.sketch_params)
                ).fetchall()
                if watchdog.fired:
                    raise self._timeout()
        finally:
            if pinned:
                try:
                    cursor.execute("ROLLBACK")  # read-only work: nothing to commit
                except duckdb.Error:
                    _log.debug("rollback after a failed statement", exc_info=True)
        return rows, sketch_rows

    @staticmethod
    def _sketches(
        compiled: CompiledQuery, sketch_rows: Sequence[Row]
    ) -> dict[tuple[CellValue, ...], dict[str, SketchState]]:
        nkeys = compiled.key_count
        buckets: dict[tuple[CellValue, ...], dict[str, list[tuple[int, int | None, int]]]] = {}
        for row in sketch_rows:
            column = compiled.sketch_columns[int(row[0])]
            key = compiled.render_key(row[1 : 1 + nkeys])
            sign, index, count = row[1 + nkeys], row[2 + nkeys], row[3 + nkeys]
            cell = buckets.setdefault(key, {})
            cell.setdefault(column, []).append(
                (int(sign), None if index is None else int(index), int(count))
            )
        out: dict[tuple[CellValue, ...], dict[str, SketchState]] = {}
        for key, per_column in buckets.items():
            try:
                out[key] = {
                    column: sketch_from_buckets(rows, DEFAULT_ALPHA)
                    for column, rows in per_column.items()
                }
            except ProtocolError as exc:
                raise HansaError(
                    f"a quantile sketch would exceed {MAX_SKETCH_BUCKETS} buckets ({exc})",
                    ErrorCode.RESOURCE_LIMIT,
                ) from exc
        return out

    def _decide(
        self,
        spec: DatasetSpec,
        policy: DisclosurePolicy,
        compiled: CompiledQuery,
        rows: Sequence[Row],
        sketch_rows: Sequence[Row],
    ) -> EngineResult:
        keys = [compiled.render_key(row) for row in rows]
        size, guarded = compiled.size_index, compiled.dominance_index
        cells = [
            CellStats(
                key,
                row[size],
                tuple((row[largest] or 0, row[total] or 0) for largest, total in guarded),
            )
            for key, row in zip(keys, rows, strict=True)
        ]
        decision = policy.decide(cells)
        sketches = self._sketches(compiled, sketch_rows) if compiled.sketch_sql else {}
        groups: list[Group] = []
        for index in decision.released:
            key = keys[index]
            try:
                states = compiled.states(rows[index], sketches.get(key, {}))
                groups.append(Group(key=key, states=states))
            except ValueError as exc:  # a wire invariant (finite, in range) failed
                raise HansaError(
                    f"an aggregate cannot be represented on the wire ({exc})",
                    ErrorCode.RESOURCE_LIMIT,
                ) from exc
        return EngineResult(
            dataset_version=spec.version,
            disclosure_version=spec.disclosure.version,
            decision=decision.decision,
            groups=tuple(groups),
            suppressed=decision.suppressed,
        )
