"""Freshness and replay rules for requests (``spec/protocol.md`` §8).

The guard is pure: callers pass ``now_ms`` (integer milliseconds since the
Unix epoch), so tests are deterministic. A request is accepted once when

1. its audience is this city;
2. ``issued_at - max_skew <= now`` (not future-dated beyond the skew);
3. ``now < expires_at`` (not expired);
4. ``expires_at - issued_at <= max_validity``;
5. neither its message id nor its ``(requester, nonce)`` pair was seen before.

Seen entries are remembered until their request's ``expires_at`` plus the
skew, after which rule 3 rejects any replay on its own, so the cache holds at
most the requests of one validity window and is bounded by ``capacity``. When
the cache is full of unexpired entries the guard refuses new requests rather
than forget one (forgetting would re-open a replay window).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Final

from hansa.protocol.errors import ErrorCode, FreshnessError

__all__ = ["FreshnessLimits", "ReplayGuard"]

DEFAULT_MAX_SKEW_MS: Final = 30_000
DEFAULT_MAX_VALIDITY_MS: Final = 300_000
DEFAULT_CAPACITY: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class FreshnessLimits:
    """Freshness parameters (all in milliseconds, capacity in entries).

    Attributes:
        max_skew_ms: tolerated clock skew for future-dated ``issued_at``.
        max_validity_ms: largest accepted ``expires_at - issued_at``.
        capacity: most unexpired entries the replay cache holds.
    """

    max_skew_ms: int = DEFAULT_MAX_SKEW_MS
    max_validity_ms: int = DEFAULT_MAX_VALIDITY_MS
    capacity: int = DEFAULT_CAPACITY


class ReplayGuard:
    """Time-window checks plus a bounded seen-id cache.

    Args:
        audience: this city's id; requests addressed elsewhere are refused.
        limits: the freshness parameters.
    """

    def __init__(self, audience: str, limits: FreshnessLimits | None = None) -> None:
        self.audience = audience
        self.limits = limits or FreshnessLimits()
        self._seen: dict[bytes, int] = {}
        self._expiry: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def check(
        self,
        *,
        message_id: bytes,
        requester: str,
        nonce: bytes,
        audience: str,
        issued_at: int,
        expires_at: int,
        now_ms: int,
    ) -> None:
        """Check a request and remember it; raise if it must be refused.

        Args:
            message_id: SHA-256 of the request envelope.
            requester: the requester's principal id.
            nonce: the request's 16-byte nonce.
            audience: the city the request is addressed to.
            issued_at: request ``issued_at`` (ms).
            expires_at: request ``expires_at`` (ms).
            now_ms: the current time (ms).

        Raises:
            FreshnessError: with code ``WRONG_AUDIENCE``, ``NOT_YET_VALID``,
                ``EXPIRED``, ``VALIDITY_TOO_LONG``, ``REPLAYED`` or
                ``REPLAY_CACHE_FULL``.
        """
        self.check_window(
            audience=audience, issued_at=issued_at, expires_at=expires_at, now_ms=now_ms
        )
        self._purge(now_ms)
        pair_key = b"n" + requester.encode() + b"\x00" + nonce
        id_key = b"i" + message_id
        if id_key in self._seen or pair_key in self._seen:
            raise FreshnessError("request was already seen", ErrorCode.REPLAYED)
        if len(self._seen) + 2 > 2 * self.limits.capacity:
            raise FreshnessError("replay cache is full", ErrorCode.REPLAY_CACHE_FULL)
        forget_at = expires_at + self.limits.max_skew_ms
        for key in (id_key, pair_key):
            self._seen[key] = forget_at
            heapq.heappush(self._expiry, (forget_at, key))

    def check_window(self, *, audience: str, issued_at: int, expires_at: int, now_ms: int) -> None:
        """Apply rules 1–4 without touching the cache.

        Raises:
            FreshnessError: as for :meth:`check`, except the replay codes.
        """
        if audience != self.audience:
            raise FreshnessError(
                f"request is addressed to {audience!r}, not {self.audience!r}",
                ErrorCode.WRONG_AUDIENCE,
            )
        if issued_at - self.limits.max_skew_ms > now_ms:
            raise FreshnessError("request is dated in the future", ErrorCode.NOT_YET_VALID)
        if now_ms >= expires_at:
            raise FreshnessError("request has expired", ErrorCode.EXPIRED)
        if expires_at - issued_at > self.limits.max_validity_ms:
            raise FreshnessError(
                f"validity exceeds {self.limits.max_validity_ms} ms", ErrorCode.VALIDITY_TOO_LONG
            )

    def _purge(self, now_ms: int) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now_ms:
            _, key = heapq.heappop(expiry)
            self._seen.pop(key, None)
