"""The analyst's Python API: ask an alliance one question from a notebook.

Theory of operation
-------------------
:class:`Alliance` holds a verified roster and an analyst's signing key.
:meth:`Alliance.query` turns a question (dataset, aggregates, group keys,
filters, purpose) into a :class:`~hansa.protocol.messages.Query`, takes the
target cities and their node keys from the roster, and sends it with
:func:`hansa.federation.fanout.fan_out` (issue 4, parts 2 and 4), passing the
roster's version as ``roster_version``. The :class:`QueryResult` holds the
combined rows, each answering city's own rows, every city's status, and can
write the evidence bundle (:func:`hansa.federation.evidence.build_bundle`).
After the fan-out, every city that answered or refused is asked for a receipt
of its request (:func:`fetch_receipts`: a signed inclusion proof of the
request's log leaf under a signed checkpoint, issue 5 part 4), best effort
with bounded retries; the receipts go into the bundle, where ``hansa verify``
checks them::

    from hansa.client import Alliance

    alliance = Alliance.load("alliance.roster", "ana.key", principal="ana@melbourne")
    result = alliance.query_sync(
        "listings",
        ["count", "mean:price", "quantiles:price:0.5,0.9"],
        group_by=["room_type"],
        filters=["price>=50"],
        purpose="research",
    )
    result.to_records()  # list of dicts, one per combined row
    Path("evidence.hansa").write_bytes(result.bundle())

In a notebook use ``await alliance.query(...)`` (``query_sync`` also works
inside a running event loop: it then runs the query on a helper thread).

Spec strings
------------
The same small grammars serve this API and ``hansa query`` (``node/_cli_query.py``).

**Aggregates** — ``KIND[:COLUMN[:ARGS]]``:

- ``count`` (rows) or ``count:COLUMN`` (non-null values of COLUMN);
- ``sum:COL``, ``mean:COL``, ``min:COL``, ``max:COL``, ``variance:COL``, ``stddev:COL``;
- ``quantiles:COL:R1,R2,...`` with ranks in ``[0, 1]`` (``quantiles:price:0.5,0.9``);
- ``histogram:COL:E1,E2,...`` with strictly increasing edges (``histogram:price:0,50,100``).

**Group keys** — ``COLUMN`` (a dimension) or ``COLUMN:UNIT`` (a time bucket;
``UNIT`` is one of ``hour day week month year day_of_week hour_of_day``).

**Filters** — ``COLUMN OP VALUE``; spaces around a symbolic operator are optional:

- ``COL=V``, ``COL!=V``, ``COL<V``, ``COL<=V``, ``COL>V``, ``COL>=V``: the
  whole rest of the text (surrounding blanks removed) is one value, so
  ``room_type=Entire home/apt`` needs no quoting inside the spec;
- ``COL in V1,V2,...`` and ``COL not in V1,V2,...``: comma-separated values;
- ``COL between LO HI`` or ``COL between LO,HI``: both bounds inclusive;
- ``COL is null`` and ``COL is not null``.

Operator words are case-insensitive. **Literal typing**: a value is an
``int`` if it reads as a decimal integer, a ``float`` if it reads as a
finite decimal number (``1.5``, ``2e3``), otherwise a string. A prefix
forces the type: ``str:123`` is the string ``"123"``, ``int:``, ``float:``
and ``bool:true`` / ``bool:false`` likewise. A value inside ``in``/``between``
cannot contain a comma.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import io
import itertools
import json
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from hansa.crypto.envelope import open_envelope, seal
from hansa.crypto.keyfile import read_key_file
from hansa.crypto.keys import PublicKey, SigningKey
from hansa.crypto.note import NoteVerifier
from hansa.federation.combine import CombinedResult, CombinedRow, HistogramCounts, combine_answers
from hansa.federation.evidence import Receipt, build_bundle
from hansa.federation.fanout import (
    ENVELOPE_MEDIA_TYPE,
    CityResult,
    CityStatus,
    FanOutResult,
    Target,
    fan_out,
)
from hansa.federation.roster import (
    MAX_ROSTER_SIGNATURES,
    MAX_ROSTER_SIZE,
    Role,
    Roster,
    SignedRoster,
    decode_signed_roster,
    roster_digest,
    verify_roster,
)
from hansa.federation.transport import BadResponse, ConnectFailed, HttpPool
from hansa.protocol.codec import decode_as, encode
from hansa.protocol.envelope import MAX_ENVELOPE_SIZE, PayloadType, decode_envelope, message_id
from hansa.protocol.errors import (
    ConfigError,
    ErrorCode,
    HansaError,
    PolicyDenied,
    ProtocolError,
    QueryError,
)
from hansa.protocol.messages import (
    IDENTIFIER_PATTERN,
    Aggregate,
    AuditOp,
    AuditRequest,
    AuditResponse,
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
    QueryRefusal,
    ResultScope,
    Stddev,
    Sum,
    TimeBucket,
    TimeUnit,
    Variance,
)

__all__ = [
    "DEFAULT_DEADLINE_S",
    "DEFAULT_LEGAL_BASIS",
    "RECEIPT_ATTEMPTS",
    "Alliance",
    "QueryResult",
    "build_query",
    "fetch_receipts",
    "format_aggregate",
    "format_filter",
    "format_group_key",
    "format_literal",
    "parse_aggregate",
    "parse_filter",
    "parse_group_key",
    "parse_literal",
    "read_roster_file",
]

DEFAULT_DEADLINE_S: Final = 10.0
"""The fan-out's default time budget in seconds."""

DEFAULT_LEGAL_BASIS: Final = "alliance agreement"
"""Legal basis signed into the policy tags when the analyst gives none."""

MAX_ROSTER_FILE: Final = MAX_ROSTER_SIZE + 65 * MAX_ROSTER_SIGNATURES + 1024
"""Largest roster file read: the body bound plus every signature and framing."""

RECEIPT_ATTEMPTS: Final = 3
"""How many times a city is asked for a receipt before it is recorded as failed."""

RECEIPT_TIMEOUT_S: Final = 5.0
"""Time budget of one receipt attempt (log keys and the receipt), in seconds."""

RECEIPT_VALIDITY_MS: Final = 60_000
"""Validity window signed into a receipt request."""

AUDIT_PATH: Final = "/v1/audit"
LOG_KEYS_PATH: Final = "/v1/log/keys"
_MAX_LOG_KEYS: Final = 16 * 1024  # bytes of GET /v1/log/keys JSON read at most
_RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
_RETRY_CODES: Final = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL, ErrorCode.RATE_LIMITED})

MAX_SPEC: Final = 4096
"""Longest spec string accepted (a bound on parsing work, far above real specs)."""

Scalar = bool | int | float | str
Value = object
Record = dict[str, Value]

_IDENT: Final = IDENTIFIER_PATTERN
_INT_RE: Final = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE: Final = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SYMBOLIC: Final = re.compile(rf"\s*({_IDENT})\s*(<=|>=|!=|=|<|>)(.*)", re.DOTALL)
_WORDED: Final = re.compile(
    rf"\s*({_IDENT})\s+(not\s+in|in|between|is\s+not\s+null|is\s+null)(?:\s+(.*)|\s*)",
    re.DOTALL | re.IGNORECASE,
)
_SYMBOL_OPS: Final = {
    "=": FilterOp.EQ,
    "!=": FilterOp.NE,
    "<": FilterOp.LT,
    "<=": FilterOp.LE,
    ">": FilterOp.GT,
    ">=": FilterOp.GE,
}
_OP_SYMBOLS: Final = {op: symbol for symbol, op in _SYMBOL_OPS.items()}
_COLUMN_AGGREGATES: Final[dict[str, type[Sum | Mean | Min | Max | Variance | Stddev]]] = {
    "sum": Sum,
    "mean": Mean,
    "min": Min,
    "max": Max,
    "variance": Variance,
    "stddev": Stddev,
}


def _spec_error(kind: str, spec: str, why: str) -> QueryError:
    shown = spec if len(spec) <= 80 else spec[:80] + "…"
    return QueryError(f"bad {kind} {shown!r}: {why}", ErrorCode.INVALID_QUERY)


def _check_column(kind: str, spec: str, column: str) -> str:
    if re.fullmatch(_IDENT, column) is None:
        raise _spec_error(kind, spec, f"{column!r} is not a column name")
    return column


def _check_length(kind: str, spec: str) -> None:
    if len(spec) > MAX_SPEC:
        raise _spec_error(kind, spec, f"longer than {MAX_SPEC} characters")


# --- literals ----------------------------------------------------------------------------


def parse_literal(text: str) -> Scalar:
    """Read a filter literal with the module's typing rule.

    Args:
        text: the literal; a ``str:``, ``int:``, ``float:`` or ``bool:``
            prefix forces the type, else int, then finite float, else string.

    Returns:
        The typed value.

    Raises:
        QueryError: a forced type that does not fit (``int:x``, ``bool:maybe``,
            ``float:nan``).
    """
    prefix, sep, rest = text.partition(":")
    if sep:
        if prefix == "str":
            return rest
        if prefix == "int":
            if _INT_RE.fullmatch(rest) is None:
                raise _spec_error("literal", text, "not an integer")
            return int(rest)
        if prefix == "float":
            value = _float(rest)
            if value is None:
                raise _spec_error("literal", text, "not a finite number")
            return value
        if prefix == "bool":
            if rest.lower() in ("true", "false"):
                return rest.lower() == "true"
            raise _spec_error("literal", text, "bool: takes true or false")
    if _INT_RE.fullmatch(text) is not None:
        return int(text)
    number = _float(text)
    return text if number is None else number


def _float(text: str) -> float | None:
    if _FLOAT_RE.fullmatch(text) is None:
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def format_literal(value: Scalar) -> str:
    """Write a literal so that :func:`parse_literal` reads back the same typed value.

    Args:
        value: a bool, int, finite float or string.

    Returns:
        Its text (with a type prefix where the plain text would read differently).
    """
    if isinstance(value, bool):
        return f"bool:{'true' if value else 'false'}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    plain = _literal_or_none(value)
    return value if value and plain == value and type(plain) is str else f"str:{value}"


def _literal_or_none(text: str) -> Scalar | None:
    """Like :func:`parse_literal`, but ``None`` where it would raise."""
    try:
        return parse_literal(text)
    except QueryError:
        return None


# --- aggregates ----------------------------------------------------------------------------


def _numbers(kind: str, spec: str, text: str) -> tuple[float, ...]:
    values = []
    for part in text.split(","):
        number = _float(part.strip())
        if number is None:
            raise _spec_error(kind, spec, f"{part.strip()!r} is not a finite number")
        values.append(number)
    return tuple(values)


def parse_aggregate(spec: str) -> Aggregate:
    """Parse an aggregate spec (module docstring), e.g. ``mean:price``.

    Args:
        spec: ``KIND[:COLUMN[:ARGS]]``.

    Returns:
        The aggregate.

    Raises:
        QueryError: an unknown kind, a missing or invalid column, or bad
            ranks or edges; the message names the spec.
    """
    _check_length("aggregate", spec)
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    column, _, args = rest.partition(":")
    if kind == "count":
        if args:
            raise _spec_error("aggregate", spec, "count takes at most a column")
        return Count(_check_column("aggregate", spec, column) if column else None)
    if kind in _COLUMN_AGGREGATES:
        if not column or args:
            raise _spec_error("aggregate", spec, f"write {kind}:COLUMN")
        return _COLUMN_AGGREGATES[kind](_check_column("aggregate", spec, column))
    if kind in ("quantiles", "histogram"):
        what = "RANK,RANK,..." if kind == "quantiles" else "EDGE,EDGE,..."
        if not column or not args:
            raise _spec_error("aggregate", spec, f"write {kind}:COLUMN:{what}")
        _check_column("aggregate", spec, column)
        numbers = _numbers("aggregate", spec, args)
        if kind == "quantiles":
            if not all(0.0 <= r <= 1.0 for r in numbers):
                raise _spec_error("aggregate", spec, "quantile ranks must be within [0, 1]")
            return Quantiles(column, numbers)
        if len(numbers) < 2:
            raise _spec_error("aggregate", spec, "a histogram needs at least two edges")
        try:
            return Histogram(column, numbers)
        except ValueError as exc:
            raise _spec_error("aggregate", spec, str(exc)) from exc
    known = "count, sum, mean, min, max, variance, stddev, quantiles, histogram"
    raise _spec_error("aggregate", spec, f"unknown kind {kind!r} (one of {known})")


def _number_text(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def format_aggregate(aggregate: Aggregate) -> str:
    """Write an aggregate as its spec (also its column label in tables).

    Args:
        aggregate: the aggregate.

    Returns:
        A spec :func:`parse_aggregate` reads back as an equal aggregate.
    """
    if isinstance(aggregate, Count):
        return "count" if aggregate.column is None else f"count:{aggregate.column}"
    if isinstance(aggregate, Quantiles):
        return f"quantiles:{aggregate.column}:" + ",".join(map(_number_text, aggregate.ranks))
    if isinstance(aggregate, Histogram):
        return f"histogram:{aggregate.column}:" + ",".join(map(_number_text, aggregate.edges))
    return f"{type(aggregate).__name__.lower()}:{aggregate.column}"


# --- group keys ------------------------------------------------------------------------------


def parse_group_key(spec: str) -> GroupKey:
    """Parse a group key spec: ``COLUMN`` or ``COLUMN:UNIT``.

    Args:
        spec: the spec, e.g. ``neighbourhood`` or ``last_review:month``.

    Returns:
        A :class:`Dimension` or :class:`TimeBucket`.

    Raises:
        QueryError: an invalid column or an unknown time unit.
    """
    _check_length("group key", spec)
    column, sep, unit = spec.strip().partition(":")
    _check_column("group key", spec, column)
    if not sep:
        return Dimension(column)
    try:
        return TimeBucket(column, TimeUnit(unit.lower()))
    except ValueError:
        units = " ".join(u.value for u in TimeUnit)
        raise _spec_error(
            "group key", spec, f"unknown time unit {unit!r} (one of {units})"
        ) from None


def format_group_key(key: GroupKey) -> str:
    """Write a group key as its spec (also its column label in tables)."""
    if isinstance(key, TimeBucket):
        return f"{key.column}:{key.unit.value}"
    return key.column


# --- filters --------------------------------------------------------------------------------


def parse_filter(spec: str) -> Filter:
    """Parse a filter spec ``COLUMN OP VALUE`` (grammar in the module docstring).

    Args:
        spec: e.g. ``price>=100``, ``room_type=Entire home/apt``,
            ``price between 50 100``, ``neighbourhood in Centrum,Noord``.

    Returns:
        The filter.

    Raises:
        QueryError: no operator, an invalid column, a wrong number of values,
            or a forced literal type that does not fit.
    """
    _check_length("filter", spec)
    worded = _WORDED.fullmatch(spec)
    if worded is not None:
        column, word, rest = worded.group(1), " ".join(worded.group(2).lower().split()), ""
        rest = (worded.group(3) or "").strip()
        if word in ("is null", "is not null"):
            if rest:
                raise _spec_error("filter", spec, f"{word!r} takes no value")
            return Filter(column, FilterOp.IS_NULL if word == "is null" else FilterOp.NOT_NULL)
        if not rest:
            raise _spec_error("filter", spec, f"{word!r} needs values")
        if word == "between":
            parts = rest.split(",") if "," in rest else rest.split()
            if len(parts) != 2:
                raise _spec_error("filter", spec, "write COLUMN between LOW HIGH")
            values = tuple(parse_literal(p.strip()) for p in parts)
            return Filter(column, FilterOp.BETWEEN, values)
        values = tuple(parse_literal(p.strip()) for p in rest.split(","))
        return Filter(column, FilterOp.IN if word == "in" else FilterOp.NOT_IN, values)
    symbolic = _SYMBOLIC.fullmatch(spec)
    if symbolic is None:
        raise _spec_error(
            "filter",
            spec,
            "write COLUMN OP VALUE with OP one of = != < <= > >= in, not in, between, "
            "is null, is not null",
        )
    column, symbol, rest = symbolic.groups()
    value = rest.strip()
    if not value:
        raise _spec_error("filter", spec, f"{symbol!r} needs a value")
    return Filter(column, _SYMBOL_OPS[symbol], (parse_literal(value),))


def format_filter(flt: Filter) -> str:
    """Write a filter as a spec :func:`parse_filter` reads back as an equal filter.

    Args:
        flt: the filter (values inside ``in``/``between`` must not contain commas
            and no string value may have surrounding blanks, as the grammar says).

    Returns:
        Its spec.
    """
    op = flt.op
    if op in _OP_SYMBOLS:
        text = format_literal(flt.values[0])
        # "a<" + "=b" would read back as "a<=" + "b": keep such a value apart.
        gap = " " if text[:1] in ("=", "<", ">", "!") else ""
        return f"{flt.column}{_OP_SYMBOLS[op]}{gap}{text}"
    if op is FilterOp.IS_NULL:
        return f"{flt.column} is null"
    if op is FilterOp.NOT_NULL:
        return f"{flt.column} is not null"
    word = {FilterOp.IN: "in", FilterOp.NOT_IN: "not in", FilterOp.BETWEEN: "between"}[op]
    return f"{flt.column} {word} " + ",".join(format_literal(v) for v in flt.values)


# --- files ------------------------------------------------------------------------------------


def read_roster_file(path: str | Path) -> SignedRoster:
    """Read and decode a signed roster file (nothing is verified here).

    Args:
        path: the roster file.

    Returns:
        The signed roster.

    Raises:
        ProtocolError: too large or not a roster file.
        OSError: the file cannot be read.
    """
    target = Path(path)
    with target.open("rb") as fh:
        data = fh.read(MAX_ROSTER_FILE + 1)
    if len(data) > MAX_ROSTER_FILE:
        raise ProtocolError(f"{target} is too large to be a roster file", ErrorCode.TOO_LARGE)
    try:
        return decode_signed_roster(data)
    except ProtocolError as exc:
        raise ProtocolError(f"{target} is not a roster file: {exc.message}", exc.code) from exc


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- results ------------------------------------------------------------------------------------


def _json_safe(value: Value) -> Value:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _value_columns(aggregate: Aggregate) -> list[str]:
    label = format_aggregate(aggregate)
    if isinstance(aggregate, Quantiles):
        return [f"{aggregate.column}:q{_number_text(r)}" for r in aggregate.ranks]
    if isinstance(aggregate, Histogram):
        e = [_number_text(x) for x in aggregate.edges]
        bins = [f"{aggregate.column}:[{lo},{hi})" for lo, hi in itertools.pairwise(e)]
        if bins:
            bins[-1] = bins[-1][:-1] + "]"
        return [f"{aggregate.column}:<{e[0]}", *bins, f"{aggregate.column}:>{e[-1]}"]
    return [label]


def _flat_values(aggregate: Aggregate, value: object) -> list[Value]:
    if isinstance(aggregate, Quantiles):
        if isinstance(value, tuple):
            return list(value)
        return [None] * len(aggregate.ranks)
    if isinstance(aggregate, Histogram):
        if isinstance(value, HistogramCounts):
            return [value.below, *value.counts, value.above]
        return [None] * (len(aggregate.edges) + 1)
    return [value]


def _first_value(aggregate: Aggregate, value: object) -> float | None:
    """The one number a chart shows for a value (first rank, or histogram total)."""
    if isinstance(value, HistogramCounts):
        return float(value.below + sum(value.counts) + value.above)
    if isinstance(value, tuple):
        value = value[0] if value else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@dataclass(frozen=True)
class QueryResult:
    """The outcome of one alliance query.

    Attributes:
        fanout: the fan-out's full result (requests, signed replies, statuses).
        signed_roster: the roster the targets came from (kept for the bundle).
        roster: that roster, verified.
        requester: the analyst principal the query was signed for.
        per_city: each answering city's own finalized rows, by city id.
        receipts: each answering or refusing city's receipt, by city id (empty
            when receipts were not fetched).
    """

    fanout: FanOutResult
    signed_roster: SignedRoster
    roster: Roster
    requester: str
    per_city: Mapping[str, CombinedResult] = field(default_factory=dict)
    receipts: Mapping[str, Receipt] = field(default_factory=dict)

    @property
    def query(self) -> Query:
        """The query asked."""
        return self.fanout.query

    @property
    def combined(self) -> CombinedResult | None:
        """The combined result (``None`` when the quorum was not met)."""
        return self.fanout.combined

    @property
    def quorum_met(self) -> bool:
        """Whether at least the quorum of cities answered and the answers combined."""
        return self.fanout.quorum_met and self.fanout.combined is not None

    @property
    def reason(self) -> str | None:
        """Why there is no combined result, if there is none."""
        return self.fanout.reason

    @property
    def cities(self) -> tuple[CityResult, ...]:
        """Every target city's result, in target order (none dropped)."""
        return self.fanout.cities

    @property
    def statuses(self) -> dict[str, CityStatus]:
        """Every target city's status, in target order."""
        return {c.city: c.status for c in self.fanout.cities}

    @property
    def columns(self) -> list[str]:
        """Column names of :meth:`to_records`: group keys, values, contributors, suppressed."""
        keys = [format_group_key(k) for k in self.query.group_by]
        values = [c for a in self.query.aggregates for c in _value_columns(a)]
        return [*keys, *values, "contributors", "suppressed_by"]

    def _records(self, combined: CombinedResult | None) -> list[Record]:
        if combined is None:
            return []
        return [self._record(row) for row in combined.rows]

    def _record(self, row: CombinedRow) -> Record:
        cells: list[Value] = list(row.key)
        for aggregate, value in zip(self.query.aggregates, row.values, strict=True):
            cells.extend(_flat_values(aggregate, value))
        cells += [list(row.contributors), list(row.suppressed_by)]
        return dict(zip(self.columns, cells, strict=True))

    def to_records(self) -> list[Record]:
        """Return the combined rows as dicts keyed by :attr:`columns`.

        Quantiles give one column per rank (``price:q0.5``); histograms one per
        bin plus the counts below and above the edges. ``contributors`` and
        ``suppressed_by`` are lists of city ids.

        Returns:
            One record per combined row (empty when there is no combined result).
        """
        return self._records(self.combined)

    def city_records(self, city: str) -> list[Record]:
        """Return one answering city's own rows, shaped as :meth:`to_records`.

        Args:
            city: an answering city.

        Returns:
            Its records (empty when the city did not answer).
        """
        return self._records(self.per_city.get(city))

    def city_summary(self) -> list[Record]:
        """Return one line per target: status, code, latency, answered and suppressed cells."""
        lines: list[Record] = []
        for c in self.fanout.cities:
            answer = c.answer
            lines.append(
                {
                    "city": c.city,
                    "status": c.status.value,
                    "code": None if c.code is None else c.code.name,
                    "latency_ms": round(c.latency_ms, 1),
                    "cells": None if answer is None else len(answer.groups),
                    "suppressed": None if answer is None else len(answer.suppressed),
                    "attempts": c.attempts,
                    "detail": c.detail,
                }
            )
        return lines

    def to_csv(self) -> str:
        """Return the combined rows as CSV text (header: :attr:`columns`).

        List cells (contributors, suppressed_by) are joined with spaces; a
        missing value is an empty cell.
        """
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.columns)
        for record in self.to_records():
            writer.writerow(
                [
                    " ".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v)
                    for v in record.values()
                ]
            )
        return out.getvalue()

    def to_dict(self) -> dict[str, Value]:
        """Return everything as JSON-ready data: query, quorum, rows, cities, per-city rows."""
        query = self.query
        return {
            "alliance": self.roster.alliance,
            "roster_version": self.roster.version,
            "roster_digest": roster_digest(self.signed_roster).hex(),
            "requester": self.requester,
            "dataset": query.dataset,
            "aggregates": [format_aggregate(a) for a in query.aggregates],
            "group_by": [format_group_key(k) for k in query.group_by],
            "filters": [format_filter(f) for f in query.filters],
            "targets": list(self.fanout.targets),
            "quorum": self.fanout.quorum,
            "quorum_met": self.quorum_met,
            "reason": self.reason,
            "columns": self.columns,
            "combined": self.to_records(),
            "cities": self.city_summary(),
            "per_city": {city: self.city_records(city) for city in self.per_city},
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        """Return :meth:`to_dict` as JSON (non-finite floats become ``null``)."""
        return json.dumps(_json_safe(self.to_dict()), indent=indent, allow_nan=False)

    def bundle(self) -> bytes:
        """Return the evidence bundle bytes (``hansa verify`` checks them).

        Raises:
            ProtocolError: the bundle cannot be built (see ``build_bundle``).
        """
        return build_bundle(self.fanout, self.signed_roster, self.receipts)

    def chart_series(self) -> tuple[list[str], dict[str, list[float | None]]]:
        """Return the data of :meth:`save_chart`: group labels and one series per city.

        The value is the first aggregate's (its first rank for quantiles, its
        total for a histogram) per answering city, per value of the first
        group key (one unnamed group when the query is not grouped). Groups
        follow the combined result's order.

        Returns:
            ``(labels, {city: values aligned with labels})``.
        """
        aggregate = self.query.aggregates[0]
        labels: list[str] = []
        index: dict[str, int] = {}
        sources = [self.combined] if self.combined is not None else []
        sources += list(self.per_city.values())
        for source in sources:
            for row in source.rows:
                label = "all" if not row.key else str(row.key[0])
                if label not in index:
                    index[label] = len(labels)
                    labels.append(label)
        series: dict[str, list[float | None]] = {}
        for city, result in self.per_city.items():
            values: list[float | None] = [None] * len(labels)
            totals: dict[int, float] = {}
            for row in result.rows:
                value = _first_value(aggregate, row.values[0])
                if value is None:
                    continue
                slot = index["all" if not row.key else str(row.key[0])]
                # Several rows share a label only when grouped by more than one
                # key; a count or sum adds up, other values keep the first.
                if slot in totals and isinstance(aggregate, Count | Sum):
                    totals[slot] += value
                else:
                    totals.setdefault(slot, value)
            for slot, value in totals.items():
                values[slot] = value
            series[city] = values
        return labels, series

    def save_chart(self, path: str | Path, *, max_groups: int = 30) -> None:
        """Write a per-city comparison bar chart (PNG) with matplotlib.

        One bar per answering city for the first aggregate, grouped by the
        first group key if the query has one (at most ``max_groups`` groups).

        Args:
            path: the PNG file to write.
            max_groups: most groups drawn (the first ones in combined order).

        Raises:
            QueryError: no city answered, so there is nothing to draw.
        """
        labels, series = self.chart_series()
        if not series or not labels:
            raise QueryError("no city answered: there is nothing to chart", ErrorCode.INVALID_QUERY)
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed (CI, servers)
        import matplotlib.pyplot as plt

        labels = labels[:max_groups]
        cities = list(series)
        width = 0.8 / len(cities)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(labels) * max(1, len(cities)) / 2), 4.5))
        try:
            for i, city in enumerate(cities):
                xs = [j + (i - (len(cities) - 1) / 2) * width for j in range(len(labels))]
                ys = [math.nan if v is None else v for v in series[city][: len(labels)]]
                ax.bar(xs, ys, width=width, label=city)
            ax.set_xticks(range(len(labels)))
            tilted = len(labels) > 4
            ax.set_xticklabels(
                labels, rotation=30 if tilted else 0, ha="right" if tilted else "center"
            )
            group = self.query.group_by[0] if self.query.group_by else None
            ax.set_xlabel(format_group_key(group) if group is not None else "")
            ax.set_ylabel(format_aggregate(self.query.aggregates[0]))
            ax.set_title(f"{self.query.dataset}: {format_aggregate(self.query.aggregates[0])}")
            ax.legend(title="city", fontsize="small")
            fig.tight_layout()
            fig.savefig(str(path), format="png")
        finally:
            plt.close(fig)


# --- the alliance -------------------------------------------------------------------------------


def _as_aggregate(spec: Aggregate | str) -> Aggregate:
    return parse_aggregate(spec) if isinstance(spec, str) else spec


def _as_group_key(spec: GroupKey | str) -> GroupKey:
    return parse_group_key(spec) if isinstance(spec, str) else spec


def _as_filter(spec: Filter | str) -> Filter:
    return parse_filter(spec) if isinstance(spec, str) else spec


def _aggregate_items(value: Sequence[Aggregate | str] | Aggregate | str) -> list[Aggregate]:
    """One aggregate or spec, or a sequence of them (a string is one spec), parsed."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [_as_aggregate(value)]
    return [_as_aggregate(v) for v in value]


def _filter_items(value: Sequence[Filter | str] | Filter | str) -> list[Filter]:
    """One filter or spec, or a sequence of them, parsed."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [_as_filter(value)]
    return [_as_filter(v) for v in value]


def _group_items(value: Sequence[GroupKey | str] | GroupKey | str) -> list[GroupKey]:
    """One group key or spec, or a sequence of them, parsed."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [_as_group_key(value)]
    return [_as_group_key(v) for v in value]


def build_query(
    dataset: str,
    aggregates: Sequence[Aggregate | str] | Aggregate | str,
    *,
    group_by: Sequence[GroupKey | str] | GroupKey | str = (),
    filters: Sequence[Filter | str] | Filter | str = (),
    max_groups: int = 1000,
) -> Query:
    """Build a query from objects or spec strings and check it as a node would.

    The query is encoded and strictly decoded, so every bound and name rule
    of the wire (``spec/protocol.md`` §6) is checked before anything is signed.

    Args:
        dataset: the dataset name.
        aggregates: one or more aggregates or aggregate specs.
        group_by: group keys or their specs.
        filters: filters or their specs.
        max_groups: most groups a city may return.

    Returns:
        The query.

    Raises:
        QueryError: a bad spec or a query the wire would refuse.
    """

    try:
        query = Query(
            dataset=dataset,
            aggregates=tuple(_aggregate_items(aggregates)),
            filters=tuple(_filter_items(filters)),
            group_by=tuple(_group_items(group_by)),
            max_groups=max_groups,
        )
        return decode_as(encode(query), Query)
    except QueryError:
        raise
    except (HansaError, ValueError) as exc:
        message = exc.message if isinstance(exc, HansaError) else str(exc)
        raise QueryError(f"invalid query: {message}", ErrorCode.INVALID_QUERY) from exc


class Alliance:
    """A verified roster plus an analyst's key: the notebook's handle on an alliance.

    Attributes:
        signed_roster: the roster file's content.
        roster: the verified roster.
        signer: the analyst's signing key.
        principal: the principal the key speaks for.
    """

    def __init__(
        self, signed_roster: SignedRoster, roster: Roster, signer: SigningKey, principal: str
    ) -> None:
        """Use :meth:`load` or :meth:`from_roster`; this only stores its arguments."""
        self.signed_roster = signed_roster
        self.roster = roster
        self.signer = signer
        self.principal = principal

    @classmethod
    def from_roster(
        cls,
        signed_roster: SignedRoster,
        signer: SigningKey,
        *,
        principal: str | None = None,
        pin: bytes | str | None = None,
        now_ms: int | None = None,
    ) -> Alliance:
        """Verify a roster and check that it names the key as an analyst.

        Args:
            signed_roster: the signed roster.
            signer: the analyst's signing key.
            principal: who the key speaks for; ``None``: the one principal the
                roster names with that key.
            pin: SHA-256 of the roster body (bytes or 64 hex digits); ``None``:
                trust the roster on its own threshold of signatures.
            now_ms: the time expiry is judged at (default: now).

        Returns:
            The alliance handle.

        Raises:
            SignatureError: the roster's signatures fall short or the pin differs.
            FreshnessError: the roster has expired.
            ConfigError: a malformed pin, or the roster does not name this key
                as an analyst (for ``principal``).
        """
        pin_bytes = _pin(pin) if pin is not None else None
        roster = verify_roster(
            signed_roster, None, _now_ms() if now_ms is None else now_ms, pin=pin_bytes
        )
        kid = signer.public_key.key_id
        holder = roster.holders.get(kid)
        if principal is None:
            if holder is None or Role.ANALYST not in holder.roles:
                raise ConfigError(
                    f"roster version {roster.version} names no analyst with this key "
                    f"({signer.public_key.raw.hex()[:16]}…)"
                )
            principal = holder.principal
        if not roster.is_allowed(principal, kid, Role.ANALYST):
            raise ConfigError(
                f"roster version {roster.version} does not name {principal!r} "
                "as an analyst with this key"
            )
        return cls(signed_roster, roster, signer, principal)

    @classmethod
    def load(
        cls,
        roster_path: str | Path,
        key_path: str | Path,
        *,
        principal: str | None = None,
        pin: bytes | str | None = None,
        passphrase: bytes | str | None = None,
    ) -> Alliance:
        """Read a roster file and an analyst key file (see :meth:`from_roster`).

        Args:
            roster_path: the signed roster file.
            key_path: the analyst's key file.
            principal: who the key speaks for (``None``: as the roster says).
            pin: SHA-256 of the roster body, bytes or 64 hex digits.
            passphrase: the key file's passphrase, if it is sealed.

        Returns:
            The alliance handle.

        Raises:
            KeyFileError: the key file cannot be read.
            ProtocolError: the roster file is not a roster.
            HansaError: as :meth:`from_roster`.
        """
        signed = read_roster_file(roster_path)
        secret = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
        signer = read_key_file(key_path, passphrase=secret)
        return cls.from_roster(signed, signer, principal=principal, pin=pin)

    @property
    def digest(self) -> str:
        """SHA-256 of the roster body, in hex (what an operator pins)."""
        return roster_digest(self.signed_roster).hex()

    @property
    def cities(self) -> tuple[str, ...]:
        """The member cities that answer queries (role ``member``), in roster order."""
        return tuple(m.city for m in self.roster.members if Role.MEMBER in m.roles)

    def targets(self, cities: Iterable[str] | str | None = None) -> list[Target]:
        """Return fan-out targets (endpoint and node key) from the roster.

        Args:
            cities: the cities to ask (a string: comma-separated city ids);
                ``None``: every member with the member role.

        Returns:
            One target per city, in the order given.

        Raises:
            ConfigError: a city is not a member, lacks the member role, or repeats.
        """
        if isinstance(cities, str):
            cities = [c.strip() for c in cities.split(",") if c.strip()]
        chosen = list(self.cities if cities is None else cities)
        if not chosen:
            raise ConfigError("no target cities: the roster has no answering member")
        if len(set(chosen)) != len(chosen):
            raise ConfigError("a target city is named twice")
        targets = []
        for city in chosen:
            member = self.roster.member(city)
            if member is None:
                raise ConfigError(
                    f"{city!r} is not a member of roster version {self.roster.version}"
                )
            if Role.MEMBER not in member.roles:
                raise ConfigError(f"{city!r} does not answer queries (no member role)")
            targets.append(Target(city, member.endpoint, PublicKey(member.public_key)))
        return targets

    async def query(
        self,
        dataset: str,
        aggregates: Sequence[Aggregate | str] | Aggregate | str,
        *,
        purpose: str,
        group_by: Sequence[GroupKey | str] | GroupKey | str = (),
        filters: Sequence[Filter | str] | Filter | str = (),
        legal_basis: str = DEFAULT_LEGAL_BASIS,
        scope: ResultScope | str = ResultScope.ALLIANCE,
        cities: Iterable[str] | str | None = None,
        quorum: int | None = None,
        deadline_s: float = DEFAULT_DEADLINE_S,
        max_groups: int = 1000,
        on_status: Callable[[CityResult], None] | None = None,
        pool: HttpPool | None = None,
        receipts: bool = True,
    ) -> QueryResult:
        """Ask the alliance one signed question and combine the answers.

        After the fan-out, every city that answered or refused is asked for a
        receipt (:func:`fetch_receipts`, best effort); they go into the bundle.

        Args:
            dataset: the dataset name.
            aggregates: aggregates or aggregate specs (``"mean:price"``).
            purpose: the purpose token (must be allowed for the analyst).
            group_by: group keys or specs (``"room_type"``, ``"last_review:month"``).
            filters: filters or specs (``"price>=100"``).
            legal_basis: the legal basis signed into the policy tags.
            scope: who may see the result, ``alliance`` or ``public``.
            cities: the cities to ask, or a comma-separated string (``None``:
                every answering member).
            quorum: how many must answer (``None``: all targets).
            deadline_s: the whole fan-out's time budget, in seconds.
            max_groups: most groups a city may return.
            on_status: called with each city's result as it arrives.
            pool: an :class:`~hansa.federation.transport.HttpPool` to reuse
                (the caller owns it); by default one is opened for this
                query's fan-out and receipts, and closed after.
            receipts: fetch receipts after the fan-out.

        Returns:
            The :class:`QueryResult` (every city listed, none dropped).

        Raises:
            QueryError: a bad spec or query.
            PolicyDenied: the roster does not allow the analyst this purpose.
            ConfigError: an unknown or repeated city, a bad scope.
            ProtocolError: a quorum outside ``1..len(cities)`` or a bad deadline.
        """
        query = build_query(
            dataset, aggregates, group_by=group_by, filters=filters, max_groups=max_groups
        )
        targets = self.targets(cities)
        try:
            scope_value = ResultScope(scope)
        except ValueError:
            raise ConfigError(f"scope must be alliance or public, not {scope!r}") from None
        if not self.roster.allows_purpose(self.principal, purpose):
            raise PolicyDenied(
                f"roster version {self.roster.version} does not allow {self.principal} "
                f"the purpose {purpose!r}",
                ErrorCode.PURPOSE_NOT_ALLOWED,
            )
        policy = PolicyTags(
            purpose=purpose, legal_basis=legal_basis, scope=scope_value, analyst=self.principal
        )
        try:
            decode_as(encode(policy), PolicyTags)
        except HansaError as exc:
            raise QueryError(f"invalid policy tags: {exc.message}", exc.code) from exc
        async with contextlib.AsyncExitStack() as stack:
            if pool is None:
                # One pool for the fan-out and the receipts: their connections are reused.
                pool = await stack.enter_async_context(HttpPool())
            result = await fan_out(
                query,
                policy,
                targets,
                signer=self.signer,
                requester=self.principal,
                quorum=len(targets) if quorum is None else quorum,
                deadline_s=deadline_s,
                roster_version=self.roster.version,
                pool=pool,
                on_status=on_status,
            )
            fetched: dict[str, Receipt] = {}
            if receipts:
                fetched = await fetch_receipts(
                    result,
                    targets,
                    signer=self.signer,
                    requester=self.principal,
                    roster_version=self.roster.version,
                    pool=pool,
                    log_keys={
                        m.city: m.log_key for m in self.roster.members if m.log_key is not None
                    },
                )
        per_city = {
            answer.responder: combine_answers(query, (answer,)) for answer in result.answers
        }
        return QueryResult(
            result, self.signed_roster, self.roster, self.principal, per_city, fetched
        )

    def query_sync(
        self,
        dataset: str,
        aggregates: Sequence[Aggregate | str] | Aggregate | str,
        *,
        purpose: str,
        group_by: Sequence[GroupKey | str] | GroupKey | str = (),
        filters: Sequence[Filter | str] | Filter | str = (),
        legal_basis: str = DEFAULT_LEGAL_BASIS,
        scope: ResultScope | str = ResultScope.ALLIANCE,
        cities: Iterable[str] | str | None = None,
        quorum: int | None = None,
        deadline_s: float = DEFAULT_DEADLINE_S,
        max_groups: int = 1000,
        on_status: Callable[[CityResult], None] | None = None,
        receipts: bool = True,
    ) -> QueryResult:
        """Run :meth:`query` to completion from synchronous code (same arguments).

        Inside a running event loop (a Jupyter cell) the query runs on a
        helper thread with its own loop, since a loop cannot be re-entered;
        ``on_status`` is then called on that thread.

        Returns:
            The :class:`QueryResult`.

        Raises:
            HansaError: as :meth:`query`.
        """
        coroutine = functools.partial(
            self.query,
            dataset,
            aggregates,
            purpose=purpose,
            group_by=group_by,
            filters=filters,
            legal_basis=legal_basis,
            scope=scope,
            cities=cities,
            quorum=quorum,
            deadline_s=deadline_s,
            max_groups=max_groups,
            on_status=on_status,
            receipts=receipts,
        )

        def run() -> QueryResult:
            return asyncio.run(coroutine())

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return run()
        box: list[QueryResult | BaseException] = []

        def worker() -> None:
            try:
                box.append(run())
            except BaseException as exc:  # re-raised in the caller's thread
                box.append(exc)

        thread = threading.Thread(target=worker, name="hansa-query", daemon=True)
        thread.start()
        thread.join()
        outcome = box[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _pin(pin: bytes | str) -> bytes:
    if isinstance(pin, str):
        try:
            pin = bytes.fromhex(pin)
        except ValueError:
            pin = b""
    if len(pin) != 32:
        raise ConfigError("a roster pin must be a SHA-256: 32 bytes or 64 hex digits")
    return pin


# --- receipts (issue 5, part 4) ---------------------------------------------------------


async def fetch_receipts(
    result: FanOutResult,
    targets: Sequence[Target],
    *,
    signer: SigningKey,
    requester: str,
    roster_version: int,
    pool: HttpPool | None = None,
    attempts: int = RECEIPT_ATTEMPTS,
    timeout_s: float = RECEIPT_TIMEOUT_S,
    backoff_s: float = 0.2,
    now_ms: Callable[[], int] | None = None,
    log_keys: Mapping[str, bytes] | None = None,
) -> dict[str, Receipt]:
    """Ask every city that answered or refused for a receipt of its request (best effort).

    For each such city, concurrently: read its log origin and log key from
    ``GET /v1/log/keys`` (unsigned: trusted on first use unless ``log_keys``, the
    roster, names the city's key; a node serving another key then gets a ``failed``
    receipt recording the key it served, which ``hansa verify`` reports as a
    failure, spec §16.1), then send a signed
    ``AuditRequest`` (op ``receipt``, the request's message id) to
    ``POST /v1/audit`` and keep the node's signed reply. Network errors,
    timeouts, HTTP 429/5xx and signed refusals saying UNAVAILABLE, INTERNAL or
    RATE_LIMITED are retried up to ``attempts`` times with exponential backoff;
    anything else ends the city's attempts. Never raises for a city's failure:
    its receipt then says ``failed`` (or ``refused``) with the reason.

    Args:
        result: the fan-out's result.
        targets: the fan-out's targets (endpoints and node keys).
        signer: the analyst's key (the one that signed the requests).
        requester: the analyst principal.
        roster_version: the roster version to sign into the receipt requests.
        pool: an :class:`~hansa.federation.transport.HttpPool` to reuse (the
            caller owns it); by default one is opened and closed here.
        attempts: the most attempts per city (at least 1).
        timeout_s: the time budget of one attempt.
        backoff_s: the pause after the first failed attempt (doubling).
        now_ms: the clock for ``issued_at`` (default: the wall clock).
        log_keys: the raw log public keys the roster names, by city id.

    Returns:
        One :class:`~hansa.federation.evidence.Receipt` per answering or refusing city.
    """
    by_city = {t.city: t for t in targets}
    wanted = [
        (c, by_city[c.city])
        for c in result.cities
        if c.status in (CityStatus.ANSWERED, CityStatus.REFUSED) and c.city in by_city
    ]
    if not wanted:
        return {}
    clock = _now_ms if now_ms is None else now_ms
    fetcher = _ReceiptFetcher(
        signer,
        requester,
        roster_version,
        max(1, attempts),
        timeout_s,
        backoff_s,
        clock,
        dict(log_keys or {}),
    )
    if pool is not None:
        receipts = await asyncio.gather(*(fetcher.fetch(pool, c, t) for c, t in wanted))
    else:
        async with HttpPool() as own:
            receipts = await asyncio.gather(*(fetcher.fetch(own, c, t) for c, t in wanted))
    return {c.city: r for (c, _), r in zip(wanted, receipts, strict=True)}


class _Retry(Exception):
    """One receipt attempt failed in a way worth retrying."""


@dataclass(frozen=True, slots=True)
class _ReceiptFetcher:
    signer: SigningKey
    requester: str
    roster_version: int
    attempts: int
    timeout_s: float
    backoff_s: float
    clock: Callable[[], int]
    log_keys: Mapping[str, bytes]

    async def fetch(self, pool: HttpPool, city: CityResult, target: Target) -> Receipt:
        origin: str | None = None
        vkey: str | None = None
        last = "not attempted"
        for attempt in range(1, self.attempts + 1):
            try:
                async with asyncio.timeout(self.timeout_s):
                    if vkey is None:
                        origin, vkey = await self._log_keys(pool, target)
                        named = self.log_keys.get(city.city)
                        if (
                            named is not None
                            and NoteVerifier.from_vkey(vkey).public_key.raw != named
                        ):
                            # The roster pins the key: another one is never trusted.
                            why = "GET /v1/log/keys serves a log key other than the roster's"
                            return Receipt("failed", attempt, None, origin, vkey, why)
                    return await self._receipt(pool, city, target, attempt, origin, vkey)
            except _Retry as exc:
                last = str(exc)
            except TimeoutError:
                last = f"no reply within {self.timeout_s:g} s"
            except (ConnectFailed, BadResponse) as exc:  # the network: worth another try
                last = exc.message
            except HansaError as exc:  # not worth retrying: the reply itself is wrong
                return Receipt("failed", attempt, None, origin, vkey, _detail(exc.message))
            if attempt < self.attempts:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
        return Receipt("failed", self.attempts, None, origin, vkey, _detail(last))

    async def _log_keys(self, pool: HttpPool, target: Target) -> tuple[str, str]:
        endpoint = pool.endpoint(target.endpoint)
        reply = await pool.get(endpoint, LOG_KEYS_PATH, max_body=_MAX_LOG_KEYS)
        status, body = reply.status, reply.body
        if status in _RETRY_STATUSES:
            raise _Retry(f"GET {LOG_KEYS_PATH}: HTTP {status}")
        if status != 200:
            raise ProtocolError(f"GET {LOG_KEYS_PATH}: HTTP {status}")
        try:
            keys = json.loads(body)
            origin, vkey = keys["origin"], keys["log_vkey"]
        except (ValueError, TypeError, KeyError) as exc:
            raise ProtocolError(f"GET {LOG_KEYS_PATH}: not the log keys JSON") from exc
        if not isinstance(origin, str) or not isinstance(vkey, str):
            raise ProtocolError(f"GET {LOG_KEYS_PATH}: origin and log_vkey must be strings")
        NoteVerifier.from_vkey(vkey)  # a malformed key is a failure now, not at verify
        return origin, vkey

    async def _receipt(
        self,
        pool: HttpPool,
        city: CityResult,
        target: Target,
        attempt: int,
        origin: str | None,
        vkey: str | None,
    ) -> Receipt:
        issued = self.clock()
        request = AuditRequest(
            requester=self.requester,
            audience=city.city,
            issued_at=issued,
            expires_at=issued + RECEIPT_VALIDITY_MS,
            nonce=secrets.token_bytes(16),
            roster_version=self.roster_version,
            op=AuditOp.RECEIPT,
            message_id=message_id(city.request),
        )
        endpoint = pool.endpoint(target.endpoint)
        reply = await pool.post(
            endpoint,
            AUDIT_PATH,
            seal(request, self.signer),
            ENVELOPE_MEDIA_TYPE,
            max_body=MAX_ENVELOPE_SIZE,
        )
        status, body = reply.status, reply.body
        if status in _RETRY_STATUSES:
            raise _Retry(f"POST {AUDIT_PATH}: HTTP {status}")
        if status != 200:
            raise ProtocolError(f"POST {AUDIT_PATH}: HTTP {status}")
        keys = {target.node_key.key_id: target.node_key}
        if decode_envelope(body).payload_type == PayloadType.QUERY_REFUSAL:
            refusal = open_envelope(body, keys, QueryRefusal).message
            why = f"{refusal.code.name}: {refusal.reason}"
            if refusal.code in _RETRY_CODES:
                raise _Retry(why)
            return Receipt("refused", attempt, body, origin, vkey, _detail(why))
        response = open_envelope(body, keys, AuditResponse).message
        if len(response.entries) != 1:
            # Kept, but not claimed as a receipt: without the leaf nothing can be checked.
            return Receipt(
                "failed", attempt, body, origin, vkey, "the node's receipt carries no leaf"
            )
        return Receipt("fetched", attempt, body, origin, vkey)


def _detail(text: str) -> str:
    return " ".join(text.split())[:1024]
