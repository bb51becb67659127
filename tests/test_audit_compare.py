"""Comparing two auditors' stores of one log (``compare_stores``, ``hansa audit compare``).

A checkpoint takes part when a log key the supplied rosters name for the city signed it
(any version), else the key both auditors pinned on first use; the others are listed,
never dropped silently. Two auditors that fetched on either side of a log-key rotation
pinned different keys: with the rosters that is no alarm, without them it is.
"""

from __future__ import annotations

import dataclasses

from test_audit_log_keys import KIDS, ROSTERS, SIGNERS, ZERO, Log

from hansa.federation.audit import LogContents, compare_stores


def _pinned(contents: LogContents, signer_index: int) -> LogContents:
    return dataclasses.replace(contents, log_vkey=SIGNERS[signer_index].verifier.vkey)


def _rotated() -> Log:
    """Log key 0, checkpoints at 3 and 6; rotated to key 1 at 6; checkpoint at 10."""
    log = Log()
    log.rotate(ZERO, KIDS[0])
    log.fill(5)
    log.sign(3, SIGNERS[0])
    log.sign(6, SIGNERS[0])
    log.rotate(KIDS[0], KIDS[1])
    log.fill(3)
    log.sign(10, SIGNERS[1])
    return log


def test_auditors_on_either_side_of_a_rotation_agree_given_the_rosters() -> None:
    log = _rotated()
    early = _pinned(log.contents(held=6), 0)
    early = dataclasses.replace(early, checkpoints=log.checkpoints[:2])
    late = _pinned(log.contents(), 1)
    report = compare_stores(early, late, ROSTERS[:2])
    assert report, report.failures
    assert report.checked_pairs == 2 * 3
    assert report.unverified == ([], [])
    # Without rosters the two pins differ, and nothing vouches for either.
    bare = compare_stores(early, late)
    assert not bare and "pinned different log keys" in bare.failures[0]


def test_checkpoints_no_known_key_signed_are_listed_not_compared() -> None:
    log = _rotated()
    log.sign(9, SIGNERS[2])  # key 2: named by no roster supplied below
    a, b = log.contents(), log.contents()
    report = compare_stores(a, b, ROSTERS[:2])
    assert report
    assert report.unverified == ([9], [9])
    assert report.checked_pairs == 3 * 3


def test_a_fork_signed_by_a_retired_key_is_caught() -> None:
    log = _rotated()
    other = Log()
    other.leaves = list(log.leaves[:6])
    other.fill(6)  # a different continuation of the first six entries
    other.sign(10, SIGNERS[0])  # the retired key signs the other history
    report = compare_stores(log.contents(), other.contents(), ROSTERS[:2])
    assert not report
    assert any("fork" in f and "10" in f for f in report.failures)
    assert report.first_difference == 6
