"""Wire messages: round trips for every struct, construction rules, error codes."""

from __future__ import annotations

import inspect
import math
import re
import sys
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
from hansa.protocol.errors import ErrorCode, ProtocolError

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


def _refused_on_decoding(value: msgspec.Struct, code: ErrorCode = ErrorCode.INVALID_FIELD) -> None:
    """``value`` was built (``Meta`` bounds are checked only when decoding) but cannot be read."""
    with pytest.raises(ProtocolError) as info:
        decode_as(encode(value), type(value))
    assert info.value.code == code, str(info.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_on_decoding(bad: float) -> None:
    # Finiteness is a Meta bound (checked in C when decoding), not a construction rule.
    _refused_on_decoding(m.Filter(column="c", op=m.FilterOp.EQ, values=(bad,)))
    _refused_on_decoding(m.Filter(column="c", op=m.FilterOp.IN, values=(1, "x", bad)))
    if not math.isnan(bad):  # NaN already fails the increasing-edges rule on construction
        _refused_on_decoding(m.Histogram(column="c", edges=(0.0, bad) if bad > 0 else (bad, 0.0)))
    _refused_on_decoding(m.SumState(n=1, total=bad))
    _refused_on_decoding(m.MinMaxState(n=1, value=bad))
    _refused_on_decoding(m.MomentsState(n=1, mean=bad, m2=0.0))
    _refused_on_decoding(m.MomentsState(n=1, mean=0.0, m2=bad))
    _refused_on_decoding(m.Group(key=(bad,), states=()))
    _refused_on_decoding(m.Group(key=("a", None, bad), states=()))
    _refused_on_decoding(m.SuppressedCell(key=(bad,), reason=m.SuppressionReason.DOMINANCE))
    _refused_on_decoding(m.Quantiles(column="c", ranks=(bad,)))


@pytest.mark.parametrize("bad", [-0.5, 1.5, -math.inf, 2.0**64])
def test_quantile_ranks_outside_zero_one_are_refused_on_decoding(bad: float) -> None:
    _refused_on_decoding(m.Quantiles(column="c", ranks=(0.5, bad)))


def test_the_largest_finite_floats_are_accepted() -> None:
    big = sys.float_info.max
    for value in (
        m.Filter(column="c", op=m.FilterOp.BETWEEN, values=(-big, big)),
        m.Histogram(column="c", edges=(-big, big)),
        m.MomentsState(n=1, mean=-big, m2=big),
        m.Group(key=(big, -0.0), states=()),
        m.Quantiles(column="c", ranks=(0.0, -0.0, 1.0)),
    ):
        assert decode_as(encode(value), type(value)) == value


def test_scalar_bounds_are_checked_when_encoding_or_decoding() -> None:
    # Integers MessagePack cannot carry do not encode at all ...
    for number in (2**64, -(2**63) - 1):
        value = m.Filter(column="c", op=m.FilterOp.EQ, values=(number,))
        with pytest.raises(ProtocolError) as info:
            encode(value)
        assert info.value.code == ErrorCode.INVALID_FIELD
    # ... and an over-long literal encodes but is refused by the receiver.
    long_text = m.Filter(column="c", op=m.FilterOp.EQ, values=("x" * (m.MAX_TEXT + 1),))
    _refused_on_decoding(long_text, ErrorCode.TOO_LARGE)
    # The extremes themselves are fine.
    extremes = m.Filter(
        column="c", op=m.FilterOp.IN, values=(m.INT_MIN, m.INT_MAX, "x" * m.MAX_TEXT)
    )
    assert decode_as(encode(extremes), m.Filter) == extremes


def test_histogram_edges_must_increase() -> None:
    m.Histogram(column="c", edges=(-1.0, 0.0, 2.5))
    with pytest.raises(ValueError, match="increasing"):
        m.Histogram(column="c", edges=(1.0, 1.0))
    with pytest.raises(ValueError, match="increasing"):
        m.Histogram(column="c", edges=(0.0, 2.0, 1.0))
    with pytest.raises(ValueError, match="increasing"):
        m.Histogram(column="c", edges=(0.0, 1.0, 2.0, 3.0, 3.0))
    # NaN compares false, so it cannot sit in an increasing sequence.
    with pytest.raises(ValueError, match="increasing"):
        m.Histogram(column="c", edges=(0.0, math.nan))


def test_query_group_by_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        m.Query(dataset="d", aggregates=(m.Count(),), group_by=(m.Dimension("a"), m.Dimension("a")))


def _policy() -> m.PolicyTags:
    return m.PolicyTags(purpose="p", legal_basis="b", scope=m.ResultScope.ALLIANCE, analyst="ana")


def _request(**changes: Any) -> m.QueryRequest:
    fields: dict[str, Any] = {
        "requester": "ana@melbourne",
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


# --- names: one batch check per message ---------------------------------------------------

_KINDS = [
    ("identifier", m._IDENTIFIER, m.IDENTIFIER_PATTERN, 63),
    ("city id", m._CITY_ID, m.CITY_ID_PATTERN, 64),
    ("principal id", m._PRINCIPAL_ID, m.PRINCIPAL_ID_PATTERN, 128),
    ("token", m._TOKEN, m.TOKEN_PATTERN, 32),
]
# Every character any name alphabet allows, the separators, and a few others.
_NAME_CHARS = st.sampled_from("aAzZ09_.@- \n\t\x00é")


def _names(pattern: str, max_length: int) -> st.SearchStrategy[str]:
    # Within the Meta length bound: lengths are checked in C before any name check.
    valid = st.from_regex(re.compile(pattern, re.ASCII), fullmatch=True)
    two_valid_names_as_one = st.builds(
        lambda a, sep, b: a + sep + b, valid, st.sampled_from([" ", "  ", "\n", ""]), valid
    )
    return st.one_of(
        st.text(_NAME_CHARS, max_size=max_length),
        valid,
        two_valid_names_as_one.filter(lambda name: len(name) <= max_length),
    )


def _accepts(names: m._Names, flat: list[str]) -> bool:
    try:
        names.check(flat)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(
    ("kind", "pattern", "max_length"), [k[1:] for k in _KINDS], ids=[k[0] for k in _KINDS]
)
@given(data=st.data())
def test_a_batch_accepts_exactly_the_names_the_pattern_accepts(
    kind: m._Kind, pattern: str, max_length: int, data: st.DataObject
) -> None:
    names = data.draw(st.lists(_names(pattern, max_length), min_size=1, max_size=5))
    expected = all(re.fullmatch(pattern, name) for name in names)
    assert _accepts(m._Names(kind), names) == expected


@given(data=st.data())
def test_a_layout_checks_each_group_against_its_own_kind(data: st.DataObject) -> None:
    # The request layout: principals, a token, cities, identifiers.
    kinds = [_KINDS[2], _KINDS[3], _KINDS[1], _KINDS[0]]
    groups = [data.draw(st.lists(_names(k[2], k[3]), max_size=3)) for k in kinds]
    flat: list[str] = []
    for i, group in enumerate(groups):
        flat += [m._GROUP] * (i > 0) + group
    expected = all(
        group and all(re.fullmatch(k[2], name) for name in group)
        for k, group in zip(kinds, groups, strict=True)
    )
    assert _accepts(m._REQUEST_NAMES, flat) == expected


def _bad_name(value: msgspec.Struct, match: str) -> None:
    """``value`` builds and encodes, but decoding it fails on a name."""
    with pytest.raises(ProtocolError, match=re.escape(match)) as info:
        decode_as(encode(value), type(value))
    assert info.value.code == ErrorCode.INVALID_FIELD


def test_a_name_with_a_separator_cannot_pass_as_two() -> None:
    _bad_name(_request(query=m.Query("d", (m.Sum("a b"),))), "invalid identifier 'a b'")
    _bad_name(_request(targets=("oslo", "lyon porto")), "invalid city id 'lyon porto'")
    _bad_name(_request(requester="ana\nbob"), "invalid principal id 'ana\\nbob'")
    # A group break (two spaces) inside a name.
    policy = m.PolicyTags("p  oslo", "b", m.ResultScope.ALLIANCE, "ana")
    _bad_name(_request(policy=policy), "invalid token 'p  oslo'")
    _bad_name(_request(targets=("oslo", "lyon  porto")), "invalid city id 'lyon  porto'")


def test_an_empty_name_in_place_of_a_group_break_is_refused() -> None:
    request = _request(targets=("oslo", "", "lyon"))
    # An empty name fails its Meta bound when decoding ...
    _refused_on_decoding(request)
    # ... and the name check alone refuses it as well.
    check = m.name_check(m.QueryRequest)
    assert check is not None
    with pytest.raises(ValueError, match="empty"):
        check(request)


def _capabilities(**changes: Any) -> m.Capabilities:
    profile: dict[str, Any] = {
        "version": 1,
        "min_group_size": 5,
        "dominance_p": 85.0,
        "max_groups": 10,
        "purposes": ("audit",),
        "aggregates": (("fare", ("sum",)),),
    }
    profile.update(changes.pop("profile", {}))
    dataset: dict[str, Any] = {
        "name": "trips",
        "version": "1",
        "columns": (m.ColumnInfo("fare", m.ColumnType.FLOAT, m.ColumnRole.MEASURE),),
        "disclosure": m.DisclosureProfile(**profile),
    }
    dataset.update(changes.pop("dataset", {}))
    fields: dict[str, Any] = {
        "city": "oslo",
        "node_key": bytes(32),
        "issued_at": 0,
        "datasets": (m.DatasetInfo(**dataset),),
    }
    return m.Capabilities(**fields | changes)


_BAD_NAMES: list[tuple[str, Any, str]] = [
    ("requester", lambda: _request(requester="Ana"), "principal id 'Ana'"),
    (
        "analyst",
        lambda: _request(policy=m.PolicyTags("p", "b", m.ResultScope.ALLIANCE, "ana.")),
        "principal id 'ana.'",
    ),
    (
        "purpose",
        lambda: _request(policy=m.PolicyTags("9p", "b", m.ResultScope.ALLIANCE, "ana")),
        "token '9p'",
    ),
    (
        "first target",
        lambda: _request(targets=("-oslo",), quorum=1),
        "city id '-oslo'",
    ),
    ("target", lambda: _request(targets=("oslo", "Lyon")), "city id 'Lyon'"),
    (
        "dataset",
        lambda: _request(query=m.Query(dataset="1d", aggregates=(m.Count(),))),
        "identifier '1d'",
    ),
    (
        "count column",
        lambda: _request(query=m.Query(dataset="d", aggregates=(m.Count("_c"),))),
        "identifier '_c'",
    ),
    (
        "histogram column",
        lambda: _request(query=m.Query(dataset="d", aggregates=(m.Histogram("h-1", (0.0, 1.0)),))),
        "identifier 'h-1'",
    ),
    (
        "filter column",
        lambda: _request(
            query=m.Query(
                dataset="d", aggregates=(m.Count(),), filters=(m.Filter("f.x", m.FilterOp.IS_NULL),)
            )
        ),
        "identifier 'f.x'",
    ),
    (
        "group key",
        lambda: _request(
            query=m.Query(
                dataset="d",
                aggregates=(m.Count(),),
                group_by=(m.TimeBucket("t\n", m.TimeUnit.DAY),),
            )
        ),
        "identifier",
    ),
    ("responder", lambda: _answer(responder="oslo_"), "city id 'oslo_'"),
    ("answer requester", lambda: _answer(requester="ana bob"), "principal id 'ana bob'"),
    ("answer dataset", lambda: _answer(dataset="d-1"), "identifier 'd-1'"),
    (
        "refusal responder",
        lambda: m.QueryRefusal(bytes(32), "Oslo", "ana", 0, ErrorCode.INTERNAL, ""),
        "city id 'Oslo'",
    ),
    (
        "refusal requester",
        lambda: m.QueryRefusal(bytes(32), "oslo", "@ana", 0, ErrorCode.INTERNAL, ""),
        "principal id '@ana'",
    ),
    ("city", lambda: _capabilities(city="oslo!"), "city id 'oslo!'"),
    ("dataset name", lambda: _capabilities(dataset={"name": "tr ips"}), "identifier 'tr ips'"),
    (
        "column name",
        lambda: _capabilities(
            dataset={"columns": (m.ColumnInfo("färe", m.ColumnType.FLOAT, m.ColumnRole.MEASURE),)}
        ),
        "identifier 'färe'",
    ),
    ("profile purpose", lambda: _capabilities(profile={"purposes": ("Audit",)}), "token 'Audit'"),
    (
        "profile column",
        lambda: _capabilities(profile={"aggregates": (("9", ("sum",)),)}),
        "identifier '9'",
    ),
    (
        "profile kind",
        lambda: _capabilities(profile={"aggregates": (("fare", ("sum", "s m")),)}),
        "token 's m'",
    ),
]


@pytest.mark.parametrize(
    ("build", "match"), [c[1:] for c in _BAD_NAMES], ids=[c[0] for c in _BAD_NAMES]
)
def test_decoding_checks_every_name_a_message_carries(build: Any, match: str) -> None:
    for valid in (_capabilities(), _request(), _answer()):
        assert decode_as(encode(valid), type(valid)) == valid
    value = build()  # names are decoding rules: building does not check them
    _bad_name(value, match)
    _bad_name(value, f"invalid {type(value).__name__}: invalid")


_NESTED: list[msgspec.Struct] = [
    m.Count("1x"),
    m.Sum("1x"),
    m.Mean("1x"),
    m.Min("1x"),
    m.Max("1x"),
    m.Variance("1x"),
    m.Stddev("1x"),
    m.Histogram("1x", (0.0, 1.0)),
    m.Quantiles("1x", (0.5,)),
    m.Filter("1x", m.FilterOp.NOT_NULL),
    m.Dimension("1x"),
    m.TimeBucket("1x", m.TimeUnit.HOUR),
    m.Query(dataset="1x", aggregates=(m.Count(),)),
    m.Query(dataset="d", aggregates=(m.Count(), m.Sum("a b"))),
    m.PolicyTags("1x", "b", m.ResultScope.PUBLIC, "ana"),
    m.PolicyTags("p", "b", m.ResultScope.PUBLIC, "ana "),
    m.ColumnInfo("1x", m.ColumnType.TEXT, m.ColumnRole.DIMENSION),
]


@pytest.mark.parametrize("value", _NESTED, ids=repr)
def test_nested_structs_decoded_alone_check_their_names(value: msgspec.Struct) -> None:
    _bad_name(value, "invalid")


def test_every_struct_with_a_name_field_has_a_name_check() -> None:
    named = {"column", "dataset", "name", "city", "responder", "requester", "purposes"}
    for cls in ALL_STRUCTS:
        fields = set(cls.__struct_fields__)
        has_names = bool(named & fields) or cls is m.PolicyTags
        assert (m.name_check(cls) is not None) == has_names, cls.__name__


def test_an_empty_column_name_is_refused_on_decoding() -> None:
    # Count() names no column (None); an empty name is a length, a Meta bound.
    request = _request(query=m.Query(dataset="d", aggregates=(m.Count(""),)))
    _refused_on_decoding(request)
    _refused_on_decoding(m.Count(""))


# --- strategies stay honest ----------------------------------------------------------------


@given(query_requests())
def test_generated_requests_respect_their_rules(req: m.QueryRequest) -> None:
    assert len(set(req.targets)) == len(req.targets)
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
