"""RFC 9162 §2.1 Merkle tree: known answers, proof soundness and the incremental tree."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hansa.crypto.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)
from hansa.protocol.errors import ErrorCode, ProofError, ProtocolError

# RFC 6962 standard test leaves (research doc §1.2; transparency-dev testdata).
STANDARD_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
STANDARD_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]

MAX_SIZE = 300


def entries(n: int, salt: bytes = b"") -> list[bytes]:
    """``n`` distinct entries (distinct leaves, so a forged proof needs a collision)."""
    return [salt + b"entry-" + i.to_bytes(4, "big") for i in range(n)]


def flip_bit(data: bytes, bit: int) -> bytes:
    """``data`` with one bit flipped (``bit`` taken modulo the bit length)."""
    bit %= len(data) * 8
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# The expected *shape* of a proof, derived from the RFC 9162 §2.1.3.1 / §2.1.4.1 generation
# recursions (not from the verifier). A verifier cannot tell two claims with the same
# shape apart: the tree size is bound by the signed checkpoint, not by the proof. Any
# claim with a different shape must be rejected.


def inclusion_shape(index: int, size: int) -> list[str]:
    """Sides of the siblings in ``PATH(index, D[size])``, leaf to root."""
    sides: list[str] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = 1 << ((hi - lo - 1).bit_length() - 1)
        if index < lo + k:
            sides.append("R")
            hi = lo + k
        else:
            sides.append("L")
            lo += k
    return sides[::-1]


def consistency_shape(m: int, n: int) -> tuple[bool, list[str]]:
    """(old root is the implicit seed, roles of the elements of ``PROOF(m, D[n])``)."""
    roles: list[str] = []
    lo, hi, complete = 0, n, True
    while m != hi - lo:
        k = 1 << ((hi - lo - 1).bit_length() - 1)
        if m <= k:
            roles.append("right-of-new")
            hi = lo + k
        else:
            roles.append("left-of-both")
            lo += k
            m -= k
            complete = False
    if not complete:
        roles.append("seed")
    return complete, roles[::-1]


# -- known answers -----------------------------------------------------------------------


def test_empty_root() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root_hash([]) == EMPTY_ROOT
    assert MerkleTree().root() == EMPTY_ROOT
    assert MerkleTree().root_at(0) == EMPTY_ROOT
    assert MerkleTree.from_leaf_hashes([]).root() == EMPTY_ROOT


def test_hash_known_answers() -> None:
    assert (
        leaf_hash(b"L123456").hex()
        == "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    )
    assert (
        node_hash(b"N123", b"N456").hex()
        == "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"
    )
    # The empty leaf differs from the empty tree (domain separation).
    assert leaf_hash(b"").hex() == STANDARD_ROOTS[0]
    assert leaf_hash(b"") != EMPTY_ROOT


@pytest.mark.parametrize("n", range(1, 9))
def test_standard_tree_roots(n: int) -> None:
    want = bytes.fromhex(STANDARD_ROOTS[n - 1])
    assert root_hash(STANDARD_LEAVES[:n]) == want
    tree = MerkleTree()
    for entry in STANDARD_LEAVES:
        tree.append(entry)
    assert tree.root_at(n) == want


def test_standard_tree_incremental_roots() -> None:
    tree = MerkleTree()
    for n, entry in enumerate(STANDARD_LEAVES, start=1):
        assert tree.append(entry) == n - 1
        assert tree.root().hex() == STANDARD_ROOTS[n - 1]
        assert tree.size == len(tree) == n


def test_root_hash_matches_rfc_recursion() -> None:
    # root_hash reduces pairwise; check it against a literal transcription of MTH.
    def mth(d: list[bytes]) -> bytes:
        if len(d) == 1:
            return hashlib.sha256(b"\x00" + d[0]).digest()
        k = 1 << ((len(d) - 1).bit_length() - 1)
        return hashlib.sha256(b"\x01" + mth(d[:k]) + mth(d[k:])).digest()

    data = entries(70)
    for n in range(1, len(data) + 1):
        assert root_hash(data[:n]) == mth(data[:n])


# -- inclusion proofs --------------------------------------------------------------------


@st.composite
def tree_and_index(draw: st.DrawFn) -> tuple[list[bytes], int]:
    n = draw(st.integers(1, MAX_SIZE))
    salt = draw(st.binary(max_size=8))
    return entries(n, salt), draw(st.integers(0, n - 1))


@given(tree_and_index())
def test_inclusion_proof_verifies(case: tuple[list[bytes], int]) -> None:
    data, index = case
    root = root_hash(data)
    proof = inclusion_proof(data, index)
    assert len(proof) == len(inclusion_shape(index, len(data)))
    assert verify_inclusion(leaf_hash(data[index]), index, len(data), proof, root)


@given(tree_and_index(), st.integers(0, 255))
def test_inclusion_proof_tampering_fails(case: tuple[list[bytes], int], bit: int) -> None:
    data, index = case
    n = len(data)
    root = root_hash(data)
    lh = leaf_hash(data[index])
    proof = inclusion_proof(data, index)
    for i in range(len(proof)):
        bad = [*proof[:i], flip_bit(proof[i], bit), *proof[i + 1 :]]
        assert not verify_inclusion(lh, index, n, bad, root)
        assert not verify_inclusion(lh, index, n, proof[:i] + proof[i + 1 :], root)
    for i in range(len(proof) + 1):
        extra = proof[i] if i < len(proof) else lh
        assert not verify_inclusion(lh, index, n, [*proof[:i], extra, *proof[i:]], root)
        assert not verify_inclusion(lh, index, n, [*proof[:i], EMPTY_ROOT, *proof[i:]], root)
    assert not verify_inclusion(lh, index, n, proof, flip_bit(root, bit))
    assert not verify_inclusion(flip_bit(lh, bit), index, n, proof, root)
    assert not verify_inclusion(leaf_hash(data[index] + b"x"), index, n, proof, root)
    # Wrong lengths of otherwise right values.
    assert not verify_inclusion(lh[:31], index, n, proof, root)
    assert not verify_inclusion(lh, index, n, proof, root + b"\x00")
    if proof:
        assert not verify_inclusion(lh, index, n, [proof[0] + b"\x00", *proof[1:]], root)


@given(tree_and_index(), st.integers(-3, 2 * MAX_SIZE + 3), st.integers(-3, 2 * MAX_SIZE + 3))
def test_inclusion_altered_index_or_size(
    case: tuple[list[bytes], int], other_index: int, other_size: int
) -> None:
    data, index = case
    n = len(data)
    root = root_hash(data)
    lh = leaf_hash(data[index])
    proof = inclusion_proof(data, index)
    shape = inclusion_shape(index, n)
    probes = {
        (index + 1, n),
        (index - 1, n),
        (index ^ 2, n),
        (index, n + 1),
        (index, n - 1),
        (index, 2 * n),
        (index, n // 2),
        (other_index, n),
        (index, other_size),
        (other_index, other_size),
    }
    for i, size in probes:
        in_range = 0 <= i < size
        want = in_range and inclusion_shape(i, size) == shape
        assert verify_inclusion(lh, i, size, proof, root) == want, (i, size)
    # Every other leaf position in the same tree has a different path.
    for i in range(n):
        assert verify_inclusion(lh, i, n, proof, root) == (i == index)


# -- consistency proofs ------------------------------------------------------------------


@st.composite
def tree_and_old_size(draw: st.DrawFn) -> tuple[list[bytes], int]:
    n = draw(st.integers(1, MAX_SIZE))
    salt = draw(st.binary(max_size=8))
    return entries(n, salt), draw(st.integers(1, n))


@given(tree_and_old_size())
def test_consistency_proof_verifies(case: tuple[list[bytes], int]) -> None:
    data, m = case
    n = len(data)
    proof = consistency_proof(data, m)
    assert len(proof) == len(consistency_shape(m, n)[1])
    assert (proof == []) == (m == n)
    assert verify_consistency(m, n, root_hash(data[:m]), root_hash(data), proof)


@given(tree_and_old_size(), st.integers(0, 255))
def test_consistency_proof_tampering_fails(case: tuple[list[bytes], int], bit: int) -> None:
    data, m = case
    n = len(data)
    old, new = root_hash(data[:m]), root_hash(data)
    proof = consistency_proof(data, m)
    for i in range(len(proof)):
        bad = [*proof[:i], flip_bit(proof[i], bit), *proof[i + 1 :]]
        assert not verify_consistency(m, n, old, new, bad)
        assert not verify_consistency(m, n, old, new, proof[:i] + proof[i + 1 :])
    for i in range(len(proof) + 1):
        extra = proof[i] if i < len(proof) else old
        assert not verify_consistency(m, n, old, new, [*proof[:i], extra, *proof[i:]])
        assert not verify_consistency(m, n, old, new, [*proof[:i], EMPTY_ROOT, *proof[i:]])
    assert not verify_consistency(m, n, flip_bit(old, bit), new, proof)
    assert not verify_consistency(m, n, old, flip_bit(new, bit), proof)
    if m < n:
        assert not verify_consistency(m, n, new, old, proof)
        assert not verify_consistency(m, n, old[:31], new, proof)
        assert not verify_consistency(m, n, old, new + b"\x00", proof)
        assert not verify_consistency(m, n, old, new, [proof[0][:31], *proof[1:]])
    # A forked log: the same sizes but one old entry rewritten.
    forked = list(data)
    forked[bit % m] += b"!"
    assert not verify_consistency(m, n, old, root_hash(forked), proof)
    if m < n:
        fork_proof = consistency_proof(forked, m)
        assert not verify_consistency(m, n, old, root_hash(forked), fork_proof)


@given(tree_and_old_size(), st.integers(-2, MAX_SIZE + 3), st.integers(-2, 2 * MAX_SIZE + 3))
def test_consistency_altered_sizes(
    case: tuple[list[bytes], int], other_old: int, other_new: int
) -> None:
    data, m = case
    n = len(data)
    old, new = root_hash(data[:m]), root_hash(data)
    proof = consistency_proof(data, m)
    shape = consistency_shape(m, n)
    probes = {
        (m + 1, n),
        (m - 1, n),
        (m ^ 2, n),
        (m, n + 1),
        (m, n - 1),
        (m, 2 * n),
        (m // 2, n // 2),
        (0, n),
        (n, m),
        (other_old, n),
        (m, other_new),
        (other_old, other_new),
    }
    for m2, n2 in probes:
        valid = 0 < m2 <= n2
        want = valid and consistency_shape(m2, n2) == shape
        if valid and m2 == n2:
            want = proof == [] and old == new  # the equal-sizes rule
        assert verify_consistency(m2, n2, old, new, proof) == want, (m2, n2)


def test_consistency_edge_cases() -> None:
    data = entries(5)
    r1, r5 = root_hash(data[:1]), root_hash(data)
    # size1 == 0 never verifies, not even with the empty root and an empty proof.
    assert not verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert not verify_consistency(0, 5, EMPTY_ROOT, r5, [])
    assert not verify_consistency(5, 1, r5, r1, [])
    assert verify_consistency(5, 5, r5, r5, [])
    assert not verify_consistency(5, 5, r5, r5, [r5])
    assert not verify_consistency(5, 5, r5, r1, [])
    assert not verify_consistency(1, 5, r1, r5, [])


# -- verification never raises -----------------------------------------------------------

GARBAGE: list[Any] = [None, "0", 1.0, True, -1, 2**70, b"", b"\x00" * 31, [b"\x00" * 32], [None]]


def test_verification_never_raises_on_garbage() -> None:
    h = b"\x00" * 32
    for g in GARBAGE:
        assert not verify_inclusion(g, 0, 1, [], h)
        assert not verify_inclusion(h, g, 1, [h], h)
        assert not verify_inclusion(h, 0, g, [h], h)
        assert not verify_inclusion(h, 0, 2, g, h)
        assert not verify_inclusion(h, 0, 2, [g], h)
        assert not verify_consistency(g, 2, h, h, [h])
        assert not verify_consistency(1, g, h, h, [h])
        assert not verify_consistency(1, 2, g, h, [h])
        assert not verify_consistency(1, 2, h, g, [h])
        assert not verify_consistency(1, 2, h, h, g)
        assert not verify_consistency(3, 4, h, h, [g, h])
    # Huge sizes with short proofs terminate and fail.
    assert not verify_inclusion(h, 2**80, 2**90, [h] * 3, h)
    assert not verify_consistency(2**80 + 1, 2**90, h, h, [h] * 3)
    assert not verify_inclusion(h, 0, 2**64, [h] * 1000, h)


# -- incremental tree ----------------------------------------------------------------------


def test_incremental_root_at_every_size() -> None:
    data = entries(200)
    tree = MerkleTree()
    for n, entry in enumerate(data, start=1):
        assert tree.append(entry) == n - 1
        want = root_hash(data[:n])
        assert tree.root() == want
        assert tree.root() == want  # cached path
    for n in range(len(data) + 1):
        assert tree.root_at(n) == root_hash(data[:n])


def test_incremental_proofs_equal_reference_exhaustively() -> None:
    data = entries(40)
    tree = MerkleTree()
    for entry in data:
        tree.append(entry)
    for size in range(1, len(data) + 1):
        prefix = data[:size]
        for index in range(size):
            assert tree.inclusion_proof(index, size) == inclusion_proof(prefix, index)
        for old in range(1, size + 1):
            assert tree.consistency_proof(old, size) == consistency_proof(prefix, old)
    assert tree.inclusion_proof(3) == inclusion_proof(data, 3)
    assert tree.consistency_proof(7) == consistency_proof(data, 7)


@given(st.lists(st.binary(max_size=20), min_size=1, max_size=MAX_SIZE), st.data())
def test_incremental_tree_matches_reference(data: list[bytes], draw: st.DataObject) -> None:
    tree = MerkleTree()
    for i, entry in enumerate(data):
        assert tree.append(entry) == i
    n = len(data)
    assert tree.root() == root_hash(data)
    size = draw.draw(st.integers(1, n), label="size")
    index = draw.draw(st.integers(0, size - 1), label="index")
    old = draw.draw(st.integers(1, size), label="old")
    assert tree.root_at(size) == root_hash(data[:size])
    assert tree.leaf_hash_at(index) == leaf_hash(data[index])
    proof = tree.inclusion_proof(index, size)
    assert proof == inclusion_proof(data[:size], index)
    assert verify_inclusion(leaf_hash(data[index]), index, size, proof, tree.root_at(size))
    cproof = tree.consistency_proof(old, size)
    assert cproof == consistency_proof(data[:size], old)
    assert verify_consistency(old, size, tree.root_at(old), tree.root_at(size), cproof)


@given(st.integers(0, MAX_SIZE), st.integers(0, 40))
def test_from_leaf_hashes_reproduces_state(n: int, more: int) -> None:
    data = entries(n + more)
    grown = MerkleTree()
    for entry in data[:n]:
        grown.append(entry)
    hashes = [leaf_hash(e) for e in data[:n]]
    loaded = MerkleTree.from_leaf_hashes(iter(hashes))
    assert loaded.size == n
    assert loaded.root() == grown.root()
    assert [loaded.leaf_hash_at(i) for i in range(n)] == hashes
    for size in range(n + 1):
        assert loaded.root_at(size) == grown.root_at(size)
    for index in range(0, n, 7):
        assert loaded.inclusion_proof(index) == grown.inclusion_proof(index)
    # Both keep growing identically, one through append_leaf_hash.
    for entry in data[n:]:
        assert loaded.append_leaf_hash(leaf_hash(entry)) == grown.append(entry)
        assert loaded.root() == grown.root()
    if n + more:
        assert loaded.consistency_proof(1) == grown.consistency_proof(1)


def test_append_leaf_hash_rejects_bad_lengths() -> None:
    tree = MerkleTree()
    h = leaf_hash(b"a")
    assert tree.append_leaf_hash(h) == 0
    assert tree.leaf_hash_at(0) == h
    assert tree.root() == root_hash([b"a"])
    for bad in (b"", h[:31], h + b"\x00"):
        with pytest.raises(ProtocolError) as exc:
            tree.append_leaf_hash(bad)
        assert exc.value.code is ErrorCode.INVALID_FIELD
        with pytest.raises(ProtocolError):
            MerkleTree.from_leaf_hashes([h, bad])
    assert tree.size == 1  # a rejected hash leaves the tree untouched


# -- impossible proof requests -------------------------------------------------------------


def test_bad_proof_requests_raise_proof_error() -> None:
    data = entries(10)
    tree = MerkleTree.from_leaf_hashes(leaf_hash(e) for e in data)
    calls: list[Any] = [
        lambda: inclusion_proof([], 0),
        lambda: inclusion_proof(data, -1),
        lambda: inclusion_proof(data, 10),
        lambda: consistency_proof(data, 0),
        lambda: consistency_proof(data, -1),
        lambda: consistency_proof(data, 11),
        lambda: consistency_proof([], 0),
        lambda: tree.inclusion_proof(10),
        lambda: tree.inclusion_proof(-1),
        lambda: tree.inclusion_proof(5, 5),
        lambda: tree.inclusion_proof(0, 11),
        lambda: tree.inclusion_proof(0, -1),
        lambda: tree.consistency_proof(0),
        lambda: tree.consistency_proof(6, 5),
        lambda: tree.consistency_proof(1, 11),
        lambda: tree.consistency_proof(-1, 5),
        lambda: tree.root_at(11),
        lambda: tree.root_at(-1),
        lambda: tree.leaf_hash_at(10),
        lambda: tree.leaf_hash_at(-1),
        lambda: MerkleTree().inclusion_proof(0),
        lambda: MerkleTree().consistency_proof(0),
    ]
    for call in calls:
        with pytest.raises(ProofError) as exc:
            call()
        assert exc.value.code is ErrorCode.PROOF


@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=6))
def test_extend_leaf_hashes_matches_one_at_a_time(batches: list[int]) -> None:
    one, bulk = MerkleTree(), MerkleTree()
    n = 0
    for k in batches:
        hashes = [leaf_hash(i.to_bytes(4, "big")) for i in range(n, n + k)]
        for h in hashes:
            one.append_leaf_hash(h)
        assert bulk.extend_leaf_hashes(hashes) == n
        n += k
        assert bulk.size == one.size == n
        assert bulk.root() == one.root()
        if n:
            assert bulk.inclusion_proof(n // 2) == one.inclusion_proof(n // 2)
            assert bulk.consistency_proof(max(1, n // 3)) == one.consistency_proof(max(1, n // 3))
    grown = MerkleTree.from_leaf_hashes(bulk.leaf_hash_at(i) for i in range(n))
    assert grown.root() == bulk.root()


def test_extend_leaf_hashes_rejects_bad_lengths_atomically() -> None:
    tree = MerkleTree()
    h = leaf_hash(b"a")
    tree.extend_leaf_hashes([h])
    with pytest.raises(ProtocolError) as exc:
        tree.extend_leaf_hashes([h, h[:31]])
    assert exc.value.code is ErrorCode.INVALID_FIELD
    assert tree.size == 1 and tree.root() == root_hash([b"a"])
