"""Wire messages: frozen, tagged msgspec Structs (``spec/protocol.md`` §5–§7).

Theory of operation
-------------------
Every message body is a MessagePack **array** whose first element is the
message's tag and whose remaining elements are its fields in declaration
order (msgspec ``array_like``). Nested structures are arrays too. Maps never
appear in a body, so duplicate map keys cannot occur: a map where an array is
expected is a type error. Unknown trailing elements are rejected
(``forbid_unknown_fields``). Every string, byte string and sequence has a
declared maximum in the schema (``Annotated[..., Meta(...)]``) and cross-field
rules are checked in ``__post_init__``, so a decoded object is a valid object.

Times are integer milliseconds since the Unix epoch (UTC). Floats appear only
as query literals, histogram edges, quantile ranks and aggregate states,
never in control fields.
"""

from __future__ import annotations

import enum
import itertools
import math
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from hansa.protocol.errors import ErrorCode

__all__ = [
    "INT_MAX",
    "INT_MIN",
    "MAX_AGGREGATES",
    "MAX_AGGREGATE_KINDS",
    "MAX_BIN_EDGES",
    "MAX_COLUMNS",
    "MAX_DATASETS",
    "MAX_FILTERS",
    "MAX_GROUPS",
    "MAX_GROUP_BY",
    "MAX_IN_VALUES",
    "MAX_LEGAL_BASIS",
    "MAX_PURPOSES",
    "MAX_QUANTILES",
    "MAX_SKETCH_BUCKETS",
    "MAX_TARGETS",
    "MAX_TEXT",
    "MAX_VERSION_TEXT",
    "Aggregate",
    "AggregateState",
    "Capabilities",
    "ColumnInfo",
    "ColumnRole",
    "ColumnType",
    "Count",
    "CountState",
    "DatasetInfo",
    "Decision",
    "Dimension",
    "DisclosureProfile",
    "ErrorMessage",
    "Filter",
    "FilterOp",
    "Group",
    "GroupKey",
    "Histogram",
    "HistogramState",
    "Max",
    "Mean",
    "Min",
    "MinMaxState",
    "MomentsState",
    "PolicyTags",
    "Quantiles",
    "Query",
    "QueryAnswer",
    "QueryRefusal",
    "QueryRequest",
    "ResultScope",
    "SketchState",
    "Stddev",
    "Sum",
    "SumState",
    "SuppressedCell",
    "SuppressionReason",
    "TimeBucket",
    "TimeUnit",
    "Variance",
    "typed_key",
]

# --- limits (spec §5.1); every size and count on the wire is bounded --------

MAX_TARGETS: Final = 1000
MAX_AGGREGATES: Final = 32
MAX_FILTERS: Final = 32
MAX_GROUP_BY: Final = 4
MAX_GROUPS: Final = 100_000
MAX_IN_VALUES: Final = 1000
MAX_BIN_EDGES: Final = 257
MAX_QUANTILES: Final = 32
MAX_SKETCH_BUCKETS: Final = 4096
MAX_DATASETS: Final = 256
MAX_COLUMNS: Final = 512
MAX_TEXT: Final = 1024
MAX_AGGREGATE_KINDS: Final = 16
MAX_PURPOSES: Final = 256
MAX_VERSION_TEXT: Final = 128
MAX_LEGAL_BASIS: Final = 256
INT_MIN: Final = -(2**63)
"""Smallest integer MessagePack (and so the wire) can carry."""
INT_MAX: Final = 2**64 - 1
"""Largest integer MessagePack (and so the wire) can carry."""

# --- constrained scalar types ---------------------------------------------------

# NOTE: patterns end in ``\Z``, not ``$``: msgspec matches with Python's
# ``re.search``, where ``$`` also matches before a trailing newline, so
# ``"melbourne\n"`` would pass as a city id. The max_length duplicates the
# bound the pattern implies so that an over-long value is reported as
# TOO_LARGE (length is checked first) and the limit is visible in the schema.
Identifier = Annotated[str, Meta(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,62}\Z", max_length=63)]
"""Dataset and column names: ASCII letter, then letters, digits, underscore; ≤ 63."""

CityId = Annotated[str, Meta(pattern=r"^[a-z0-9](?:[a-z0-9.-]{0,62}[a-z0-9])?\Z", max_length=64)]
"""City ids: lower-case DNS-label-like tokens (``melbourne``, ``cape-town``); ≤ 64."""

PrincipalId = Annotated[
    str, Meta(pattern=r"^[a-z0-9](?:[a-z0-9._@-]{0,126}[a-z0-9])?\Z", max_length=128)
]
"""Analyst or node principal ids, e.g. ``ana@melbourne``; ≤ 128."""

Token = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}\Z", max_length=32)]
"""Vocabulary tokens such as purposes: lower-case, ≤ 32."""

Millis = Annotated[int, Meta(ge=0, le=2**53)]
Nonce = Annotated[bytes, Meta(min_length=16, max_length=16)]
Digest = Annotated[bytes, Meta(min_length=32, max_length=32)]
PublicKeyBytes = Annotated[bytes, Meta(min_length=32, max_length=32)]
Text = Annotated[str, Meta(max_length=MAX_TEXT)]
Count_ = Annotated[int, Meta(ge=0, le=2**63 - 1)]
VersionText = Annotated[str, Meta(min_length=1, max_length=MAX_VERSION_TEXT)]
BoundedText = Annotated[str, Meta(max_length=MAX_TEXT)]
Scalar = bool | int | float | BoundedText
"""A query literal: finite floats only, strings of at most :data:`MAX_TEXT` characters."""
CellValue = bool | int | float | BoundedText | None
"""A group-key value in an answer (``None`` is the SQL NULL group); floats are finite."""


def _check_finite(values: tuple[object, ...], what: str) -> None:
    """Reject NaN and infinities, which break equality, merging and ordering."""
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{what} must be finite")


def _check_scalars(values: tuple[object, ...], what: str) -> None:
    """Apply the wire bounds to scalars built in Python (decoding checks them already)."""
    _check_finite(values, what)
    for v in values:
        if isinstance(v, str) and len(v) > MAX_TEXT:
            raise ValueError(f"{what}: string longer than {MAX_TEXT} characters")
        if isinstance(v, int) and not isinstance(v, bool) and not INT_MIN <= v <= INT_MAX:
            raise ValueError(f"{what}: integer outside the MessagePack range")


def _check_unique(values: tuple[object, ...], what: str) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{what} must be unique")


class _Wire(
    msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag_field="kind"
):
    """Base of every wire struct: immutable, positional, no unknown fields."""


# --- enums ------------------------------------------------------------------------


class ResultScope(enum.StrEnum):
    """Who may see the combined result (a policy tag)."""

    ALLIANCE = "alliance"
    PUBLIC = "public"


class FilterOp(enum.StrEnum):
    """Filter operators with their arity (spec §6.3)."""

    EQ = "eq"
    NE = "ne"
    IN = "in"
    NOT_IN = "not_in"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    BETWEEN = "between"
    IS_NULL = "is_null"
    NOT_NULL = "not_null"


_FILTER_ARITY: Final[dict[FilterOp, tuple[int, int]]] = {
    FilterOp.EQ: (1, 1),
    FilterOp.NE: (1, 1),
    FilterOp.IN: (1, MAX_IN_VALUES),
    FilterOp.NOT_IN: (1, MAX_IN_VALUES),
    FilterOp.LT: (1, 1),
    FilterOp.LE: (1, 1),
    FilterOp.GT: (1, 1),
    FilterOp.GE: (1, 1),
    FilterOp.BETWEEN: (2, 2),
    FilterOp.IS_NULL: (0, 0),
    FilterOp.NOT_NULL: (0, 0),
}


class TimeUnit(enum.StrEnum):
    """Time bucket units for :class:`TimeBucket`."""

    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"
    DAY_OF_WEEK = "day_of_week"
    HOUR_OF_DAY = "hour_of_day"


class ColumnType(enum.StrEnum):
    """Logical column types a dataset may declare."""

    INTEGER = "integer"
    FLOAT = "float"
    TEXT = "text"
    BOOLEAN = "boolean"
    DATE = "date"
    TIMESTAMP = "timestamp"


class ColumnRole(enum.StrEnum):
    """What a column may be used for (spec §6.1)."""

    DIMENSION = "dimension"
    MEASURE = "measure"
    TIME = "time"
    IDENTIFIER = "identifier"
    HIDDEN = "hidden"


class Decision(enum.StrEnum):
    """What the node decided for an answered query."""

    ANSWERED = "answered"
    SUPPRESSED = "answered_suppressed"
    NOISED = "noised"


class SuppressionReason(enum.StrEnum):
    """Why a cell was withheld from an answer."""

    MIN_GROUP_SIZE = "min_group_size"
    DOMINANCE = "dominance"


# --- the query (spec §6) ----------------------------------------------------------


class Count(_Wire, frozen=True, tag="count"):
    """Number of rows, or of non-null values of ``column`` when given."""

    column: Identifier | None = None


class Sum(_Wire, frozen=True, tag="sum"):
    """Sum of a measure column."""

    column: Identifier


class Mean(_Wire, frozen=True, tag="mean"):
    """Arithmetic mean of a measure column."""

    column: Identifier


class Min(_Wire, frozen=True, tag="min"):
    """Minimum of a measure column."""

    column: Identifier


class Max(_Wire, frozen=True, tag="max"):
    """Maximum of a measure column."""

    column: Identifier


class Variance(_Wire, frozen=True, tag="variance"):
    """Sample variance (n - 1 denominator) of a measure column."""

    column: Identifier


class Stddev(_Wire, frozen=True, tag="stddev"):
    """Sample standard deviation of a measure column."""

    column: Identifier


class Histogram(_Wire, frozen=True, tag="histogram"):
    """Counts over the half-open bins ``[e0, e1), …, [e(n-2), e(n-1)]``.

    The last bin is closed. Values outside ``[e0, e(n-1)]`` are counted in
    the ``below`` and ``above`` fields of :class:`HistogramState`.
    """

    column: Identifier
    edges: Annotated[tuple[float, ...], Meta(min_length=2, max_length=MAX_BIN_EDGES)]

    def __post_init__(self) -> None:
        if not all(math.isfinite(e) for e in self.edges):
            raise ValueError("histogram edges must be finite")
        if any(b <= a for a, b in itertools.pairwise(self.edges)):
            raise ValueError("histogram edges must be strictly increasing")


class Quantiles(_Wire, frozen=True, tag="quantiles"):
    """Quantiles at the given ranks, estimated with a relative-error sketch."""

    column: Identifier
    ranks: Annotated[tuple[float, ...], Meta(min_length=1, max_length=MAX_QUANTILES)]

    def __post_init__(self) -> None:
        if not all(0.0 <= q <= 1.0 for q in self.ranks):
            raise ValueError("quantile ranks must lie in [0, 1]")


Aggregate = Count | Sum | Mean | Min | Max | Variance | Stddev | Histogram | Quantiles


class Filter(_Wire, frozen=True, tag="filter"):
    """A typed predicate ``column op values`` (spec §6.3)."""

    column: Identifier
    op: FilterOp
    values: Annotated[tuple[Scalar, ...], Meta(max_length=MAX_IN_VALUES)] = ()

    def __post_init__(self) -> None:
        low, high = _FILTER_ARITY[self.op]
        if not low <= len(self.values) <= high:
            raise ValueError(f"filter {self.op.value!r} takes {low}..{high} values")
        _check_scalars(self.values, "filter literals")


class Dimension(_Wire, frozen=True, tag="dimension"):
    """Group by the values of a dimension column."""

    column: Identifier


class TimeBucket(_Wire, frozen=True, tag="time_bucket"):
    """Group by a time column truncated (or projected) to ``unit``."""

    column: Identifier
    unit: TimeUnit


GroupKey = Dimension | TimeBucket


class Query(_Wire, frozen=True, tag="query"):
    """An aggregate query over one dataset: data, never SQL text."""

    dataset: Identifier
    aggregates: Annotated[tuple[Aggregate, ...], Meta(min_length=1, max_length=MAX_AGGREGATES)]
    filters: Annotated[tuple[Filter, ...], Meta(max_length=MAX_FILTERS)] = ()
    group_by: Annotated[tuple[GroupKey, ...], Meta(max_length=MAX_GROUP_BY)] = ()
    max_groups: Annotated[int, Meta(ge=1, le=MAX_GROUPS)] = 1000

    def __post_init__(self) -> None:
        # A repeated grouping key adds nothing but a duplicate key column.
        _check_unique(self.group_by, "group_by keys")


class PolicyTags(_Wire, frozen=True, tag="policy"):
    """Why and for whom a query is asked; signed inside the request body."""

    purpose: Token
    legal_basis: Annotated[str, Meta(min_length=1, max_length=MAX_LEGAL_BASIS)]
    scope: ResultScope
    analyst: PrincipalId


# --- request / response bodies (spec §7) ----------------------------------------------


class QueryRequest(_Wire, frozen=True, tag="query-request"):
    """A signed request for one city to answer one aggregate query."""

    requester: PrincipalId
    audience: CityId
    issued_at: Millis
    expires_at: Millis
    nonce: Nonce
    roster_version: Annotated[int, Meta(ge=0, le=2**53)]
    policy: PolicyTags
    query: Query
    targets: Annotated[tuple[CityId, ...], Meta(min_length=1, max_length=MAX_TARGETS)]
    quorum: Annotated[int, Meta(ge=1, le=MAX_TARGETS)]

    def __post_init__(self) -> None:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("targets must be unique")
        if self.audience not in self.targets:
            raise ValueError("audience must be one of the targets")
        if self.quorum > len(self.targets):
            raise ValueError("quorum exceeds the number of targets")


class CountState(_Wire, frozen=True, tag="count"):
    """Mergeable state of :class:`Count`: the count itself."""

    n: Count_


class SumState(_Wire, frozen=True, tag="sum"):
    """Mergeable state of :class:`Sum`: non-null count and total (finite).

    NOTE: spec §7.3.2 also asks for ``total == 0`` when n == 0; that rule is
    checked by ``hansa.federation.combine`` when it validates an answer, not here.
    """

    n: Count_
    total: int | float

    def __post_init__(self) -> None:
        _check_scalars((self.total,), "sum total")


class MinMaxState(_Wire, frozen=True, tag="minmax"):
    """Mergeable state of :class:`Min` / :class:`Max` (``None`` exactly when n == 0)."""

    n: Count_
    value: int | float | None

    def __post_init__(self) -> None:
        if (self.value is None) != (self.n == 0):
            raise ValueError("min/max value must be null exactly when n == 0")
        _check_scalars((self.value,), "min/max value")


class MomentsState(_Wire, frozen=True, tag="moments"):
    """Mergeable state of mean/variance/stddev: n, mean and M2 (Chan et al.).

    Both are finite, and ``mean`` is 0 when n == 0.

    NOTE: spec §7.3.4 also asks for ``m2 >= 0``; that rule is checked by
    ``hansa.federation.combine`` when it validates an answer, not here.
    """

    n: Count_
    mean: float
    m2: float

    def __post_init__(self) -> None:
        _check_finite((self.mean, self.m2), "moments")
        if self.n == 0 and self.mean != 0:
            raise ValueError("moments mean must be 0 when n == 0")


class HistogramState(_Wire, frozen=True, tag="histogram"):
    """Mergeable state of :class:`Histogram`: bin counts plus out-of-range counts."""

    counts: Annotated[tuple[Count_, ...], Meta(min_length=1, max_length=MAX_BIN_EDGES - 1)]
    below: Count_ = 0
    above: Count_ = 0


SketchBuckets = Annotated[tuple[tuple[int, Count_], ...], Meta(max_length=MAX_SKETCH_BUCKETS)]


class SketchState(_Wire, frozen=True, tag="ddsketch"):
    """Mergeable DDSketch state (relative accuracy ``alpha``).

    Bucket ``i`` covers ``(gamma**(i-1), gamma**i]`` with
    ``gamma = (1 + alpha) / (1 - alpha)``; ``positive`` and ``negative`` hold
    ``(index, count)`` pairs sorted by strictly increasing index for values
    above zero and for the magnitudes of values below zero.

    NOTE: spec §7.3.6 also asks for counts > 0; that rule is checked by
    ``hansa.federation.sketch.validate_sketch`` before merging, not here.
    """

    alpha: Annotated[float, Meta(gt=0.0, lt=1.0)]
    zero_count: Count_
    positive: SketchBuckets
    negative: SketchBuckets

    def __post_init__(self) -> None:
        # Sorted, unique indices make merging a linear walk and the encoding canonical.
        for buckets in (self.positive, self.negative):
            if any(b[0] <= a[0] for a, b in itertools.pairwise(buckets)):
                raise ValueError("sketch bucket indices must be strictly increasing")


AggregateState = CountState | SumState | MinMaxState | MomentsState | HistogramState | SketchState

CellKey = Annotated[tuple[CellValue, ...], Meta(max_length=MAX_GROUP_BY)]


class Group(_Wire, frozen=True, tag="group"):
    """One released cell: its key values and one state per requested aggregate."""

    key: CellKey
    states: Annotated[tuple[AggregateState, ...], Meta(max_length=MAX_AGGREGATES)]

    def __post_init__(self) -> None:
        _check_scalars(self.key, "group key values")


class SuppressedCell(_Wire, frozen=True, tag="suppressed"):
    """A withheld cell: its key and why (never its values)."""

    key: CellKey
    reason: SuppressionReason

    def __post_init__(self) -> None:
        _check_scalars(self.key, "suppressed key values")


class QueryAnswer(_Wire, frozen=True, tag="query-answer"):
    """A city's signed answer: released cells, suppressed cells, and citations.

    Every cell key has the same length (one value per ``group_by`` entry),
    every released cell has the same number of states (one per aggregate),
    no key appears twice, and ``decision`` agrees with ``suppressed``:
    ``answered`` has none, ``answered_suppressed`` has at least one.
    """

    request_id: Digest
    responder: CityId
    requester: PrincipalId
    issued_at: Millis
    dataset: Identifier
    dataset_version: VersionText
    disclosure_version: Annotated[int, Meta(ge=0)]
    decision: Decision
    groups: Annotated[tuple[Group, ...], Meta(max_length=MAX_GROUPS)]
    suppressed: Annotated[tuple[SuppressedCell, ...], Meta(max_length=MAX_GROUPS)] = ()

    def __post_init__(self) -> None:
        key_lengths = {len(g.key) for g in self.groups} | {len(c.key) for c in self.suppressed}
        if len(key_lengths) > 1:
            raise ValueError("all cell keys must have the same length")
        if len({len(g.states) for g in self.groups}) > 1:
            raise ValueError("all groups must carry the same number of states")
        keys = [typed_key(g.key) for g in self.groups]
        keys += [typed_key(c.key) for c in self.suppressed]
        if len(set(keys)) != len(keys):
            raise ValueError("a cell key appears more than once")
        if self.decision is Decision.ANSWERED and self.suppressed:
            raise ValueError("decision 'answered' cannot list suppressed cells")
        if self.decision is Decision.SUPPRESSED and not self.suppressed:
            raise ValueError("decision 'answered_suppressed' needs a suppressed cell")


def typed_key(key: tuple[CellValue, ...]) -> tuple[tuple[str, CellValue], ...]:
    """Return a hashable form of a cell key that compares values as typed (spec §7.2).

    Python equates ``1``, ``1.0`` and ``True``; on the wire they are different
    keys, so each value is paired with its kind. ``-0.0`` and ``0.0`` stay one key.

    Args:
        key: a cell key.

    Returns:
        A tuple of ``(kind, value)`` pairs, equal exactly when the keys are.
    """
    return tuple((_kind(v), v) for v in key)


def _kind(value: CellValue) -> str:
    # isinstance, not type(): a str or int subclass (an enum) is sent as its base kind.
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "str"


def _check_wire_code(code: ErrorCode) -> None:
    if not code.on_wire:
        raise ValueError(f"error code {code.value} is local-only and never sent")


class QueryRefusal(_Wire, frozen=True, tag="query-refusal"):
    """A city's signed refusal, with the reason code (never a local-only 6xx code)."""

    request_id: Digest
    responder: CityId
    requester: PrincipalId
    issued_at: Millis
    code: ErrorCode
    reason: Text

    def __post_init__(self) -> None:
        _check_wire_code(self.code)


class ColumnInfo(_Wire, frozen=True, tag="column"):
    """A published column: name, logical type and role."""

    name: Identifier
    type: ColumnType
    role: ColumnRole


class DisclosureProfile(_Wire, frozen=True, tag="disclosure"):
    """A dataset's published disclosure settings (spec §8).

    ``aggregates`` maps a column name (each at most once) to the aggregate
    kinds offered on it.
    """

    version: Annotated[int, Meta(ge=0)]
    min_group_size: Annotated[int, Meta(ge=1, le=1_000_000)]
    dominance_p: Annotated[float, Meta(gt=0.0, le=100.0)]
    max_groups: Annotated[int, Meta(ge=1, le=MAX_GROUPS)]
    purposes: Annotated[tuple[Token, ...], Meta(max_length=MAX_PURPOSES)]
    aggregates: Annotated[
        tuple[
            tuple[Identifier, Annotated[tuple[Token, ...], Meta(max_length=MAX_AGGREGATE_KINDS)]],
            ...,
        ],
        Meta(max_length=MAX_COLUMNS),
    ]

    def __post_init__(self) -> None:
        _check_unique(self.purposes, "purposes")
        _check_unique(tuple(column for column, _ in self.aggregates), "aggregate columns")


class DatasetInfo(_Wire, frozen=True, tag="dataset"):
    """A published dataset: schema, version and disclosure profile."""

    name: Identifier
    version: VersionText
    columns: Annotated[tuple[ColumnInfo, ...], Meta(min_length=1, max_length=MAX_COLUMNS)]
    disclosure: DisclosureProfile

    def __post_init__(self) -> None:
        _check_unique(tuple(c.name for c in self.columns), "column names")


class Capabilities(_Wire, frozen=True, tag="capabilities"):
    """A node's signed capability document."""

    city: CityId
    node_key: PublicKeyBytes
    issued_at: Millis
    datasets: Annotated[tuple[DatasetInfo, ...], Meta(max_length=MAX_DATASETS)]

    def __post_init__(self) -> None:
        _check_unique(tuple(d.name for d in self.datasets), "dataset names")


class ErrorMessage(_Wire, frozen=True, tag="error"):
    """An unsigned error, used only when the requester cannot be identified.

    ``code`` is a wire code (never a local-only 6xx code).
    """

    code: ErrorCode
    message: Text

    def __post_init__(self) -> None:
        _check_wire_code(self.code)
