"""Wire messages: round trips for every struct, construction rules, error codes."""

from __future__ import annotations

import inspect
import math
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    STRUCT_STRATEGIES,
    aggregate_states,
    aggregates,
    filters,
    group_keys,
    query_answers,
    query_requests,
    top_level_messages,
)

from hansa.protocol import messages as m
from hansa.protocol.codec import decode_as, encode
from hansa.protocol.errors import ErrorCode

ALL_STRUCTS = sorted(
    (
        cls
        for _, cls in inspect.getmembers(m, inspect.isclass)
        if issubclass(cls, msgspec.Struct) and cls.__module__ == m.__name__ and cls is not m._Wire
    ),
    key=lambda cls: cls.__name__,
)


def _same_types(a: Any, b: Any) -> bool:
    """Deep equality that also tells ``True`` from ``1`` and ``1`` from ``1.0``."""
    if type(a) is not type(b):
        return False
    if isinstance(a, msgspec.Struct):
        return all(_same_types(getattr(a, f), getattr(b, f)) for f in a.__struct_fields__)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same_types(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


def test_every_struct_has_a_strategy() -> None:
    assert len(ALL_STRUCTS) >= 25
    assert set(ALL_STRUCTS) == set(STRUCT_STRATEGIES)


@pytest.mark.parametrize("cls", ALL_STRUCTS, ids=lambda c: c.__name__)
@given(data=st.data())
def test_round_trip_every_struct(cls: type[msgspec.Struct], data: st.DataObject) -> None:
    value = data.draw(STRUCT_STRATEGIES[cls])
    assert type(value) is cls
    body = encode(value)
    decoded = decode_as(body, cls)
    assert decoded == value
    assert _same_types(decoded, value)
    # Deterministic: the decoded value encodes to the same bytes.
    assert encode(decoded) == body


@given(top_level_messages())
def test_round_trip_top_level(message: msgspec.Struct) -> None:
    assert decode_as(encode(message), type(message)) == message


_UNIONS: list[tuple[str, Any, st.SearchStrategy[Any]]] = [
    ("Aggregate", m.Aggregate, aggregates),
    ("AggregateState", m.AggregateState, aggregate_states),
    ("GroupKey", m.GroupKey, group_keys),
]


@pytest.mark.parametrize(("name", "union", "strategy"), _UNIONS, ids=[u[0] for u in _UNIONS])
@given(data=st.data())
def test_round_trip_tagged_unions(
    name: str, union: Any, strategy: st.SearchStrategy[Any], data: st.DataObject
) -> None:
    value = data.draw(strategy)
    decoded = msgspec.msgpack.Decoder(union).decode(encode(value))
    assert type(decoded) is type(value)
    assert decoded == value


@pytest.mark.parametrize("op", list(m.FilterOp), ids=lambda op: op.value)
@given(data=st.data())
def test_filter_round_trip_every_op(op: m.FilterOp, data: st.DataObject) -> None:
    value = data.draw(filters(op))
    assert value.op is op
    assert decode_as(encode(value), m.Filter) == value


def test_body_is_a_tagged_array() -> None:
    body = encode(m.Query(dataset="trips", aggregates=(m.Count(),)))
    assert msgspec.msgpack.decode(body) == ["query", "trips", [["count", None]], [], [], 1000]


# --- construction rules (__post_init__) ------------------------------------------------

_ARITY_EXAMPLES = {
    m.FilterOp.EQ: ((), (1, 2)),
    m.FilterOp.NE: ((), (1, 2)),
    m.FilterOp.LT: ((), (1, 2)),
    m.FilterOp.LE: ((), (1, 2)),
    m.FilterOp.GT: ((), (1, 2)),
    m.FilterOp.GE: ((), (1, 2)),
    m.FilterOp.IN: ((), tuple(range(m.MAX_IN_VALUES + 1))),
    m.FilterOp.NOT_IN: ((), tuple(range(m.MAX_IN_VALUES + 1))),
    m.FilterOp.BETWEEN: ((1,), (1, 2, 3)),
    m.FilterOp.IS_NULL: ((1,), (1, 2)),
    m.FilterOp.NOT_NULL: ((1,), (1, 2)),
}


@pytest.mark.parametrize("op", list(m.FilterOp), ids=lambda op: op.value)
def test_filter_arity_is_enforced(op: m.FilterOp) -> None:
    for values in _ARITY_EXAMPLES[op]:
        with pytest.raises(ValueError, match="takes"):
            m.Filter(column="c", op=op, values=values)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        m.Filter(column="c", op=m.FilterOp.EQ, values=(bad,))
    with pytest.raises(ValueError, match="finite"):
        m.Histogram(column="c", edges=(0.0, bad) if bad > 0 else (bad, 0.0))
    with pytest.raises(ValueError, match="finite"):
        m.SumState(n=1, total=bad)
    with pytest.raises(ValueError, match="finite"):
        m.MomentsState(n=1, mean=bad, m2=0.0)
    with pytest.raises(ValueError, match="finite"):
        m.Group(key=(bad,), states=())
    with pytest.raises(ValueError, match="quantile ranks"):
        m.Quantiles(column="c", ranks=(bad,))


def test_scalar_bounds_are_checked_on_construction() -> None:
    with pytest.raises(ValueError, match="range"):
        m.Filter(column="c", op=m.FilterOp.EQ, values=(2**64,))
    with pytest.raises(ValueError, match="range"):
        m.Filter(column="c", op=m.FilterOp.EQ, values=(-(2**63) - 1,))
    with pytest.raises(ValueError, match="longer"):
        m.Filter(column="c", op=m.FilterOp.EQ, values=("x" * (m.MAX_TEXT + 1),))
    # The extremes themselves are fine.
    m.Filter(column="c", op=m.FilterOp.IN, values=(m.INT_MIN, m.INT_MAX, "x" * m.MAX_TEXT))


def test_histogram_edges_must_increase() -> None:
    with pytest.raises(ValueError, match="increasing"):
        m.Histogram(column="c", edges=(1.0, 1.0))
    with pytest.raises(ValueError, match="increasing"):
        m.Histogram(column="c", edges=(0.0, 2.0, 1.0))


def test_query_group_by_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        m.Query(dataset="d", aggregates=(m.Count(),), group_by=(m.Dimension("a"), m.Dimension("a")))


def _policy() -> m.PolicyTags:
    return m.PolicyTags(purpose="p", legal_basis="b", scope=m.ResultScope.ALLIANCE, analyst="ana")


def _request(**changes: Any) -> m.QueryRequest:
    fields: dict[str, Any] = {
        "requester": "ana@melbourne",
        "audience": "oslo",
        "issued_at": 1_000,
        "expires_at": 2_000,
        "nonce": bytes(16),
        "roster_version": 3,
        "policy": _policy(),
        "query": m.Query(dataset="d", aggregates=(m.Count(),)),
        "targets": ("oslo", "lyon"),
        "quorum": 2,
    }
    fields.update(changes)
    return m.QueryRequest(**fields)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"expires_at": 1_000}, "expires_at"),
        ({"expires_at": 999}, "expires_at"),
        ({"audience": "rome"}, "audience"),
        ({"quorum": 3}, "quorum"),
        ({"targets": ("oslo", "oslo"), "quorum": 1}, "unique"),
    ],
)
def test_request_cross_field_rules(changes: dict[str, Any], match: str) -> None:
    _request()  # the baseline is valid
    with pytest.raises(ValueError, match=match):
        _request(**changes)


def test_min_max_value_is_null_exactly_when_empty() -> None:
    m.MinMaxState(n=0, value=None)
    m.MinMaxState(n=2, value=-3)
    with pytest.raises(ValueError, match="null"):
        m.MinMaxState(n=0, value=1.0)
    with pytest.raises(ValueError, match="null"):
        m.MinMaxState(n=1, value=None)


def test_sketch_indices_must_strictly_increase() -> None:
    m.SketchState(alpha=0.01, zero_count=0, positive=((-1, 2), (4, 1)), negative=())
    with pytest.raises(ValueError, match="increasing"):
        m.SketchState(alpha=0.01, zero_count=0, positive=((4, 1), (-1, 2)), negative=())
    with pytest.raises(ValueError, match="increasing"):
        m.SketchState(alpha=0.01, zero_count=0, positive=(), negative=((1, 1), (1, 1)))


def test_moments_of_no_rows_have_mean_zero() -> None:
    m.SumState(n=0, total=0)
    m.SumState(n=0, total=-0.0)
    m.MomentsState(n=0, mean=0.0, m2=0.0)
    with pytest.raises(ValueError, match="0 when n == 0"):
        m.MomentsState(n=0, mean=2.0, m2=0.0)


def test_cell_keys_compare_as_typed_values() -> None:
    # 1, 1.0 and true are three keys on the wire (spec §7.2) ...
    groups = tuple(m.Group(key=(v,), states=()) for v in (1, 1.0, True, "1", None))
    answer = _answer(decision=m.Decision.ANSWERED, groups=groups, suppressed=())
    assert decode_as(encode(answer), m.QueryAnswer) == answer
    assert len({m.typed_key(g.key) for g in groups}) == 5
    # ... while -0.0 and 0.0 are one.
    with pytest.raises(ValueError, match="more than once"):
        _answer(
            decision=m.Decision.ANSWERED,
            groups=(m.Group(key=(0.0,), states=()), m.Group(key=(-0.0,), states=())),
            suppressed=(),
        )
    assert m.typed_key((m.FilterOp.EQ,)) == m.typed_key(("eq",))


def _answer(**changes: Any) -> m.QueryAnswer:
    fields: dict[str, Any] = {
        "request_id": bytes(32),
        "responder": "oslo",
        "requester": "ana@melbourne",
        "issued_at": 5,
        "dataset": "d",
        "dataset_version": "v1",
        "disclosure_version": 0,
        "decision": m.Decision.SUPPRESSED,
        "groups": (m.Group(key=("a",), states=(m.CountState(n=12),)),),
        "suppressed": (m.SuppressedCell(key=("b",), reason=m.SuppressionReason.MIN_GROUP_SIZE),),
    }
    fields.update(changes)
    return m.QueryAnswer(**fields)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"groups": (m.Group(key=("a", 1), states=(m.CountState(n=12),)),)}, "same length"),
        (
            {"suppressed": (m.SuppressedCell(key=(), reason=m.SuppressionReason.DOMINANCE),)},
            "same length",
        ),
        (
            {
                "groups": (
                    m.Group(key=("a",), states=(m.CountState(n=12),)),
                    m.Group(key=("c",), states=()),
                )
            },
            "same number of states",
        ),
        (
            {"suppressed": (m.SuppressedCell(key=("a",), reason=m.SuppressionReason.DOMINANCE),)},
            "more than once",
        ),
        ({"decision": m.Decision.ANSWERED}, "cannot list suppressed"),
        ({"suppressed": ()}, "needs a suppressed"),
    ],
)
def test_answer_cross_field_rules(changes: dict[str, Any], match: str) -> None:
    _answer()  # the baseline is valid
    with pytest.raises(ValueError, match=match):
        _answer(**changes)


def test_local_only_codes_never_go_on_the_wire() -> None:
    for code in ErrorCode:
        if code.on_wire:
            m.ErrorMessage(code=code, message="x")
            m.QueryRefusal(
                request_id=bytes(32),
                responder="oslo",
                requester="ana",
                issued_at=0,
                code=code,
                reason="",
            )
        else:
            with pytest.raises(ValueError, match="local-only"):
                m.ErrorMessage(code=code, message="x")


def test_capability_names_must_be_unique() -> None:
    profile = m.DisclosureProfile(
        version=1, min_group_size=5, dominance_p=85.0, max_groups=10, purposes=(), aggregates=()
    )
    column = m.ColumnInfo(name="a", type=m.ColumnType.TEXT, role=m.ColumnRole.DIMENSION)
    dataset = m.DatasetInfo(name="d", version="1", columns=(column,), disclosure=profile)
    with pytest.raises(ValueError, match="column names"):
        m.DatasetInfo(name="d", version="1", columns=(column, column), disclosure=profile)
    with pytest.raises(ValueError, match="dataset names"):
        m.Capabilities(city="oslo", node_key=bytes(32), issued_at=0, datasets=(dataset, dataset))
    with pytest.raises(ValueError, match="purposes"):
        m.DisclosureProfile(
            version=1,
            min_group_size=5,
            dominance_p=85.0,
            max_groups=10,
            purposes=("a", "a"),
            aggregates=(),
        )
    with pytest.raises(ValueError, match="aggregate columns"):
        m.DisclosureProfile(
            version=1,
            min_group_size=5,
            dominance_p=85.0,
            max_groups=10,
            purposes=(),
            aggregates=(("x", ("sum",)), ("x", ("count",))),
        )


# --- strategies stay honest ----------------------------------------------------------------


@given(query_requests())
def test_generated_requests_respect_their_rules(req: m.QueryRequest) -> None:
    assert req.audience in req.targets
    assert req.quorum <= len(req.targets)
    assert req.expires_at > req.issued_at


@given(query_answers())
def test_generated_answers_cover_every_decision(answer: m.QueryAnswer) -> None:
    if answer.decision is m.Decision.ANSWERED:
        assert answer.suppressed == ()
    if answer.decision is m.Decision.SUPPRESSED:
        assert answer.suppressed


# --- error codes --------------------------------------------------------------------------


def test_every_error_code_has_a_meaning_and_codes_are_unique() -> None:
    values = [code.value for code in ErrorCode]
    assert len(values) == len(set(values))
    # An IntEnum silently turns a repeated value into an alias: catch that too.
    assert len(ErrorCode.__members__) == len(list(ErrorCode))
    meanings = [code.meaning for code in ErrorCode]
    assert all(meaning and meaning == meaning.strip() for meaning in meanings)
    assert len(set(meanings)) == len(meanings)


def test_error_code_groups() -> None:
    for code in ErrorCode:
        assert 100 <= code.value < 700
        assert code.on_wire == (code.value < 600)
