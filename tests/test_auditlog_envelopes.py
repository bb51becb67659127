"""Where the audit log keeps envelopes: by the leaf that logs them (new stores), by hash
(older stores); pre-encoded leaves passed to ``append_many``; and the node's per-request
leaves, encoded directly, byte for byte as the shared leaf codec encodes the entries."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hansa.crypto.merkle import leaf_hash
from hansa.node.auditlog import (
    MAX_LEAF_SIZE,
    AnswerSent,
    AuditEntry,
    AuditLog,
    Decision,
    InconsistentLogError,
    Outcome,
    RequestReceived,
    SettingsChanged,
    SettingsScope,
    encode_entry,
    reply_leaves,
    request_received_leaf,
)
from hansa.protocol.envelope import message_id
from hansa.protocol.errors import ProtocolError, TooLargeError

ORIGIN = "city1.example/audit"
KEY_ID = hashlib.sha256(b"analyst").digest()


def _envelope(i: int) -> bytes:
    return f"envelope-{i}".encode()


def _received(envelope: bytes, t: int = 1) -> RequestReceived:
    return RequestReceived(t, message_id(envelope), KEY_ID)


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db)
    try:
        return list(conn.execute(sql).fetchall())
    finally:
        conn.close()


_ENVELOPE_INDICES = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'envelopes'"


def _stored(db: Path) -> dict[bytes, int]:
    """The stored envelopes' hashes and rowids."""
    out: dict[bytes, int] = {}
    for rowid, digest in _rows(db, "SELECT rowid, hash FROM envelopes"):
        assert isinstance(rowid, int) and isinstance(digest, bytes)
        out[digest] = rowid
    return out


def test_a_new_store_keys_envelopes_by_leaf_without_a_hash_index(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    request, answer, capabilities = _envelope(0), _envelope(1), _envelope(2)
    with AuditLog.open(db, ORIGIN) as log:
        sent = AnswerSent(2, message_id(request), message_id(answer))
        settings_changed = SettingsChanged(
            3, SettingsScope.DISCLOSURE, message_id(capabilities), 1, "trips"
        )
        log.append_many([_received(request), sent, settings_changed], [request, answer])
        log.append_many([], [capabilities])  # logged by no request or answer leaf
    assert ("envelopes", "by-leaf") in _rows(db, "SELECT key, value FROM meta")
    assert _rows(db, _ENVELOPE_INDICES) == []
    assert _stored(db) == {
        message_id(request): 0,
        message_id(answer): 1,
        message_id(capabilities): -1,
    }
    with AuditLog.open(db, ORIGIN) as log:  # found again after a restart
        for envelope in (request, answer, capabilities):
            assert log.envelope(message_id(envelope)) == envelope
        assert log.envelope(hashlib.sha256(b"never stored").digest()) is None


def test_the_same_envelope_is_stored_once(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    request = _envelope(0)
    with AuditLog.open(db, ORIGIN) as log:
        log.append(_received(request), [request])
        log.append(_received(request, 2), [request])  # a replay: logged again
        log.append_many([_received(request, 3), _received(request, 4)], [request, request])
        log.append_many([], [request])
        assert log.size == 4
        assert log.index_of(message_id(request)) == 0
        assert log.envelope(message_id(request)) == request
    assert _rows(db, "SELECT rowid FROM envelopes") == [(0,)]


def test_an_envelope_whose_leaf_came_without_it_is_stored_apart(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    request = _envelope(0)
    with AuditLog.open(db, ORIGIN) as log:
        log.append(_received(request))  # no envelope: leaf 0 logs a message id only
        assert log.envelope(message_id(request)) is None
        log.append(_received(request, 2), [request])  # leaf 1; the index keeps leaf 0
        assert log.envelope(message_id(request)) == request
    with AuditLog.open(db, ORIGIN) as log:
        assert log.envelope(message_id(request)) == request
        log.append_many([], [request])
    assert _rows(db, "SELECT rowid FROM envelopes") == [(-1,)]


def test_a_repaired_tail_frees_the_rowids_of_its_envelopes(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    with AuditLog.open(db, ORIGIN) as log:
        for i in range(4):
            log.append(_received(_envelope(i)), [_envelope(i)])
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE leaves SET leaf = ? WHERE idx = 2", (b"torn",))
    conn.close()
    with AuditLog.open(db, ORIGIN) as log:
        assert log.repaired == 2 and log.size == 2
        # Leaves 2 and 3 are gone: so are the envelopes at their rowids, and new
        # entries take those indices without a clash.
        assert log.envelope(message_id(_envelope(3))) is None
        log.append(_received(_envelope(9)), [_envelope(9)])
        log.append(_received(_envelope(3)), [_envelope(3)])
        assert log.envelope(message_id(_envelope(9))) == _envelope(9)
        assert log.envelope(message_id(_envelope(3))) == _envelope(3)
        assert log.envelope(message_id(_envelope(1))) == _envelope(1)


def test_an_edited_envelope_found_by_leaf_is_detected(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    with AuditLog.open(db, ORIGIN) as log:
        log.append(_received(_envelope(0)), [_envelope(0)])
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("UPDATE envelopes SET envelope = ?", (b"forged",))
        conn.close()
        with pytest.raises(InconsistentLogError):
            log.envelope(message_id(_envelope(0)))


@pytest.mark.parametrize("layout", ["indexed", "without-rowid"])
def test_an_older_store_keeps_finding_envelopes_by_hash(tmp_path: Path, layout: str) -> None:
    db = tmp_path / "a.db"
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE leaves (idx INTEGER PRIMARY KEY, leaf BLOB NOT NULL);"
        "CREATE TABLE checkpoints (size INTEGER PRIMARY KEY, root BLOB NOT NULL,"
        " note BLOB NOT NULL);"
        + (
            "CREATE TABLE envelopes (hash BLOB NOT NULL, envelope BLOB NOT NULL);"
            if layout == "indexed"
            else "CREATE TABLE envelopes (hash BLOB PRIMARY KEY, envelope BLOB NOT NULL)"
            " WITHOUT ROWID;"
        )
    )
    with conn:
        conn.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [("format", "hansa-audit-store/v1"), ("origin", ORIGIN)],
        )
    conn.close()
    with AuditLog.open(db, ORIGIN) as log:
        for i in range(3):
            log.append(_received(_envelope(i)), [_envelope(i)])
        log.append(_received(_envelope(0), 9), [_envelope(0)])
    with AuditLog.open(db, ORIGIN) as log:
        for i in range(3):
            assert log.envelope(message_id(_envelope(i))) == _envelope(i)
    assert len(_rows(db, "SELECT hash FROM envelopes")) == 3
    indices = _rows(db, _ENVELOPE_INDICES)
    assert (layout == "indexed") == (("envelopes_by_hash",) in indices)
    assert ("envelopes", "by-leaf") not in _rows(db, "SELECT key, value FROM meta")


def test_pre_encoded_leaves_are_stored_and_indexed_as_entries(tmp_path: Path) -> None:
    request, answer = _envelope(0), _envelope(1)
    entries: list[AuditEntry] = [
        _received(request),
        AnswerSent(2, message_id(request), message_id(answer)),
    ]
    with AuditLog.open(tmp_path / "a.db", ORIGIN) as log:
        assert log.append_many([encode_entry(e) for e in entries], [request, answer]) == [0, 1]
        assert [log.entry(i) for i in range(2)] == entries
        assert log.index_of(message_id(request)) == 0
        assert log.index_of(message_id(answer)) == 1
        assert log.leaf_hash_at(1) == leaf_hash(encode_entry(entries[1]))
        assert log.envelope(message_id(answer)) == answer


# One step: (envelope numbers the entries log, envelope numbers stored, request or answer).
_steps = st.lists(
    st.tuples(
        st.lists(st.integers(0, 7), max_size=3),
        st.lists(st.integers(0, 7), max_size=3),
        st.booleans(),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None)
@given(steps=_steps, reopen_at=st.integers(0, 12))
def test_every_stored_envelope_is_found_and_stored_once(
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[list[int], list[int], bool]],
    reopen_at: int,
) -> None:
    db = tmp_path_factory.mktemp("log") / "a.db"
    stored: set[int] = set()
    log = AuditLog.open(db, ORIGIN, durable=False)
    try:
        for n, (logged, kept, as_answer) in enumerate(steps):
            if n == reopen_at:
                log.close()
                log = AuditLog.open(db, ORIGIN, durable=False)
            entries: list[AuditEntry] = [
                AnswerSent(n, bytes(32), message_id(_envelope(i)))
                if as_answer
                else _received(_envelope(i), n)
                for i in logged
            ]
            log.append_many(entries, [_envelope(i) for i in kept])
            stored.update(kept)
        log.close()
        log = AuditLog.open(db, ORIGIN, durable=False)
        for i in range(8):
            found = log.envelope(message_id(_envelope(i)))
            assert found == (_envelope(i) if i in stored else None)
    finally:
        log.close()
    assert len(_rows(db, "SELECT hash FROM envelopes")) == len(stored)


# ------------------------------------------------------------------ the node's leaves

_hashes = st.binary(min_size=32, max_size=32)
_u64 = st.integers(0, 2**64 - 1)


@given(t=_u64, message=_hashes, key=_hashes)
def test_request_received_leaf_is_the_encoded_entry(t: int, message: bytes, key: bytes) -> None:
    assert request_received_leaf(t, message, key) == encode_entry(RequestReceived(t, message, key))


@given(
    t=_u64,
    request=_hashes,
    answer=_hashes,
    outcome=st.sampled_from(Outcome),
    refusal=st.integers(1, 2**16 - 1),
    version=_u64,
    data_version=st.text(max_size=40),
)
def test_reply_leaves_are_the_encoded_decision_and_answer_sent(
    t: int,
    request: bytes,
    answer: bytes,
    outcome: Outcome,
    refusal: int,
    version: int,
    data_version: str,
) -> None:
    reason = refusal if outcome is Outcome.REFUSED else 0
    decision, sent = reply_leaves(
        t,
        request,
        outcome,
        answer,
        reason=reason,
        disclosure_version=version,
        data_version=data_version,
    )
    assert decision == encode_entry(Decision(t, request, outcome, reason, version, data_version))
    assert sent == encode_entry(AnswerSent(t, request, answer))


def test_the_node_leaves_refuse_what_the_entries_refuse() -> None:
    good = bytes(32)
    with pytest.raises(ProtocolError):
        request_received_leaf(1, b"short", good)
    with pytest.raises(ProtocolError):
        request_received_leaf(-1, good, good)
    with pytest.raises(ProtocolError):
        reply_leaves(1, good, Outcome.ANSWERED, good, reason=5)  # an answer has no reason
    with pytest.raises(ProtocolError):
        reply_leaves(1, good, Outcome.REFUSED, good)  # a refusal needs one
    with pytest.raises(ProtocolError):
        reply_leaves(1, good, Outcome.ANSWERED, b"short")
    with pytest.raises(ProtocolError):
        reply_leaves(1, good, Outcome.ANSWERED, good, disclosure_version=2**64)
    with pytest.raises(TooLargeError):
        reply_leaves(1, good, Outcome.ANSWERED, good, data_version="v" * MAX_LEAF_SIZE)
