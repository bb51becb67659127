"""The pure replay guard: time window, audience, and the bounded seen-request cache."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from strategies import REQUEST, query_requests

from hansa.protocol import messages as m
from hansa.protocol.errors import (
    ConfigError,
    ErrorCode,
    FreshnessError,
    HansaError,
    ProtocolError,
)
from hansa.protocol.freshness import FreshnessLimits, ReplayGuard

CITY = "cape-town"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
LIMITS = FreshnessLimits(max_skew_ms=30_000, max_validity_ms=300_000, capacity=1000)


def _id(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(8, "big")).digest()


def _check(guard: ReplayGuard, **changes: Any) -> None:
    fields: dict[str, Any] = {
        "message_id": _id(1),
        "requester": "ana@melbourne",
        "nonce": bytes(16),
        "audience": CITY,
        "issued_at": T0,
        "expires_at": T0 + 60_000,
        "now_ms": T0 + 1_000,
    }
    fields.update(changes)
    guard.check(**fields)


def _refused(guard: ReplayGuard, code: ErrorCode, **changes: Any) -> None:
    before = len(guard)
    with pytest.raises(FreshnessError) as info:
        _check(guard, **changes)
    assert info.value.code == code, str(info.value)
    assert len(guard) <= before  # a refused request is never remembered


def test_a_fresh_request_is_accepted_once() -> None:
    guard = ReplayGuard(CITY, LIMITS)
    _check(guard)
    assert len(guard) == 1
    _refused(guard, ErrorCode.REPLAYED, now_ms=T0 + 2_000)
    assert len(guard) == 1


def test_same_requester_and_nonce_under_another_id_is_a_replay() -> None:
    guard = ReplayGuard(CITY, LIMITS)
    _check(guard)
    _refused(guard, ErrorCode.REPLAYED, message_id=_id(2), expires_at=T0 + 90_000)


def test_same_id_with_another_nonce_is_a_replay() -> None:
    guard = ReplayGuard(CITY, LIMITS)
    _check(guard)
    _refused(guard, ErrorCode.REPLAYED, nonce=b"\x01" * 16)


def test_distinct_requests_are_all_accepted() -> None:
    guard = ReplayGuard(CITY, LIMITS)
    _check(guard)
    _check(guard, message_id=_id(2), nonce=b"\x01" * 16)  # same requester, new nonce
    _check(guard, message_id=_id(3), requester="bo@oslo")  # same nonce, new requester
    assert len(guard) == 3


def test_requester_and_nonce_do_not_run_together() -> None:
    # ("a", 0x00 || n) and ("a\x00", n) are different pairs, whatever the encoding.
    guard = ReplayGuard(CITY, LIMITS)
    _check(guard, requester="a", nonce=b"\x00" + bytes(15))
    _check(guard, message_id=_id(2), requester="a\x00", nonce=bytes(15))
    assert len(guard) == 2


def test_wrong_audience() -> None:
    guard = ReplayGuard(CITY, LIMITS)
    _refused(guard, ErrorCode.WRONG_AUDIENCE, audience="melbourne")
    _refused(guard, ErrorCode.WRONG_AUDIENCE, audience="Cape-Town")
    # A string is one city, never a substring test; a tuple is a query's targets.
    _refused(guard, ErrorCode.WRONG_AUDIENCE, audience="cape-town-east")
    _refused(guard, ErrorCode.WRONG_AUDIENCE, audience=("melbourne", "cape-town-east"))
    _refused(guard, ErrorCode.WRONG_AUDIENCE, audience=())
    assert len(guard) == 0


def test_a_request_to_several_targets_is_accepted_by_each_listed_city() -> None:
    targets = ("melbourne", CITY, "oslo")
    for city in targets:
        guard = ReplayGuard(city, LIMITS)
        _check(guard, audience=targets)
        assert len(guard) == 1


def test_future_dated_beyond_the_skew() -> None:
    guard = ReplayGuard(CITY, LIMITS)
    now = T0
    _refused(
        guard, ErrorCode.NOT_YET_VALID, issued_at=now + 30_001, expires_at=now + 60_000, now_ms=now
    )
    # Exactly at the skew is still accepted.
    _check(guard, issued_at=now + 30_000, expires_at=now + 60_000, now_ms=now)


def test_expired() -> None:
    guard = ReplayGuard(CITY, LIMITS)
    _refused(guard, ErrorCode.EXPIRED, now_ms=T0 + 60_000)
    _refused(guard, ErrorCode.EXPIRED, now_ms=T0 + 10**9)
    _check(guard, now_ms=T0 + 59_999)


def test_validity_too_long() -> None:
    guard = ReplayGuard(CITY, LIMITS)
    _refused(guard, ErrorCode.VALIDITY_TOO_LONG, expires_at=T0 + 300_001)
    _check(guard, expires_at=T0 + 300_000)


def test_expiry_before_issue_is_an_invalid_field() -> None:
    guard = ReplayGuard(CITY, LIMITS)
    for expires_at in (T0, T0 - 1):
        with pytest.raises(ProtocolError) as info:
            _check(guard, expires_at=expires_at, now_ms=T0 - 10)
        assert info.value.code == ErrorCode.INVALID_FIELD
    assert len(guard) == 0


def test_check_window_leaves_the_cache_alone() -> None:
    guard = ReplayGuard(CITY, LIMITS)
    for _ in range(2):
        guard.check_window(audience=CITY, issued_at=T0, expires_at=T0 + 1, now_ms=T0)
    assert len(guard) == 0


def test_entries_are_forgotten_after_expiry_and_replays_stay_refused() -> None:
    guard = ReplayGuard(CITY, LIMITS)
    _check(guard)  # expires at T0 + 60 s, forgotten at T0 + 90 s
    _check(guard, message_id=_id(2), nonce=b"\x02" * 16, expires_at=T0 + 200_000)
    assert len(guard) == 2
    later = T0 + 90_000
    _check(
        guard,
        message_id=_id(3),
        nonce=b"\x03" * 16,
        issued_at=later,
        expires_at=later + 1,
        now_ms=later,
    )
    assert len(guard) == 2  # the first was forgotten, the third remembered
    # A replay of the forgotten request is refused by the clock alone.
    _refused(guard, ErrorCode.EXPIRED, now_ms=later)
    _refused(guard, ErrorCode.EXPIRED, now_ms=later + 10**6)
    # The second is still remembered.
    _refused(
        guard,
        ErrorCode.REPLAYED,
        message_id=_id(2),
        nonce=b"\x02" * 16,
        expires_at=T0 + 200_000,
        now_ms=later,
    )


def test_capacity_bound_refuses_without_evicting() -> None:
    guard = ReplayGuard(CITY, FreshnessLimits(capacity=3))
    for i in range(3):
        _check(guard, message_id=_id(i), nonce=bytes([i]) * 16, expires_at=T0 + 60_000 + i)
    _refused(guard, ErrorCode.REPLAY_CACHE_FULL, message_id=_id(9), nonce=b"\x09" * 16)
    assert len(guard) == 3
    for i in range(3):  # every live entry is still there
        _refused(
            guard,
            ErrorCode.REPLAYED,
            message_id=_id(i),
            nonce=bytes([i]) * 16,
            expires_at=T0 + 60_000 + i,
        )
    # Once the oldest is forgotten (expires_at + skew), there is room again.
    after = T0 + 60_000 + 30_000
    _check(
        guard,
        message_id=_id(9),
        nonce=b"\x09" * 16,
        issued_at=after,
        expires_at=after + 1_000,
        now_ms=after,
    )
    assert len(guard) == 3


def test_the_refused_request_is_accepted_when_room_frees_up() -> None:
    guard = ReplayGuard(CITY, FreshnessLimits(capacity=1))
    _check(guard, expires_at=T0 + 2_000)
    _refused(guard, ErrorCode.REPLAY_CACHE_FULL, message_id=_id(2), nonce=b"\x02" * 16)
    # At T0 + 32 s the first is forgotten; the refused one was never remembered.
    _check(guard, message_id=_id(2), nonce=b"\x02" * 16, expires_at=T0 + 60_000, now_ms=T0 + 32_000)


@pytest.mark.parametrize(
    "limits",
    [
        {"max_skew_ms": -1},
        {"max_validity_ms": 0},
        {"capacity": 0},
        {"capacity": -5},
    ],
)
def test_limits_are_validated(limits: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        FreshnessLimits(**limits)


def test_check_request_reads_the_request_fields() -> None:
    guard = ReplayGuard(REQUEST.targets[0], LIMITS)
    now = REQUEST.issued_at
    guard.check_request(REQUEST, message_id=_id(1), now_ms=now)
    with pytest.raises(FreshnessError) as info:
        guard.check_request(REQUEST, message_id=_id(2), now_ms=now)
    assert info.value.code == ErrorCode.REPLAYED
    other = ReplayGuard("rome", LIMITS)  # not one of the targets
    with pytest.raises(FreshnessError) as info:
        other.check_request(REQUEST, message_id=_id(1), now_ms=now)
    assert info.value.code == ErrorCode.WRONG_AUDIENCE


@given(req=query_requests(), offset=st.integers(min_value=-(10**6), max_value=10**6))
def test_generated_requests_get_a_verdict(req: m.QueryRequest, offset: int) -> None:
    guard = ReplayGuard(req.targets[-1], LIMITS)
    try:
        guard.check_request(req, message_id=_id(0), now_ms=req.issued_at + offset)
    except HansaError as exc:
        assert isinstance(exc, FreshnessError)
        assert len(guard) == 0
        return
    assert len(guard) == 1
    assert req.issued_at + offset < req.expires_at


# --- a reference model, driven by a state machine ---------------------------------------------


@dataclass(frozen=True)
class _Seen:
    message_id: bytes
    pair: tuple[str, bytes]
    forget_at: int


SKEW, VALIDITY, CAPACITY = 10, 100, 4


class ReplayGuardMachine(RuleBasedStateMachine):
    """Checks the guard against a model that never forgets a live request."""

    def __init__(self) -> None:
        super().__init__()
        limits = FreshnessLimits(max_skew_ms=SKEW, max_validity_ms=VALIDITY, capacity=CAPACITY)
        self.guard = ReplayGuard(CITY, limits)
        self.now = 1_000
        self.accepted: list[_Seen] = []
        self.requests: list[tuple[str, bytes, int, int]] = []

    def _live(self) -> list[_Seen]:
        return [s for s in self.accepted if s.forget_at > self.now]

    def _expected(self, requester: str, nonce: bytes, issued: int, expires: int) -> str:
        if issued - SKEW > self.now:
            return "NOT_YET_VALID"
        if self.now >= expires:
            return "EXPIRED"
        if expires - issued > VALIDITY:
            return "VALIDITY_TOO_LONG"
        mid = _request_id(requester, nonce, issued, expires)
        live = self._live()
        if any(s.message_id == mid or s.pair == (requester, nonce) for s in live):
            return "REPLAYED"
        if len(live) >= CAPACITY:
            return "REPLAY_CACHE_FULL"
        return "ok"

    def _submit(self, requester: str, nonce: bytes, issued: int, expires: int) -> None:
        expected = self._expected(requester, nonce, issued, expires)
        mid = _request_id(requester, nonce, issued, expires)
        try:
            self.guard.check(
                message_id=mid,
                requester=requester,
                nonce=nonce,
                audience=CITY,
                issued_at=issued,
                expires_at=expires,
                now_ms=self.now,
            )
            got = "ok"
        except FreshnessError as exc:
            got = exc.code.name
        assert got == expected
        if got == "ok":
            # Never a duplicate of a request still inside its window.
            for s in self.accepted:
                assert s.message_id != mid
                if s.pair == (requester, nonce):
                    assert s.forget_at <= self.now
            self.accepted.append(_Seen(mid, (requester, nonce), expires + SKEW))
            self.requests.append((requester, nonce, issued, expires))
        if got in {"ok", "REPLAYED", "REPLAY_CACHE_FULL"}:
            # The cache was purged on this call: it holds exactly the live requests.
            assert len(self.guard) == len(self._live())

    @rule(
        requester=st.sampled_from(["ana", "bo", "cy"]),
        nonce=st.sampled_from([bytes([i]) * 16 for i in range(4)]),
        issued_delta=st.integers(min_value=-VALIDITY, max_value=2 * SKEW),
        validity=st.integers(min_value=1, max_value=VALIDITY + 5),
    )
    def new_request(self, requester: str, nonce: bytes, issued_delta: int, validity: int) -> None:
        issued = self.now + issued_delta
        self._submit(requester, nonce, issued, issued + validity)

    @precondition(lambda self: bool(self.requests))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        self._submit(*data.draw(st.sampled_from(self.requests)))

    @rule(step=st.integers(min_value=0, max_value=VALIDITY))
    def advance(self, step: int) -> None:
        self.now += step

    @invariant()
    def bounded(self) -> None:
        assert len(self.guard) <= CAPACITY


def _request_id(requester: str, nonce: bytes, issued: int, expires: int) -> bytes:
    """A message id that, like SHA-256 of an envelope, is fixed by the content."""
    return hashlib.sha256(f"{requester}|{nonce.hex()}|{issued}|{expires}".encode()).digest()


ReplayGuardMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
TestReplayGuardMachine = ReplayGuardMachine.TestCase
