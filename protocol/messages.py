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

Where each rule is checked
--------------------------
Decoding is the receive hot path (it runs after every signature check), so
the rules are placed where they cost least. Decode bodies only through
:mod:`hansa.protocol.codec`: a bare msgspec decoder skips the name checks.

- **Scalar bounds are ``Meta`` constraints, checked in C while decoding**:
  lengths and counts, integer ranges, quantile ranks in ``[0, 1]``, and
  finiteness of every float (``FiniteFloat``: ``-max <= x <= max`` rejects
  NaN and both infinities). As msgspec intends, they are *not* checked when
  a struct is built in Python: a message built with, say, a NaN literal or
  an over-long string encodes, and its receiver refuses it.
  :func:`hansa.protocol.codec.encode` fails cleanly (``ProtocolError``) on
  an integer MessagePack cannot carry.
- **Name shapes** (identifiers, city ids, principal ids, tokens) are
  decoding rules too (they were ``Meta`` patterns, which msgspec ran as one
  ``re.search`` per string). After decoding, the codec runs the message's
  :func:`name_check`, which checks every name in it, nested structs
  included, with one regular-expression call per message: the names are
  joined with spaces (no name alphabet contains one), the joined text must
  hold exactly the spaces inserted (so a name with a space cannot pass as
  two), and one compiled ``fullmatch`` of the message's layout of name
  kinds checks them all (see :class:`_Names`). A name's *length* is its
  ``Meta`` bound (``TOO_LARGE``); its shape is ``INVALID_FIELD``.
- **Cross-field rules** run in ``__post_init__``, on construction and on
  decoding, written with C-speed builtins over whole tuples.
"""

from __future__ import annotations

import enum
import itertools
import operator
import re
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Final, NamedTuple

import msgspec
from msgspec import Meta

from hansa.protocol.envelope import MAX_ENVELOPE_SIZE
from hansa.protocol.errors import ErrorCode

__all__ = [
    "CITY_ID_PATTERN",
    "IDENTIFIER_PATTERN",
    "INT_MAX",
    "INT_MIN",
    "MAX_AGGREGATES",
    "MAX_AGGREGATE_KINDS",
    "MAX_AUDIT_PAGE",
    "MAX_BIN_EDGES",
    "MAX_CHECKPOINT_NOTE",
    "MAX_COLUMNS",
    "MAX_DATASETS",
    "MAX_FILTERS",
    "MAX_GROUPS",
    "MAX_GROUP_BY",
    "MAX_IN_VALUES",
    "MAX_LEAF_BYTES",
    "MAX_LEGAL_BASIS",
    "MAX_PROOF_HASHES",
    "MAX_PURPOSES",
    "MAX_QUANTILES",
    "MAX_SKETCH_BUCKETS",
    "MAX_TARGETS",
    "MAX_TEXT",
    "MAX_VERSION_TEXT",
    "PRINCIPAL_ID_PATTERN",
    "TOKEN_PATTERN",
    "AddCheckpoint",
    "Aggregate",
    "AggregateState",
    "AuditOp",
    "AuditRequest",
    "AuditResponse",
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
    "FiniteFloat",
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
    "name_check",
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
MAX_AUDIT_PAGE: Final = 1000
MAX_LEAF_BYTES: Final = 65_535
MAX_PROOF_HASHES: Final = 128
MAX_CHECKPOINT_NOTE: Final = 65_536
INT_MIN: Final = -(2**63)
"""Smallest integer MessagePack (and so the wire) can carry."""
INT_MAX: Final = 2**64 - 1
"""Largest integer MessagePack (and so the wire) can carry."""

# --- constrained scalar types ---------------------------------------------------

# Name shapes (spec §5.3), as full-match patterns. The schema bounds each
# name's length with ``Meta`` (checked in C; over-long is TOO_LARGE); the
# shape is checked in batches by ``_Names`` below (INVALID_FIELD).
IDENTIFIER_PATTERN: Final = r"[A-Za-z][A-Za-z0-9_]{0,62}"
"""Dataset and column names (``Identifier``), matched against the whole name."""
CITY_ID_PATTERN: Final = r"[a-z0-9](?:[a-z0-9.-]{0,62}[a-z0-9])?"
"""City ids (``CityId``), matched against the whole name."""
PRINCIPAL_ID_PATTERN: Final = r"[a-z0-9](?:[a-z0-9._@-]{0,126}[a-z0-9])?"
"""Analyst and node principal ids (``PrincipalId``), matched against the whole name."""
TOKEN_PATTERN: Final = r"[a-z][a-z0-9_-]{0,31}"  # noqa: S105 (a vocabulary token, not a secret)
"""Vocabulary tokens such as purposes (``Token``), matched against the whole name."""

Identifier = Annotated[str, Meta(min_length=1, max_length=63)]
"""Dataset and column names: ASCII letter, then letters, digits, underscore; ≤ 63."""

CityId = Annotated[str, Meta(min_length=1, max_length=64)]
"""City ids: lower-case DNS-label-like tokens (``melbourne``, ``cape-town``); ≤ 64."""

PrincipalId = Annotated[str, Meta(min_length=1, max_length=128)]
"""Analyst or node principal ids, e.g. ``ana@melbourne``; ≤ 128."""

Token = Annotated[str, Meta(min_length=1, max_length=32)]
"""Vocabulary tokens such as purposes: lower-case, ≤ 32."""

Millis = Annotated[int, Meta(ge=0, le=2**53)]
Nonce = Annotated[bytes, Meta(min_length=16, max_length=16)]
Digest = Annotated[bytes, Meta(min_length=32, max_length=32)]
PublicKeyBytes = Annotated[bytes, Meta(min_length=32, max_length=32)]
Text = Annotated[str, Meta(max_length=MAX_TEXT)]
Count_ = Annotated[int, Meta(ge=0, le=2**63 - 1)]
VersionText = Annotated[str, Meta(min_length=1, max_length=MAX_VERSION_TEXT)]
BoundedText = Annotated[str, Meta(max_length=MAX_TEXT)]
FiniteFloat = Annotated[float, Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
"""A finite float64: the bounds reject NaN and both infinities when decoding."""
Rank = Annotated[float, Meta(ge=0.0, le=1.0)]
"""A quantile rank in ``[0, 1]`` (NaN is rejected)."""
# NOTE: integers need no bounds: MessagePack itself cannot carry one outside
# [INT_MIN, INT_MAX], and ``codec.encode`` refuses to encode one.
Scalar = bool | int | FiniteFloat | BoundedText
"""A query literal: finite floats only, strings of at most :data:`MAX_TEXT` characters."""
CellValue = bool | int | FiniteFloat | BoundedText | None
"""A group-key value in an answer (``None`` is the SQL NULL group); floats are finite."""


class _Kind(NamedTuple):
    """A kind of name: what to call it, and its shape as a regular expression.

    The shape leaves out the length bound (that is the ``Meta`` bound,
    checked in C when decoding) and uses possessive quantifiers, so it never
    backtracks and runs in time linear in the text. Within the length bound
    it accepts exactly what the kind's ``*_PATTERN`` accepts
    (``tests/test_messages.py`` checks this).
    """

    what: str
    shape: str


_IDENTIFIER: Final = _Kind("identifier", r"[A-Za-z][A-Za-z0-9_]*+")
# (?<=...) after a possessive run: the last character must be a letter or digit.
_CITY_ID: Final = _Kind("city id", r"[a-z0-9][a-z0-9.-]*+(?<=[a-z0-9])")
_PRINCIPAL_ID: Final = _Kind("principal id", r"[a-z0-9][a-z0-9._@-]*+(?<=[a-z0-9])")
_TOKEN: Final = _Kind("token", r"[a-z][a-z0-9_-]*+")

_GROUP: Final = ""
"""Marks the end of a group in the flat name list given to :meth:`_Names.check`."""


class _Names:
    """Checks the names of one message with a single regular-expression call.

    The names come in a fixed sequence of non-empty groups, each of one
    :class:`_Kind`, as one flat list with an empty string between groups.
    Joined with a space, names are one space apart and groups two. No name
    alphabet contains a space, and the joined text must hold exactly
    ``len(names) - 1`` spaces, so no name contains one (a name with a space
    cannot pass as two names); one compiled ``fullmatch`` of the layout then
    checks every name against the shape of its group's kind. An empty name
    adds a double space where the layout has none, so it fails the match.
    """

    __slots__ = ("_kinds", "_layout")

    def __init__(self, *kinds: _Kind) -> None:
        self._kinds = kinds
        self._layout = re.compile("  ".join(f"{k.shape}(?: {k.shape})*+" for k in kinds))

    def check(self, names: list[str]) -> None:
        """Raise ``ValueError`` unless every name has the shape of its group's kind.

        Args:
            names: the names of each group in turn, with :data:`_GROUP`
                (an empty string) between two groups.
        """
        joined = " ".join(names)
        if joined.count(" ") != len(names) - 1 or self._layout.fullmatch(joined) is None:
            raise self._error(names)

    def _error(self, names: list[str]) -> ValueError:
        # The slow path: find the culprit to name it (quoted, shortened). Decoded
        # names are never empty (Meta min_length=1), so "" is always a group mark.
        group = 0
        for name in names:
            if name == _GROUP:
                group += 1
            elif group < len(self._kinds):
                kind = self._kinds[group]
                if re.fullmatch(kind.shape, name) is None:
                    shown = name if len(name) <= 64 else name[:64] + "…"
                    return ValueError(f"invalid {kind.what} {shown!r}")
        expected = ", then ".join(f"{k.what}s" for k in self._kinds)
        return ValueError(f"a name is empty or missing (expected {expected})")


_IDENTIFIERS: Final = _Names(_IDENTIFIER)
_CITY_IDS: Final = _Names(_CITY_ID)
_TOKENS: Final = _Names(_TOKEN)
_REQUEST_NAMES: Final = _Names(_PRINCIPAL_ID, _TOKEN, _CITY_ID, _IDENTIFIER)
_POLICY_NAMES: Final = _Names(_TOKEN, _PRINCIPAL_ID)
_RESPONSE_NAMES: Final = _Names(_CITY_ID, _PRINCIPAL_ID)
_ANSWER_NAMES: Final = _Names(_CITY_ID, _PRINCIPAL_ID, _IDENTIFIER)

_COLUMN: Final = operator.attrgetter("column")
_NAME: Final = operator.attrgetter("name")
_KEY: Final = operator.attrgetter("key")
_STATES: Final = operator.attrgetter("states")
_FIRST: Final = operator.itemgetter(0)
_SECOND: Final = operator.itemgetter(1)
_LT: Final = operator.lt


def _unique(values: Sequence[object]) -> bool:
    return len(set(values)) == len(values)


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
    the ``below`` and ``above`` fields of :class:`HistogramState`. Edges are
    finite (checked when decoding).
    """

    column: Identifier
    edges: Annotated[tuple[FiniteFloat, ...], Meta(min_length=2, max_length=MAX_BIN_EDGES)]

    def __post_init__(self) -> None:
        edges = self.edges
        if not all(map(_LT, edges, edges[1:])):
            raise ValueError("histogram edges must be strictly increasing")


class Quantiles(_Wire, frozen=True, tag="quantiles"):
    """Quantiles at the given ranks (in ``[0, 1]``), estimated with a relative-error sketch."""

    column: Identifier
    ranks: Annotated[tuple[Rank, ...], Meta(min_length=1, max_length=MAX_QUANTILES)]


Aggregate = Count | Sum | Mean | Min | Max | Variance | Stddev | Histogram | Quantiles


class Filter(_Wire, frozen=True, tag="filter"):
    """A typed predicate ``column op values`` (spec §6.3); literals are :data:`Scalar`."""

    column: Identifier
    op: FilterOp
    values: Annotated[tuple[Scalar, ...], Meta(max_length=MAX_IN_VALUES)] = ()

    def __post_init__(self) -> None:
        low, high = _FILTER_ARITY[self.op]
        if not low <= len(self.values) <= high:
            raise ValueError(f"filter {self.op.value!r} takes {low}..{high} values")


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
        group_by = self.group_by
        if len(group_by) > 1 and len(set(group_by)) != len(group_by):
            raise ValueError("group_by keys must be unique")


def _query_names(query: Query) -> list[str]:
    """The dataset and every column ``query`` names."""
    # filter(None, ...) skips the column of Count() (None). It would skip an
    # empty column name too, but that is a length, and Meta(min_length=1)
    # rejects it when decoding (see the module docstring).
    columns = itertools.chain(query.filters, query.group_by, query.aggregates)
    return [query.dataset, *filter(None, map(_COLUMN, columns))]


class PolicyTags(_Wire, frozen=True, tag="policy"):
    """Why and for whom a query is asked; signed inside the request body."""

    purpose: Token
    legal_basis: Annotated[str, Meta(min_length=1, max_length=MAX_LEGAL_BASIS)]
    scope: ResultScope
    analyst: PrincipalId


# --- request / response bodies (spec §7) ----------------------------------------------


class QueryRequest(_Wire, frozen=True, tag="query-request"):
    """A signed request for every city in ``targets`` to answer one aggregate query.

    One envelope, signed once, addressed to all of its targets (spec §7.1): each
    target city answers it if it is one of them.
    """

    requester: PrincipalId
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
        targets = self.targets
        if len(set(targets)) != len(targets):
            raise ValueError("targets must be unique")
        if self.quorum > len(targets):
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
    total: int | FiniteFloat


class MinMaxState(_Wire, frozen=True, tag="minmax"):
    """Mergeable state of :class:`Min` / :class:`Max` (``None`` exactly when n == 0)."""

    n: Count_
    value: int | FiniteFloat | None

    def __post_init__(self) -> None:
        if (self.value is None) != (self.n == 0):
            raise ValueError("min/max value must be null exactly when n == 0")


class MomentsState(_Wire, frozen=True, tag="moments"):
    """Mergeable state of mean/variance/stddev: n, mean and M2 (Chan et al.).

    Both are finite, and ``mean`` is 0 when n == 0.

    NOTE: spec §7.3.4 also asks for ``m2 >= 0``; that rule is checked by
    ``hansa.federation.combine`` when it validates an answer, not here.
    """

    n: Count_
    mean: FiniteFloat
    m2: FiniteFloat

    def __post_init__(self) -> None:
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
        # (Unrolled for the two sides: this runs for every sketch of every answer.)
        positive, negative = self.positive, self.negative
        if (
            len(positive) > 1
            and not all(map(_LT, map(_FIRST, positive), map(_FIRST, positive[1:])))
        ) or (
            len(negative) > 1
            and not all(map(_LT, map(_FIRST, negative), map(_FIRST, negative[1:])))
        ):
            raise ValueError("sketch bucket indices must be strictly increasing")


AggregateState = CountState | SumState | MinMaxState | MomentsState | HistogramState | SketchState

CellKey = Annotated[tuple[CellValue, ...], Meta(max_length=MAX_GROUP_BY)]


class Group(_Wire, frozen=True, tag="group"):
    """One released cell: its key values and one state per requested aggregate."""

    key: CellKey
    states: Annotated[tuple[AggregateState, ...], Meta(max_length=MAX_AGGREGATES)]


class SuppressedCell(_Wire, frozen=True, tag="suppressed"):
    """A withheld cell: its key and why (never its values)."""

    key: CellKey
    reason: SuppressionReason


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
        groups, suppressed, decision = self.groups, self.suppressed, self.decision
        if decision is Decision.ANSWERED and suppressed:
            raise ValueError("decision 'answered' cannot list suppressed cells")
        if decision is Decision.SUPPRESSED and not suppressed:
            raise ValueError("decision 'answered_suppressed' needs a suppressed cell")
        keys = [*map(_KEY, groups), *map(_KEY, suppressed)]
        if len(keys) > 1:
            if len(set(map(len, keys))) > 1:
                raise ValueError("all cell keys must have the same length")
            if len(set(map(len, map(_STATES, groups)))) > 1:
                raise ValueError("all groups must carry the same number of states")
            # Python equates 1, 1.0 and True, so keys that are distinct as Python
            # values are distinct as typed values too; only a clash needs typed_key.
            if len(set(keys)) != len(keys) and not _unique(list(map(typed_key, keys))):
                raise ValueError("a cell key appears more than once")


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
        if not _unique(self.purposes):
            raise ValueError("purposes must be unique")
        if not _unique(list(map(_FIRST, self.aggregates))):
            raise ValueError("aggregate columns must be unique")


class DatasetInfo(_Wire, frozen=True, tag="dataset"):
    """A published dataset: schema, version and disclosure profile."""

    name: Identifier
    version: VersionText
    columns: Annotated[tuple[ColumnInfo, ...], Meta(min_length=1, max_length=MAX_COLUMNS)]
    disclosure: DisclosureProfile

    def __post_init__(self) -> None:
        if not _unique(list(map(_NAME, self.columns))):
            raise ValueError("column names must be unique")


class Capabilities(_Wire, frozen=True, tag="capabilities"):
    """A node's signed capability document."""

    city: CityId
    node_key: PublicKeyBytes
    issued_at: Millis
    datasets: Annotated[tuple[DatasetInfo, ...], Meta(max_length=MAX_DATASETS)]

    def __post_init__(self) -> None:
        if not _unique(list(map(_NAME, self.datasets))):
            raise ValueError("dataset names must be unique")


class ErrorMessage(_Wire, frozen=True, tag="error"):
    """An unsigned error, used only when the requester cannot be identified.

    ``code`` is a wire code (never a local-only 6xx code).
    """

    code: ErrorCode
    message: Text

    def __post_init__(self) -> None:
        _check_wire_code(self.code)


# --- audit log access (spec §16) ---------------------------------------------------------


class AuditOp(enum.StrEnum):
    """What an :class:`AuditRequest` asks the node's audit log for (spec §16.3)."""

    CHECKPOINT = "checkpoint"
    ENTRIES = "entries"
    INCLUSION = "inclusion"
    CONSISTENCY = "consistency"
    ENVELOPES = "envelopes"
    RECEIPT = "receipt"


Size = Annotated[int, Meta(ge=0, le=2**53)]
"""A leaf index or tree size."""
Leaf = Annotated[bytes, Meta(max_length=MAX_LEAF_BYTES)]
"""One audit-log leaf (``hansa-audit/v1``, at most 65535 bytes)."""
NoteBytes = Annotated[bytes, Meta(min_length=1, max_length=MAX_CHECKPOINT_NOTE)]
"""A signed C2SP checkpoint note (§12.3), with any cosignature lines."""
StoredEnvelope = Annotated[bytes, Meta(max_length=MAX_ENVELOPE_SIZE)]
"""An envelope kept beside the audit tree (at most ``MAX_ENVELOPE_SIZE`` bytes)."""


class AuditRequest(_Wire, frozen=True, tag="audit-request"):
    """A signed request for part of a city's audit log (spec §16.3).

    The fields an ``op`` does not use must keep their defaults, so one signed
    request has one meaning.
    """

    requester: PrincipalId
    audience: CityId
    issued_at: Millis
    expires_at: Millis
    nonce: Nonce
    roster_version: Annotated[int, Meta(ge=0, le=2**53)]
    op: AuditOp
    start: Size = 0
    end: Size = 0
    index: Size = 0
    message_id: Digest | None = None
    old_size: Size = 0
    new_size: Size = 0
    hashes: Annotated[tuple[Digest, ...], Meta(max_length=MAX_AUDIT_PAGE)] = ()

    def __post_init__(self) -> None:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        op = self.op
        used = _AUDIT_FIELDS[op]
        for name in _AUDIT_OPTIONAL:
            if name not in used and getattr(self, name) != _AUDIT_DEFAULTS[name]:
                raise ValueError(f"op {op.value!r} does not take {name}")
        if op is AuditOp.ENTRIES and not 0 < self.end - self.start <= MAX_AUDIT_PAGE:
            raise ValueError(f"entries needs start < end <= start + {MAX_AUDIT_PAGE}")
        if op is AuditOp.CONSISTENCY and not (
            self.old_size >= 1 and (self.new_size == 0 or self.new_size >= self.old_size)
        ):
            raise ValueError("consistency needs 1 <= old_size <= new_size (or new_size 0)")
        if op is AuditOp.ENVELOPES and not self.hashes:
            raise ValueError("envelopes needs at least one hash")
        if op is AuditOp.RECEIPT and self.message_id is None:
            raise ValueError("receipt needs the message_id of the request")


_AUDIT_DEFAULTS: Final[dict[str, object]] = {
    "start": 0,
    "end": 0,
    "index": 0,
    "message_id": None,
    "old_size": 0,
    "new_size": 0,
    "hashes": (),
}
_AUDIT_OPTIONAL: Final = tuple(_AUDIT_DEFAULTS)
_AUDIT_FIELDS: Final[dict[AuditOp, frozenset[str]]] = {
    AuditOp.CHECKPOINT: frozenset(),
    AuditOp.ENTRIES: frozenset({"start", "end"}),
    # by index, or by message_id (then index must stay 0); at new_size (0: the checkpoint)
    AuditOp.INCLUSION: frozenset({"index", "message_id", "new_size"}),
    AuditOp.CONSISTENCY: frozenset({"old_size", "new_size"}),
    AuditOp.ENVELOPES: frozenset({"hashes"}),
    AuditOp.RECEIPT: frozenset({"message_id"}),
}


class AuditResponse(_Wire, frozen=True, tag="audit-response"):
    """A city's signed reply to an :class:`AuditRequest` (spec §16.3).

    ``checkpoint`` is the signed checkpoint the proofs refer to (the latest
    one, with the cosignatures the node holds); fields an op does not fill
    keep their defaults.
    """

    request_id: Digest
    responder: CityId
    issued_at: Millis
    op: AuditOp
    checkpoint: NoteBytes | None = None
    entries: Annotated[tuple[Leaf, ...], Meta(max_length=MAX_AUDIT_PAGE)] = ()
    first_index: Size = 0
    proof: Annotated[tuple[Digest, ...], Meta(max_length=MAX_PROOF_HASHES)] = ()
    index: Size = 0
    tree_size: Size = 0
    envelopes: Annotated[
        tuple[tuple[Digest, StoredEnvelope], ...], Meta(max_length=MAX_AUDIT_PAGE)
    ] = ()


class AddCheckpoint(_Wire, frozen=True, tag="add-checkpoint"):
    """An unsigned witness request (C2SP tlog-witness ``add-checkpoint``, spec §16.5).

    The authority is the log's signature on ``checkpoint``; the body itself
    is not signed.
    """

    old_size: Size
    proof: Annotated[tuple[Digest, ...], Meta(max_length=MAX_PROOF_HASHES)]
    checkpoint: NoteBytes


# --- name checks, run by the codec after decoding ----------------------------------------


def _check_column(value: Any) -> None:
    if value.column is not None:
        _IDENTIFIERS.check([value.column])


def _check_query(value: Query) -> None:
    _IDENTIFIERS.check(_query_names(value))


def _check_request(value: QueryRequest) -> None:
    policy, query = value.policy, value.query
    columns = itertools.chain(query.filters, query.group_by, query.aggregates)
    # One group per line, in the order of _REQUEST_NAMES; the last is
    # _query_names(query), inlined on this hot path.
    # fmt: off
    _REQUEST_NAMES.check([
        value.requester, policy.analyst, _GROUP,
        policy.purpose, _GROUP,
        *value.targets, _GROUP,
        query.dataset, *filter(None, map(_COLUMN, columns)),
    ])
    # fmt: on


def _check_policy(value: PolicyTags) -> None:
    _POLICY_NAMES.check([value.purpose, _GROUP, value.analyst])


def _check_answer(value: QueryAnswer) -> None:
    _ANSWER_NAMES.check([value.responder, _GROUP, value.requester, _GROUP, value.dataset])


def _check_refusal(value: QueryRefusal) -> None:
    _RESPONSE_NAMES.check([value.responder, _GROUP, value.requester])


def _check_column_info(value: ColumnInfo) -> None:
    _IDENTIFIERS.check([value.name])


def _check_profile(value: DisclosureProfile, identifiers: list[str] | None = None) -> None:
    # identifiers: names of the enclosing dataset, checked in the same batch.
    columns = identifiers if identifiers is not None else []
    columns += map(_FIRST, value.aggregates)
    if columns:
        _IDENTIFIERS.check(columns)
    tokens = list(value.purposes)
    tokens += itertools.chain.from_iterable(map(_SECOND, value.aggregates))
    if tokens:
        _TOKENS.check(tokens)


def _check_dataset(value: DatasetInfo) -> None:
    _check_profile(value.disclosure, [value.name, *map(_NAME, value.columns)])


def _check_audit_request(value: AuditRequest) -> None:
    _RESPONSE_NAMES.check([value.audience, _GROUP, value.requester])


def _check_audit_response(value: AuditResponse) -> None:
    _CITY_IDS.check([value.responder])


def _check_capabilities(value: Capabilities) -> None:
    _CITY_IDS.check([value.city])
    for dataset in value.datasets:
        _check_dataset(dataset)


_NAME_CHECKS: Final[dict[type[msgspec.Struct], Callable[[Any], None]]] = {
    **dict.fromkeys(
        (Count, Sum, Mean, Min, Max, Variance, Stddev, Histogram, Quantiles, Filter),
        _check_column,
    ),
    Dimension: _check_column,
    TimeBucket: _check_column,
    Query: _check_query,
    PolicyTags: _check_policy,
    QueryRequest: _check_request,
    QueryAnswer: _check_answer,
    QueryRefusal: _check_refusal,
    ColumnInfo: _check_column_info,
    DisclosureProfile: _check_profile,
    DatasetInfo: _check_dataset,
    Capabilities: _check_capabilities,
    AuditRequest: _check_audit_request,
    AuditResponse: _check_audit_response,
}


def name_check(cls: type[msgspec.Struct]) -> Callable[[Any], None] | None:
    """Return the check of every name in a decoded ``cls`` value, nested ones included.

    :func:`hansa.protocol.codec.decode_as` runs it after decoding (see the
    module docstring): name shapes are decoding rules, like the ``Meta``
    bounds, and are not checked when a struct is built in Python.

    Args:
        cls: a wire struct type.

    Returns:
        A function that raises ``ValueError`` naming the first badly shaped
        name, or None when ``cls`` carries no names.
    """
    return _NAME_CHECKS.get(cls)
