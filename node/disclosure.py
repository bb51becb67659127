"""First-level disclosure control: the node's decision step (spec §8).

Theory of operation
-------------------
Disclosure control runs in two places around query execution, and both are
built from small rule objects that each check one thing (house style §9
points 9–10):

*Before* execution, :class:`RequestRule` objects look at the request and the
dataset and return a :class:`Verdict`. The first refusal wins. The rules
here are :class:`PurposeAllowList` (``PURPOSE_NOT_ALLOWED``) and
:class:`AggregatesOffered` (``AGGREGATE_NOT_ALLOWED``); later rules — who may
ask, rate limits, privacy budget — slot into the same list.

*After* execution, :class:`CellRule` objects look at each computed cell's
statistics (:class:`CellStats`: row count and, for dominance, the largest
absolute contribution and the sum of absolute values per column) and either
pass it or name a :class:`~hansa.protocol.messages.SuppressionReason`. The
first rule that objects wins. The rules here are :class:`MinGroupSize` (k)
and :class:`Dominance` (p %); cell-key noise would be a later rule.

:class:`DisclosurePolicy` composes both lists. ``evaluate_request`` returns
a verdict and ``enforce_request`` raises it; ``decide`` turns the cells into
a :class:`CellDecision` (released indices, suppressed cells, and
``answered`` or ``answered_suppressed``).

Failing closed: a policy with no request rules or no cell rules cannot be
constructed, a rule that raises aborts the whole answer (nothing is
released), and scalar answers (no group-by) are one cell subject to the
same rules — a whole-dataset count below k is suppressed too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from hansa.node.catalog import ROLE_AGGREGATES, AggregateKind, DatasetSpec
from hansa.protocol.errors import ErrorCode, HansaError, PolicyDenied, QueryError
from hansa.protocol.messages import (
    Aggregate,
    CellValue,
    Decision,
    Mean,
    Query,
    QueryRequest,
    Stddev,
    Sum,
    SuppressedCell,
    SuppressionReason,
    Variance,
)

__all__ = [
    "DOMINANCE_AGGREGATES",
    "AggregatesOffered",
    "CellDecision",
    "CellRule",
    "CellStats",
    "DisclosurePolicy",
    "Dominance",
    "MinGroupSize",
    "PurposeAllowList",
    "RequestRule",
    "Verdict",
    "aggregate_kind",
    "dominance_columns",
]

DOMINANCE_AGGREGATES: tuple[type[Sum | Mean | Variance | Stddev], ...] = (
    Sum,
    Mean,
    Variance,
    Stddev,
)
"""Aggregates whose state reveals a cell's total, so the dominance rule guards them.

Mean/Variance/Stddev states carry ``n`` and the mean, hence the sum.
"""


def aggregate_kind(aggregate: Aggregate) -> AggregateKind:
    """Return the published kind of an aggregate (its wire tag).

    Args:
        aggregate: a query aggregate.

    Returns:
        The matching :class:`AggregateKind`.
    """
    return AggregateKind(str(type(aggregate).__struct_config__.tag))


def dominance_columns(query: Query) -> tuple[str, ...]:
    """Return the distinct columns the dominance rule must check, in query order.

    Args:
        query: the query.

    Returns:
        Columns of the query's Sum, Mean, Variance and Stddev aggregates.
    """
    seen: dict[str, None] = {}
    for agg in query.aggregates:
        if isinstance(agg, DOMINANCE_AGGREGATES):
            seen.setdefault(agg.column, None)
    return tuple(seen)


# --- verdicts and request rules ----------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The outcome of a request rule: allowed, or refused with a wire code and reason.

    Truthy exactly when allowed.
    """

    allowed: bool
    code: ErrorCode | None = None
    reason: str = ""

    def __bool__(self) -> bool:
        return self.allowed

    @classmethod
    def allow(cls) -> Verdict:
        """Return the allowing verdict (one shared instance: verdicts are immutable)."""
        return _ALLOW

    @classmethod
    def refuse(cls, code: ErrorCode, reason: str) -> Verdict:
        """Return a refusal.

        Args:
            code: the wire code (3xx query codes, 4xx policy codes).
            reason: one line for the requester.

        Returns:
            The verdict.
        """
        return cls(False, code, reason)

    def error(self) -> HansaError:
        """Return the exception for a refusal: 3xx codes are QueryError, others PolicyDenied.

        Returns:
            The exception to raise (for an allowing verdict, an INTERNAL error:
            raising it would be a bug).
        """
        if self.allowed or self.code is None:
            return HansaError("an allowing verdict has no error", ErrorCode.INTERNAL)
        if 300 <= self.code < 400:
            return QueryError(self.reason, self.code)
        return PolicyDenied(self.reason, self.code)


_ALLOW: Final = Verdict(True)
"""Every rule that allows returns this one instance (built once, not per request)."""


@runtime_checkable
class RequestRule(Protocol):
    """A check of a request against a dataset before any data is read."""

    def evaluate(self, request: QueryRequest, dataset: DatasetSpec) -> Verdict:
        """Return whether the request may proceed.

        Args:
            request: the verified request.
            dataset: the dataset it names.

        Returns:
            The verdict.
        """
        ...


@dataclass(frozen=True)
class PurposeAllowList:
    """Refuse purposes not on the dataset's allow-list (``PURPOSE_NOT_ALLOWED``)."""

    def evaluate(self, request: QueryRequest, dataset: DatasetSpec) -> Verdict:
        """Check ``request.policy.purpose`` against ``dataset.disclosure.purposes``.

        Args:
            request: the request.
            dataset: the dataset.

        Returns:
            Allowed, or refused with ``PURPOSE_NOT_ALLOWED``.
        """
        purpose = request.policy.purpose
        if purpose in dataset.disclosure.purposes:
            return Verdict.allow()
        return Verdict.refuse(
            ErrorCode.PURPOSE_NOT_ALLOWED,
            f"purpose {purpose!r} is not allowed for dataset {dataset.name!r}",
        )


@dataclass(frozen=True)
class AggregatesOffered:
    """Refuse aggregates the dataset does not offer on a column (``AGGREGATE_NOT_ALLOWED``).

    Only columns that exist and whose role could offer the aggregate are
    judged here; unknown columns and role violations are schema errors the
    query compiler reports with their own codes.
    """

    def evaluate(self, request: QueryRequest, dataset: DatasetSpec) -> Verdict:
        """Check every aggregate's column against the offered aggregates.

        Args:
            request: the request.
            dataset: the dataset.

        Returns:
            Allowed, or refused with ``AGGREGATE_NOT_ALLOWED``.
        """
        for agg in request.query.aggregates:
            column = getattr(agg, "column", None)
            if column is None:
                continue  # Count(*) is always offered: it is the cell size itself.
            info = dataset.column(column)
            kind = aggregate_kind(agg)
            if info is None or kind not in ROLE_AGGREGATES[info.role]:
                continue
            if kind not in dataset.disclosure.allowed(column):
                return Verdict.refuse(
                    ErrorCode.AGGREGATE_NOT_ALLOWED,
                    f"{kind.value} is not offered on column {column!r}",
                )
        return Verdict.allow()


# --- cells and cell rules ---------------------------------------------------------------------


@dataclass(frozen=True)
class CellStats:
    """What the cell rules see of one computed cell (never released as such).

    Attributes:
        key: the cell's group key (``()`` for a scalar answer).
        rows: the number of rows in the cell (after filters).
        dominance: per dominance column, ``(max |x|, sum |x|)`` over the cell.
    """

    key: tuple[CellValue, ...]
    rows: int
    dominance: tuple[tuple[int | float, int | float], ...] = ()


@runtime_checkable
class CellRule(Protocol):
    """A check of one computed cell; returns why it must be suppressed, or None."""

    def evaluate(self, cell: CellStats) -> SuppressionReason | None:
        """Judge one cell.

        Args:
            cell: the cell's statistics.

        Returns:
            A suppression reason, or None to release the cell.
        """
        ...


@dataclass(frozen=True)
class MinGroupSize:
    """Suppress cells with fewer than ``k`` rows (``min_group_size``)."""

    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("min group size must be at least 1")

    def evaluate(self, cell: CellStats) -> SuppressionReason | None:
        """Suppress when ``cell.rows < k``.

        Args:
            cell: the cell.

        Returns:
            ``MIN_GROUP_SIZE`` or None.
        """
        return SuppressionReason.MIN_GROUP_SIZE if cell.rows < self.k else None


@dataclass(frozen=True)
class Dominance:
    """Suppress cells where one contributor exceeds ``p`` % of a total (``dominance``).

    For each guarded column, the cell is dominated when
    ``max|x| > p/100 * sum|x|`` (strictly; a cell whose values are all zero
    is not dominated). With ``p == 100`` no cell is ever dominated.
    """

    p: float

    def __post_init__(self) -> None:
        if not 0 < self.p <= 100:
            raise ValueError("dominance p must be in (0, 100]")

    def evaluate(self, cell: CellStats) -> SuppressionReason | None:
        """Suppress when any guarded column is dominated by a single value.

        Args:
            cell: the cell.

        Returns:
            ``DOMINANCE`` or None.
        """
        for largest, total in cell.dominance:
            # Compared as largest * 100 > p * total to stay exact for integers.
            if total > 0 and largest * 100 > self.p * total:
                return SuppressionReason.DOMINANCE
        return None


@dataclass(frozen=True)
class CellDecision:
    """The result of the cell rules over one answer.

    Attributes:
        decision: ``answered`` or ``answered_suppressed``.
        released: indices (into the judged cells) of the cells to release.
        suppressed: the withheld cells with their reasons.
    """

    decision: Decision
    released: tuple[int, ...]
    suppressed: tuple[SuppressedCell, ...]


@dataclass(frozen=True)
class DisclosurePolicy:
    """A dataset's disclosure decision step: request rules, then cell rules.

    Attributes:
        request_rules: checked in order before execution; first refusal wins.
        cell_rules: checked in order per cell after execution; first objection wins.

    Raises:
        ValueError: either list is empty (a policy that checks nothing fails closed).
    """

    request_rules: tuple[RequestRule, ...]
    cell_rules: tuple[CellRule, ...]

    def __post_init__(self) -> None:
        if not self.request_rules or not self.cell_rules:
            raise ValueError("a disclosure policy needs at least one request and one cell rule")

    @classmethod
    def for_dataset(cls, dataset: DatasetSpec) -> DisclosurePolicy:
        """Build the first-level policy from a dataset's settings.

        Args:
            dataset: the dataset.

        Returns:
            Purpose and aggregate checks; min group size, then dominance.
        """
        settings = dataset.disclosure
        return cls(
            request_rules=(PurposeAllowList(), AggregatesOffered()),
            cell_rules=(MinGroupSize(settings.min_group_size), Dominance(settings.dominance_p)),
        )

    def evaluate_request(self, request: QueryRequest, dataset: DatasetSpec) -> Verdict:
        """Run the request rules.

        Args:
            request: the request.
            dataset: the dataset it names.

        Returns:
            The first refusal, or an allowing verdict.
        """
        for rule in self.request_rules:
            verdict = rule.evaluate(request, dataset)
            if not verdict:
                return verdict
        return Verdict.allow()

    def enforce_request(self, request: QueryRequest, dataset: DatasetSpec) -> None:
        """Run the request rules and raise on refusal.

        Args:
            request: the request.
            dataset: the dataset it names.

        Raises:
            PolicyDenied: a policy code (e.g. ``PURPOSE_NOT_ALLOWED``).
            QueryError: ``AGGREGATE_NOT_ALLOWED``.
        """
        verdict = self.evaluate_request(request, dataset)
        if not verdict:
            raise verdict.error()

    def decide(self, cells: Sequence[CellStats]) -> CellDecision:
        """Judge every cell.

        Args:
            cells: the computed cells, in answer order.

        Returns:
            Which cells to release and which to report as suppressed.
        """
        released: list[int] = []
        suppressed: list[SuppressedCell] = []
        for index, cell in enumerate(cells):
            reason: SuppressionReason | None = None
            for rule in self.cell_rules:
                reason = rule.evaluate(cell)
                if reason is not None:
                    break
            if reason is None:
                released.append(index)
            else:
                suppressed.append(SuppressedCell(key=cell.key, reason=reason))
        decision = Decision.SUPPRESSED if suppressed else Decision.ANSWERED
        return CellDecision(decision, tuple(released), tuple(suppressed))
