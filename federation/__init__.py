"""Hansa federation: what the alliance shares (roster, combining, evidence).

Pure logic: no sockets, no asyncio. :mod:`hansa.federation.sketch` holds the
quantile sketch, :mod:`hansa.federation.combine` merges per-city aggregate
states into one federated answer.
"""

from hansa.federation.combine import (
    CombinedResult,
    CombinedRow,
    FinalValue,
    HistogramCounts,
    combine_answers,
    empty_state,
    expected_state_type,
    finalize,
    key_sort_key,
    merge_many,
    merge_states,
)
from hansa.federation.sketch import (
    DEFAULT_ALPHA,
    SKETCH_SQL_INDEX,
    SKETCH_SQL_SIGN,
    ZERO_THRESHOLD,
    bucket_index,
    gamma,
    ln_gamma,
    merge_sketches,
    sketch_from_buckets,
    sketch_from_values,
    sketch_quantile,
    sketch_quantiles,
    sketch_sql_index,
    sketch_sql_sign,
)

__all__ = [
    "DEFAULT_ALPHA",
    "SKETCH_SQL_INDEX",
    "SKETCH_SQL_SIGN",
    "ZERO_THRESHOLD",
    "CombinedResult",
    "CombinedRow",
    "FinalValue",
    "HistogramCounts",
    "bucket_index",
    "combine_answers",
    "empty_state",
    "expected_state_type",
    "finalize",
    "gamma",
    "key_sort_key",
    "ln_gamma",
    "merge_many",
    "merge_sketches",
    "merge_states",
    "sketch_from_buckets",
    "sketch_from_values",
    "sketch_quantile",
    "sketch_quantiles",
    "sketch_sql_index",
    "sketch_sql_sign",
]
