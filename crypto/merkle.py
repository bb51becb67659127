"""RFC 9162 §2.1 Merkle tree: hashes, inclusion and consistency proofs, and a log tree.

Theory of operation
===================

Hashing (RFC 9162 §2.1.1, unchanged from RFC 6962 §2.1). With ``H = SHA-256`` and an
ordered list of entries ``D[n] = d(0) … d(n-1)`` (raw bytes)::

    MTH({})       = H("")                                   EMPTY_ROOT
    MTH({d(0)})   = H(0x00 || d(0))                         leaf_hash()
    MTH(D[n])     = H(0x01 || MTH(D[0:k]) || MTH(D[k:n]))   node_hash(), k = largest 2^i < n

The one-byte prefixes separate leaves from interior nodes, so no interior node can be
passed off as a leaf (second preimage). The tree of ``n`` leaves is therefore a run of
*perfect* subtrees, one per set bit of ``n``, largest on the left, folded right to left.

Proofs. ``PATH(m, D[n])`` (RFC 9162 §2.1.3.1) is the list of sibling hashes from leaf ``m``
up to the root. ``PROOF(m, D[n])`` (§2.1.4.1) is the list of subtree hashes from which a
verifier recomputes both the old root ``MTH(D[0:m])`` and the new root ``MTH(D[n])``.
Verification follows the §2.1.3.2 and §2.1.4.2 algorithms, with the edge-case rules of
``transparency-dev/merkle`` (``proof/verify.go``) that its public test vectors encode:

* every hash that is hashed or compared is 32 bytes, otherwise the proof fails;
* ``index >= size`` fails; a consistency proof from ``size1 == 0`` always fails (it is
  meaningless: every tree extends the empty tree, so protocols special-case old size 0,
  as C2SP tlog-witness does); ``size1 > size2`` fails;
* equal sizes need an empty proof and equal roots. NOTE: like upstream, this case is a
  plain byte comparison of the two roots, so it does not check their length (one
  upstream vector, ``sizes-are-equal-one-and-proof-is-empty``, pins this).

Verification never raises: any malformed input is a ``False`` verdict. Proof
*generation* with impossible arguments raises :class:`~hansa.protocol.errors.ProofError`.

Two implementations
===================

The module-level functions take the raw entries and recompute what they need, following
the recursive definitions of RFC 9162 §2.1 literally (``O(n)`` hashing per call). They are
the executable reference and suit small, one-off trees.

:class:`MerkleTree` is the incremental state of an append-only log. It stores the hash
of every complete (perfect) aligned subtree, level by level: level 0 holds the leaf
hashes, level ``k`` holds ``MTH`` of each aligned block ``[j·2^k, (j+1)·2^k)`` that is
already full. An append adds one leaf hash and completes at most one node per level
(amortised one interior hash per leaf, so two SHA-256 calls per entry). Each level is a
``bytearray`` of 32-byte slots: ~64 bytes per leaf in total, against ~160 bytes for a
``list[bytes]``, at the same append speed (measured with CPython 3.11).

Every subtree that appears in the RFC's recursion covers a range ``[a, b)`` whose start is
a multiple of the largest power of two in ``b - a``, so its hash is the right-to-left
fold of at most ``log2(n)`` stored perfect nodes (one per set bit of ``b - a``). Roots at
any past size, inclusion proofs and consistency proofs are assembled from such ranges,
with ``O(log n)`` lookups and hashes and without re-hashing leaves. Proof shapes follow
``transparency-dev/merkle`` ``proof/proof.go``: inner siblings, then at most one
ephemeral (incomplete) node, then the left border of perfect subtrees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from hansa.protocol.errors import ErrorCode, ProofError, ProtocolError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MerkleTree",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_hash",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE: Final = 32
"""Size in bytes of every tree hash (SHA-256)."""

_sha256: Final = hashlib.sha256
_LEAF_PREFIX: Final = b"\x00"  # RFC 9162 §2.1.1: leaf hash domain
_NODE_PREFIX: Final = b"\x01"  # RFC 9162 §2.1.1: interior node domain

EMPTY_ROOT: Final[bytes] = _sha256(b"").digest()
"""``MTH({})``: the root of the empty tree, SHA-256 of the empty string."""


def leaf_hash(data: bytes) -> bytes:
    """Return the RFC 9162 leaf hash ``SHA-256(0x00 || data)``.

    Args:
        data: the raw entry.

    Returns:
        The 32-byte leaf hash.
    """
    return _sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 9162 interior node hash ``SHA-256(0x01 || left || right)``.

    Args:
        left: hash of the left subtree.
        right: hash of the right subtree.

    Returns:
        The 32-byte node hash.
    """
    return _sha256(_NODE_PREFIX + left + right).digest()


# --------------------------------------------------------------------------------------
# Reference functions over raw entries (RFC 9162 §2.1 recursions, O(n) per call).
# --------------------------------------------------------------------------------------


def _split(n: int) -> int:
    """Largest power of two strictly less than ``n`` (``n >= 2``), the RFC's ``k``."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    """``MTH(D[lo:hi])`` over leaf hashes, ``hi > lo``, by the RFC recursion."""
    n = hi - lo
    if n == 1:
        return hashes[lo]
    k = _split(n)
    return _sha256(_NODE_PREFIX + _mth(hashes, lo, lo + k) + _mth(hashes, lo + k, hi)).digest()


def root_hash(leaves: Sequence[bytes]) -> bytes:
    """Return the Merkle Tree Hash ``MTH(D[n])`` of raw entries (RFC 9162 §2.1.1).

    Args:
        leaves: the raw entries, in log order.

    Returns:
        The 32-byte root; :data:`EMPTY_ROOT` for no entries.
    """
    if not leaves:
        return EMPTY_ROOT
    # Pairwise reduction, carrying an odd last node up unchanged, builds the same tree as
    # the RFC's "largest power of two < n" split: both put the perfect subtrees of the
    # binary decomposition of n side by side and join them right to left.
    level = [_sha256(_LEAF_PREFIX + d).digest() for d in leaves]
    while len(level) > 1:
        it = iter(level)
        nxt = [_sha256(_NODE_PREFIX + a + b).digest() for a, b in zip(it, it, strict=False)]
        if len(level) & 1:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Return the inclusion proof ``PATH(index, D[n])`` (RFC 9162 §2.1.3.1).

    Args:
        leaves: the raw entries of the tree, in log order.
        index: the 0-based index of the entry to prove.

    Returns:
        The sibling hashes ordered from the leaf up to the root (empty for a tree of one).

    Raises:
        ProofError: ``index`` is not in ``[0, len(leaves))``.
    """
    n = len(leaves)
    if not 0 <= index < n:
        raise ProofError(f"leaf index {index} out of range for tree size {n}")
    hashes = [_sha256(_LEAF_PREFIX + d).digest() for d in leaves]
    outer: list[bytes] = []  # collected root-first, reversed at the end
    lo, hi = 0, n
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            outer.append(_mth(hashes, lo + k, hi))
            hi = lo + k
        else:
            outer.append(_mth(hashes, lo, lo + k))
            lo += k
    outer.reverse()
    return outer


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """Return the consistency proof ``PROOF(old_size, D[n])`` (RFC 9162 §2.1.4.1).

    Args:
        leaves: the raw entries of the new tree, in log order (``n = len(leaves)``).
        old_size: the size of the earlier tree, a prefix of ``leaves``.

    Returns:
        The proof nodes in RFC order; empty when ``old_size == n``.

    Raises:
        ProofError: ``old_size`` is not in ``[1, n]``. A proof from the empty tree is
            meaningless (every tree extends it) and would never verify.
    """
    n = len(leaves)
    if not 0 < old_size <= n:
        raise ProofError(f"no consistency proof from size {old_size} to size {n}")
    hashes = [_sha256(_LEAF_PREFIX + d).digest() for d in leaves]
    return _subproof(old_size, n, lambda lo, hi: _mth(hashes, lo, hi))


def _subproof(m: int, n: int, subtree: Callable[[int, int], bytes]) -> list[bytes]:
    """``SUBPROOF(m, D[n], true)`` (RFC 9162 §2.1.4.1), unrolled, for ``0 < m <= n``.

    ``subtree(lo, hi)`` returns ``MTH(D[lo:hi])``. Elements are produced outermost first
    and reversed, because the recursion appends each level's sibling after the deeper
    sub-proof.
    """
    outer: list[bytes] = []
    lo, hi = 0, n
    complete = True  # the RFC's flag b: true while D[lo:hi] is still the old tree's root
    while True:
        size = hi - lo
        if m == size:
            if not complete:
                outer.append(subtree(lo, hi))
            break
        k = _split(size)
        if m <= k:
            outer.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            outer.append(subtree(lo, lo + k))
            lo += k
            m -= k
            complete = False
    outer.reverse()
    return outer


# --------------------------------------------------------------------------------------
# Verification (RFC 9162 §2.1.3.2 and §2.1.4.2). Never raises.
# --------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes | bytearray) and len(value) == HASH_SIZE


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Check an inclusion proof with the RFC 9162 §2.1.3.2 algorithm.

    Args:
        leaf_hash: the 32-byte leaf hash (:func:`leaf_hash` of the entry, not the entry).
        index: the 0-based leaf index.
        tree_size: the size of the tree ``root`` belongs to.
        proof: the sibling hashes, leaf to root.
        root: the expected 32-byte root of the tree of ``tree_size`` leaves.

    Returns:
        True if and only if the proof places ``leaf_hash`` at ``index`` in the tree
        with root ``root``. Any malformed input (wrong types, hash lengths, sizes,
        proof length) gives False.
    """
    try:
        if not (_is_int(index) and _is_int(tree_size) and 0 <= index < tree_size):
            return False
        if not (_is_hash(leaf_hash) and _is_hash(root)):
            return False
        fn, sn, r = index, tree_size - 1, bytes(leaf_hash)
        for p in proof:
            if sn == 0 or not _is_hash(p):
                return False
            if fn & 1 or fn == sn:
                r = _sha256(_NODE_PREFIX + p + r).digest()
                # On the right edge (fn == sn, fn even) the node has no right sibling at
                # these levels: it is promoted unchanged, so skip them.
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
            else:
                r = _sha256(_NODE_PREFIX + r + p).digest()
            fn >>= 1
            sn >>= 1
        return sn == 0 and r == root
    except TypeError:  # e.g. ``proof`` is not iterable
        return False


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Check a consistency proof with the RFC 9162 §2.1.4.2 algorithm.

    Edge cases follow ``transparency-dev/merkle``: ``old_size == 0`` is always False
    (a proof from the empty tree is meaningless; callers special-case it), as is
    ``old_size > new_size``; equal sizes need an empty proof and ``old_root == new_root``.

    Args:
        old_size: size of the earlier tree (``size1``).
        new_size: size of the later tree (``size2``).
        old_root: 32-byte root of the earlier tree.
        new_root: 32-byte root of the later tree.
        proof: the proof nodes in RFC order.

    Returns:
        True if and only if the tree with ``new_root`` extends the tree with ``old_root``.
        Any malformed input gives False.
    """
    try:
        if not (_is_int(old_size) and _is_int(new_size) and 0 < old_size <= new_size):
            return False
        if old_size == new_size:
            # NOTE: a byte comparison, as upstream; the roots' length is not checked here.
            return len(proof) == 0 and old_root == new_root
        if not (_is_hash(old_root) and _is_hash(new_root)) or len(proof) == 0:
            return False
        path: list[bytes] = list(proof)
        if not all(_is_hash(p) for p in path):
            return False
        if old_size & (old_size - 1) == 0:
            # The old tree is one perfect subtree of the new one: its root is the seed.
            path.insert(0, bytes(old_root))
        fn, sn = old_size - 1, new_size - 1
        while fn & 1:
            fn >>= 1
            sn >>= 1
        fr = sr = bytes(path[0])
        for c in path[1:]:
            if sn == 0:
                return False
            if fn & 1 or fn == sn:
                fr = _sha256(_NODE_PREFIX + c + fr).digest()
                sr = _sha256(_NODE_PREFIX + c + sr).digest()
                while fn and not fn & 1:  # right edge, as in verify_inclusion
                    fn >>= 1
                    sn >>= 1
            else:
                sr = _sha256(_NODE_PREFIX + sr + c).digest()
            fn >>= 1
            sn >>= 1
        return sn == 0 and fr == old_root and sr == new_root
    except TypeError:  # e.g. ``proof`` has no length
        return False


# --------------------------------------------------------------------------------------
# Incremental log tree.
# --------------------------------------------------------------------------------------


def _check_leaf_hash(h: bytes) -> None:
    if not _is_hash(h):
        raise ProtocolError(f"a leaf hash must be {HASH_SIZE} bytes", code=ErrorCode.INVALID_FIELD)


class MerkleTree:
    """Append-only RFC 9162 Merkle tree with O(log n) roots and proofs at any size.

    ``_levels[k]`` is a ``bytearray`` of 32-byte slots: slot ``j`` is ``MTH`` of leaves
    ``[j·2^k, (j+1)·2^k)``, stored once that block is full (level 0: the leaf hashes).
    Not thread-safe: callers serialise appends (the node appends from one task).
    """

    __slots__ = ("_levels", "_root_cache", "_size")

    def __init__(self) -> None:
        """Create an empty tree."""
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        self._root_cache: tuple[int, bytes] = (0, EMPTY_ROOT)

    @classmethod
    def from_leaf_hashes(cls, hashes: Iterable[bytes]) -> MerkleTree:
        """Rebuild a tree from its leaf hashes, e.g. when a node reloads its log.

        Builds each level from the one below in bulk (one hash per interior node).

        Args:
            hashes: the 32-byte leaf hashes, in log order.

        Returns:
            A tree in the same state as one that had every hash appended in order.

        Raises:
            ProtocolError: a leaf hash is not 32 bytes (code ``INVALID_FIELD``).
        """
        level = bytearray()
        count = 0
        for h in hashes:
            _check_leaf_hash(h)
            level += h
            count += 1
        tree = cls()
        size = count
        levels = [level]
        sha, prefix = _sha256, _NODE_PREFIX
        while count >= 2:
            pairs = count >> 1
            with memoryview(level) as view:
                level = bytearray(
                    b"".join(
                        [sha(prefix + view[i : i + 64]).digest() for i in range(0, pairs * 64, 64)]
                    )
                )
            levels.append(level)
            count = pairs
        tree._levels = levels
        tree._size = size
        return tree

    @property
    def size(self) -> int:
        """The number of leaves appended so far."""
        return self._size

    def __len__(self) -> int:
        """The number of leaves appended so far (same as :attr:`size`)."""
        return self._size

    def append(self, entry: bytes) -> int:
        """Append a raw entry; its leaf hash is ``SHA-256(0x00 || entry)``.

        Args:
            entry: the raw entry bytes.

        Returns:
            The 0-based index of the new leaf.
        """
        return self._push(_sha256(_LEAF_PREFIX + entry).digest())

    def append_leaf_hash(self, h: bytes) -> int:
        """Append an already computed leaf hash.

        Args:
            h: the 32-byte leaf hash (``leaf_hash(entry)``).

        Returns:
            The 0-based index of the new leaf.

        Raises:
            ProtocolError: ``h`` is not 32 bytes (code ``INVALID_FIELD``).
        """
        _check_leaf_hash(h)
        return self._push(bytes(h))

    def extend_leaf_hashes(self, hashes: Iterable[bytes]) -> int:
        """Append already computed leaf hashes in order, in bulk (e.g. one commit's batch).

        The same state as :meth:`append_leaf_hash` for each hash in turn, but each level
        grows once per call: the interior nodes the batch completes are hashed in one
        pass per level, without a Python call per leaf.

        Args:
            hashes: the 32-byte leaf hashes, in log order.

        Returns:
            The 0-based index of the first new leaf (the old size).

        Raises:
            ProtocolError: a hash is not 32 bytes (code ``INVALID_FIELD``); the tree is
                then unchanged.
        """
        batch = [bytes(h) for h in hashes]
        for h in batch:
            _check_leaf_hash(h)
        first = old = self._size
        new = old + len(batch)
        levels = self._levels
        levels[0] += b"".join(batch)
        sha, prefix = _sha256, _NODE_PREFIX
        k = 0
        # Level k held ``old`` nodes and now holds ``new``: the nodes of level k + 1 from
        # old // 2 to new // 2 are the blocks this batch just completed.
        while new >> 1 > old >> 1:
            if k + 1 == len(levels):
                levels.append(bytearray())
            with memoryview(levels[k]) as view:
                levels[k + 1] += b"".join(
                    [
                        sha(prefix + view[i : i + 64]).digest()
                        for i in range((old >> 1) * 64, (new >> 1) * 64, 64)
                    ]
                )
            old >>= 1
            new >>= 1
            k += 1
        self._size = first + len(batch)
        return first

    def _push(self, h: bytes) -> int:
        levels = self._levels
        index = self._size
        levels[0] += h
        self._size = n = index + 1
        k = 0
        # Each trailing zero bit of the new size is a block that this leaf just completed.
        while not n & 1:
            lower = levels[k]
            k += 1
            if k == len(levels):
                levels.append(bytearray())
            levels[k] += _sha256(_NODE_PREFIX + lower[-64:]).digest()
            n >>= 1
        return index

    def leaf_hash_at(self, index: int) -> bytes:
        """Return the stored leaf hash at ``index``.

        Args:
            index: a 0-based leaf index.

        Returns:
            The 32-byte leaf hash.

        Raises:
            ProofError: ``index`` is not in ``[0, size)``.
        """
        if not 0 <= index < self._size:
            raise ProofError(f"leaf index {index} out of range for tree size {self._size}")
        off = index * HASH_SIZE
        return bytes(self._levels[0][off : off + HASH_SIZE])

    def _node(self, level: int, index: int) -> bytes:
        off = index * HASH_SIZE
        return bytes(self._levels[level][off : off + HASH_SIZE])

    def _range_hash(self, lo: int, hi: int) -> bytes:
        """``MTH(D[lo:hi])`` for ``lo < hi <= size``, ``lo`` aligned as in the RFC recursion.

        The range is the perfect blocks of the set bits of ``hi - lo``, largest first; fold
        them right to left, starting with the smallest (rightmost) block.
        """
        levels = self._levels
        rest = hi - lo
        low = rest & -rest
        k = low.bit_length() - 1
        hi -= low
        off = (hi >> k) * HASH_SIZE
        r: bytes | bytearray = levels[k][off : off + HASH_SIZE]
        rest ^= low
        while rest:
            low = rest & -rest
            k = low.bit_length() - 1
            hi -= low
            off = (hi >> k) * HASH_SIZE
            r = _sha256(_NODE_PREFIX + levels[k][off : off + HASH_SIZE] + r).digest()
            rest ^= low
        return bytes(r)

    def _check_size(self, size: int | None) -> int:
        if size is None:
            return self._size
        if not 0 <= size <= self._size:
            raise ProofError(f"tree size {size} out of range (log size is {self._size})")
        return size

    def root(self) -> bytes:
        """Return the current root ``MTH(D[size])`` (cached until the next append).

        Returns:
            The 32-byte root; :data:`EMPTY_ROOT` for an empty tree.
        """
        cached_size, cached = self._root_cache
        if cached_size == self._size:
            return cached
        r = self._range_hash(0, self._size)
        self._root_cache = (self._size, r)
        return r

    def root_at(self, size: int) -> bytes:
        """Return the root the tree had when it held ``size`` leaves.

        Args:
            size: a past or current size, ``0 <= size <= self.size``.

        Returns:
            The 32-byte root ``MTH(D[0:size])``.

        Raises:
            ProofError: ``size`` is negative or larger than the tree.
        """
        size = self._check_size(size)
        if size == self._size:
            return self.root()
        return self._range_hash(0, size) if size else EMPTY_ROOT

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Return ``PATH(index, D[size])`` (RFC 9162 §2.1.3.1).

        Args:
            index: the 0-based leaf index.
            size: the tree size the proof is for; defaults to the current size.

        Returns:
            The sibling hashes, leaf to root; equal to :func:`inclusion_proof` over the
            first ``size`` entries.

        Raises:
            ProofError: ``size`` is out of range or ``index`` is not in ``[0, size)``.
        """
        n = self._check_size(size)
        if not 0 <= index < n:
            raise ProofError(f"leaf index {index} out of range for tree size {n}")
        # Below level ``inner`` the paths to ``index`` and to the last leaf ``n - 1``
        # differ; every sibling there is a full block except the one at level inner - 1,
        # the ephemeral node holding the last leaf, which may be incomplete.
        inner = (index ^ (n - 1)).bit_length()
        proof: list[bytes] = []
        for level in range(inner - 1):
            proof.append(self._node(level, (index >> level) ^ 1))
        if inner:
            lo = ((index >> (inner - 1)) ^ 1) << (inner - 1)
            proof.append(self._range_hash(lo, min(n, lo + (1 << (inner - 1)))))
        # Above it the path runs along the right edge: only left siblings, one per set bit.
        level = inner
        rest = index >> inner
        while rest:
            if rest & 1:
                proof.append(self._node(level, (index >> level) ^ 1))
            rest >>= 1
            level += 1
        return proof

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """Return ``PROOF(old_size, D[new_size])`` (RFC 9162 §2.1.4.1).

        Args:
            old_size: the earlier size, ``0 < old_size <= new_size``.
            new_size: the later size; defaults to the current size.

        Returns:
            The proof nodes in RFC order (empty when the sizes are equal); equal to
            :func:`consistency_proof` over the first ``new_size`` entries.

        Raises:
            ProofError: ``new_size`` is out of range, or ``old_size`` is not in
                ``[1, new_size]`` (a proof from the empty tree is meaningless).
        """
        n = self._check_size(new_size)
        if not 0 < old_size <= n:
            raise ProofError(f"no consistency proof from size {old_size} to size {n}")
        return _subproof(old_size, n, self._range_hash)
