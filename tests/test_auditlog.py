"""The audit log: leaf format, durable store, group commit, crash recovery, checkpoints."""

from __future__ import annotations

import hashlib
import itertools
import random
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hansa.crypto.keys import SigningKey
from hansa.crypto.merkle import leaf_hash, verify_consistency, verify_inclusion
from hansa.crypto.note import NoteSigner, verify_checkpoint
from hansa.node import auditlog
from hansa.node.auditlog import (
    AuditLog,
    AuditLogError,
    CheckpointPolicy,
    InconsistentLogError,
    _Job,
)
from hansa.protocol import auditleaf
from hansa.protocol.auditleaf import (
    MAGIC,
    MAX_LEAF_SIZE,
    AnswerSent,
    AuditEntry,
    Decision,
    EntryType,
    KeyRotated,
    Outcome,
    RequestReceived,
    RosterInstalled,
    SettingsChanged,
    SettingsScope,
    decode_entry,
    encode_entry,
    unpack_leaf,
)
from hansa.protocol.envelope import message_id
from hansa.protocol.errors import ConfigError, ErrorCode, ProofError, ProtocolError, TooLargeError

ORIGIN = "city1.example/audit"
H1 = bytes(range(32))
H2 = bytes(range(32, 64))


def _signer(name: str = ORIGIN, seed: int = 7) -> NoteSigner:
    return NoteSigner(name, SigningKey(bytes([seed]) * 32))


def _request(i: int, t: int = 1_700_000_000_000) -> tuple[RequestReceived, bytes]:
    """A request entry and the fake envelope bytes whose hash it logs."""
    envelope = f"envelope-{i}".encode()
    return RequestReceived(t + i, message_id(envelope), hashlib.sha256(b"k%d" % i).digest()), (
        envelope
    )


# ------------------------------------------------------------------ leaf format

EXAMPLES: list[AuditEntry] = [
    RequestReceived(1, H1, H2),
    Decision(2, H1, Outcome.ANSWERED, 0, 4, "v3-0123456789ab"),
    Decision(3, H1, Outcome.ANSWERED_SUPPRESSED, 0, 4, ""),
    Decision(4, H1, Outcome.REFUSED, int(ErrorCode.PURPOSE_NOT_ALLOWED), 0, ""),
    AnswerSent(5, H1, H2),
    RosterInstalled(6, H2, 9),
    KeyRotated(7, bytes(32), H2, "node"),
    SettingsChanged(8, SettingsScope.DISCLOSURE, H1, 2**64 - 1, "trips"),
    SettingsChanged(9, SettingsScope.CONFIG, H1, 1),
]


@pytest.mark.parametrize("entry", EXAMPLES)
def test_every_entry_type_round_trips(entry: AuditEntry) -> None:
    leaf = encode_entry(entry)
    assert leaf.startswith(MAGIC)
    assert decode_entry(leaf) == entry


def test_request_received_layout_is_pinned() -> None:
    leaf = encode_entry(RequestReceived(0x0102030405060708, H1, H2))
    assert leaf == b"hansa-audit/v1\n\x01" + bytes(range(1, 9)) + H1 + H2 + b"\x00\x00"
    assert len(leaf) == 15 + 1 + 8 + 64 + 2


def test_decision_layout_is_pinned() -> None:
    leaf = encode_entry(Decision(1, H1, Outcome.REFUSED, 401, 3, "v1"))
    body = H1 + b"\x03" + struct.pack(">H", 401) + struct.pack(">Q", 3)
    assert leaf == MAGIC + b"\x02" + struct.pack(">Q", 1) + body + b"\x00\x02v1"


hashes = st.binary(min_size=32, max_size=32)
u64 = st.integers(0, 2**64 - 1)
text = st.text(max_size=40)


@st.composite
def decisions(draw: st.DrawFn) -> Decision:
    outcome = draw(st.sampled_from(Outcome))
    reason = draw(st.integers(1, 65535)) if outcome is Outcome.REFUSED else 0
    return Decision(draw(u64), draw(hashes), outcome, reason, draw(u64), draw(text))


entries: st.SearchStrategy[AuditEntry] = st.one_of(
    st.builds(RequestReceived, u64, hashes, hashes),
    decisions(),
    st.builds(AnswerSent, u64, hashes, hashes),
    st.builds(RosterInstalled, u64, hashes, u64),
    st.builds(KeyRotated, u64, hashes, hashes, text),
    st.builds(SettingsChanged, u64, st.sampled_from(SettingsScope), hashes, u64, text),
)


@given(entries)
def test_entries_round_trip(entry: AuditEntry) -> None:
    leaf = encode_entry(entry)
    assert len(leaf) <= MAX_LEAF_SIZE
    assert decode_entry(leaf) == entry


@given(entries, st.data())
def test_truncated_leaf_is_rejected(entry: AuditEntry, data: st.DataObject) -> None:
    leaf = encode_entry(entry)
    cut = data.draw(st.integers(0, len(leaf) - 1))
    with pytest.raises(ProtocolError):
        decode_entry(leaf[:cut])


@given(entries, st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_rejected(entry: AuditEntry, extra: bytes) -> None:
    with pytest.raises(ProtocolError, match="trailing"):
        decode_entry(encode_entry(entry) + extra)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    try:
        decode_entry(data)
    except ProtocolError:
        pass


@given(entries, st.data())
def test_flipped_byte_decodes_differently_or_is_rejected(
    entry: AuditEntry, data: st.DataObject
) -> None:
    leaf = bytearray(encode_entry(entry))
    at = data.draw(st.integers(0, len(leaf) - 1))
    leaf[at] ^= data.draw(st.integers(1, 255))
    try:
        assert decode_entry(bytes(leaf)) != entry
    except ProtocolError:
        pass


def test_oversize_leaf_is_rejected() -> None:
    with pytest.raises(TooLargeError):
        encode_entry(KeyRotated(1, H1, H2, "x" * MAX_LEAF_SIZE))
    big = encode_entry(KeyRotated(1, H1, H2, "x" * (MAX_LEAF_SIZE - 90)))
    assert len(big) <= MAX_LEAF_SIZE
    with pytest.raises(TooLargeError):
        decode_entry(big + bytes(MAX_LEAF_SIZE))


def _patch(leaf: bytes, offset: int, value: bytes) -> bytes:
    return leaf[:offset] + value + leaf[offset + len(value) :]


@pytest.mark.parametrize(
    ("leaf", "code"),
    [
        (_patch(encode_entry(EXAMPLES[0]), 0, b"X"), ErrorCode.MALFORMED),
        (_patch(encode_entry(EXAMPLES[0]), 13, b"2"), ErrorCode.UNSUPPORTED_VERSION),
        (_patch(encode_entry(EXAMPLES[0]), 15, b"\x07"), ErrorCode.INVALID_FIELD),
        (_patch(encode_entry(EXAMPLES[0]), 15, b"\x00"), ErrorCode.INVALID_FIELD),
        # decision: outcome byte 9, then a refusal with reason 0
        (_patch(encode_entry(EXAMPLES[1]), 24 + 32, b"\x09"), ErrorCode.INVALID_FIELD),
        (_patch(encode_entry(EXAMPLES[3]), 24 + 33, b"\x00\x00"), ErrorCode.INVALID_FIELD),
        # settings scope 0
        (_patch(encode_entry(EXAMPLES[7]), 24, b"\x00"), ErrorCode.INVALID_FIELD),
        # data on a type that carries none
        (encode_entry(EXAMPLES[0])[:-2] + b"\x00\x01x", ErrorCode.INVALID_FIELD),
        # invalid UTF-8 text
        (encode_entry(KeyRotated(1, H1, H2, "ab"))[:-2] + b"\xff\xfe", ErrorCode.INVALID_FIELD),
    ],
)
def test_bad_leaves_are_rejected_with_codes(leaf: bytes, code: ErrorCode) -> None:
    for decoder in (decode_entry, unpack_leaf):  # both forms share one check
        with pytest.raises(ProtocolError) as info:
            decoder(leaf)
        assert info.value.code is code


@given(entries)
def test_flat_and_typed_decodings_agree(entry: AuditEntry) -> None:
    leaf = encode_entry(entry)
    flat = unpack_leaf(leaf)
    assert flat.kind == _KIND[type(entry)] and flat.log_time_ms == entry.log_time_ms
    if isinstance(entry, RequestReceived):
        assert (flat.first, flat.second) == (entry.message_id, entry.requester_key_id)
    elif isinstance(entry, AnswerSent):
        assert (flat.first, flat.second) == (entry.request_id, entry.answer_id)
    elif isinstance(entry, Decision):
        want = (entry.message_id, entry.outcome, entry.reason)
        assert (flat.first, flat.outcome, flat.reason) == want
        assert (flat.version, flat.text) == (entry.disclosure_version, entry.data_version)
    elif isinstance(entry, RosterInstalled):
        assert (flat.first, flat.version) == (entry.roster_digest, entry.roster_version)
    elif isinstance(entry, KeyRotated):
        assert (flat.first, flat.second, flat.text) == (
            entry.old_key_id,
            entry.new_key_id,
            entry.role,
        )
    else:
        want2 = (entry.scope, entry.digest, entry.settings_version, entry.subject)
        assert (flat.outcome, flat.first, flat.version, flat.text) == want2


_KIND: dict[type, EntryType] = {
    RequestReceived: EntryType.REQUEST_RECEIVED,
    Decision: EntryType.DECISION,
    AnswerSent: EntryType.ANSWER_SENT,
    RosterInstalled: EntryType.ROSTER_INSTALLED,
    KeyRotated: EntryType.KEY_ROTATED,
    SettingsChanged: EntryType.SETTINGS_CHANGED,
}


def test_node_store_re_exports_the_shared_codec() -> None:
    for name in auditleaf.__all__:
        if name in auditlog.__all__:
            assert getattr(auditlog, name) is getattr(auditleaf, name), name
    assert auditlog.encode_entry is encode_entry and auditlog.RequestReceived is RequestReceived


def test_non_bytes_leaf_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        unpack_leaf("hansa-audit/v1\n" + "x" * 80)  # type: ignore[arg-type]


def test_entries_validate_their_fields() -> None:
    with pytest.raises(ProtocolError):
        RequestReceived(1, b"short", H2)
    with pytest.raises(ProtocolError):
        RequestReceived(-1, H1, H2)
    with pytest.raises(ProtocolError):
        Decision(1, H1, Outcome.ANSWERED, 401)
    with pytest.raises(ProtocolError):
        Decision(1, H1, Outcome.REFUSED, 0)
    with pytest.raises(ProtocolError):
        KeyRotated(1, H1, H2, "\ud800")


# ------------------------------------------------------------------ store


def test_append_and_reopen_round_trip(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    with AuditLog.open(db, ORIGIN) as log:
        assert log.size == 0
        first, env = _request(0)
        assert log.append(first, [env]) == 0
        rest = [_request(i)[0] for i in range(1, 5)]
        assert log.append_many(rest) == [1, 2, 3, 4]
        answer = b"answer-envelope"
        assert log.append(AnswerSent(9, first.message_id, message_id(answer)), [answer]) == 5
        root = log.root()
    with AuditLog.open(db, ORIGIN) as log:
        assert log.size == 6 and log.root() == root and log.repaired == 0
        assert log.entry(0) == first
        assert [decode_entry(b) for b in log.leaves(1, 5)] == rest
        assert log.envelope(first.message_id) == env
        assert log.envelope(message_id(answer)) == answer
        assert log.envelope(H1) is None
        assert log.index_of(first.message_id) == 0
        assert log.index_of(message_id(answer)) == 5
        with pytest.raises(AuditLogError):
            log.entry(6)


def test_wrong_origin_or_foreign_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    AuditLog.open(db, ORIGIN).close()
    with pytest.raises(AuditLogError, match="not"):
        AuditLog.open(db, "city2.example/audit")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(AuditLogError):
        AuditLog.open(junk, ORIGIN)


def test_only_one_writer_at_a_time(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    with AuditLog.open(db, ORIGIN), pytest.raises(AuditLogError, match="already open"):
        AuditLog.open(db, ORIGIN)
    AuditLog.open(db, ORIGIN).close()  # released on close


def test_closed_log_refuses_appends(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "a.db", ORIGIN)
    log.close()
    with pytest.raises(AuditLogError, match="closed"):
        log.append(_request(0)[0])


def test_group_commit_gives_contiguous_unique_indices(tmp_path: Path) -> None:
    threads, per_thread = 8, 40
    got: dict[int, list[tuple[int, RequestReceived]]] = {t: [] for t in range(threads)}
    with AuditLog.open(tmp_path / "a.db", ORIGIN) as log:
        barrier = threading.Barrier(threads)

        def worker(t: int) -> None:
            barrier.wait()
            for i in range(per_thread):
                entry = _request(t * 1000 + i)[0]
                got[t].append((log.append(entry), entry))

        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join(timeout=60)
        indices = sorted(i for items in got.values() for i, _ in items)
        assert indices == list(range(threads * per_thread))
        for items in got.values():
            assert [i for i, _ in items] == sorted(i for i, _ in items)  # per-caller order
            for index, entry in items:
                assert log.entry(index) == entry
                assert log.leaf_hash_at(index) == leaf_hash(encode_entry(entry))


def test_jobs_beyond_max_batch_are_still_committed(tmp_path: Path) -> None:
    threads, per_thread = 4, 20
    results: list[int] = []
    lock = threading.Lock()
    with AuditLog.open(tmp_path / "a.db", ORIGIN, durable=False, max_batch=1) as log:

        def worker(t: int) -> None:
            for i in range(per_thread):
                index = log.append(_request(t * 1000 + i)[0])
                with lock:
                    results.append(index)

        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join(timeout=60)
        assert sorted(results) == list(range(threads * per_thread))
        assert log.commits == threads * per_thread  # max_batch=1: one job per commit


def test_committer_loops_until_its_own_job_is_done(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "a.db", ORIGIN, max_batch=1) as log:
        # White-box: another caller's job is already at the head of the queue, and a
        # round commits one job, so the caller must run a second round for its own.
        first = _request(0)[0]
        leaf = encode_entry(first)
        other = _Job([first], [leaf], [leaf_hash(leaf)], [])
        log._queue.append(other)
        assert log.append(_request(1)[0]) == 1
        assert other.done and other.indices == [0] and other.error is None
        assert log.entry(0) == first and log.commits == 2


def test_queued_callers_share_one_commit(tmp_path: Path) -> None:
    threads = 6
    with AuditLog.open(tmp_path / "a.db", ORIGIN) as log:
        results: list[int] = []
        # White-box: pretend a leader is busy so every caller queues, then step down:
        # the caller that takes over must commit all of them in one transaction.
        with log._queue_cond:
            log._leading = True
        pool = [
            threading.Thread(target=lambda t=t: results.append(log.append(_request(t)[0])))
            for t in range(threads)
        ]
        for th in pool:
            th.start()
        for _ in range(2000):
            if len(log._queue) == threads:
                break
            threading.Event().wait(0.005)
        with log._queue_cond:
            log._leading = False
            log._queue_cond.notify_all()
        for th in pool:
            th.join(timeout=60)
        assert sorted(results) == list(range(threads))
        assert log.commits == 1


# ------------------------------------------------------------------ checkpoints and proofs


def test_checkpoints_verify_and_are_consistent(tmp_path: Path) -> None:
    signer = _signer()
    db = tmp_path / "a.db"
    notes: list[bytes] = []
    with AuditLog.open(db, ORIGIN) as log:
        for n in (1, 2, 3, 5, 8, 13):
            log.append_many([_request(log.size + i)[0] for i in range(n - log.size)])
            notes.append(log.checkpoint(signer))
    with AuditLog.open(db, ORIGIN, verifier=signer.verifier) as log:
        stored = log.checkpoints()
        assert [c.note for c in stored] == notes
        cps = [verify_checkpoint(n, signer.verifier) for n in notes]
        assert [c.size for c in cps] == [1, 2, 3, 5, 8, 13]
        for a in cps:
            for b in cps:
                if a.size <= b.size:
                    proof = log.consistency_proof(a.size, b.size)
                    assert verify_consistency(a.size, b.size, a.root_hash, b.root_hash, proof)
        last = cps[-1]
        for index in range(last.size):
            proof = log.inclusion_proof(index, last.size)
            h = log.leaf_hash_at(index)
            assert verify_inclusion(h, index, last.size, proof, last.root_hash)
            assert not verify_inclusion(
                h, (index + 1) % last.size, last.size, proof, last.root_hash
            )
        mid = _request(4)[0].message_id
        index, proof = log.inclusion_proof_for(mid, 5)
        assert index == 4
        assert verify_inclusion(log.leaf_hash_at(4), 4, 5, proof, cps[3].root_hash)
        with pytest.raises(ProofError):
            log.inclusion_proof_for(H1)
        with pytest.raises(ProofError):
            log.consistency_proof(3, 14)


def test_checkpoint_needs_the_origin_key(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "a.db", ORIGIN) as log, pytest.raises(ConfigError):
        log.checkpoint(_signer("city2.example/audit"))


def test_checkpoint_signed_by_another_key_is_refused_on_open(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    with AuditLog.open(db, ORIGIN) as log:
        log.append(_request(0)[0])
        log.checkpoint(_signer(seed=9))
    with pytest.raises(InconsistentLogError):
        AuditLog.open(db, ORIGIN, verifier=_signer().verifier)


def test_policy_due_after_n_entries_or_t_seconds() -> None:
    policy = CheckpointPolicy(every_seconds=10.0, every_entries=100, last_time=0.0)
    assert not policy.due(5.0, 0)  # nothing new
    assert not policy.due(5.0, 99)
    assert policy.due(5.0, 100)  # N entries
    assert policy.due(10.0, 1)  # T seconds with growth
    policy.record(10.0, 50)
    assert not policy.due(1000.0, 50)  # unchanged tree: no new checkpoint
    assert not policy.due(19.9, 149)
    assert policy.due(20.0, 51)
    assert policy.due(11.0, 150)
    with pytest.raises(ConfigError):
        CheckpointPolicy(every_seconds=0.0, every_entries=1)
    with pytest.raises(ConfigError):
        CheckpointPolicy(every_seconds=1.0, every_entries=0)


def test_checkpoint_if_due(tmp_path: Path) -> None:
    signer = _signer()
    policy = CheckpointPolicy(every_seconds=60.0, every_entries=3)
    with AuditLog.open(tmp_path / "a.db", ORIGIN) as log:
        made = []
        for i in range(7):
            log.append(_request(i)[0])
            made.append(log.checkpoint_if_due(signer, policy, now=1.0) is not None)
        assert made == [False, False, True, False, False, True, False]
        assert log.checkpoint_if_due(signer, policy, now=61.0) is not None
        assert [c.size for c in log.checkpoints()] == [3, 6, 7]


# ------------------------------------------------------------------ tampering and torn tails


def _filled(db: Path, n: int, checkpoint_at: int | None) -> None:
    with AuditLog.open(db, ORIGIN) as log:
        for i in range(n):
            log.append(_request(i)[0])
            if log.size == checkpoint_at:
                log.checkpoint(_signer())


def _sql(db: Path, statement: str, *args: object) -> None:
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(statement, args)
    conn.close()


def test_modified_leaf_under_checkpoint_is_detected(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    _filled(db, 6, checkpoint_at=6)
    forged = encode_entry(RequestReceived(1, H1, H2))  # decodes fine, different hash
    _sql(db, "UPDATE leaves SET leaf = ? WHERE idx = 2", forged)
    with pytest.raises(InconsistentLogError, match="do not match"):
        AuditLog.open(db, ORIGIN)


def test_damaged_or_missing_leaf_under_checkpoint_is_not_repaired(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    _filled(db, 6, checkpoint_at=4)
    _sql(db, "UPDATE leaves SET leaf = ? WHERE idx = 3", b"garbage")
    with pytest.raises(InconsistentLogError, match="damaged"):
        AuditLog.open(db, ORIGIN)
    db2 = tmp_path / "b.db"
    _filled(db2, 6, checkpoint_at=6)
    _sql(db2, "DELETE FROM leaves WHERE idx = 5")
    with pytest.raises(InconsistentLogError):
        AuditLog.open(db2, ORIGIN)


def test_checkpoint_beyond_stored_leaves_is_detected(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    _filled(db, 4, checkpoint_at=4)
    _sql(db, "UPDATE checkpoints SET root = ?", H1)
    with pytest.raises(InconsistentLogError):
        AuditLog.open(db, ORIGIN)


def test_edited_envelope_is_detected_when_read(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "a.db", ORIGIN) as log:
        entry, env = _request(0)
        log.append(entry, [env])
        _sql(tmp_path / "a.db", "UPDATE envelopes SET envelope = ?", b"forged")
        with pytest.raises(InconsistentLogError):
            log.envelope(entry.message_id)


def test_edited_checkpoint_row_is_detected(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    _filled(db, 4, checkpoint_at=4)
    _sql(db, "UPDATE checkpoints SET root = 'text'")
    with pytest.raises(InconsistentLogError, match="types"):
        AuditLog.open(db, ORIGIN)


def test_nothing_is_repaired_when_a_checkpoint_fails(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    _filled(db, 6, checkpoint_at=3)
    _sql(db, "UPDATE leaves SET leaf = ? WHERE idx = 0", encode_entry(EXAMPLES[0]))
    _sql(db, "UPDATE leaves SET leaf = ? WHERE idx = 5", b"torn")
    with pytest.raises(InconsistentLogError):
        AuditLog.open(db, ORIGIN)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM leaves").fetchone() == (6,)  # evidence kept
    conn.close()


def test_damaged_tail_beyond_checkpoints_is_repaired_and_reported(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    _filled(db, 6, checkpoint_at=3)
    good = AuditLog.open(db, ORIGIN)
    root4 = good.root(4)
    good.close()
    _sql(db, "UPDATE leaves SET leaf = ? WHERE idx = 4", encode_entry(EXAMPLES[0])[:-1])
    with AuditLog.open(db, ORIGIN) as log:
        assert log.repaired == 2 and log.size == 4 and log.root() == root4
        assert log.append(_request(99)[0]) == 4  # appends continue
    with AuditLog.open(db, ORIGIN) as log:
        assert log.repaired == 0 and log.size == 5
    _sql(db, "INSERT INTO leaves VALUES (7, ?)", encode_entry(EXAMPLES[0]))  # a gap at 5
    with AuditLog.open(db, ORIGIN) as log:
        assert log.repaired == 1 and log.size == 5


def test_torn_last_wal_write_loses_only_the_last_commit(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    torn = tmp_path / "torn.db"
    with AuditLog.open(db, ORIGIN) as log:
        for i in range(10):
            log.append(_request(i)[0])  # ten commits, all still in the WAL
        root9 = log.root(9)
        # A crash mid-write of the last commit: the file as it was, minus the WAL's tail.
        torn.write_bytes(db.read_bytes())
        wal = Path(str(db) + "-wal").read_bytes()
        Path(str(torn) + "-wal").write_bytes(wal[:-100])
    with AuditLog.open(torn, ORIGIN) as log:
        assert log.size == 9 and log.root() == root9  # SQLite dropped the torn frame
        assert log.append(_request(10)[0]) == 9


# ------------------------------------------------------------------ crash test

CHILD = """
import sys, threading, time
from hansa.crypto.keys import SigningKey
from hansa.crypto.note import NoteSigner
from hansa.node.auditlog import AuditLog, CheckpointPolicy, RequestReceived
from hansa.protocol.envelope import message_id

db, origin, seed, tag = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), sys.argv[4]
signer = NoteSigner(origin, SigningKey(seed))
log = AuditLog.open(db, origin, verifier=signer.verifier)
policy = CheckpointPolicy(every_seconds=0.02, every_entries=8)
out = threading.Lock()
print("ready", flush=True)

def run(t):
    for i in range(1_000_000):
        env = f"{tag}-{t}-{i}".encode()
        mid = message_id(env)
        index = log.append(RequestReceived(int(time.time() * 1000), mid, mid), [env])
        with out:
            print(index, mid.hex(), flush=True)
        if t == 0:
            log.checkpoint_if_due(signer, policy, time.monotonic())

threads = [threading.Thread(target=run, args=(t,)) for t in range(3)]
for th in threads:
    th.start()
for th in threads:
    th.join()
"""


def test_sigkill_at_random_moments_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    db = tmp_path / "audit.db"
    signer = _signer()
    rng = random.Random(5)
    acked: dict[int, bytes] = {}
    for round_ in range(20):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(db), ORIGIN, (bytes([7]) * 32).hex(), str(round_)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            readable, _, _ = select.select([proc.stdout], [], [], 30.0)
            assert readable, "child did not start"
            assert proc.stdout.readline() == b"ready\n", proc.stderr.read() if proc.stderr else ""
            threading.Event().wait(rng.uniform(0.05, 0.3))
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        for line in out.split(b"\n")[:-1]:  # a last line without newline was cut mid-print
            raw_index, raw_mid = line.split()
            acked[int(raw_index)] = bytes.fromhex(raw_mid.decode())
        with AuditLog.open(db, ORIGIN, verifier=signer.verifier) as log:
            assert log.repaired == 0
            for index, mid in acked.items():
                assert log.index_of(mid) == index
                entry = log.entry(index)
                assert isinstance(entry, RequestReceived) and entry.message_id == mid
                assert log.envelope(mid) is not None
            cps = log.checkpoints()
            for a, b in itertools.pairwise(cps):
                if a.size:
                    proof = log.consistency_proof(a.size, b.size)
                    assert verify_consistency(a.size, b.size, a.root_hash, b.root_hash, proof)
            size = log.size
            assert log.append(_request(10_000 + round_)[0]) == size  # appends continue
    assert len(acked) >= 20  # the children really did acknowledge entries
    with AuditLog.open(db, ORIGIN, verifier=signer.verifier) as log:
        assert len(log.checkpoints()) >= 2  # and signed checkpoints that were re-verified


def test_envelope_ids_given_by_the_caller_key_the_envelopes(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "a.db", ORIGIN) as log:
        entry, env = _request(0)
        log.append_many([entry], [env], envelope_ids=[entry.message_id])
        assert log.envelope(entry.message_id) == env
        with pytest.raises(ConfigError):
            log.append_many([_request(1)[0]], [env], envelope_ids=[])
        with pytest.raises(ConfigError):
            log.append_many([_request(1)[0]], [env], envelope_ids=[b"short"])
        assert log.size == 1  # a rejected call appends nothing
        # A wrong id is caught when the envelope is read (it does not hash to its key).
        other, other_env = _request(2)
        log.append_many([other], [other_env], envelope_ids=[bytes(32)])
        with pytest.raises(InconsistentLogError):
            log.envelope(bytes(32))
