"""Hypothesis strategies for every Hansa wire message (reusable by any test).

Every strategy generates only *valid* values: each satisfies the schema's
``Meta`` constraints (lengths, ranges), the name patterns and the
``__post_init__`` rules of ``hansa.protocol.messages``, so
``decode(encode(m)) == m`` must hold for all of them. Name patterns are read
from the module's ``*_PATTERN`` constants, so a change to a pattern changes
what is generated.

Use ``STRUCT_STRATEGIES`` to reach one strategy per wire struct type, or
``top_level_messages()`` / ``signed_messages()`` for message bodies.
Sizes are kept small by default so tests stay fast; the limits themselves
are tested with hand-built inputs.
"""

from __future__ import annotations

import re
from typing import Any, Final, TypeVar

import msgspec
from hypothesis import strategies as st

from hansa.protocol import messages as m
from hansa.protocol.errors import ErrorCode

__all__ = [
    "ANSWER",
    "CAPABILITIES",
    "ERROR",
    "QUERY",
    "REFUSAL",
    "REQUEST",
    "STRUCT_STRATEGIES",
    "aggregate_states",
    "aggregates",
    "capabilities",
    "cell_values",
    "city_ids",
    "dataset_infos",
    "error_messages",
    "filters",
    "group_keys",
    "identifiers",
    "millis",
    "principal_ids",
    "queries",
    "query_answers",
    "query_refusals",
    "query_requests",
    "scalars",
    "signed_messages",
    "tokens",
    "top_level_messages",
    "wire_error_codes",
]

T = TypeVar("T")


def _from_pattern(pattern: str) -> st.SearchStrategy[str]:
    """Strings that a name pattern (matched against the whole name) accepts."""
    return st.from_regex(re.compile(pattern, re.ASCII), fullmatch=True)


# --- scalars -------------------------------------------------------------------------

identifiers: Final = _from_pattern(m.IDENTIFIER_PATTERN)
city_ids: Final = _from_pattern(m.CITY_ID_PATTERN)
principal_ids: Final = _from_pattern(m.PRINCIPAL_ID_PATTERN)
tokens: Final = _from_pattern(m.TOKEN_PATTERN)
millis: Final = st.integers(min_value=0, max_value=2**53)
counts: Final = st.integers(min_value=0, max_value=2**63 - 1)
positive_counts: Final = st.integers(min_value=1, max_value=2**63 - 1)
nonces: Final = st.binary(min_size=16, max_size=16)
digests: Final = st.binary(min_size=32, max_size=32)
finite_floats: Final = st.floats(allow_nan=False, allow_infinity=False)
wire_ints: Final = st.integers(min_value=m.INT_MIN, max_value=m.INT_MAX)
short_text: Final = st.text(max_size=40)
scalars: Final[st.SearchStrategy[m.Scalar]] = st.one_of(
    st.booleans(), wire_ints, finite_floats, short_text
)
cell_values: Final[st.SearchStrategy[m.CellValue]] = st.one_of(st.none(), scalars)
wire_error_codes: Final = st.sampled_from([c for c in ErrorCode if c.on_wire])
version_texts: Final = st.text(min_size=1, max_size=20)


def _unique_tuple(
    elements: st.SearchStrategy[T], *, min_size: int = 0, max_size: int, key: Any = None
) -> st.SearchStrategy[tuple[T, ...]]:
    if key is None:
        return st.lists(elements, min_size=min_size, max_size=max_size, unique=True).map(tuple)
    return st.lists(elements, min_size=min_size, max_size=max_size, unique_by=key).map(tuple)


def _tuple(
    elements: st.SearchStrategy[T], *, min_size: int = 0, max_size: int
) -> st.SearchStrategy[tuple[T, ...]]:
    return st.lists(elements, min_size=min_size, max_size=max_size).map(tuple)


# --- the query ---------------------------------------------------------------------------

_optional_identifiers = st.none() | identifiers


@st.composite
def histograms(draw: st.DrawFn) -> m.Histogram:
    """A histogram aggregate with strictly increasing finite edges."""
    edges = sorted(draw(st.lists(finite_floats, min_size=2, max_size=8, unique=True)))
    return m.Histogram(column=draw(identifiers), edges=tuple(edges))


quantiles: Final = st.builds(
    m.Quantiles,
    column=identifiers,
    ranks=_tuple(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=5),
)

aggregates: Final[st.SearchStrategy[m.Aggregate]] = st.one_of(
    st.builds(m.Count, column=_optional_identifiers),
    st.builds(m.Sum, column=identifiers),
    st.builds(m.Mean, column=identifiers),
    st.builds(m.Min, column=identifiers),
    st.builds(m.Max, column=identifiers),
    st.builds(m.Variance, column=identifiers),
    st.builds(m.Stddev, column=identifiers),
    histograms(),
    quantiles,
)

# Arity per operator (spec §6.3), kept small for speed; IN takes up to 5 here.
_ARITY: Final[dict[m.FilterOp, tuple[int, int]]] = {
    m.FilterOp.EQ: (1, 1),
    m.FilterOp.NE: (1, 1),
    m.FilterOp.IN: (1, 5),
    m.FilterOp.NOT_IN: (1, 5),
    m.FilterOp.LT: (1, 1),
    m.FilterOp.LE: (1, 1),
    m.FilterOp.GT: (1, 1),
    m.FilterOp.GE: (1, 1),
    m.FilterOp.BETWEEN: (2, 2),
    m.FilterOp.IS_NULL: (0, 0),
    m.FilterOp.NOT_NULL: (0, 0),
}


@st.composite
def filters(draw: st.DrawFn, op: m.FilterOp | None = None) -> m.Filter:
    """A filter with the right number of literals for its operator."""
    chosen = op if op is not None else draw(st.sampled_from(m.FilterOp))
    low, high = _ARITY[chosen]
    values = draw(_tuple(scalars, min_size=low, max_size=high))
    return m.Filter(column=draw(identifiers), op=chosen, values=values)


group_keys: Final[st.SearchStrategy[m.GroupKey]] = st.one_of(
    st.builds(m.Dimension, column=identifiers),
    st.builds(m.TimeBucket, column=identifiers, unit=st.sampled_from(m.TimeUnit)),
)

queries: Final[st.SearchStrategy[m.Query]] = st.builds(
    m.Query,
    dataset=identifiers,
    aggregates=_tuple(aggregates, min_size=1, max_size=4),
    filters=_tuple(filters(), max_size=3),
    group_by=_unique_tuple(group_keys, max_size=m.MAX_GROUP_BY),
    max_groups=st.integers(min_value=1, max_value=m.MAX_GROUPS),
)

policy_tags: Final = st.builds(
    m.PolicyTags,
    purpose=tokens,
    legal_basis=st.text(min_size=1, max_size=40),
    scope=st.sampled_from(m.ResultScope),
    analyst=principal_ids,
)


@st.composite
def query_requests(draw: st.DrawFn) -> m.QueryRequest:
    """A request whose quorum fits its targets."""
    targets = draw(_unique_tuple(city_ids, min_size=1, max_size=5))
    issued_at = draw(st.integers(min_value=0, max_value=2**53 - 1))
    expires_at = draw(st.integers(min_value=issued_at + 1, max_value=2**53))
    return m.QueryRequest(
        requester=draw(principal_ids),
        issued_at=issued_at,
        expires_at=expires_at,
        nonce=draw(nonces),
        roster_version=draw(st.integers(min_value=0, max_value=2**53)),
        policy=draw(policy_tags),
        query=draw(queries),
        targets=targets,
        quorum=draw(st.integers(min_value=1, max_value=len(targets))),
    )


# --- aggregate states and answers ------------------------------------------------------


@st.composite
def sum_states(draw: st.DrawFn) -> m.SumState:
    """A sum state whose total is 0 when it counts nothing."""
    n = draw(counts)
    total = draw(st.sampled_from([0, 0.0])) if n == 0 else draw(wire_ints | finite_floats)
    return m.SumState(n=n, total=total)


@st.composite
def moments_states(draw: st.DrawFn) -> m.MomentsState:
    """A moments state with m2 >= 0 and mean 0 when it counts nothing."""
    n = draw(counts)
    mean = 0.0 if n == 0 else draw(finite_floats)
    m2 = draw(st.floats(min_value=0.0, allow_infinity=False))
    return m.MomentsState(n=n, mean=mean, m2=m2)


@st.composite
def min_max_states(draw: st.DrawFn) -> m.MinMaxState:
    """A min/max state whose value is null exactly when it counts nothing."""
    n = draw(counts)
    value = None if n == 0 else draw(st.one_of(wire_ints, finite_floats))
    return m.MinMaxState(n=n, value=value)


_sketch_buckets = st.lists(
    st.tuples(st.integers(min_value=-(2**31), max_value=2**31), positive_counts),
    max_size=6,
    unique_by=lambda b: b[0],
).map(lambda bs: tuple(sorted(bs)))

histogram_states: Final = st.builds(
    m.HistogramState,
    counts=_tuple(counts, min_size=1, max_size=8),
    below=counts,
    above=counts,
)

sketch_states: Final = st.builds(
    m.SketchState,
    alpha=st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True),
    zero_count=counts,
    positive=_sketch_buckets,
    negative=_sketch_buckets,
)

aggregate_states: Final[st.SearchStrategy[m.AggregateState]] = st.one_of(
    st.builds(m.CountState, n=counts),
    sum_states(),
    min_max_states(),
    moments_states(),
    histogram_states,
    sketch_states,
)


@st.composite
def query_answers(draw: st.DrawFn) -> m.QueryAnswer:
    """An answer with uniform, unique keys and a decision that fits its cells.

    Keys are unique as typed values (spec §7.2), so ``(1,)``, ``(1.0,)`` and
    ``(True,)`` may all appear in one answer.
    """
    key_length = draw(st.integers(min_value=0, max_value=m.MAX_GROUP_BY))
    n_states = draw(st.integers(min_value=0, max_value=3))
    decision = draw(st.sampled_from(m.Decision))
    cell_keys = st.tuples(*[cell_values] * key_length)
    keys = draw(st.lists(cell_keys, max_size=6, unique_by=m.typed_key))
    if decision is m.Decision.ANSWERED:
        split = len(keys)
    elif decision is m.Decision.SUPPRESSED:
        if not keys:
            keys = [draw(cell_keys)]
        split = draw(st.integers(min_value=0, max_value=len(keys) - 1))
    else:
        split = draw(st.integers(min_value=0, max_value=len(keys)))
    groups = tuple(
        m.Group(key=k, states=draw(_tuple(aggregate_states, min_size=n_states, max_size=n_states)))
        for k in keys[:split]
    )
    suppressed = tuple(
        m.SuppressedCell(key=k, reason=draw(st.sampled_from(m.SuppressionReason)))
        for k in keys[split:]
    )
    return m.QueryAnswer(
        request_id=draw(digests),
        responder=draw(city_ids),
        requester=draw(principal_ids),
        issued_at=draw(millis),
        dataset=draw(identifiers),
        dataset_version=draw(version_texts),
        disclosure_version=draw(st.integers(min_value=0, max_value=2**63 - 1)),
        decision=decision,
        groups=groups,
        suppressed=suppressed,
    )


query_refusals: Final[st.SearchStrategy[m.QueryRefusal]] = st.builds(
    m.QueryRefusal,
    request_id=digests,
    responder=city_ids,
    requester=principal_ids,
    issued_at=millis,
    code=wire_error_codes,
    reason=short_text,
)

# --- capabilities --------------------------------------------------------------------------

column_infos: Final = st.builds(
    m.ColumnInfo,
    name=identifiers,
    type=st.sampled_from(m.ColumnType),
    role=st.sampled_from(m.ColumnRole),
)

disclosure_profiles: Final = st.builds(
    m.DisclosureProfile,
    version=st.integers(min_value=0, max_value=2**63 - 1),
    min_group_size=st.integers(min_value=1, max_value=1_000_000),
    dominance_p=st.floats(min_value=0.0, max_value=100.0, exclude_min=True),
    max_groups=st.integers(min_value=1, max_value=m.MAX_GROUPS),
    purposes=_unique_tuple(tokens, max_size=3),
    aggregates=_unique_tuple(
        st.tuples(identifiers, _tuple(tokens, max_size=3)), max_size=3, key=lambda a: a[0]
    ),
)

dataset_infos: Final = st.builds(
    m.DatasetInfo,
    name=identifiers,
    version=version_texts,
    columns=_unique_tuple(column_infos, min_size=1, max_size=4, key=lambda c: c.name),
    disclosure=disclosure_profiles,
)

capabilities: Final[st.SearchStrategy[m.Capabilities]] = st.builds(
    m.Capabilities,
    city=city_ids,
    node_key=st.binary(min_size=32, max_size=32),
    issued_at=millis,
    datasets=_unique_tuple(dataset_infos, max_size=2, key=lambda d: d.name),
)

error_messages: Final[st.SearchStrategy[m.ErrorMessage]] = st.builds(
    m.ErrorMessage, code=wire_error_codes, message=short_text
)

# --- audit log access ------------------------------------------------------------------------

sizes: Final = st.integers(min_value=0, max_value=2**53)


@st.composite
def audit_requests(draw: st.DrawFn) -> m.AuditRequest:
    """Valid audit requests of every op (only the fields the op takes are set)."""
    issued = draw(st.integers(min_value=0, max_value=2**53 - 1))
    op = draw(st.sampled_from(m.AuditOp))
    extra: dict[str, Any] = {}
    if op is m.AuditOp.ENTRIES:
        start = draw(st.integers(min_value=0, max_value=2**53 - m.MAX_AUDIT_PAGE))
        extra = {"start": start, "end": start + draw(st.integers(1, m.MAX_AUDIT_PAGE))}
    elif op is m.AuditOp.INCLUSION:
        extra = {
            "index": draw(sizes),
            "message_id": draw(st.none() | digests),
            "new_size": draw(sizes),
        }
    elif op is m.AuditOp.CONSISTENCY:
        old = draw(st.integers(min_value=1, max_value=2**52))
        extra = {"old_size": old, "new_size": draw(st.just(0) | st.integers(old, 2**53))}
    elif op is m.AuditOp.ENVELOPES:
        extra = {"hashes": draw(_tuple(digests, min_size=1, max_size=4))}
    elif op is m.AuditOp.RECEIPT:
        extra = {"message_id": draw(digests)}
    return m.AuditRequest(
        requester=draw(principal_ids),
        audience=draw(city_ids),
        issued_at=issued,
        expires_at=draw(st.integers(min_value=issued + 1, max_value=2**53)),
        nonce=draw(nonces),
        roster_version=draw(sizes),
        op=op,
        **extra,
    )


audit_responses: Final[st.SearchStrategy[m.AuditResponse]] = st.builds(
    m.AuditResponse,
    request_id=digests,
    responder=city_ids,
    issued_at=millis,
    op=st.sampled_from(m.AuditOp),
    checkpoint=st.none() | st.binary(min_size=1, max_size=80),
    entries=_tuple(st.binary(max_size=40), max_size=3),
    first_index=sizes,
    proof=_tuple(digests, max_size=3),
    index=sizes,
    tree_size=sizes,
    envelopes=_tuple(st.tuples(digests, st.binary(max_size=40)), max_size=2),
)

add_checkpoints: Final[st.SearchStrategy[m.AddCheckpoint]] = st.builds(
    m.AddCheckpoint,
    old_size=sizes,
    proof=_tuple(digests, max_size=3),
    checkpoint=st.binary(min_size=1, max_size=80),
)

# --- unions and the per-type table ------------------------------------------------------------


def signed_messages() -> st.SearchStrategy[
    m.QueryRequest | m.QueryAnswer | m.QueryRefusal | m.Capabilities
]:
    """Any body that travels in a signed envelope."""
    return st.one_of(query_requests(), query_answers(), query_refusals, capabilities)


def top_level_messages() -> st.SearchStrategy[msgspec.Struct]:
    """Any top-level body, the unsigned :class:`ErrorMessage` included."""
    return st.one_of(signed_messages(), error_messages)


STRUCT_STRATEGIES: Final[dict[type[msgspec.Struct], st.SearchStrategy[Any]]] = {
    m.Count: st.builds(m.Count, column=_optional_identifiers),
    m.Sum: st.builds(m.Sum, column=identifiers),
    m.Mean: st.builds(m.Mean, column=identifiers),
    m.Min: st.builds(m.Min, column=identifiers),
    m.Max: st.builds(m.Max, column=identifiers),
    m.Variance: st.builds(m.Variance, column=identifiers),
    m.Stddev: st.builds(m.Stddev, column=identifiers),
    m.Histogram: histograms(),
    m.Quantiles: quantiles,
    m.Filter: filters(),
    m.Dimension: st.builds(m.Dimension, column=identifiers),
    m.TimeBucket: st.builds(m.TimeBucket, column=identifiers, unit=st.sampled_from(m.TimeUnit)),
    m.Query: queries,
    m.PolicyTags: policy_tags,
    m.QueryRequest: query_requests(),
    m.CountState: st.builds(m.CountState, n=counts),
    m.SumState: sum_states(),
    m.MinMaxState: min_max_states(),
    m.MomentsState: moments_states(),
    m.HistogramState: histogram_states,
    m.SketchState: sketch_states,
    m.Group: st.builds(
        m.Group,
        key=_tuple(cell_values, max_size=m.MAX_GROUP_BY),
        states=_tuple(aggregate_states, max_size=3),
    ),
    m.SuppressedCell: st.builds(
        m.SuppressedCell,
        key=_tuple(cell_values, max_size=m.MAX_GROUP_BY),
        reason=st.sampled_from(m.SuppressionReason),
    ),
    m.QueryAnswer: query_answers(),
    m.QueryRefusal: query_refusals,
    m.ColumnInfo: column_infos,
    m.DisclosureProfile: disclosure_profiles,
    m.DatasetInfo: dataset_infos,
    m.Capabilities: capabilities,
    m.ErrorMessage: error_messages,
    m.AuditRequest: audit_requests(),
    m.AuditResponse: audit_responses,
    m.AddCheckpoint: add_checkpoints,
}
"""One strategy of valid values per wire struct type (every struct in ``messages``)."""

# --- fixed examples ----------------------------------------------------------------------------
# One hand-written valid message of each top-level kind, touching every aggregate and
# state kind; tests edit their generic MessagePack trees to craft invalid inputs.


def _example_policy() -> m.PolicyTags:
    return m.PolicyTags(
        purpose="audit", legal_basis="art. 6", scope=m.ResultScope.PUBLIC, analyst="ana"
    )


QUERY = m.Query(
    dataset="trips",
    aggregates=(
        m.Count(),
        m.Histogram(column="fare", edges=(0.0, 10.0)),
        m.Quantiles("fare", (0.5,)),
    ),
    filters=(m.Filter(column="zone", op=m.FilterOp.IN, values=("a", "b")),),
    group_by=(m.Dimension("zone"),),
)
REQUEST = m.QueryRequest(
    requester="ana@melbourne",
    issued_at=1_000,
    expires_at=61_000,
    nonce=bytes(range(16)),
    roster_version=7,
    policy=_example_policy(),
    query=QUERY,
    targets=("oslo", "lyon", "porto"),
    quorum=2,
)
ANSWER = m.QueryAnswer(
    request_id=bytes(32),
    responder="oslo",
    requester="ana@melbourne",
    issued_at=2_000,
    dataset="trips",
    dataset_version="2024-06",
    disclosure_version=1,
    decision=m.Decision.SUPPRESSED,
    groups=(
        m.Group(
            key=("a",),
            states=(
                m.CountState(n=12),
                m.SumState(n=12, total=3.5),
                m.MinMaxState(n=12, value=-1),
                m.MomentsState(n=12, mean=0.5, m2=1.0),
                m.HistogramState(counts=(3, 4), below=1),
                m.SketchState(alpha=0.01, zero_count=1, positive=((1, 2),), negative=()),
            ),
        ),
    ),
    suppressed=(m.SuppressedCell(key=("b",), reason=m.SuppressionReason.MIN_GROUP_SIZE),),
)
_PROFILE = m.DisclosureProfile(
    version=1,
    min_group_size=10,
    dominance_p=85.0,
    max_groups=100,
    purposes=("audit",),
    aggregates=(("fare", ("sum", "mean")),),
)
CAPABILITIES = m.Capabilities(
    city="oslo",
    node_key=bytes(32),
    issued_at=0,
    datasets=(
        m.DatasetInfo(
            name="trips",
            version="1",
            columns=(m.ColumnInfo("fare", m.ColumnType.FLOAT, m.ColumnRole.MEASURE),),
            disclosure=_PROFILE,
        ),
    ),
)
REFUSAL = m.QueryRefusal(
    request_id=bytes(32),
    responder="oslo",
    requester="ana@melbourne",
    issued_at=3,
    code=ErrorCode.PURPOSE_NOT_ALLOWED,
    reason="purpose not allowed",
)
ERROR = m.ErrorMessage(code=ErrorCode.MALFORMED, message="bad bytes")
