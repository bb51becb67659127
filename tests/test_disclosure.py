"""First-level disclosure rules: small, composable, failing closed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hansa.node.catalog import AggregateKind, DatasetSpec, DisclosureSettings
from hansa.node.disclosure import (
    AggregatesOffered,
    CellStats,
    DisclosurePolicy,
    Dominance,
    MinGroupSize,
    PurposeAllowList,
    Verdict,
    dominance_columns,
)
from hansa.protocol.errors import ErrorCode, HansaError, PolicyDenied, QueryError
from hansa.protocol.messages import (
    ColumnInfo,
    ColumnRole,
    ColumnType,
    Count,
    Decision,
    Histogram,
    Max,
    Mean,
    PolicyTags,
    Query,
    QueryRequest,
    ResultScope,
    Stddev,
    Sum,
    SuppressionReason,
    Variance,
)

SPEC = DatasetSpec(
    name="stays",
    version="v1-000000000000",
    columns=(
        ColumnInfo(name="district", type=ColumnType.TEXT, role=ColumnRole.DIMENSION),
        ColumnInfo(name="price", type=ColumnType.INTEGER, role=ColumnRole.MEASURE),
        ColumnInfo(name="rating", type=ColumnType.FLOAT, role=ColumnRole.MEASURE),
        ColumnInfo(name="host_id", type=ColumnType.INTEGER, role=ColumnRole.IDENTIFIER),
    ),
    disclosure=DisclosureSettings(
        version=3,
        min_group_size=5,
        dominance_p=80.0,
        purposes=("research",),
        aggregates=(
            ("district", frozenset({AggregateKind.COUNT})),
            ("price", frozenset({AggregateKind.COUNT, AggregateKind.SUM})),
            ("rating", frozenset(AggregateKind)),
            ("host_id", frozenset()),
        ),
    ),
    row_count=10,
)


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


def test_purpose_allow_list() -> None:
    q = Query(dataset="stays", aggregates=(Count(),))
    assert PurposeAllowList().evaluate(request(q), SPEC)
    verdict = PurposeAllowList().evaluate(request(q, "marketing"), SPEC)
    assert not verdict and verdict.code is ErrorCode.PURPOSE_NOT_ALLOWED
    err = verdict.error()
    assert isinstance(err, PolicyDenied) and err.code is ErrorCode.PURPOSE_NOT_ALLOWED


def test_aggregates_offered() -> None:
    rule = AggregatesOffered()
    ok = Query(dataset="stays", aggregates=(Count(), Sum("price"), Count("district")))
    assert rule.evaluate(request(ok), SPEC)
    refused = rule.evaluate(request(Query(dataset="stays", aggregates=(Mean("price"),))), SPEC)
    assert not refused and refused.code is ErrorCode.AGGREGATE_NOT_ALLOWED
    assert isinstance(refused.error(), QueryError)
    # The identifier offers no count here (the operator removed it).
    refused = rule.evaluate(request(Query(dataset="stays", aggregates=(Count("host_id"),))), SPEC)
    assert refused.code is ErrorCode.AGGREGATE_NOT_ALLOWED
    # Unknown columns and role violations are left to the compiler's own codes.
    for agg in (Sum("nope"), Sum("district")):
        assert rule.evaluate(request(Query(dataset="stays", aggregates=(agg,))), SPEC)


def test_policy_enforce_runs_rules_in_order() -> None:
    policy = DisclosurePolicy.for_dataset(SPEC)
    q = Query(dataset="stays", aggregates=(Mean("price"),))
    with pytest.raises(PolicyDenied) as denied:
        policy.enforce_request(request(q, "marketing"), SPEC)
    assert denied.value.code is ErrorCode.PURPOSE_NOT_ALLOWED  # purpose is checked first
    with pytest.raises(QueryError) as refused:
        policy.enforce_request(request(q), SPEC)
    assert refused.value.code is ErrorCode.AGGREGATE_NOT_ALLOWED


def test_empty_policy_cannot_exist() -> None:
    with pytest.raises(ValueError):
        DisclosurePolicy(request_rules=(), cell_rules=(MinGroupSize(1),))
    with pytest.raises(ValueError):
        DisclosurePolicy(request_rules=(PurposeAllowList(),), cell_rules=())
    with pytest.raises(ValueError):
        MinGroupSize(0)
    with pytest.raises(ValueError):
        Dominance(0)
    with pytest.raises(ValueError):
        Dominance(100.5)


def test_verdict_truthiness_and_error() -> None:
    assert Verdict.allow() and not Verdict.refuse(ErrorCode.RATE_LIMITED, "slow down")
    assert Verdict.allow().error().code is ErrorCode.INTERNAL
    assert isinstance(Verdict.refuse(ErrorCode.RATE_LIMITED, "x").error(), PolicyDenied)


def test_min_group_size() -> None:
    rule = MinGroupSize(5)
    assert rule.evaluate(CellStats(key=("a",), rows=4)) is SuppressionReason.MIN_GROUP_SIZE
    assert rule.evaluate(CellStats(key=("a",), rows=5)) is None
    # A scalar cell with no rows is below any k.
    assert MinGroupSize(1).evaluate(CellStats(key=(), rows=0)) is SuppressionReason.MIN_GROUP_SIZE


def test_dominance() -> None:
    rule = Dominance(80.0)
    assert rule.evaluate(CellStats((), 3, ((81, 100),))) is SuppressionReason.DOMINANCE
    assert rule.evaluate(CellStats((), 3, ((80, 100),))) is None  # strictly more than p %
    assert rule.evaluate(CellStats((), 3, ((0, 0),))) is None  # all zero: no contributor
    assert rule.evaluate(CellStats((), 3, ((1, 10), (9.5, 10.0)))) is SuppressionReason.DOMINANCE
    # Exact with big integers: 80 % of 10**20 + 1 versus a float comparison.
    big = 10**20
    assert rule.evaluate(CellStats((), 3, ((big * 8 // 10, big),))) is None
    assert (
        rule.evaluate(CellStats((), 3, ((big * 8 // 10 + 1, big),))) is SuppressionReason.DOMINANCE
    )
    assert Dominance(100).evaluate(CellStats((), 1, ((5, 5),))) is None


def test_decide_reports_first_reason_and_decision() -> None:
    policy = DisclosurePolicy.for_dataset(SPEC)
    cells = [
        CellStats(("a",), 10, ((5, 100),)),
        CellStats(("b",), 2, ((100, 100),)),  # both rules object; k is reported
        CellStats(("c",), 10, ((90, 100),)),
    ]
    decision = policy.decide(cells)
    assert decision.decision is Decision.SUPPRESSED
    assert decision.released == (0,)
    assert [(c.key, c.reason) for c in decision.suppressed] == [
        (("b",), SuppressionReason.MIN_GROUP_SIZE),
        (("c",), SuppressionReason.DOMINANCE),
    ]
    assert policy.decide(cells[:1]).decision is Decision.ANSWERED
    assert policy.decide([]).decision is Decision.ANSWERED


def test_failing_rule_fails_closed() -> None:
    class Broken:
        def evaluate(self, cell: CellStats) -> SuppressionReason | None:
            raise HansaError("rule store unavailable", ErrorCode.UNAVAILABLE)

    policy = DisclosurePolicy(request_rules=(PurposeAllowList(),), cell_rules=(Broken(),))
    with pytest.raises(HansaError):
        policy.decide([CellStats(("a",), 100)])


def test_dominance_columns() -> None:
    q = Query(
        dataset="stays",
        aggregates=(
            Count(),
            Sum("price"),
            Mean("price"),
            Variance("rating"),
            Stddev("x"),
            Max("y"),
            Histogram("z", (0.0, 1.0)),
        ),
    )
    assert dominance_columns(q) == ("price", "rating", "x")


@given(
    st.integers(1, 20),
    st.floats(1.0, 100.0),
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 1000), st.integers(0, 1000)), max_size=30
    ),
)
def test_decide_partitions_cells(k: int, p: float, raw: list[tuple[int, int, int]]) -> None:
    policy = DisclosurePolicy(
        request_rules=(PurposeAllowList(),), cell_rules=(MinGroupSize(k), Dominance(p))
    )
    cells = [CellStats((i,), rows, ((min(a, b), max(a, b)),)) for i, (rows, a, b) in enumerate(raw)]
    decision = policy.decide(cells)
    suppressed = {c.key[0]: c.reason for c in decision.suppressed}
    assert set(decision.released) | set(suppressed) == set(range(len(cells)))
    assert not set(decision.released) & set(suppressed)
    for i, cell in enumerate(cells):
        largest, total = cell.dominance[0]
        if cell.rows < k:
            assert suppressed[i] is SuppressionReason.MIN_GROUP_SIZE
        elif total > 0 and largest * 100 > p * total:
            assert suppressed[i] is SuppressionReason.DOMINANCE
        else:
            assert i in decision.released
    assert (decision.decision is Decision.SUPPRESSED) == bool(suppressed)
