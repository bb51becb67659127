"""Combining per-city aggregate states into one federated answer (pure, no I/O).

Theory of operation
-------------------
A city answers a :class:`~hansa.protocol.messages.Query` with, per released
cell (group), one mergeable *state* per requested aggregate (node contract,
``protocol/messages.py``). The analyst merges the states of a cell across
cities and derives the final values. The central property (DESIGN
"Federated answer = central answer") is that merging per-city states gives
what the same query computes over the union of the cities' rows:

- exactly for counts, integer sums, min, max and histograms (integer sums
  and counts are added as Python ints, so merging never wraps around; a total
  beyond the wire's 64-bit range raises ``TooLargeError`` rather than being
  rounded);
- for float sums up to the rounding of each city's own total: the totals
  are added with :func:`math.fsum`, exactly rounded;
- within float tolerance for mean, variance and stddev: the moments
  ``(n, mean, M2)`` are combined with the k-way form of Chan et al.'s
  parallel update, ``mean = Σ n_i·mean_i / N`` and
  ``M2 = Σ M2_i + Σ n_i·(mean_i - mean)²``, both sums taken with
  :func:`math.fsum` so the result does not depend on the order of cities;
- within the sketch's bound for quantiles (:mod:`hansa.federation.sketch`),
  whose merge is itself exact.

Every merge here is commutative bit for bit (ties between equal min/max
candidates are broken by a fixed rule) and :func:`combine_answers` sorts
the answers by city first, so the combined result does not depend on the
order in which answers arrived.

Suppressed cells contribute nothing: a city that withheld a cell is left
out of that cell's merge and listed in the row's ``suppressed``, so the
analyst sees which cells are partial.

Group keys are matched by *typed* value: ``1``, ``1.0`` and ``True`` are
different keys, because a city whose dimension is INTEGER and one whose
dimension is BOOLEAN or FLOAT are not describing the same category, and
silently adding them would hide a schema mismatch. Within floats the key
follows SQL ``GROUP BY`` (as DuckDB does): ``-0.0`` and ``0.0`` are one
key (shown as ``0.0``) and every NaN is one key.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from hansa.federation.sketch import (
    DEFAULT_ALPHA,
    empty_sketch,
    merge_sketch_many,
    sketch_quantiles,
    validate_sketch,
)
from hansa.protocol.errors import ErrorCode, HansaError, ProtocolError, TooLargeError
from hansa.protocol.messages import (
    INT_MAX,
    INT_MIN,
    Aggregate,
    AggregateState,
    CellValue,
    Count,
    CountState,
    Histogram,
    HistogramState,
    Max,
    Mean,
    Min,
    MinMaxState,
    MomentsState,
    Quantiles,
    Query,
    QueryAnswer,
    SketchState,
    Stddev,
    Sum,
    SumState,
    SuppressionReason,
    Variance,
)

__all__ = [
    "CombinedResult",
    "CombinedRow",
    "FinalValue",
    "HistogramCounts",
    "check_answer",
    "combine_answers",
    "empty_state",
    "expected_state_type",
    "finalize",
    "key_sort_key",
    "merge_many",
    "merge_states",
]


@dataclass(frozen=True, slots=True)
class HistogramCounts:
    """The final value of a :class:`~hansa.protocol.messages.Histogram` aggregate.

    Attributes:
        edges: the bin edges of the query.
        counts: ``counts[i]`` values in ``[edges[i], edges[i+1])`` (last bin closed).
        below: values below ``edges[0]``.
        above: values above ``edges[-1]``.
    """

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    below: int
    above: int

    @property
    def total(self) -> int:
        """All non-null values, in range or not."""
        return sum(self.counts) + self.below + self.above


FinalValue = int | float | None | HistogramCounts | tuple[float | None, ...]
"""What :func:`finalize` returns for one aggregate (see its docstring for each kind)."""


_S = TypeVar("_S", bound=AggregateState)

_STATE_TYPE: Final[dict[type[Aggregate], type[AggregateState]]] = {
    Count: CountState,
    Sum: SumState,
    Min: MinMaxState,
    Max: MinMaxState,
    Mean: MomentsState,
    Variance: MomentsState,
    Stddev: MomentsState,
    Histogram: HistogramState,
    Quantiles: SketchState,
}


def expected_state_type(aggregate: Aggregate) -> type[AggregateState]:
    """Return the state class a city must send for an aggregate (node contract).

    Args:
        aggregate: an aggregate of a query.

    Returns:
        The :data:`~hansa.protocol.messages.AggregateState` member class.
    """
    return _STATE_TYPE[type(aggregate)]


def empty_state(aggregate: Aggregate, *, alpha: float | None = None) -> AggregateState:
    """Return the state of an aggregate over no rows (the identity of merging).

    Args:
        aggregate: the aggregate.
        alpha: sketch accuracy for :class:`Quantiles` (default ``DEFAULT_ALPHA``).

    Returns:
        ``CountState(0)``, ``SumState(0, 0)``, ``MinMaxState(0, None)``,
        ``MomentsState(0, 0.0, 0.0)``, an all-zero histogram or an empty sketch.
    """
    match aggregate:
        case Count():
            return CountState(n=0)
        case Sum():
            return SumState(n=0, total=0)
        case Min() | Max():
            return MinMaxState(n=0, value=None)
        case Mean() | Variance() | Stddev():
            return MomentsState(n=0, mean=0.0, m2=0.0)
        case Histogram(edges=edges):
            return HistogramState(counts=(0,) * (len(edges) - 1))
        case Quantiles():
            return empty_sketch(DEFAULT_ALPHA if alpha is None else alpha)


# --- validation -------------------------------------------------------------------


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(message, ErrorCode.INVALID_FIELD)


def _is_count(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_state(aggregate: Aggregate | None, state: AggregateState) -> None:
    """Check one state's own invariants, and its kind against the aggregate when given.

    Raises:
        ProtocolError: ``INVALID_FIELD`` describing the broken rule.
    """
    if aggregate is not None:
        want = expected_state_type(aggregate)
        if type(state) is not want:
            raise _invalid(
                f"aggregate {type(aggregate).__name__.lower()} needs a {want.__name__}, "
                f"got a {type(state).__name__}"
            )
    match state:
        case CountState(n=n):
            if not _is_count(n):
                raise _invalid("count must be a non-negative integer")
        case SumState(n=n, total=total):
            if not _is_count(n) or not _is_number(total):
                raise _invalid("sum state needs a count and a numeric total")
            if isinstance(total, float) and not math.isfinite(total):
                raise _invalid("sum total must be finite")
            if n == 0 and total != 0:
                raise _invalid("sum total must be 0 when no value was summed")
        case MinMaxState(n=n, value=value):
            if not _is_count(n):
                raise _invalid("min/max count must be a non-negative integer")
            if (n == 0) != (value is None):
                raise _invalid("min/max value must be None exactly when n == 0")
            if value is not None and (
                not _is_number(value) or (isinstance(value, float) and not math.isfinite(value))
            ):
                raise _invalid("min/max value must be a finite number")
        case MomentsState(n=n, mean=mean, m2=m2):
            if not _is_count(n):
                raise _invalid("moments count must be a non-negative integer")
            if not (_is_number(mean) and _is_number(m2)):
                raise _invalid("moments mean and m2 must be numbers")
            if not (math.isfinite(mean) and math.isfinite(m2)) or m2 < 0:
                raise _invalid("moments mean and m2 must be finite, m2 >= 0")
        case HistogramState(counts=counts, below=below, above=above):
            if not all(_is_count(c) for c in (*counts, below, above)):
                raise _invalid("histogram counts must be non-negative integers")
            if isinstance(aggregate, Histogram) and len(counts) != len(aggregate.edges) - 1:
                raise _invalid(
                    f"histogram has {len(counts)} bins, the query's edges define "
                    f"{len(aggregate.edges) - 1}"
                )
        case SketchState():
            validate_sketch(state)


# --- merging ------------------------------------------------------------------------


def _exact_sum(totals: Sequence[int | float]) -> int | float:
    """Integers add exactly; any float makes the sum a correctly rounded float.

    Raises:
        TooLargeError: the exact total does not fit the wire (an integer outside
            the MessagePack range, or a float beyond the largest double), so no
            valid :class:`SumState` can hold it.
    """
    if all(isinstance(t, int) for t in totals):
        exact = sum(totals)
        if not INT_MIN <= exact <= INT_MAX:
            raise TooLargeError(f"merged integer sum {exact} exceeds the wire's integer range")
        return exact
    try:
        return math.fsum(totals)
    except OverflowError as exc:
        raise TooLargeError("merged float sum exceeds the largest double") from exc


def _wire_count(total: int, what: str) -> int:
    """A merged count, refused beyond the wire's integer range as sums are (``_exact_sum``).

    Found by tests/test_verify_hostile.py: three cities each claiming ``2**63 - 1`` rows
    merged to a count no MessagePack encoder accepts, so the fan-out could not write its
    evidence bundle; refused here, the combination fails cleanly instead (with a reason).

    Raises:
        TooLargeError: ``total`` exceeds ``INT_MAX``.
    """
    if total > INT_MAX:
        raise TooLargeError(f"merged {what} {total} exceeds the wire's integer range")
    return total


def _extreme(values: Sequence[int | float], want_max: bool) -> int | float:
    """Min or max with a total tie-break so the merge is commutative bit for bit.

    Equal candidates (``1`` and ``1.0``, or ``0.0`` and ``-0.0``) are ordered
    int before float and by sign bit, which keeps the exact int and the
    SQL-natural signed zero (``-0.0`` for min, ``0.0`` for max).
    """

    def rank(x: int | float) -> tuple[int | float, int, int]:
        is_float = 1 if isinstance(x, float) else 0
        negative_zero = 1 if isinstance(x, float) and math.copysign(1.0, x) < 0 else 0
        if want_max:
            return (x, -is_float, -negative_zero)
        return (x, is_float, -negative_zero)

    return max(values, key=rank) if want_max else min(values, key=rank)


def _weighted_mean(ns: Sequence[int], means: Sequence[float], total: int) -> float:
    try:
        mean = math.fsum(n * m for n, m in zip(ns, means, strict=True)) / total
    except (OverflowError, ValueError):
        mean = math.nan
    if not math.isfinite(mean):
        # n*mean overflowed; weights n/N <= 1 cannot overflow.
        mean = math.fsum((n / total) * m for n, m in zip(ns, means, strict=True))
    return mean


def _merge_moments(states: Sequence[MomentsState]) -> MomentsState:
    live = [s for s in states if s.n > 0]
    if not live:
        return MomentsState(n=0, mean=0.0, m2=0.0)
    if len(live) == 1:
        return live[0]
    # k-way Chan et al.: M2 = Σ M2_i + Σ n_i (mean_i - mean)^2. fsum makes both
    # sums independent of the order of the parts.
    ns = [s.n for s in live]
    total = sum(ns)
    mean = _weighted_mean(ns, [s.mean for s in live], total)
    try:
        m2 = math.fsum(s.m2 for s in live) + math.fsum(s.n * (s.mean - mean) ** 2 for s in live)
    except OverflowError:
        m2 = math.inf
    return MomentsState(n=total, mean=mean, m2=m2)


def merge_many(
    states: Sequence[AggregateState],
    *,
    aggregate: Aggregate | None = None,
    checked: bool = False,
) -> AggregateState:
    """Merge any number of states of one aggregate; the result does not depend on their order.

    Args:
        states: one or more states of the same kind.
        aggregate: the aggregate they belong to. Required for
            :class:`~hansa.protocol.messages.MinMaxState` (a min and a max share
            one state kind); when given, every state is checked against it.
        checked: every state already passed the checks against ``aggregate``
            (:func:`check_answer` did): they are not repeated.

    Returns:
        The merged state, as the same aggregate over the union of the rows
        would produce.

    Raises:
        ProtocolError: ``INVALID_FIELD`` for no states, mixed kinds, a kind
            that does not fit ``aggregate``, an invalid state (negative count,
            non-finite float, histogram bins that differ, sketches with
            different ``alpha``).
        TooLargeError: the merged state cannot be represented: a sketch store
            beyond ``MAX_SKETCH_BUCKETS``, an integer sum, count or histogram
            count beyond the wire's 64-bit range, a float sum or moments beyond
            the double range.
        HansaError: ``INTERNAL`` when min/max states are merged without the aggregate.
    """
    if not states:
        raise _invalid("no states to merge")
    kind = type(states[0])
    if not checked:
        for state in states:
            if type(state) is not kind:
                raise _invalid(f"cannot merge a {kind.__name__} with a {type(state).__name__}")
            _check_state(aggregate, state)
    first = states[0]
    if isinstance(first, CountState):
        return CountState(n=_wire_count(sum(s.n for s in _of(CountState, states)), "count"))
    if isinstance(first, SumState):
        sums = _of(SumState, states)
        return SumState(n=sum(s.n for s in sums), total=_exact_sum([s.total for s in sums]))
    if isinstance(first, MinMaxState):
        if not isinstance(aggregate, Min | Max):
            raise HansaError(
                "merging min/max states needs the aggregate (Min or Max)", ErrorCode.INTERNAL
            )
        present = [s.value for s in _of(MinMaxState, states) if s.value is not None]
        n = sum(s.n for s in _of(MinMaxState, states))
        if not present:
            return MinMaxState(n=n, value=None)
        return MinMaxState(n=n, value=_extreme(present, isinstance(aggregate, Max)))
    if isinstance(first, MomentsState):
        return _merge_moments(_of(MomentsState, states))
    if isinstance(first, HistogramState):
        hists = _of(HistogramState, states)
        width = len(first.counts)
        if any(len(h.counts) != width for h in hists):
            raise _invalid("cannot merge histograms with different numbers of bins")
        return HistogramState(
            counts=tuple(
                _wire_count(sum(col), "histogram count")
                for col in zip(*(h.counts for h in hists), strict=True)
            )
            if width
            else (),
            below=_wire_count(sum(h.below for h in hists), "histogram count"),
            above=_wire_count(sum(h.above for h in hists), "histogram count"),
        )
    return merge_sketch_many(_of(SketchState, states))


def _of(kind: type[_S], states: Sequence[AggregateState]) -> list[_S]:
    """Narrow a list already checked to hold one kind (for the type checker)."""
    return [s for s in states if isinstance(s, kind)]


def merge_states(
    a: AggregateState, b: AggregateState, *, aggregate: Aggregate | None = None
) -> AggregateState:
    """Merge two states of one aggregate (commutative; associative up to float rounding).

    Args:
        a: a state.
        b: a state of the same kind.
        aggregate: the aggregate; required when the states are ``MinMaxState``.

    Returns:
        The merged state (see :func:`merge_many`).

    Raises:
        ProtocolError: ``INVALID_FIELD`` on a kind mismatch or an invalid state.
        TooLargeError: the merged state cannot be represented (see :func:`merge_many`).
        HansaError: ``INTERNAL`` when min/max states are merged without the aggregate.
    """
    return merge_many((a, b), aggregate=aggregate)


# --- finalizing ------------------------------------------------------------------------


def finalize(aggregate: Aggregate, state: AggregateState) -> FinalValue:
    """Derive the final value of an aggregate from its (merged) state.

    Values follow SQL over the union of the rows:

    - ``Count`` → ``int``;
    - ``Sum`` → ``int`` or ``float`` total, ``None`` when no value was summed
      (SQL ``SUM`` of no values is NULL);
    - ``Mean`` → ``float``, ``None`` when ``n == 0``;
    - ``Variance`` → sample variance ``M2 / (n - 1)``, ``None`` when ``n < 2``
      (as ``VAR_SAMP``); ``Stddev`` → its square root;
    - ``Min`` / ``Max`` → the value, ``None`` when ``n == 0``;
    - ``Histogram`` → :class:`HistogramCounts`;
    - ``Quantiles`` → one estimate per rank, all ``None`` for no values.

    Args:
        aggregate: the aggregate of the query.
        state: its state.

    Returns:
        The final value.

    Raises:
        ProtocolError: ``INVALID_FIELD`` when the state does not fit the
            aggregate or is invalid.
    """
    _check_state(aggregate, state)
    match aggregate, state:
        case Count(), CountState(n=n):
            return n
        case Sum(), SumState(n=n, total=total):
            return None if n == 0 else total
        case Min() | Max(), MinMaxState(value=value):
            return value
        case Mean(), MomentsState(n=n, mean=mean):
            return None if n == 0 else float(mean)
        case Variance() | Stddev(), MomentsState(n=n, m2=m2):
            if n < 2:
                return None
            variance = max(m2, 0.0) / (n - 1)
            return math.sqrt(variance) if isinstance(aggregate, Stddev) else variance
        case Histogram(edges=edges), HistogramState(counts=counts, below=below, above=above):
            return HistogramCounts(edges=edges, counts=counts, below=below, above=above)
        case Quantiles(ranks=ranks), SketchState():
            return sketch_quantiles(state, ranks)
    raise AssertionError("unreachable: _check_state matched the kinds")  # pragma: no cover


# --- group keys -----------------------------------------------------------------------------

_TypedKey = tuple[tuple[str, object], ...]


def _typed(value: CellValue) -> tuple[str, object]:
    """The identity of a key value: its type tag plus a canonical value (module docstring)."""
    if value is None:
        return ("null", None)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        if math.isnan(value):
            return ("float", "nan")
        return ("float", value + 0.0)  # -0.0 + 0.0 == 0.0: one SQL group
    if isinstance(value, str):
        return ("str", value)
    raise _invalid(f"group key value {value!r} has an unsupported type")


def _canonical(value: CellValue) -> CellValue:
    if isinstance(value, float) and not math.isnan(value):
        return value + 0.0
    return value


def key_sort_key(key: Sequence[CellValue]) -> tuple[tuple[int, int, int | float | str, int], ...]:
    """A total order on group keys of mixed types, used to order combined rows.

    Per element: booleans (``False < True``), then numbers in numeric order
    (ints and floats interleaved, an int before an equal float, NaN after
    every number), then strings (code-point order), then ``None`` last
    (DuckDB's default ``NULLS LAST``).

    Args:
        key: a group key.

    Returns:
        A tuple that compares without ``TypeError`` across any keys.
    """
    out: list[tuple[int, int, int | float | str, int]] = []
    for value in key:
        if value is None:
            out.append((3, 0, 0, 0))
        elif isinstance(value, bool):
            out.append((0, 0, int(value), 0))
        elif isinstance(value, int):
            out.append((1, 0, value, 0))
        elif isinstance(value, float):
            if math.isnan(value):
                out.append((1, 1, 0, 1))
            else:
                out.append((1, 0, value, 1))
        else:
            out.append((2, 0, value, 0))
    return tuple(out)


# --- combining answers -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CombinedRow:
    """One cell of a combined answer.

    Attributes:
        key: the group key values (floats canonical: ``0.0``, not ``-0.0``).
        values: one final value per aggregate of the query (see
            :func:`finalize`); all ``None`` when no city released the cell.
        states: the merged state per aggregate (empty states when no city
            released the cell).
        contributors: cities whose released cell was merged, sorted.
        suppressed: ``(city, reason)`` for every city that withheld the cell,
            sorted by city.
    """

    key: tuple[CellValue, ...]
    values: tuple[FinalValue, ...]
    states: tuple[AggregateState, ...]
    contributors: tuple[str, ...]
    suppressed: tuple[tuple[str, SuppressionReason], ...] = ()

    @property
    def suppressed_by(self) -> tuple[str, ...]:
        """Cities that withheld this cell."""
        return tuple(city for city, _ in self.suppressed)

    @property
    def partial(self) -> bool:
        """True when at least one city withheld this cell."""
        return bool(self.suppressed)

    @property
    def released(self) -> bool:
        """True when at least one city released this cell."""
        return bool(self.contributors)


@dataclass(frozen=True, slots=True)
class CombinedResult:
    """The federated answer to one query.

    Attributes:
        query: the query that was answered.
        rows: one row per group key that any city released or suppressed,
            in :func:`key_sort_key` order.
        cities: the cities whose answers were combined, sorted.
    """

    query: Query
    rows: tuple[CombinedRow, ...]
    cities: tuple[str, ...]

    def get(self, key: Sequence[CellValue]) -> CombinedRow | None:
        """Return the row for a key (typed match, as in combining), or ``None``.

        Args:
            key: the group key values.

        Returns:
            The row, or ``None`` when no city released or suppressed that key.
        """
        wanted = tuple(_typed(v) for v in key)
        for row in self.rows:
            if tuple(_typed(v) for v in row.key) == wanted:
                return row
        return None

    @property
    def partial_rows(self) -> tuple[CombinedRow, ...]:
        """Rows that at least one city withheld."""
        return tuple(row for row in self.rows if row.partial)


@dataclass(slots=True)
class _Cell:
    key: tuple[CellValue, ...]
    parts: list[tuple[str, tuple[AggregateState, ...]]]
    suppressed: list[tuple[str, SuppressionReason]]


def _check_key(key: tuple[CellValue, ...], arity: int, city: str) -> _TypedKey:
    if len(key) != arity:
        raise _invalid(
            f"city {city!r}: group key {key!r} has {len(key)} values, the query groups by {arity}"
        )
    try:
        return tuple(_typed(v) for v in key)
    except ProtocolError as exc:
        raise _invalid(f"city {city!r}: {exc.message}") from exc


def check_answer(query: Query, answer: QueryAnswer) -> None:
    """Check that one answer fits ``query``, as :func:`combine_answers` would, without merging.

    The per-answer rules of :func:`combine_answers`, and nothing else: the
    dataset, each key's arity and value types, no key listed twice (released
    or suppressed), exactly one state per aggregate and of the aggregate's
    kind, the histogram bin count, and each state's own validity. An answer
    that passes is accepted by :func:`combine_answers` alone or together with
    others (barring a merged state too large for the wire, or sketches of
    different ``alpha``, which only the merge can find). The fan-out runs this
    once per reply as it arrives, so a misfit answer is that city's protocol
    error rather than the combination's failure; it costs a few microseconds
    where a one-answer ``combine_answers`` also merges and finalizes.

    Args:
        query: the query the answer claims to answer.
        answer: a decoded (and verified) answer.

    Raises:
        ProtocolError: ``INVALID_FIELD`` naming the city and the broken rule.
    """
    city = answer.responder
    if answer.dataset != query.dataset:
        raise _invalid(
            f"city {city!r} answered for dataset {answer.dataset!r}, "
            f"the query is over {query.dataset!r}"
        )
    arity = len(query.group_by)
    aggregates = query.aggregates
    seen: set[_TypedKey] = set()
    for group in answer.groups:
        typed = _check_key(group.key, arity, city)
        if typed in seen:
            raise _invalid(f"city {city!r}: group key {group.key!r} appears twice")
        seen.add(typed)
        if len(group.states) != len(aggregates):
            raise _invalid(
                f"city {city!r}: group {group.key!r} has {len(group.states)} states, "
                f"the query has {len(aggregates)} aggregates"
            )
        for position, (aggregate, state) in enumerate(zip(aggregates, group.states, strict=True)):
            try:
                _check_state(aggregate, state)
            except ProtocolError as exc:
                raise type(exc)(
                    f"city {city!r}: group {group.key!r}: aggregate #{position}: {exc.message}",
                    exc.code,
                ) from exc
    for withheld in answer.suppressed:
        typed = _check_key(withheld.key, arity, city)
        if typed in seen:
            raise _invalid(
                f"city {city!r}: group key {withheld.key!r} is listed twice "
                "(released and suppressed, or suppressed twice)"
            )
        seen.add(typed)


def combine_answers(
    query: Query, answers: Iterable[QueryAnswer], *, checked: bool = False
) -> CombinedResult:
    """Merge the cities' answers to one query, cell by cell.

    Released cells are merged by typed group key across cities; a city's
    suppressed cells add nothing and are recorded on the row. The result
    does not depend on the order of ``answers``.

    Args:
        query: the query every answer answers.
        answers: the answers to combine (at most one per city).
        checked: every answer already passed :func:`check_answer` against
            ``query`` (the fan-out checks each reply as it arrives): the
            per-state validity checks are not repeated. Everything that
            concerns several answers together is still checked.

    Returns:
        The :class:`CombinedResult`.

    Raises:
        ProtocolError: ``INVALID_FIELD`` naming the city when an answer is for
            another dataset, a city answers twice, a key has the wrong arity
            or repeats within one answer, a group does not hold exactly one
            state of the right kind per aggregate, or a state is invalid.
        TooLargeError: a merged state cannot be represented (see :func:`merge_many`).
    """
    ordered = sorted(answers, key=lambda a: a.responder)
    arity = len(query.group_by)
    aggregates = query.aggregates
    cells: dict[_TypedKey, _Cell] = {}
    cities: list[str] = []
    for answer in ordered:
        city = answer.responder
        if cities and cities[-1] == city:
            raise _invalid(f"city {city!r} answered more than once")
        cities.append(city)
        if answer.dataset != query.dataset:
            raise _invalid(
                f"city {city!r} answered for dataset {answer.dataset!r}, "
                f"the query is over {query.dataset!r}"
            )
        seen: set[_TypedKey] = set()
        for group in answer.groups:
            typed = _check_key(group.key, arity, city)
            if typed in seen:
                raise _invalid(f"city {city!r}: group key {group.key!r} appears twice")
            seen.add(typed)
            if len(group.states) != len(aggregates):
                raise _invalid(
                    f"city {city!r}: group {group.key!r} has {len(group.states)} states, "
                    f"the query has {len(aggregates)} aggregates"
                )
            for position, (aggregate, state) in enumerate(
                zip(aggregates, group.states, strict=True)
            ):
                if checked:
                    break
                try:
                    _check_state(aggregate, state)
                except ProtocolError as exc:
                    # Keep the class and code (a TooLargeError stays one), add who sent it.
                    raise type(exc)(
                        f"city {city!r}: group {group.key!r}: aggregate #{position}: {exc.message}",
                        exc.code,
                    ) from exc
            cell = cells.setdefault(typed, _Cell(tuple(_canonical(v) for v in group.key), [], []))
            cell.parts.append((city, group.states))
        for withheld in answer.suppressed:
            typed = _check_key(withheld.key, arity, city)
            if typed in seen:
                raise _invalid(
                    f"city {city!r}: group key {withheld.key!r} is listed twice "
                    "(released and suppressed, or suppressed twice)"
                )
            seen.add(typed)
            cell = cells.setdefault(
                typed, _Cell(tuple(_canonical(v) for v in withheld.key), [], [])
            )
            cell.suppressed.append((city, withheld.reason))

    rows: list[CombinedRow] = []
    for cell in cells.values():
        if cell.parts:
            try:
                states = tuple(
                    merge_many(
                        [part[position] for _, part in cell.parts],
                        aggregate=aggregate,
                        checked=checked,
                    )
                    for position, aggregate in enumerate(aggregates)
                )
            except ProtocolError as exc:
                # E.g. sketches of different alpha, or a sum beyond the wire range.
                cities_here = ", ".join(city for city, _ in cell.parts)
                raise type(exc)(
                    f"group {cell.key!r} from cities {cities_here}: {exc.message}", exc.code
                ) from exc
            values = tuple(
                finalize(aggregate, state)
                for aggregate, state in zip(aggregates, states, strict=True)
            )
        else:
            states = tuple(empty_state(aggregate) for aggregate in aggregates)
            values = tuple(None for _ in aggregates)
        rows.append(
            CombinedRow(
                key=cell.key,
                values=values,
                states=states,
                contributors=tuple(city for city, _ in cell.parts),
                suppressed=tuple(cell.suppressed),
            )
        )
    rows.sort(key=lambda row: key_sort_key(row.key))
    return CombinedResult(query=query, rows=tuple(rows), cities=tuple(cities))
