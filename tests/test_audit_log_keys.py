"""The auditor ties each log key to the log sizes it was in force for (spec §16.2).

The node logs ``key_rotated`` for its log key before it signs anything with a new one,
so the key in force for a checkpoint of size ``S`` is the one the last log-key rotation
with an index below ``S`` names: that entry is inside the tree the checkpoint signs. A
retired log key (perhaps leaked since) must not vouch for a larger tree, even when the
auditor is given an old roster that names it. Most logs here are built in memory from the
shared leaf codec; one goes through a node's log store, ``hansa audit import`` and
``hansa audit verify``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_audit import CITY, NOW, ORIGIN, ROOT_KEY, build, import_, make_roster, serve

from hansa.crypto.keys import SigningKey
from hansa.crypto.merkle import MerkleTree, leaf_hash
from hansa.crypto.note import Checkpoint, NoteSigner, sign_note
from hansa.federation.audit import (
    AuditorStore,
    AuditReport,
    LogContents,
    SeenCheckpoint,
    verify_log,
)
from hansa.federation.roster import Roster, decode_roster, encode_signed_roster, sign_roster
from hansa.federation.roster import unsigned as unsigned_roster
from hansa.node.auditlog import AuditLog
from hansa.node.cli import EXIT_VERIFY_FAILED, main
from hansa.protocol.auditleaf import (
    KEY_ROLE_LOG,
    KEY_ROLE_NODE,
    KEY_ROLE_WITNESS,
    AuditEntry,
    KeyRotated,
    SettingsChanged,
    SettingsScope,
    encode_entry,
)

ZERO = bytes(32)
NODE_KEY = SigningKey(b"\x51" * 32)
LOG_KEYS = [SigningKey(bytes([0x52 + i]) * 32) for i in range(3)]
SIGNERS = [NoteSigner(ORIGIN, key) for key in LOG_KEYS]
KIDS = [key.public_key.key_id for key in LOG_KEYS]


def roster(version: int, log_key: SigningKey) -> Roster:
    """Roster ``version``, naming ``log_key`` as the city's log key (no witness quorum)."""
    base = decode_roster(make_roster(NODE_KEY, None, log_key=log_key.public_key.raw).body)
    return msgspec.structs.replace(base, version=version)


ROSTERS = [roster(i + 1, key) for i, key in enumerate(LOG_KEYS)]


def filler(i: int) -> AuditEntry:
    """An entry no other check looks at (a configuration change)."""
    return SettingsChanged(NOW + i, SettingsScope.CONFIG, bytes([i % 256]) * 32, i)


class Log:
    """Leaves and checkpoints as an auditor holds them, built entry by entry."""

    def __init__(self) -> None:
        self.leaves: list[bytes] = []
        self.checkpoints: list[SeenCheckpoint] = []

    def add(self, entry: AuditEntry) -> int:
        self.leaves.append(encode_entry(entry))
        return len(self.leaves) - 1

    def fill(self, n: int) -> None:
        for _ in range(n):
            self.add(filler(len(self.leaves)))

    def rotate(self, old: bytes, new: bytes, role: str = KEY_ROLE_LOG) -> int:
        return self.add(KeyRotated(NOW, old, new, role))

    def root(self, size: int) -> bytes:
        return MerkleTree.from_leaf_hashes([leaf_hash(x) for x in self.leaves]).root_at(size)

    def sign(self, size: int, *signers: NoteSigner) -> None:
        """Keep a checkpoint of ``size`` signed by ``signers`` (of the leaves held now)."""
        text = Checkpoint(ORIGIN, size, self.root(size)).to_text()
        note = sign_note(text, signers)
        self.checkpoints.append(SeenCheckpoint(note, size, self.root(size), len(self.checkpoints)))

    def contents(self, held: int | None = None) -> LogContents:
        leaves = list(enumerate(self.leaves))[:held]
        return LogContents(CITY, ORIGIN, None, {}, leaves, {}, self.checkpoints)


def verify(log: Log, rosters: Sequence[Roster] = ROSTERS, held: int | None = None) -> AuditReport:
    return verify_log(log.contents(held), rosters, workers=0)


def reasons(report: AuditReport, check: str = "checkpoint") -> list[str]:
    return [f.reason for f in report.failures if f.check == check]


def rotated_log() -> tuple[Log, int]:
    """Log key 0 from the first start, rotated to key 1 at the returned index."""
    log = Log()
    log.rotate(ZERO, KIDS[0])
    log.fill(5)
    log.sign(3, SIGNERS[0])
    log.sign(6, SIGNERS[0])
    at = log.rotate(KIDS[0], KIDS[1])
    log.fill(4)
    return log, at


# --- (a) each checkpoint under the key of its size ----------------------------------------


def test_checkpoints_before_and_after_a_rotation_verify_under_the_key_of_their_size() -> None:
    log, at = rotated_log()
    log.sign(at, SIGNERS[0])  # the rotation entry is not inside this tree
    log.sign(at + 1, SIGNERS[1])  # ...and is inside this one
    log.sign(len(log.leaves), SIGNERS[1])
    report = verify(log, ROSTERS[:2])
    assert report, [str(f) for f in report.failures]
    assert report.largest_checkpoint == len(log.leaves) == report.size
    # Every checkpoint follows a recorded log key: no fall-back warning.
    assert not any("every trusted log key" in w for w in report.warnings), report.warnings


def test_a_note_also_signed_by_the_key_in_force_verifies() -> None:
    log, at = rotated_log()
    log.sign(at + 2, SIGNERS[0], SIGNERS[1])  # a transitional note with both signatures
    assert verify(log, ROSTERS[:2])


# --- (b) a retired key beyond its rotation ------------------------------------------------


def test_a_retired_log_key_cannot_vouch_beyond_its_rotation() -> None:
    log, at = rotated_log()
    log.sign(at + 1, SIGNERS[1])
    size = len(log.leaves)
    log.sign(size, SIGNERS[0])  # signed with the old (leaked) key after the rotation
    # The auditor was handed only the old roster, which names the old key.
    for rosters in ([ROSTERS[0]], ROSTERS[:2], ROSTERS[1::-1]):
        report = verify(log, rosters)
        (bad,) = [r for r in reasons(report) if f"checkpoint of size {size} " in r]
        assert f"log key {KIDS[0].hex()[:16]}" in bad
        assert f"retired by key_rotated #{at}" in bad
        assert f"in force there is {KIDS[1].hex()[:16]}… (key_rotated #{at})" in bad
        assert report.largest_checkpoint < size
    # The old roster alone cannot check the new key's checkpoint either, and says why.
    report = verify(log, [ROSTERS[0]])
    (new,) = [r for r in reasons(report) if f"checkpoint of size {at + 1}:" in r]
    assert "not signed by any known key" in new and "no supplied roster names it" in new


def test_a_key_the_log_never_put_in_force_is_refused_even_if_a_roster_names_it() -> None:
    log, _at = rotated_log()
    log.sign(len(log.leaves), SIGNERS[2])
    (bad,) = reasons(verify(log))
    assert "never recorded as in force below that size" in bad
    # Before the log recorded any log key the rosters' keys are all accepted, and the
    # report says so.
    early = Log()
    early.fill(3)
    early.sign(2, SIGNERS[2])
    first = early.rotate(ZERO, KIDS[0])
    early.fill(2)
    early.sign(first, SIGNERS[1])  # the rotation is not inside this tree either
    early.sign(len(early.leaves), SIGNERS[0])
    report = verify(early)
    assert report, [str(f) for f in report.failures]
    (warning,) = [w for w in report.warnings if "every trusted log key" in w]
    assert warning.startswith(f"2 checkpoint(s) of size up to {first} ")
    assert f"(#{first})" in warning and "a retired log key would pass" in warning


def test_a_log_that_records_no_log_key_accepts_every_named_key_with_a_warning() -> None:
    log = Log()
    log.rotate(ZERO, NODE_KEY.public_key.key_id, KEY_ROLE_NODE)  # other roles do not count
    log.fill(4)
    log.sign(2, SIGNERS[0])
    log.sign(5, SIGNERS[1])
    report = verify(log, ROSTERS[:2])
    assert report, [str(f) for f in report.failures]
    assert any("the log records no log key" in w for w in report.warnings), report.warnings


def test_a_checkpoint_beyond_the_leaves_held_is_judged_by_the_rotations_held() -> None:
    log, at = rotated_log()
    size = len(log.leaves)
    log.sign(size, SIGNERS[0])
    log.sign(size - 1, SIGNERS[1])
    held = at + 2  # the auditor holds the rotation, not the rest
    report = verify(log, held=held)
    old = [r for r in reasons(report) if f"checkpoint of size {size} " in r]
    assert len(old) == 1 and f"retired by key_rotated #{at}" in old[0]
    # Under the key in force, it fails only for covering leaves not held: a later
    # rotation the auditor has not fetched may yet retire that key too.
    new = [r for r in reasons(report) if f"checkpoint of size {size - 1} " in r]
    assert new == [f"checkpoint of size {size - 1} covers more leaves than the {held} held"]


# --- (c) the rotations must chain ---------------------------------------------------------


def test_a_broken_log_key_rotation_chain_fails() -> None:
    log, _at = rotated_log()
    bogus = log.rotate(KIDS[2], KIDS[2])  # from a key that was never in force
    log.fill(2)
    log.sign(len(log.leaves), SIGNERS[2])  # the key it names is in force from there on
    report = verify(log)
    assert [(f.index, f.check) for f in report.failures] == [(bogus, "key")]
    assert report.failures[0].reason.startswith("log key rotated from a key the log did not")
    # A first log key with a non-zero old id is as broken.
    first = Log()
    first.rotate(KIDS[1], KIDS[0])
    first.fill(1)
    first.sign(2, SIGNERS[0])
    assert [(f.index, f.check) for f in verify(first).failures] == [(0, "key")]


def test_a_rotation_back_to_a_retired_log_key_fails() -> None:
    # Whoever holds the retired key appends a rotation back to it, chained from the key
    # in force, and signs on with the retired key: the checkpoint alone would pass.
    log, at = rotated_log()
    back = log.rotate(KIDS[1], KIDS[0])
    log.fill(1)
    log.sign(len(log.leaves), SIGNERS[0])
    report = verify(log)
    assert [(f.index, f.check) for f in report.failures] == [(back, "key")]
    assert f"rotated back to {KIDS[0].hex()[:16]}…, retired by key_rotated #{at}" in (
        report.failures[0].reason
    )
    # Onward to a key never retired is a rotation like any other.
    log, at = rotated_log()
    log.rotate(KIDS[1], KIDS[2])
    log.fill(1)
    log.sign(len(log.leaves), SIGNERS[2])
    assert verify(log).failures == []


def test_witness_key_rotations_chain_too() -> None:
    log, _at = rotated_log()
    witness = [SigningKey(bytes([0x5A + i]) * 32).public_key.key_id for i in range(2)]
    log.rotate(ZERO, witness[0], KEY_ROLE_WITNESS)
    log.rotate(witness[0], witness[1], KEY_ROLE_WITNESS)
    assert verify(log).failures == []
    skipped = log.rotate(witness[0], witness[1], KEY_ROLE_WITNESS)  # not from the last
    assert [(f.index, f.check) for f in verify(log).failures] == [(skipped, "key")]


# --- (d) the rule, for any rotations and checkpoints --------------------------------------

N = 24


@settings(max_examples=100, deadline=None)
@given(
    rotations=st.lists(
        st.tuples(st.integers(0, N - 1), st.integers(0, 2)), max_size=4, unique_by=lambda r: r[0]
    ),
    checkpoints=st.lists(
        st.tuples(st.integers(1, N), st.integers(0, 2)),
        min_size=1,
        max_size=5,
        unique_by=lambda c: c[0],
    ),
)
def test_accepted_exactly_when_signed_by_the_last_rotation_below_its_size(
    rotations: list[tuple[int, int]], checkpoints: list[tuple[int, int]]
) -> None:
    schedule = dict(rotations)  # index -> key number
    log = Log()
    last: int | None = None
    retired: set[int] = set()
    back = set()  # rotations back to a retired key: each fails, yet counts
    for i in range(N):
        if i in schedule:
            log.rotate(ZERO if last is None else KIDS[last], KIDS[schedule[i]])
            if schedule[i] in retired:
                back.add(i)
            if last is not None and last != schedule[i]:
                retired.add(last)
            last = schedule[i]
        else:
            log.add(filler(i))
    for size, signer in checkpoints:
        log.sign(size, SIGNERS[signer])
    report = verify(log)  # every roster: each of the three keys is named by one of them

    rejected = set()
    for reason in reasons(report):
        found = re.match(r"checkpoint of size (\d+) ", reason)
        assert found is not None, reason
        rejected.add(int(found.group(1)))
    expected = set()
    unrecorded = False
    for size, signer in checkpoints:
        below = [i for i in sorted(schedule) if i < size]
        if not below:
            unrecorded = True  # nothing says which key: every named key is accepted
        elif schedule[below[-1]] != signer:
            expected.add(size)
    assert rejected == expected
    assert {f.index for f in report.failures if f.check == "key"} == back
    assert {f.check for f in report.failures} <= {"checkpoint", "key"}
    assert any("every trusted log key" in w for w in report.warnings) == unrecorded


# --- through the node's store and the command line ----------------------------------------


def test_hansa_audit_verify_reports_a_checkpoint_under_a_retired_log_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = build(tmp_path, n=2, quorum=None)
    old, new = world.log_signer, NoteSigner(ORIGIN, LOG_KEYS[1])
    # Hansa key ids (crypto/keys.py), not the 4-byte note key ids of the signers.
    old_id, new_id = old.signing_key.key_id, new.signing_key.key_id
    with AuditLog.open(world.db, ORIGIN, durable=False) as log:
        # An older log: its first record of the log key comes with an upgrade.
        log.append(KeyRotated(NOW + 100, ZERO, old_id, KEY_ROLE_LOG))
        serve(log, world, 10)
        log.checkpoint(old)
        rotation = log.append(KeyRotated(NOW + 200, old_id, new_id, KEY_ROLE_LOG))
        serve(log, world, 11)
        log.checkpoint(new)
        serve(log, world, 12)
        forged = log.checkpoint(old)  # the retired key, leaked, signs a larger tree
        forged_size = log.size
    import_(world, tmp_path / "store", cosign=())
    rosters = []
    for version, signer in ((1, old), (2, new)):
        signed = make_roster(world.node_key, None, log_key=signer.verifier.public_key.raw)
        body = msgspec.structs.replace(decode_roster(signed.body), version=version)
        rosters.append(body)
        path = tmp_path / f"v{version}.roster"
        path.write_bytes(encode_signed_roster(sign_roster(unsigned_roster(body), ROOT_KEY)))
    with AuditorStore.open(tmp_path / "store", CITY) as store:
        contents = store.contents()
    assert any(seen.note == forged for seen in contents.checkpoints)
    report = verify_log(contents, rosters, workers=0)
    (bad,) = reasons(report)
    assert bad.startswith(f"checkpoint of size {forged_size} is signed by log key")
    assert f"retired by key_rotated #{rotation}" in bad
    assert report.largest_checkpoint == forged_size - 3  # the new key's checkpoint

    argv = ["audit", "verify", "--store", str(tmp_path / "store"), "--workers", "0"]
    for version in (1, 2):
        argv += ["--roster", str(tmp_path / f"v{version}.roster")]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == EXIT_VERIFY_FAILED
    assert f"retired by key_rotated #{rotation}" in out
    assert "FAILED" in out
