"""Prometheus text exposition for the node, hand-written (no extra dependency).

The node keeps a few counters and one histogram in memory and renders them
in the Prometheus text format, version 0.0.4
(https://prometheus.io/docs/instrumenting/exposition_formats/). All updates
happen on the event loop thread, so no locking is needed.

Series:

* ``hansa_requests_total{route, outcome, code}``: HTTP requests handled, by
  route template, outcome (``answered``, ``refused`` = signed refusal,
  ``rejected`` = unsigned error, ``ok`` for the other routes) and error code
  name (``none`` when there is no error).
* ``hansa_verification_failures_total{code}``: requests whose envelope did
  not verify or whose requester could not be identified.
* ``hansa_query_duration_seconds``: latency of ``POST /v1/query`` from the
  first byte read to the response body being ready, a histogram with the
  standard Prometheus client buckets.
* ``hansa_queries_in_flight`` and ``hansa_replay_cache_entries`` (requests
  remembered by the replay guard): gauges read
  when the page is rendered.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Final

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "NodeMetrics",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""The media type of the Prometheus text format."""

DEFAULT_BUCKETS: Final[tuple[float, ...]] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""The Prometheus client libraries' default histogram buckets, in seconds."""


def _escape_label(value: str) -> str:
    # Exposition format: backslash, double quote and line feed are escaped.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class Counter:
    """A monotonically increasing counter with a fixed set of label names.

    Args:
        name: metric name (``_total`` suffix by convention).
        help_text: one-line description.
        labelnames: label names; every increment gives one value per name.
    """

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help_text = help_text
        self.labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` (≥ 0) to the series named by ``labels``.

        Raises:
            ValueError: wrong number of labels or a negative amount.
        """
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name} takes {len(self.labelnames)} labels")
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        """Return the current value of one series (0 when never incremented)."""
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        """Return the exposition lines of this metric."""
        lines = [
            f"# HELP {self.name} {_escape_help(self.help_text)}",
            f"# TYPE {self.name} counter",
        ]
        for labels, value in sorted(self._values.items()):
            lines.append(f"{self.name}{_labels(self.labelnames, labels)} {_number(value)}")
        return lines


class Gauge:
    """A gauge whose value is read from a callback at render time.

    Args:
        name: metric name.
        help_text: one-line description.
        read: returns the current value.
    """

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.name = name
        self.help_text = help_text
        self._read = read

    def render(self) -> list[str]:
        """Return the exposition lines of this metric."""
        return [
            f"# HELP {self.name} {_escape_help(self.help_text)}",
            f"# TYPE {self.name} gauge",
            f"{self.name} {_number(float(self._read()))}",
        ]


class Histogram:
    """A cumulative histogram without labels.

    Args:
        name: metric name (``_seconds`` suffix for durations).
        help_text: one-line description.
        buckets: strictly increasing finite upper bounds; ``+Inf`` is implicit.

    Raises:
        ValueError: the buckets are empty, unordered or not finite.
    """

    def __init__(
        self, name: str, help_text: str, buckets: Sequence[float] = DEFAULT_BUCKETS
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or any(not math.isfinite(b) for b in bounds):
            raise ValueError("histogram buckets must be finite and non-empty")
        if any(b <= a for a, b in itertools.pairwise(bounds)):
            raise ValueError("histogram buckets must be strictly increasing")
        self.name = name
        self.help_text = help_text
        self.buckets = bounds
        self._counts = [0] * (len(bounds) + 1)  # last slot: above every bound (+Inf only)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        # The first bound >= value (bisect in C: this runs once per query); past the
        # last bound (and NaN, which compares false with every bound) -> the +Inf slot.
        index = bisect.bisect_left(self.buckets, value) if value == value else len(self.buckets)
        self._counts[index] += 1
        self._sum += value
        self._count += 1

    @property
    def count(self) -> int:
        """Number of observations so far."""
        return self._count

    def render(self) -> list[str]:
        """Return the exposition lines of this metric (cumulative buckets)."""
        lines = [
            f"# HELP {self.name} {_escape_help(self.help_text)}",
            f"# TYPE {self.name} histogram",
        ]
        running = 0
        for bound, n in zip(self.buckets, self._counts, strict=False):
            running += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self._count}')
        lines.append(f"{self.name}_sum {_number(self._sum)}")
        lines.append(f"{self.name}_count {self._count}")
        return lines


class NodeMetrics:
    """The node's metrics registry.

    Args:
        in_flight: returns the number of queries executing or queued.
        replay_entries: returns the number of entries in the replay cache.
        witness_alarms: returns the number of equivocations this node's witness holds.
    """

    def __init__(
        self,
        *,
        in_flight: Callable[[], float] = lambda: 0.0,
        replay_entries: Callable[[], float] = lambda: 0.0,
        witness_alarms: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.requests = Counter(
            "hansa_requests_total",
            "HTTP requests handled, by route, outcome and error code.",
            ("route", "outcome", "code"),
        )
        self.verification_failures = Counter(
            "hansa_verification_failures_total",
            "Requests whose envelope failed verification or whose requester is unknown.",
            ("code",),
        )
        self.query_latency = Histogram(
            "hansa_query_duration_seconds",
            "Latency of POST /v1/query, from reading the body to the response being ready.",
        )
        self._gauges = (
            Gauge("hansa_queries_in_flight", "Queries executing or waiting for a slot.", in_flight),
            Gauge(
                "hansa_replay_cache_entries",
                "Requests remembered by the replay cache.",
                replay_entries,
            ),
            Gauge(
                "hansa_witness_equivocation_alarms",
                "Proven equivocations (two inconsistent signed checkpoints) this witness holds.",
                witness_alarms,
            ),
        )

    def render(self) -> str:
        """Return the whole exposition page (ends with a newline)."""
        lines: list[str] = []
        lines += self.requests.render()
        lines += self.verification_failures.render()
        lines += self.query_latency.render()
        for gauge in self._gauges:
            lines += gauge.render()
        return "\n".join(lines) + "\n"
