"""The tlog-witness: cosigning, conflicts, bad proofs and signatures, equivocation alarms."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hansa.crypto.keys import SigningKey
from hansa.crypto.merkle import EMPTY_ROOT, MerkleTree
from hansa.crypto.note import (
    Checkpoint,
    CosignatureSigner,
    Note,
    NoteSigner,
    NoteVerifier,
    open_checkpoint,
    sign_checkpoint,
)
from hansa.federation.roster import Member, Role, RootKey, Roster
from hansa.node.cli import EXIT_ERROR, EXIT_VERIFY_FAILED, main
from hansa.node.witness import (
    WITNESS_DB,
    AlarmKind,
    CosignedCheckpoint,
    EquivocationError,
    LogSignatureError,
    ProofRejectedError,
    UnknownLogError,
    Witness,
    WitnessConflict,
    WitnessError,
    WitnessStore,
    alarm_holds,
    cosignature_quorum,
    followed_logs,
    http_status,
    implied_old_root,
)
from hansa.protocol.errors import ErrorCode, NoteError

ORIGIN = "hansa/hanse/lubeck"
NOW = 1_790_000_000
LOG = NoteSigner(ORIGIN, SigningKey(bytes([1]) * 32))
COSIGNER = CosignatureSigner("witness/riga", SigningKey(bytes([2]) * 32))


def _tree(n: int, tag: bytes = b"") -> MerkleTree:
    tree = MerkleTree()
    for i in range(n):
        tree.append(b"entry-%d" % i + (tag if i >= 3 else b""))
    return tree


def _note(tree: MerkleTree, size: int | None = None, signer: NoteSigner = LOG) -> bytes:
    size = tree.size if size is None else size
    return sign_checkpoint(Checkpoint(ORIGIN, size, tree.root_at(size)), signer)


def _verifiers(origin: str) -> NoteVerifier | None:
    return LOG.verifier if origin == ORIGIN else None


@pytest.fixture
def witness(tmp_path: Path) -> Iterator[Witness]:
    with WitnessStore(tmp_path / WITNESS_DB) as store:
        yield Witness(store, COSIGNER, _verifiers)


def _cosigned(note: bytes, line: bytes) -> bytes:
    """The note with the returned cosignature line merged in, as the log does."""
    return note + line


# ------------------------------------------------------------------ happy path


def test_a_growing_log_is_cosigned_and_remembered(witness: Witness) -> None:
    tree = _tree(11)
    first = _note(tree, 3)
    line = witness.add_checkpoint(first, 0, [], NOW)
    assert line.startswith("— witness/riga ".encode())
    opened = open_checkpoint(_cosigned(first, line), LOG.verifier, witnesses=[COSIGNER.verifier])
    assert [c.timestamp for c in opened.cosignatures] == [NOW]

    second = _note(tree, 11)
    line2 = witness.add_checkpoint(second, 3, tree.consistency_proof(3, 11), NOW + 5)
    opened2 = open_checkpoint(_cosigned(second, line2), LOG.verifier, witnesses=[COSIGNER.verifier])
    assert opened2.cosigners() == {"witness/riga"}

    # Same size again: a fresh cosignature with a new timestamp (tlog-witness freshness).
    line3 = witness.add_checkpoint(second, 11, [], NOW + 9)
    assert line3 != line2
    latest = witness.store.latest(ORIGIN)
    assert latest is not None
    assert (latest.size, latest.root_hash, latest.cosigned_at) == (11, tree.root(), NOW + 9)
    # The stored note holds exactly the log's line and the witness's line, both valid.
    stored = open_checkpoint(latest.note, LOG.verifier, witnesses=[COSIGNER.verifier])
    assert len(Note.from_bytes(latest.note).signatures) == 2
    assert [c.timestamp for c in stored.cosignatures] == [NOW + 9]
    assert [c.size for c in witness.store.cosigned(ORIGIN)] == [11, 3]
    assert witness.store.origins() == [ORIGIN]
    assert witness.alarm_count == 0 and witness.alarms() == []


def test_state_survives_reopening(tmp_path: Path) -> None:
    tree = _tree(6)
    with WitnessStore(tmp_path / WITNESS_DB) as store:
        Witness(store, COSIGNER, _verifiers).add_checkpoint(_note(tree, 5), 0, [], NOW)
    with WitnessStore(tmp_path / WITNESS_DB) as store:
        w = Witness(store, COSIGNER, _verifiers)
        with pytest.raises(WitnessConflict) as info:
            w.add_checkpoint(_note(tree, 6), 0, [], NOW)
        assert info.value.last_size == 5
        w.add_checkpoint(_note(tree, 6), 5, tree.consistency_proof(5, 6), NOW)


def test_empty_tree_first_then_growth(witness: Witness) -> None:
    tree = _tree(2)
    empty = sign_checkpoint(Checkpoint(ORIGIN, 0, EMPTY_ROOT), LOG)
    witness.add_checkpoint(empty, 0, [], NOW)
    # From a size-0 checkpoint old_size 0 is right and the proof must be empty.
    witness.add_checkpoint(_note(tree), 0, [], NOW)
    latest = witness.store.latest(ORIGIN)
    assert latest is not None and latest.size == 2


def test_other_cosignature_lines_are_ignored_and_dropped(witness: Witness) -> None:
    tree = _tree(4)
    other = CosignatureSigner("witness/tallinn", SigningKey(bytes([9]) * 32))
    note = Note.from_bytes(_note(tree))
    with_other = note.with_signatures(other.sign(note.text, NOW)).to_bytes()
    witness.add_checkpoint(with_other, 0, [], NOW)
    latest = witness.store.latest(ORIGIN)
    assert latest is not None
    names = [s.name for s in Note.from_bytes(latest.note).signatures]
    assert names == [ORIGIN, "witness/riga"]


# ------------------------------------------------------------------ refusals


def test_wrong_old_size_is_a_conflict_with_the_last_size(witness: Witness) -> None:
    tree = _tree(9)
    with pytest.raises(WitnessConflict) as first:
        witness.add_checkpoint(_note(tree, 4), 2, [], NOW)
    assert first.value.last_size == 0
    witness.add_checkpoint(_note(tree, 4), 0, [], NOW)
    with pytest.raises(WitnessConflict) as info:
        witness.add_checkpoint(_note(tree, 9), 3, tree.consistency_proof(3, 9), NOW)
    assert info.value.last_size == 4
    assert info.value.code is ErrorCode.ROSTER_MISMATCH
    assert http_status(info.value) == 409
    # A log that skips the witness (old size 0 again) is refused too.
    with pytest.raises(WitnessConflict):
        witness.add_checkpoint(_note(tree, 9), 0, [], NOW)


def test_bad_proofs_are_refused_without_alarm(witness: Witness) -> None:
    tree = _tree(13)
    witness.add_checkpoint(_note(tree, 5), 0, [], NOW)
    proof = tree.consistency_proof(5, 13)
    bad = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
    for wrong in (bad, proof[:-1], [], [*proof, proof[0]]):
        with pytest.raises(ProofRejectedError) as info:
            witness.add_checkpoint(_note(tree, 13), 5, wrong, NOW)
        assert http_status(info.value) == 422 and info.value.code is ErrorCode.INVALID_FIELD
    # Equal sizes need an empty proof.
    with pytest.raises(ProofRejectedError):
        witness.add_checkpoint(_note(tree, 5), 5, proof[:1], NOW)
    latest = witness.store.latest(ORIGIN)
    assert latest is not None and latest.size == 5
    assert witness.alarm_count == 0 and witness.alarms() == []


def test_first_checkpoint_rules(witness: Witness) -> None:
    tree = _tree(5)
    with pytest.raises(ProofRejectedError):
        witness.add_checkpoint(_note(tree), 0, tree.consistency_proof(1, 5), NOW)
    wrong_empty = sign_checkpoint(Checkpoint(ORIGIN, 0, bytes(32)), LOG)
    with pytest.raises(ProofRejectedError):
        witness.add_checkpoint(wrong_empty, 0, [], NOW)
    assert witness.store.latest(ORIGIN) is None


def test_bad_log_signature_unknown_origin_and_malformed(witness: Witness) -> None:
    tree = _tree(4)
    impostor = NoteSigner(ORIGIN, SigningKey(bytes([3]) * 32))
    with pytest.raises(LogSignatureError) as bad_key:
        witness.add_checkpoint(_note(tree, signer=impostor), 0, [], NOW)
    assert http_status(bad_key.value) == 403 and bad_key.value.code is ErrorCode.BAD_SIGNATURE

    # A forged signature under the real key id fails too.
    note = Note.from_bytes(_note(tree))
    sig = note.signatures[0]
    forged_sig = type(sig)(sig.name, sig.key_id, bytes(64))
    forged = Note(note.text, (forged_sig,)).to_bytes()
    with pytest.raises(LogSignatureError):
        witness.add_checkpoint(forged, 0, [], NOW)

    stranger = NoteSigner("hansa/hanse/visby", SigningKey(bytes([4]) * 32))
    other = sign_checkpoint(Checkpoint("hansa/hanse/visby", 4, tree.root()), stranger)
    with pytest.raises(UnknownLogError) as unknown:
        witness.add_checkpoint(other, 0, [], NOW)
    assert http_status(unknown.value) == 404 and unknown.value.code is ErrorCode.UNKNOWN_KEY

    for garbage in (b"", b"not a note", _note(tree)[:-5], b"\xff\xfe" * 10):
        with pytest.raises(WitnessError) as malformed:
            witness.add_checkpoint(garbage, 0, [], NOW)
        assert http_status(malformed.value) == 400
        assert malformed.value.code is ErrorCode.MALFORMED

    with pytest.raises(WitnessError) as too_old:
        witness.add_checkpoint(_note(tree), 5, [], NOW)
    assert http_status(too_old.value) == 400 and too_old.value.code is ErrorCode.INVALID_FIELD
    with pytest.raises(WitnessError):
        witness.add_checkpoint(_note(tree), 0, [b"short"], NOW)
    with pytest.raises(WitnessError):
        witness.add_checkpoint(_note(tree), -1, [], NOW)
    assert witness.store.latest(ORIGIN) is None


# ------------------------------------------------------------------ equivocation


def test_same_size_fork_raises_an_alarm_with_both_notes(
    witness: Witness, caplog: pytest.LogCaptureFixture
) -> None:
    honest, fork = _tree(6), _tree(6, tag=b"-forged")
    assert honest.root_at(3) == fork.root_at(3) and honest.root() != fork.root()
    witness.add_checkpoint(_note(honest, 3), 0, [], NOW)
    witness.add_checkpoint(_note(honest), 3, honest.consistency_proof(3, 6), NOW + 1)
    forged = _note(fork)
    errors: list[EquivocationError] = []
    with caplog.at_level(logging.ERROR, logger="hansa.node.witness"):
        # Whatever old size the log claims, same size and another root is equivocation.
        for old_size in (6, 3):
            with pytest.raises(EquivocationError) as info:
                witness.add_checkpoint(forged, old_size, [], NOW + 2)
            errors.append(info.value)
    assert [http_status(e) for e in errors] == [409, 409]
    alarm = errors[-1].alarm
    assert alarm.kind is AlarmKind.SAME_SIZE
    assert alarm.presented_note == forged
    cosigned = open_checkpoint(alarm.cosigned_note, LOG.verifier, witnesses=[COSIGNER.verifier])
    assert cosigned.checkpoint.root_hash == honest.root() and cosigned.cosigners()
    assert open_checkpoint(alarm.presented_note, LOG.verifier).checkpoint.root_hash == fork.root()
    assert witness.alarm_count == 2
    assert [a.presented_note for a in witness.alarms()] == [forged, forged]
    assert alarm.log_vkey == LOG.vkey and alarm_holds(alarm)
    # Evidence that does not prove anything is told apart on re-check.
    impostor = NoteSigner(ORIGIN, SigningKey(bytes([5]) * 32))
    assert not alarm_holds(dataclasses.replace(alarm, presented_note=_note(honest)))
    assert not alarm_holds(dataclasses.replace(alarm, log_vkey=impostor.vkey))
    assert not alarm_holds(dataclasses.replace(alarm, presented_note=_note(fork, signer=impostor)))
    assert not alarm_holds(dataclasses.replace(alarm, log_vkey="not a vkey"))
    assert sum("ALARM" in r.getMessage() for r in caplog.records) == 2
    # The witness keeps following the history it cosigned first.
    latest = witness.store.latest(ORIGIN)
    assert latest is not None and latest.root_hash == honest.root()
    witness.add_checkpoint(_note(honest), 6, [], NOW + 3)


def test_fork_behind_the_cosigned_size_is_proven_by_its_own_proof(witness: Witness) -> None:
    honest, fork = _tree(5), _tree(9, tag=b"-forged")
    witness.add_checkpoint(_note(honest), 0, [], NOW)
    # The fork's own (honest-for-the-fork) proof from 5 to 9 reaches its signed root but
    # implies a root at size 5 the witness never cosigned.
    proof = fork.consistency_proof(5, 9)
    assert implied_old_root(5, 9, fork.root(), proof) == fork.root_at(5) != honest.root()
    with pytest.raises(EquivocationError) as info:
        witness.add_checkpoint(_note(fork), 5, proof, NOW + 1)
    alarm = info.value.alarm
    assert alarm.kind is AlarmKind.INCONSISTENT_PROOF
    assert (alarm.cosigned_size, alarm.presented_size, alarm.old_size) == (5, 9, 5)
    assert alarm.proof == tuple(proof)
    assert witness.alarms() == [alarm]
    assert alarm_holds(alarm)
    assert not alarm_holds(dataclasses.replace(alarm, proof=tuple(honest.consistency_proof(3, 5))))
    assert not alarm_holds(dataclasses.replace(alarm, kind=AlarmKind.SAME_SIZE))
    assert witness.alarm_count == 1


def test_power_of_two_old_size_fork_is_refused_but_not_provable(witness: Witness) -> None:
    honest, fork = _tree(4), _tree(9, tag=b"-forged")
    witness.add_checkpoint(_note(honest), 0, [], NOW)
    with pytest.raises(ProofRejectedError):
        witness.add_checkpoint(_note(fork), 4, fork.consistency_proof(4, 9), NOW)
    assert witness.alarm_count == 0


def test_alarm_count_starts_from_the_stored_alarms(tmp_path: Path) -> None:
    honest, fork = _tree(5), _tree(5, tag=b"x")
    with WitnessStore(tmp_path / WITNESS_DB) as store:
        w = Witness(store, COSIGNER, _verifiers)
        w.add_checkpoint(_note(honest), 0, [], NOW)
        with pytest.raises(EquivocationError):
            w.add_checkpoint(_note(fork), 5, [], NOW)
    with WitnessStore(tmp_path / WITNESS_DB) as store:
        assert Witness(store, COSIGNER, _verifiers).alarm_count == 1


def test_cli_reports_alarms_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["witness", "alarms", "--data-dir", str(tmp_path)]) == EXIT_ERROR
    honest, fork = _tree(5), _tree(5, tag=b"x")
    with WitnessStore(tmp_path / WITNESS_DB) as store:
        w = Witness(store, COSIGNER, _verifiers)
        w.add_checkpoint(_note(honest), 0, [], NOW)
    capsys.readouterr()
    assert main(["witness", "alarms", "--data-dir", str(tmp_path)]) == 0
    assert "no equivocation alarms (1 logs witnessed)" in capsys.readouterr().out
    with WitnessStore(tmp_path / WITNESS_DB) as store:
        with pytest.raises(EquivocationError):
            Witness(store, COSIGNER, _verifiers).add_checkpoint(_note(fork), 5, [], NOW)
    assert main(["witness", "alarms", "--data-dir", str(tmp_path)]) == EXIT_VERIFY_FAILED
    out = capsys.readouterr().out
    assert "1 EQUIVOCATION ALARM(S)" in out and ORIGIN in out and "same-size" in out
    assert f"evidence holds: both notes verify under {LOG.vkey}" in out
    # Both signed notes are printed verbatim.
    assert _note(fork).decode() in out
    with WitnessStore(tmp_path / WITNESS_DB) as store:
        latest = store.latest(ORIGIN)
    assert latest is not None and latest.note.decode() in out


# ------------------------------------------------------------------ store and proofs


def test_advance_is_a_compare_and_swap(tmp_path: Path) -> None:
    tree = _tree(3)
    a = CosignedCheckpoint(ORIGIN, 2, tree.root_at(2), b"n2", NOW)
    b = CosignedCheckpoint(ORIGIN, 3, tree.root_at(3), b"n3", NOW)
    with WitnessStore(tmp_path / WITNESS_DB) as one, WitnessStore(tmp_path / WITNESS_DB) as two:
        assert one.advance(None, a)
        assert not two.advance(None, b)  # another writer already stored a state
        assert two.advance(a, b)
        assert not one.advance(a, b)
        assert one.latest(ORIGIN) == b


def test_a_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with WitnessStore(path) as store:
        store._conn.execute("UPDATE meta SET value = 'something-else' WHERE key = 'format'")
    with pytest.raises(WitnessError) as info:
        WitnessStore(path)
    assert info.value.code is ErrorCode.INTERNAL and http_status(info.value) == 500


@given(st.integers(1, 200), st.integers(1, 200))
def test_implied_old_root_of_honest_proofs(a: int, b: int) -> None:
    old, new = min(a, b), max(a, b)
    tree = _tree(new)
    implied = implied_old_root(old, new, tree.root(), tree.consistency_proof(old, new))
    if old == new or old & (old - 1) == 0:
        assert implied is None
    else:
        assert implied == tree.root_at(old)
        # A proof that does not reach the signed root implies nothing.
        other = _tree(new, tag=b"o").root()
        assert implied_old_root(old, new, other, tree.consistency_proof(old, new)) is None


@settings(max_examples=15)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=6))
def test_any_honest_sequence_is_cosigned(sizes: list[int]) -> None:
    tree = _tree(40)
    with tempfile.TemporaryDirectory() as tmp, WitnessStore(Path(tmp) / WITNESS_DB) as store:
        w = Witness(store, COSIGNER, _verifiers)
        last = 0
        for t, size in enumerate(sorted(sizes)):
            proof = tree.consistency_proof(last, size) if 0 < last < size else []
            w.add_checkpoint(_note(tree, size), last, proof, NOW + t)
            last = size
        latest = store.latest(ORIGIN)
        assert latest is not None and latest.size == max(sizes)


# ------------------------------------------------------------------ quorum


def test_cosignature_quorum() -> None:
    tree = _tree(4)
    witnesses = [
        CosignatureSigner(f"witness/c{i}", SigningKey(bytes([10 + i]) * 32)) for i in range(3)
    ]
    verifiers = [w.verifier for w in witnesses]
    note = Note.from_bytes(_note(tree))
    two = note.with_signatures(*(w.sign(note.text, NOW) for w in witnesses[:2])).to_bytes()
    assert cosignature_quorum(two, verifiers, 2) == (True, ("witness/c0", "witness/c1"))
    assert cosignature_quorum(two, verifiers, 3) == (False, ("witness/c0", "witness/c1"))
    assert cosignature_quorum(two, verifiers[2:], 1) == (False, ())
    assert cosignature_quorum(two, [], 0) == (True, ())
    # A listed witness whose line does not verify rejects the note (signed-note).
    bad_line = witnesses[2].sign(note.text, NOW)
    bad_line = type(bad_line)(
        bad_line.name,
        bad_line.key_id,
        bad_line.signature[:-1] + bytes([bad_line.signature[-1] ^ 1]),
    )
    three = Note.from_bytes(two).with_signatures(bad_line).to_bytes()
    assert cosignature_quorum(three, verifiers, 1) == (False, ())
    with pytest.raises(NoteError):
        cosignature_quorum(two, [LOG.verifier], 1)
    with pytest.raises(NoteError):
        cosignature_quorum(b"garbage", verifiers, 1)
    with pytest.raises(ValueError, match="quorum"):
        cosignature_quorum(two, verifiers, -1)


@settings(max_examples=25)
@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 30))
def test_any_fork_behind_a_cosigned_size_is_caught(a: int, b: int, c: int) -> None:
    fork_at, old, new = sorted((a % 29, b, c + 30))
    fork_at = min(fork_at, old - 1)
    honest = MerkleTree()
    forked = MerkleTree()
    for i in range(new):
        honest.append(b"e%d" % i)
        forked.append(b"e%d" % i if i < fork_at else b"f%d" % i)
    with tempfile.TemporaryDirectory() as tmp, WitnessStore(Path(tmp) / WITNESS_DB) as store:
        w = Witness(store, COSIGNER, _verifiers)
        w.add_checkpoint(_note(honest, old), 0, [], NOW)
        proof = forked.consistency_proof(old, new)
        if old & (old - 1) == 0:
            # Not provable (module docstring): refused, never cosigned.
            with pytest.raises(ProofRejectedError):
                w.add_checkpoint(_note(forked, new), old, proof, NOW)
        else:
            with pytest.raises(EquivocationError) as info:
                w.add_checkpoint(_note(forked, new), old, proof, NOW)
            assert alarm_holds(info.value.alarm)
        latest = store.latest(ORIGIN)
        assert latest is not None and latest.size == old


# ------------------------------------------------------------------ the roster's log keys


def _roster(log_keys: dict[str, bytes]) -> Roster:
    """Roster of hanse: lubeck, riga (this witness) and tallinn, with these log keys."""
    cities = ("lubeck", "riga", "tallinn")
    return Roster(
        alliance="hanse",
        version=1,
        expires_ms=2**40,
        threshold=1,
        root_keys=(RootKey("lubeck", SigningKey(bytes([40]) * 32).public_key.raw),),
        members=tuple(
            Member(
                city,
                city.title(),
                SigningKey(bytes([50 + i]) * 32).public_key.raw,
                f"http://127.0.0.1:{9000 + i}",
                (Role.MEMBER, Role.WITNESS),
                log_key=log_keys.get(city),
            )
            for i, city in enumerate(cities)
        ),
        analysts=(),
        purposes=(),
    )


def test_the_roster_s_log_keys_are_followed_and_win_over_the_file(tmp_path: Path) -> None:
    impostor = NoteSigner(ORIGIN, SigningKey(bytes([3]) * 32))
    riga_log = SigningKey(bytes([4]) * 32).public_key.raw
    roster = _roster({"lubeck": LOG.verifier.public_key.raw, "riga": riga_log})
    other = NoteSigner("hansa/elsewhere/x", SigningKey(bytes([5]) * 32)).verifier
    # The operator's file pins another key for lubeck's origin, and a log outside the roster.
    pinned = {ORIGIN: impostor.verifier, other.name: other}
    followed, overridden = followed_logs(pinned, roster, "riga")
    assert followed == {ORIGIN: LOG.verifier, other.name: other}  # not riga's own log
    assert overridden == [ORIGIN]
    # Without a roster (or a roster naming no log key) the file alone decides.
    assert followed_logs(pinned, None, "riga") == (pinned, [])
    assert followed_logs(pinned, _roster({}), "riga") == (pinned, [])
    # A witness following these logs cosigns the roster key's checkpoints, and refuses
    # the file's key for that origin.
    with WitnessStore(tmp_path / WITNESS_DB) as store:
        witness = Witness(store, COSIGNER, followed.get)
        tree = _tree(4)
        with pytest.raises(LogSignatureError):
            witness.add_checkpoint(_note(tree, signer=impostor), 0, [], NOW)
        line = witness.add_checkpoint(_note(tree), 0, [], NOW)
        opened = open_checkpoint(_note(tree) + line, LOG.verifier, witnesses=[COSIGNER.verifier])
        assert opened.cosigners() == {"witness/riga"}
