"""Freshness and replay rules for requests (``spec/protocol.md`` §8).

The guard is pure: callers pass ``now_ms`` (integer milliseconds since the
Unix epoch), so tests are deterministic. A request is accepted once when

1. it is addressed to this city (a query request to all its ``targets``,
   an audit request to its one ``audience``);
2. ``issued_at - max_skew <= now`` (not future-dated beyond the skew);
3. ``now < expires_at`` (not expired);
4. ``expires_at - issued_at <= max_validity``;
5. neither its message id nor its ``(requester, nonce)`` pair was seen before.

Seen requests are remembered until their ``expires_at`` plus the skew, after
which rule 3 rejects any replay on its own (the skew margin covers a clock
stepped back by up to ``max_skew_ms``), so the cache holds at most the
requests of one validity window and is bounded by ``capacity``. When the
cache is full of unexpired entries the guard refuses new requests rather
than forget one (forgetting would re-open a replay window).

The roster version a request names is checked against the roster by the
caller (``ROSTER_MISMATCH``); the guard only handles time and replay.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Final

from hansa.protocol.errors import ConfigError, ErrorCode, FreshnessError, ProtocolError
from hansa.protocol.messages import QueryRequest

__all__ = ["FreshnessLimits", "ReplayGuard"]

DEFAULT_MAX_SKEW_MS: Final = 30_000
DEFAULT_MAX_VALIDITY_MS: Final = 300_000
DEFAULT_CAPACITY: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class FreshnessLimits:
    """Freshness parameters (all in milliseconds, capacity in requests).

    Attributes:
        max_skew_ms: tolerated clock skew for future-dated ``issued_at`` (>= 0).
        max_validity_ms: largest accepted ``expires_at - issued_at`` (>= 1).
        capacity: most unexpired requests the replay cache holds (>= 1).

    Raises:
        ConfigError: a parameter is out of range.
    """

    max_skew_ms: int = DEFAULT_MAX_SKEW_MS
    max_validity_ms: int = DEFAULT_MAX_VALIDITY_MS
    capacity: int = DEFAULT_CAPACITY

    def __post_init__(self) -> None:
        if self.max_skew_ms < 0:
            raise ConfigError("max_skew_ms must be >= 0")
        if self.max_validity_ms < 1:
            raise ConfigError("max_validity_ms must be >= 1")
        if self.capacity < 1:
            raise ConfigError("replay cache capacity must be >= 1")


class ReplayGuard:
    """Time-window checks plus a bounded seen-request cache.

    Each accepted request is remembered under two keys, its message id and
    its ``(requester, nonce)`` pair; a later request matching either is a
    replay. ``len(guard)`` is the number of requests remembered.

    Args:
        audience: this city's id; requests addressed elsewhere are refused.
        limits: the freshness parameters.
    """

    def __init__(self, audience: str, limits: FreshnessLimits | None = None) -> None:
        self.audience = audience
        self.limits = limits or FreshnessLimits()
        self._ids: dict[bytes, int] = {}
        self._pairs: dict[bytes, int] = {}
        # (forget_at, message id, pair key), a min-heap on forget_at.
        self._expiry: list[tuple[int, bytes, bytes]] = []

    def __len__(self) -> int:
        return len(self._ids)

    def check_request(self, request: QueryRequest, *, message_id: bytes, now_ms: int) -> None:
        """Check a decoded request and remember it; raise if it must be refused.

        Args:
            request: the verified, decoded request body.
            message_id: SHA-256 of the request envelope.
            now_ms: the current time (ms).

        Raises:
            FreshnessError: as for :meth:`check`.
        """
        self.check(
            message_id=message_id,
            requester=request.requester,
            nonce=request.nonce,
            audience=request.targets,
            issued_at=request.issued_at,
            expires_at=request.expires_at,
            now_ms=now_ms,
        )

    def check(
        self,
        *,
        message_id: bytes,
        requester: str,
        nonce: bytes,
        audience: str | tuple[str, ...],
        issued_at: int,
        expires_at: int,
        now_ms: int,
    ) -> None:
        """Check a request and remember it; raise if it must be refused.

        Nothing is remembered when the request is refused.

        Args:
            message_id: SHA-256 of the request envelope.
            requester: the requester's principal id.
            nonce: the request's 16-byte nonce.
            audience: the city the request is addressed to, or the cities (a
                query request's ``targets``; this city must be one of them).
            issued_at: request ``issued_at`` (ms).
            expires_at: request ``expires_at`` (ms).
            now_ms: the current time (ms).

        Raises:
            FreshnessError: with code ``WRONG_AUDIENCE``, ``NOT_YET_VALID``,
                ``EXPIRED``, ``VALIDITY_TOO_LONG``, ``REPLAYED`` or
                ``REPLAY_CACHE_FULL``.
            ProtocolError: (``INVALID_FIELD``) ``expires_at <= issued_at``.
        """
        self.check_window(
            audience=audience, issued_at=issued_at, expires_at=expires_at, now_ms=now_ms
        )
        self._purge(now_ms)
        # Length-prefix the requester so that no two (requester, nonce) pairs
        # share a key, whatever bytes the caller passes.
        raw = requester.encode()
        pair_key = len(raw).to_bytes(4, "big") + raw + nonce
        if message_id in self._ids or pair_key in self._pairs:
            raise FreshnessError("request was already seen", ErrorCode.REPLAYED)
        if len(self._ids) >= self.limits.capacity:
            raise FreshnessError("replay cache is full", ErrorCode.REPLAY_CACHE_FULL)
        forget_at = expires_at + self.limits.max_skew_ms
        self._ids[message_id] = forget_at
        self._pairs[pair_key] = forget_at
        heapq.heappush(self._expiry, (forget_at, message_id, pair_key))

    def check_window(
        self, *, audience: str | tuple[str, ...], issued_at: int, expires_at: int, now_ms: int
    ) -> None:
        """Apply rules 1–4 without touching the cache.

        Args:
            audience: the city the request is addressed to, or the cities.
            issued_at: request ``issued_at`` (ms).
            expires_at: request ``expires_at`` (ms).
            now_ms: the current time (ms).

        Raises:
            FreshnessError: as for :meth:`check`, except the replay codes.
            ProtocolError: (``INVALID_FIELD``) ``expires_at <= issued_at``.
        """
        # A str is one city: never a substring test (`"a" in "ab"`).
        if isinstance(audience, str):
            elsewhere = audience != self.audience
        else:
            elsewhere = self.audience not in audience
        if elsewhere:
            shown = audience if isinstance(audience, str) else ", ".join(audience[:5])
            more = "" if isinstance(audience, str) or len(audience) <= 5 else ", ..."
            raise FreshnessError(
                f"request is addressed to {shown[:300]!r}{more}, not to {self.audience!r}",
                ErrorCode.WRONG_AUDIENCE,
            )
        if expires_at <= issued_at:
            # QueryRequest refuses this already; direct callers get the same rule.
            raise ProtocolError("expires_at must be after issued_at", ErrorCode.INVALID_FIELD)
        if issued_at - self.limits.max_skew_ms > now_ms:
            raise FreshnessError("request is dated in the future", ErrorCode.NOT_YET_VALID)
        if now_ms >= expires_at:
            raise FreshnessError("request has expired", ErrorCode.EXPIRED)
        if expires_at - issued_at > self.limits.max_validity_ms:
            raise FreshnessError(
                f"validity exceeds {self.limits.max_validity_ms} ms", ErrorCode.VALIDITY_TOO_LONG
            )

    def _purge(self, now_ms: int) -> None:
        """Forget requests whose ``expires_at + max_skew`` has passed."""
        expiry = self._expiry
        while expiry and expiry[0][0] <= now_ms:
            _, mid, pair_key = heapq.heappop(expiry)
            del self._ids[mid]
            del self._pairs[pair_key]
