"""verify_log's signature checks spread over processes: the same report however spread.

:func:`~hansa.federation.audit.verify_log` hands envelopes to worker processes in chunks
while it reads the leaves, takes back the chunks no worker has started, and checks the
results in log order. These tests build logs in memory (leaves from the shared codec,
real sealed envelopes), tamper with entries in the middle, and check that the failures
land on the right entries and that 0, 1 or 2 workers, and any chunking, give the same
report.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hansa.crypto.envelope import seal
from hansa.crypto.keys import SigningKey
from hansa.federation import audit
from hansa.federation.audit import AuditReport, LogContents, usable_cpus, verify_log
from hansa.federation.roster import Analyst, Member, Role, RootKey, Roster
from hansa.protocol.auditleaf import (
    KEY_ROLE_LOG,
    KEY_ROLE_NODE,
    AnswerSent,
    AuditEntry,
    Decision,
    KeyRotated,
    Outcome,
    RequestReceived,
    encode_entry,
)
from hansa.protocol.envelope import decode_envelope, encode_envelope, message_id
from hansa.protocol.errors import ErrorCode
from hansa.protocol.messages import (
    Count,
    PolicyTags,
    Query,
    QueryAnswer,
    QueryRefusal,
    QueryRequest,
    ResultScope,
)
from hansa.protocol.messages import Decision as AnswerDecision

CITY = "amsterdam"
ORIGIN = f"hansa/test/{CITY}"
NOW = 1_800_000_000_000
NODE_KEY = SigningKey(b"\x61" * 32)
ANALYST_KEYS = [SigningKey(bytes([0x70 + i]) * 32) for i in range(3)]
STRANGER = SigningKey(b"\x7f" * 32)
ROSTER = Roster(
    alliance="test",
    version=1,
    expires_ms=NOW + 86_400_000,
    threshold=1,
    root_keys=(RootKey(CITY, NODE_KEY.public_key.raw),),
    members=(Member(CITY, "A", NODE_KEY.public_key.raw, "http://127.0.0.1:1", (Role.MEMBER,)),),
    analysts=tuple(
        Analyst(f"a{i}@{CITY}", k.public_key.raw, CITY, ("test",))
        for i, k in enumerate(ANALYST_KEYS)
    ),
    purposes=("test",),
)


def request(
    i: int,
    *,
    nonce: bytes | None = None,
    key: SigningKey | None = None,
    targets: tuple[str, ...] = (CITY,),
) -> bytes:
    """The ``i``-th request envelope, signed by analyst ``i % 3`` (or ``key``)."""
    principal = f"a{i % 3}@{CITY}"
    body = QueryRequest(
        requester=principal,
        issued_at=NOW + i,
        expires_at=NOW + i + 60_000,
        nonce=i.to_bytes(16, "big") if nonce is None else nonce,
        roster_version=1,
        policy=PolicyTags("test", "test", ResultScope.ALLIANCE, principal),
        query=Query(dataset="listings", aggregates=(Count(),)),
        targets=targets,
        quorum=1,
    )
    return seal(body, ANALYST_KEYS[i % 3] if key is None else key)


def answer(i: int, request_id: bytes) -> bytes:
    """The node's signed answer to the ``i``-th request."""
    body = QueryAnswer(
        request_id=request_id,
        responder=CITY,
        requester=f"a{i % 3}@{CITY}",
        issued_at=NOW + i + 1,
        dataset="listings",
        dataset_version="v1-0123456789ab",
        disclosure_version=3,
        decision=AnswerDecision.ANSWERED,
        groups=(),
    )
    return seal(body, NODE_KEY)


def bad_signature(envelope: bytes) -> bytes:
    """The same envelope with one bit of its signature flipped (still canonical)."""
    env = decode_envelope(envelope)
    flipped = bytes([env.signature[0] ^ 1]) + env.signature[1:]
    return encode_envelope(msgspec.structs.replace(env, signature=flipped))


class LogBuilder:
    """Leaves and the envelopes stored beside them, as an auditor holds them."""

    def __init__(self) -> None:
        self.leaves: list[bytes] = []
        self.envelopes: dict[bytes, bytes] = {}

    def add(self, entry: AuditEntry | bytes, *envelopes: bytes) -> int:
        """Append a leaf (an entry, or raw bytes) and store ``envelopes``; its index."""
        self.leaves.append(entry if isinstance(entry, bytes) else encode_entry(entry))
        for envelope in envelopes:
            self.envelopes[message_id(envelope)] = envelope
        return len(self.leaves) - 1

    def request(self, i: int, envelope: bytes, *, store: bool = True) -> int:
        kid = decode_envelope(envelope).key_id
        entry = RequestReceived(NOW + i + 5, message_id(envelope), kid)
        return self.add(entry, *([envelope] if store else []))

    def contents(self) -> LogContents:
        return LogContents(CITY, ORIGIN, None, {}, list(enumerate(self.leaves)), self.envelopes, [])


def clean_log(n: int, *, answer_every: int = 5) -> LogBuilder:
    """``n`` logged requests; every ``answer_every``-th is decided and answered."""
    log = LogBuilder()
    for i in range(n):
        envelope = request(i)
        log.request(i, envelope)
        if i % answer_every == 0:
            mid = message_id(envelope)
            reply = answer(i, mid)
            log.add(Decision(NOW + i + 6, mid, Outcome.ANSWERED, 0, 3, "v1-0123456789ab"))
            log.add(AnswerSent(NOW + i + 7, mid, message_id(reply)), reply)
    return log


def tampered_log() -> tuple[LogBuilder, dict[int, tuple[str, str]]]:
    """A log of ~300 entries with one tampering of each kind spread through it.

    Returns:
        The log, and the expected failure per index: (check, part of the reason).
    """
    log = clean_log(60)
    expected: dict[int, tuple[str, str]] = {}
    i = 1000
    for _ in range(3):  # interleave tampered entries with clean stretches
        forged = bad_signature(request(i))
        expected[log.request(i, forged)] = ("request", "signature does not verify")
        stranger = request(i + 1, key=STRANGER)
        expected[log.request(i + 1, stranger)] = ("request", "that no roster names")
        replay = request(i + 2, nonce=(i - 1000).to_bytes(16, "big"))  # a clean one's nonce
        expected[log.request(i + 2, replay)] = ("freshness", "reuses a (requester, nonce)")
        missing = request(i + 3)
        expected[log.request(i + 3, missing, store=False)] = ("request", "is not held")
        expected[log.add(b"hansa-audit/v1\n\x01 not a leaf")] = ("entry", "undecodable leaf")
        elsewhere = request(i + 5, targets=("lisbon", "madrid"))  # signed, but not for us
        expected[log.request(i + 5, elsewhere)] = ("request", "not among its targets")
        envelope = request(i + 4)
        mid = message_id(envelope)
        log.request(i + 4, envelope)
        log.add(Decision(NOW + i + 6, mid, Outcome.ANSWERED, 0, 3, "v1-0123456789ab"))
        reply = bad_signature(answer(i + 4, mid))
        expected[log.add(AnswerSent(NOW + i + 7, mid, message_id(reply)), reply)] = (
            "answer",
            "signature does not verify",
        )
        clean = clean_log(40)
        offset = len(log.leaves)
        for leaf in clean.leaves:
            log.add(leaf)
        log.envelopes.update(clean.envelopes)
        # The clean stretch reuses request numbers 0..39: same envelopes, so replays,
        # except those answered again with the answer already released: byte-identical
        # repeats, which a node answers that way (spec §8.3).
        number = -1
        for index, leaf in enumerate(clean.leaves, offset):
            if leaf[15] == 1:  # request_received
                number += 1
                if number % 5:
                    expected[index] = ("freshness", "a replay of a message id")
        i += 10
    return log, expected


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Use the pool for any log and cut it into many small chunks."""
    monkeypatch.setattr(audit, "INLINE_LIMIT", 1)
    monkeypatch.setattr(audit, "_MIN_CHUNK", 4)
    monkeypatch.setattr(audit, "_MAX_CHUNK", 16)


def by_index(report: AuditReport) -> dict[int | None, list[tuple[str, str]]]:
    out: dict[int | None, list[tuple[str, str]]] = {}
    for failure in report.failures:
        out.setdefault(failure.index, []).append((failure.check, failure.reason))
    return out


@pytest.mark.usefixtures("small_chunks")
def test_tampered_entries_are_reported_at_their_index_on_any_worker_count() -> None:
    log, expected = tampered_log()
    contents = log.contents()
    reports = {w: verify_log(contents, [ROSTER], workers=w) for w in (0, 1, 2)}
    found = by_index(reports[0])
    assert set(found) == set(expected), sorted(map(str, set(found) ^ set(expected)))
    for index, (check, reason) in expected.items():
        assert any(c == check and reason in r for c, r in found[index]), (index, found[index])
    counts = reports[0].counts
    missing = sum(1 for _check, reason in expected.values() if reason == "is not held")
    assert reports[0].signatures == counts["request_received"] + counts["answer_sent"] - missing
    # The same report, failure for failure and in the same order, however spread.
    assert reports[1] == reports[0]
    assert reports[2] == reports[0]


def test_a_forged_signature_deep_in_a_large_log_is_found_on_the_pool() -> None:
    # Above INLINE_LIMIT with the real chunk sizes, so the pool checks it.
    n = audit.INLINE_LIMIT + 100
    log = LogBuilder()
    forged_at = n * 3 // 4
    for i in range(n):
        envelope = request(i)
        log.request(i, bad_signature(envelope) if i == forged_at else envelope)
    report = verify_log(log.contents(), [ROSTER], workers=1)
    assert [(f.index, f.check, f.reason) for f in report.failures] == [
        (forged_at, "request", "signature does not verify")
    ]
    assert report.signatures == n
    assert report.counts == {"request_received": n}


def _slow_worker_chunk(envelopes: Sequence[bytes], kinds: bytes) -> list[audit._Wire]:
    """A worker that takes 50 ms per chunk: this process must check most chunks itself."""
    time.sleep(0.05)
    return audit._check_chunk(envelopes, kinds, audit._KEYS)


@pytest.mark.usefixtures("small_chunks")
def test_this_process_checks_the_chunks_no_worker_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = clean_log(200)
    contents = log.contents()
    inline = verify_log(contents, [ROSTER], workers=0)
    here: list[int] = []
    check_chunk = audit._check_chunk

    def counting(
        envelopes: Sequence[bytes], kinds: bytes, keys: Mapping[bytes, bytes]
    ) -> list[audit._Wire]:
        if os.getpid() == parent:
            here.append(len(envelopes))
        return check_chunk(envelopes, kinds, keys)

    parent = os.getpid()
    monkeypatch.setattr(audit, "_worker_chunk", _slow_worker_chunk)
    monkeypatch.setattr(audit, "_check_chunk", counting)
    report = verify_log(contents, [ROSTER], workers=1)
    assert report == inline
    assert inline and report.signatures == 200 + 40
    # The slow worker holds at most one chunk running and two queued at a time; this
    # process takes back the rest as soon as its own work is done.
    assert len(here) >= 1
    assert sum(here) >= report.signatures // 2


@pytest.mark.usefixtures("small_chunks")
def test_progress_counts_every_signature_in_order() -> None:
    log = clean_log(100)
    seen: list[tuple[str, int, int]] = []
    report = verify_log(log.contents(), [ROSTER], workers=1, progress=lambda *a: seen.append(a))
    signed = [(done, total) for phase, done, total in seen if phase == "signatures"]
    assert ("tree", len(log.leaves), len(log.leaves)) in seen
    assert len(signed) > 1  # many chunks
    assert [d for d, _t in signed] == sorted(d for d, _t in signed)
    assert signed[-1] == (report.signatures, report.signatures)


CLEAN = clean_log(50, answer_every=3)
TAMPERED, _EXPECTED = tampered_log()


@settings(max_examples=60, deadline=None)
@given(
    low=st.integers(min_value=0, max_value=40),
    spread=st.integers(min_value=0, max_value=60),
    tampered=st.booleans(),
)
def test_any_chunking_gives_the_same_report(low: int, spread: int, tampered: bool) -> None:
    contents = (TAMPERED if tampered else CLEAN).contents()
    want = verify_log(contents, [ROSTER], workers=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(audit, "_MIN_CHUNK", low)  # 0 too: a chunk is never empty
        mp.setattr(audit, "_MAX_CHUNK", low + spread)
        got = verify_log(contents, [ROSTER], workers=0)
    assert got == want
    assert bool(got) != tampered


def test_usable_cpus_is_what_this_process_may_run_on() -> None:
    n = usable_cpus()
    assert 1 <= n <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert n == len(os.sched_getaffinity(0))


def test_the_collector_is_restored_after_verify() -> None:
    import gc

    assert gc.isenabled()
    verify_log(CLEAN.contents(), [ROSTER], workers=0)
    assert gc.isenabled()
    gc.disable()
    try:
        verify_log(CLEAN.contents(), [ROSTER], workers=0)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_answers_must_be_signed_by_the_node_key_the_log_says_is_in_force() -> None:
    kid = NODE_KEY.public_key.key_id
    other = SigningKey(b"\x62" * 32).public_key.key_id
    log = LogBuilder()
    log.add(KeyRotated(NOW, bytes(32), kid, KEY_ROLE_NODE))  # the first start
    answered = clean_log(10, answer_every=2)
    for leaf in answered.leaves:
        log.add(leaf)
    log.envelopes.update(answered.envelopes)
    assert verify_log(log.contents(), [ROSTER], workers=0).failures == []

    # The log then claims a rotation to another key, yet keeps answering with the old one.
    rotated = log.add(KeyRotated(NOW + 100, kid, other, KEY_ROLE_NODE))
    envelope = request(50)
    mid = message_id(envelope)
    log.request(50, envelope)
    log.add(Decision(NOW + 56, mid, Outcome.ANSWERED, 0, 3, "v1-0123456789ab"))
    reply = answer(50, mid)
    sent = log.add(AnswerSent(NOW + 57, mid, message_id(reply)), reply)
    # And a rotation from a key that was never in force.
    bogus = log.add(KeyRotated(NOW + 200, bytes([9]) * 32, kid, KEY_ROLE_NODE))
    failures = verify_log(log.contents(), [ROSTER], workers=0).failures
    assert [(f.index, f.check) for f in failures] == [(bogus, "key"), (sent, "answer")]
    assert f"#{rotated}" in failures[1].reason
    # Other roles' rotations do not bear on the node key.
    log2 = LogBuilder()
    log2.add(KeyRotated(NOW, bytes(32), other, KEY_ROLE_LOG))
    for leaf in answered.leaves:
        log2.add(leaf)
    log2.envelopes.update(answered.envelopes)
    assert verify_log(log2.contents(), [ROSTER], workers=0).failures == []


def test_a_repeat_is_accepted_only_with_the_answer_already_released() -> None:
    log = LogBuilder()
    envelope = request(7)
    mid = message_id(envelope)
    reply = answer(7, mid)
    for _ in range(2):  # the node answered, then answered a byte-identical repeat
        log.request(7, envelope)
        log.add(Decision(NOW + 13, mid, Outcome.ANSWERED, 0, 3, "v1-0123456789ab"))
        log.add(AnswerSent(NOW + 14, mid, message_id(reply)), reply)
    assert verify_log(log.contents(), [ROSTER], workers=0).failures == []

    # A repeat given a freshly signed (different) answer: released twice, a replay.
    fresh = seal(msgspec.structs.replace(decode_answer(reply), issued_at=NOW + 99), NODE_KEY)
    repeat_at = log.request(7, envelope)
    log.add(Decision(NOW + 15, mid, Outcome.ANSWERED, 0, 3, "v1-0123456789ab"))
    log.add(AnswerSent(NOW + 16, mid, message_id(fresh)), fresh)
    failures = verify_log(log.contents(), [ROSTER], workers=0).failures
    assert [(f.index, f.check) for f in failures] == [(repeat_at, "freshness")]
    assert "a replay of a message id" in failures[0].reason


def decode_answer(envelope: bytes) -> QueryAnswer:
    return msgspec.msgpack.decode(decode_envelope(envelope).payload, type=QueryAnswer)


def test_a_misaddressed_request_the_node_refused_is_no_failure() -> None:
    # The node logs a verified request before its audience check (spec §16.2); refusing
    # one that does not list the city is right, answering it is not.
    log = LogBuilder()
    elsewhere = request(3, targets=("lisbon",))
    mid = message_id(elsewhere)
    log.request(3, elsewhere)
    refusal = QueryRefusal(
        request_id=mid,
        responder=CITY,
        requester=f"a{3 % 3}@{CITY}",
        issued_at=NOW + 9,
        code=ErrorCode.WRONG_AUDIENCE,
        reason="not addressed to this city",
    )
    sealed = seal(refusal, NODE_KEY)
    log.add(Decision(NOW + 9, mid, Outcome.REFUSED, int(ErrorCode.WRONG_AUDIENCE), 0, ""))
    log.add(AnswerSent(NOW + 10, mid, message_id(sealed)), sealed)
    assert verify_log(log.contents(), [ROSTER], workers=0).failures == []

    answered = request(4, targets=("lisbon",))
    mid = message_id(answered)
    at = log.request(4, answered)
    reply = answer(4, mid)
    log.add(Decision(NOW + 10, mid, Outcome.ANSWERED, 0, 3, "v1-0123456789ab"))
    log.add(AnswerSent(NOW + 11, mid, message_id(reply)), reply)
    failures = verify_log(log.contents(), [ROSTER], workers=0).failures
    assert [(f.index, f.check) for f in failures] == [(at, "request")]
    assert "not among its targets" in failures[0].reason
