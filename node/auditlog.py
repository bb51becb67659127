"""The node's durable, tamper-evident audit log: leaf format, store and checkpoints.

Every event the node sees is appended here *before* the node acts on it or replies
(issue 5, part 1). The log is an RFC 9162 Merkle tree (:mod:`hansa.crypto.merkle`) over
fixed binary leaves; the node signs C2SP checkpoints over it (part 2). This module is a
library: the server wires it in separately.

Leaves
======

Entries use the ``hansa-audit/v1`` leaf layout of :mod:`hansa.protocol.auditleaf`
(spec §16.2), the one codec shared with the auditor; its entry types, :func:`encode_entry`
and :func:`decode_entry` are re-exported here. A leaf hash is ``SHA-256(0x00 || leaf)``
(RFC 9162 §2.1.1).

Store
=====

SQLite (stdlib ``sqlite3``) in WAL mode with ``synchronous=FULL``: a commit returns only
after the WAL is fsynced, so :meth:`AuditLog.append` returns only once the entry is on
disk. Tables: ``leaves(idx, leaf)``, ``envelopes(hash, envelope)``,
``checkpoints(size, root, note)`` and ``meta`` (format, origin, and for stores made since
envelopes are kept by leaf, ``envelopes = by-leaf``). In such a store an envelope's rowid
is the index of the leaf that logs it (its ``request_received`` or ``answer_sent``), so an
append writes only the tables' last pages; older stores find envelopes through a unique
index on the hash, and work unchanged.

Group commit: callers queue their entries; one caller at a time leads and drains the
whole queue into one transaction and one fsync, then wakes every caller with its
indices (leader/follower, no background thread). Throughput therefore grows with the
number of concurrent callers instead of being capped at one fsync per entry.

On open the store reloads every leaf, checks indices are contiguous from 0 and that each
leaf decodes, rebuilds the tree with :meth:`MerkleTree.from_leaf_hashes`, and checks every
stored checkpoint against it. A bad tail (SQLite's journal already discards torn pages
and uncommitted transactions; this catches anything else) is truncated only when no
checkpoint covers it, and reported in :attr:`AuditLog.repaired`; damage under a
checkpoint, or a checkpoint whose root differs from the recomputed tree, raises
:class:`InconsistentLogError`. Nothing is silently accepted. Leaves after the latest
checkpoint are vouched for by nothing but the disk, so the checkpoint policy bounds how
much an edit of the file could change undetected; envelopes are checked against their
hash when read.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import sqlite3
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Self

from hansa.crypto.merkle import HASH_SIZE, MerkleTree, leaf_hash
from hansa.crypto.note import (
    Checkpoint,
    Note,
    NoteSigner,
    NoteVerifier,
    sign_checkpoint,
    verify_checkpoint,
)
from hansa.protocol.auditleaf import (
    KEY_ROLE_LOG,
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
from hansa.protocol.errors import (
    ConfigError,
    ErrorCode,
    HansaError,
    NoteError,
    ProofError,
    ProtocolError,
    TooLargeError,
)

__all__ = [
    "MAGIC",
    "MAX_LEAF_SIZE",
    "AnswerSent",
    "AuditEntry",
    "AuditLog",
    "AuditLogError",
    "CheckpointPolicy",
    "Decision",
    "EntryType",
    "InconsistentLogError",
    "KeyRotated",
    "Outcome",
    "RequestReceived",
    "RosterInstalled",
    "SettingsChanged",
    "SettingsScope",
    "StoredCheckpoint",
    "decode_entry",
    "encode_entry",
    "reply_leaves",
    "request_received_leaf",
]

_log = logging.getLogger(__name__)


class AuditLogError(HansaError):
    """The audit log store cannot be opened or written (I/O, corruption, misuse)."""

    default_code = ErrorCode.INTERNAL


class InconsistentLogError(AuditLogError):
    """The stored leaves do not match a stored checkpoint: tampering or lost entries."""


# --------------------------------------------------------------------------------------
# The node's per-request leaves, encoded directly
# --------------------------------------------------------------------------------------

# The same bytes as ``encode_entry`` of the entry objects (the layout in
# hansa.protocol.auditleaf; tests compare the two), without building and validating an
# entry object per field on the event loop: the node logs three leaves per request.
_PAIR_LEAF: Final = struct.Struct(">15sBQ32s32sH")  # request_received, answer_sent
_DECISION_LEAF: Final = struct.Struct(">15sBQ32sBHQH")  # + data_version bytes
_DECISION_TEXT_MAX: Final = MAX_LEAF_SIZE - _DECISION_LEAF.size


def _hash_field(value: bytes, name: str) -> bytes:
    if len(value) != HASH_SIZE:
        raise ProtocolError(
            f"audit entry {name} must be {HASH_SIZE} bytes", ErrorCode.INVALID_FIELD
        )
    return value


def request_received_leaf(log_time_ms: int, message_id: bytes, requester_key_id: bytes) -> bytes:
    """Encode a ``request_received`` leaf (``encode_entry(RequestReceived(...))``).

    Args:
        log_time_ms: POSIX milliseconds when logged.
        message_id: SHA-256 of the request envelope.
        requester_key_id: the requester's key id.

    Returns:
        The leaf bytes.

    Raises:
        ProtocolError: (``INVALID_FIELD``) a field is out of range.
    """
    try:
        return _PAIR_LEAF.pack(
            MAGIC,
            EntryType.REQUEST_RECEIVED,
            log_time_ms,
            _hash_field(message_id, "message_id"),
            _hash_field(requester_key_id, "requester_key_id"),
            0,
        )
    except struct.error as exc:
        raise ProtocolError(f"audit entry: {exc}", ErrorCode.INVALID_FIELD) from exc


def reply_leaves(
    log_time_ms: int,
    request_id: bytes,
    outcome: Outcome,
    answer_id: bytes,
    *,
    reason: int = 0,
    disclosure_version: int = 0,
    data_version: str = "",
) -> tuple[bytes, bytes]:
    """Encode the ``decision`` and ``answer_sent`` leaves of one reply, logged together.

    The same bytes as ``encode_entry`` of ``Decision(log_time_ms, request_id, outcome,
    reason, disclosure_version, data_version)`` and ``AnswerSent(log_time_ms,
    request_id, answer_id)``.

    Args:
        log_time_ms: POSIX milliseconds when logged.
        request_id: SHA-256 of the request envelope decided about.
        outcome: what the node decided.
        answer_id: SHA-256 of the reply envelope (answer or refusal).
        reason: 0 when answered; the non-zero wire error code of a refusal.
        disclosure_version: the disclosure-settings version applied (0: none).
        data_version: the dataset's data version string, or empty.

    Returns:
        ``(decision leaf, answer_sent leaf)``.

    Raises:
        ProtocolError: (``INVALID_FIELD``) a field is out of range, or the reason does
            not match the outcome.
        TooLargeError: the data version makes the leaf too large.
    """
    if (outcome is Outcome.REFUSED) != (reason != 0):
        raise ProtocolError(
            "a refusal needs a non-zero reason; an answer needs reason 0", ErrorCode.INVALID_FIELD
        )
    text = data_version.encode("utf-8")
    if len(text) > _DECISION_TEXT_MAX:
        raise TooLargeError(f"audit leaf data of {len(text)} bytes is too large")
    request_id = _hash_field(request_id, "request_id")
    try:
        decision = _DECISION_LEAF.pack(
            MAGIC,
            EntryType.DECISION,
            log_time_ms,
            request_id,
            outcome,
            reason,
            disclosure_version,
            len(text),
        )
        sent = _PAIR_LEAF.pack(
            MAGIC,
            EntryType.ANSWER_SENT,
            log_time_ms,
            request_id,
            _hash_field(answer_id, "answer_id"),
            0,
        )
    except struct.error as exc:
        raise ProtocolError(f"audit entry: {exc}", ErrorCode.INVALID_FIELD) from exc
    return decision + text, sent


# --------------------------------------------------------------------------------------
# Checkpoint policy
# --------------------------------------------------------------------------------------


@dataclass
class CheckpointPolicy:
    """When to sign a checkpoint: at least every T seconds and after every N entries.

    Pure: the caller passes the clock. A checkpoint is due when the tree has grown since
    the last one and either ``every_entries`` entries were added or ``every_seconds``
    passed. An unchanged tree needs no new checkpoint (a checkpoint carries no time, so
    re-signing it would give the same note).

    Attributes:
        every_seconds: the longest time a grown tree waits for a checkpoint (T > 0).
        every_entries: the most entries a checkpoint may lag behind (N >= 1).
        last_time: when the last checkpoint was signed (seconds, caller's clock).
        last_size: the size the last checkpoint covered.

    Raises:
        ConfigError: T or N is out of range.
    """

    every_seconds: float
    every_entries: int
    last_time: float = 0.0
    last_size: int = 0

    def __post_init__(self) -> None:
        if not self.every_seconds > 0:
            raise ConfigError("checkpoint interval must be positive")
        if isinstance(self.every_entries, bool) or self.every_entries < 1:
            raise ConfigError("checkpoint entry count must be at least 1")

    def due(self, now: float, size: int) -> bool:
        """Say whether a checkpoint over ``size`` entries is due at time ``now``.

        Args:
            now: the current time in seconds (any monotonic or wall clock, used consistently).
            size: the current tree size.

        Returns:
            True when a new checkpoint should be signed.
        """
        if size <= self.last_size:
            return False
        return (
            size - self.last_size >= self.every_entries
            or now - self.last_time >= self.every_seconds
        )

    def record(self, now: float, size: int) -> None:
        """Note that a checkpoint over ``size`` entries was signed at ``now``.

        Args:
            now: the time of signing.
            size: the size it covers.
        """
        self.last_time = now
        self.last_size = size


# --------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """A signed checkpoint the log holds.

    Attributes:
        size: the tree size it covers.
        root_hash: the tree root at that size.
        note: the signed C2SP checkpoint note.
    """

    size: int
    root_hash: bytes
    note: bytes


@dataclass(eq=False)
class _Job:
    """One caller's pending append: filled in by whichever caller commits it.

    ``entries`` is what the caller passed (entry objects or encoded leaves); the commit
    uses only ``leaves``, their ``hashes`` and the ``envelopes``.
    """

    entries: Sequence[AuditEntry | bytes]
    leaves: list[bytes]
    hashes: list[bytes]
    envelopes: list[tuple[bytes, bytes]]
    indices: list[int] = field(default_factory=list)
    error: str | None = None
    done: bool = False


_FORMAT: Final = "hansa-audit-store/v1"
_WAL_AUTOCHECKPOINT: Final = 10_000
_ENVELOPES_KEY: Final = "envelopes"
_BY_LEAF: Final = "by-leaf"
# How envelopes are found by their hash. A new store ("envelopes" = "by-leaf" in meta)
# gives an envelope the rowid of the leaf that logs it (its request_received or
# answer_sent entry) and finds it through the in-memory message id index that the log
# keeps anyway; the few envelopes no such leaf logs (capability documents) get negative
# rowids, listed in memory. Appends then write only the tables' last pages: a unique
# index on the (random) hash wrote a random index page per envelope, most of a commit's
# WAL pages, syscalls and fsync bytes. Older stores keep finding envelopes by hash
# through that index (or their hash-keyed WITHOUT ROWID table) and work unchanged.
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leaves (idx INTEGER PRIMARY KEY, leaf BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS envelopes (hash BLOB NOT NULL, envelope BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY, root BLOB NOT NULL, note BLOB NOT NULL);
"""


def _stored_checkpoint(row: tuple[object, ...]) -> StoredCheckpoint:
    """A checkpoints row, type-checked (the file may have been edited)."""
    size, root, note = row
    if not (isinstance(size, int) and isinstance(root, bytes) and isinstance(note, bytes)):
        raise InconsistentLogError(f"stored checkpoint row {size!r} has the wrong types")
    return StoredCheckpoint(size, root, note)


# Where the index keys sit in an encoded leaf (the layout in hansa.protocol.auditleaf):
# the entry type byte after the magic, then u64 log time, then the body's 32-byte fields.
_KIND_AT: Final = len(MAGIC)
_FIRST_AT: Final = _KIND_AT + 1 + 8
_SECOND_AT: Final = _FIRST_AT + HASH_SIZE
_REQUEST_KIND: Final = int(EntryType.REQUEST_RECEIVED)
_ANSWER_KIND: Final = int(EntryType.ANSWER_SENT)


def _index_leaves(by_id: dict[bytes, int], first: int, leaves: Sequence[bytes]) -> None:
    """Record the message ids that leaves ``first, first + 1, ...`` log (the first wins).

    A ``request_received`` leaf is found by its request id, an ``answer_sent`` leaf by
    its answer id. Read from the leaf bytes (the flat form), not from entry objects.
    """
    for index, leaf in enumerate(leaves, first):
        kind = leaf[_KIND_AT]
        if kind == _REQUEST_KIND:
            by_id.setdefault(leaf[_FIRST_AT:_SECOND_AT], index)
        elif kind == _ANSWER_KIND:
            by_id.setdefault(leaf[_SECOND_AT : _SECOND_AT + HASH_SIZE], index)


class AuditLog:
    """A durable append-only audit log with its Merkle tree and checkpoints.

    Use :meth:`open`. Thread-safe: :meth:`append` may be called from many threads at
    once, and concurrent callers share one transaction and one fsync (group commit).

    Attributes:
        path: the SQLite file.
        origin: the log's checkpoint origin (the city's log name).
        durable: whether commits are fsynced (``synchronous=FULL``); False only for
            benchmarks and tests.
        repaired: how many undecodable or out-of-order tail rows the last open removed.
        unchecked_checkpoints: sizes of the stored checkpoints, signed before the current
            log key came into force, whose signature the last open could not check: no
            retired log key it was given signed them (their roots did match the stored
            leaves). See :meth:`open`.
        commits: append transactions committed since open (appends / commits is the
            mean group-commit batch).
    """

    def __init__(
        self,
        path: Path,
        origin: str,
        conn: sqlite3.Connection,
        reader: sqlite3.Connection,
        *,
        durable: bool,
        max_batch: int,
    ) -> None:
        """Use :meth:`open`; this only initialises the in-memory state."""
        self.path = path
        self.origin = origin
        self.durable = durable
        self.repaired = 0
        self.unchecked_checkpoints: list[int] = []
        self._log_rotations: list[tuple[int, bytes]] = []  # (index, new key id), role "log"
        self.commits = 0
        self._conn = conn
        self._reader = reader
        self._max_batch = max_batch
        self._tree = MerkleTree()
        self._by_id: dict[bytes, int] = {}
        self._by_leaf = False  # envelopes keyed by leaf index (new stores), not by hash
        self._spare_rows: dict[bytes, int] = {}  # by-leaf: envelopes no leaf logs
        self._next_spare = -1  # by-leaf: the rowid of the next such envelope
        self._checkpoints: dict[int, StoredCheckpoint] = {}
        self._queue: list[_Job] = []
        # guards _queue, _leading, _closed and the jobs' results
        self._queue_cond = threading.Condition(threading.Lock())
        self._leading = False  # a caller is committing rounds
        self._write_lock = threading.Lock()  # owns _conn: one writer (commit or checkpoint)
        self._state_lock = threading.Lock()  # guards _tree, _by_id, _spare_rows, _checkpoints
        self._read_lock = threading.Lock()  # owns _reader
        self._closed = False
        self._broken: str | None = None
        self._lock_fd = -1  # the open file holding the single-writer lock

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        path: str | Path,
        origin: str,
        *,
        durable: bool = True,
        verifier: NoteVerifier | None = None,
        retired: Sequence[NoteVerifier] = (),
        max_batch: int = 4096,
    ) -> AuditLog:
        """Open (or create) the log at ``path`` and check it against its checkpoints.

        Args:
            path: the SQLite file; created with its tables when absent.
            origin: the log's checkpoint origin; must match the one the file was made with.
            durable: fsync every commit (WAL, ``synchronous=FULL``). False sets
                ``synchronous=OFF`` and is for benchmarks only.
            verifier: the current log key's verifier. When given, every stored
                checkpoint's signature is verified too: under this key, or, for a
                checkpoint from before the log's last ``key_rotated`` entry (role
                ``log``) that put this key in force (every checkpoint, when the log
                records other log keys but not this one yet: the node logs the rotation
                after opening), under one of ``retired``.
                Such an older checkpoint signed by none of them still opens, listed in
                :attr:`unchecked_checkpoints` (its root matched the stored leaves; the
                key that signed it is gone, e.g. discarded after a compromise), so that a
                node can always start after its log key was replaced (spec §16.2).
            retired: verifiers of log keys this log used before the current one.
            max_batch: most caller jobs committed in one transaction.

        Returns:
            The open log.

        Raises:
            InconsistentLogError: a stored checkpoint does not match the recomputed tree,
                a checkpoint signed since the current log key came into force does not
                verify under it, or damaged leaves are covered by a checkpoint.
            ConfigError: ``verifier``'s key is one this log already retired.
            AuditLogError: the file cannot be opened, is already open (by any process),
                is not an audit store, or belongs to another origin.
            NoteError: ``origin`` is not a valid checkpoint origin.
            ConfigError: ``max_batch`` is below 1.
        """
        Checkpoint(origin, 0, bytes(HASH_SIZE))  # validates the origin early
        if max_batch < 1:
            raise ConfigError("max_batch must be at least 1")
        path = Path(path)
        lock_fd = _lock(path)
        try:
            conn = _connect(path, durable)
            reader = _connect(path, durable)
        except sqlite3.Error as exc:
            os.close(lock_fd)
            raise AuditLogError(f"cannot open audit log {path}: {exc}") from exc
        log = cls(path, origin, conn, reader, durable=durable, max_batch=max_batch)
        log._lock_fd = lock_fd
        try:
            log._load(verifier, retired)
        except BaseException:
            log.close()
            raise
        return log

    def _load(self, verifier: NoteVerifier | None, retired: Sequence[NoteVerifier]) -> None:
        conn = self._conn
        try:
            conn.executescript(_SCHEMA)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                meta = {"format": _FORMAT, "origin": self.origin, _ENVELOPES_KEY: _BY_LEAF}
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
                conn.execute("COMMIT")
            elif meta.get("format") != _FORMAT:
                raise AuditLogError(f"{self.path} is not a {_FORMAT} store")
            elif meta.get("origin") != self.origin:
                raise AuditLogError(
                    f"{self.path} is the log of {meta.get('origin')!r}, not {self.origin!r}"
                )
            self._open_envelopes(conn, by_leaf=meta.get(_ENVELOPES_KEY) == _BY_LEAF)
            rows = conn.execute("SELECT size, root, note FROM checkpoints ORDER BY size")
            checkpoints = [_stored_checkpoint(row) for row in rows]
            covered = checkpoints[-1].size if checkpoints else 0
            hashes, bad_at = self._load_leaves(conn)
            if bad_at is not None and bad_at < covered:
                raise InconsistentLogError(
                    f"audit leaf {bad_at} is missing or damaged under a checkpoint of size"
                    f" {covered}"
                )
            self._tree = MerkleTree.from_leaf_hashes(hashes)
            if verifier is not None:
                self._refuse_retired(verifier)
            for cp in checkpoints:
                self._check_checkpoint(cp, verifier, retired)
                self._checkpoints[cp.size] = cp
            # Only once the checkpoints vouch for the prefix is the bad tail removed.
            if bad_at is not None:
                self._repair_tail(conn, bad_at)
        except sqlite3.Error as exc:
            raise AuditLogError(f"cannot read audit log {self.path}: {exc}") from exc

    def _open_envelopes(self, conn: sqlite3.Connection, *, by_leaf: bool) -> None:
        """Choose how envelopes are found (see ``_BY_LEAF``); list the spare ones."""
        (table_sql,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'envelopes'"
        ).fetchone()
        if "WITHOUT ROWID" in str(table_sql).upper():  # an old store: the key is the hash
            return
        indexed = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'envelopes_by_hash'"
        ).fetchone()
        if not by_leaf or indexed is not None:
            # An older store (or a by-leaf one an older node indexed): found by hash.
            conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS envelopes_by_hash ON envelopes (hash)")
            return
        self._by_leaf = True
        for rowid, digest in conn.execute("SELECT rowid, hash FROM envelopes WHERE rowid < 0"):
            self._spare_rows[bytes(digest)] = rowid
            self._next_spare = min(self._next_spare, rowid - 1)

    def _load_leaves(self, conn: sqlite3.Connection) -> tuple[list[bytes], int | None]:
        """Leaf hashes of the good prefix, and the first bad index (None if all good)."""
        hashes: list[bytes] = []
        for idx, leaf in conn.execute("SELECT idx, leaf FROM leaves ORDER BY idx"):
            if idx != len(hashes) or not isinstance(leaf, bytes):
                return hashes, len(hashes)
            try:
                fields = unpack_leaf(leaf)
            except ProtocolError:
                return hashes, len(hashes)
            # The flat form: no entry object per leaf (a log may hold millions).
            if fields.kind == EntryType.REQUEST_RECEIVED:
                self._by_id.setdefault(fields.first, idx)
            elif fields.kind == EntryType.ANSWER_SENT:
                self._by_id.setdefault(fields.second, idx)
            elif fields.kind == EntryType.KEY_ROTATED and fields.text == KEY_ROLE_LOG:
                self._log_rotations.append((idx, fields.second))
            hashes.append(leaf_hash(leaf))
        return hashes, None

    def _repair_tail(self, conn: sqlite3.Connection, bad_at: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        removed = conn.execute("DELETE FROM leaves WHERE idx >= ?", (bad_at,)).rowcount
        if self._by_leaf:  # their envelopes' rowids are the indices of the next leaves
            conn.execute("DELETE FROM envelopes WHERE rowid >= ?", (bad_at,))
        conn.execute("COMMIT")
        self.repaired = removed
        # Not silent: the operator sees it, and the caller can read ``repaired``.
        _log.warning(
            "audit log %s: removed %d damaged tail leaves from index %d (no checkpoint covered"
            " them)",
            self.path,
            removed,
            bad_at,
        )

    def _check_checkpoint(
        self, cp: StoredCheckpoint, verifier: NoteVerifier | None, retired: Sequence[NoteVerifier]
    ) -> None:
        if cp.size > self._tree.size:
            raise InconsistentLogError(
                f"checkpoint of size {cp.size} but only {self._tree.size} leaves are stored"
            )
        if self._tree.root_at(cp.size) != cp.root_hash:
            raise InconsistentLogError(
                f"stored leaves do not match the checkpoint of size {cp.size}"
            )
        try:
            if verifier is None:
                parsed = Checkpoint.from_text(Note.from_bytes(cp.note).text)
            else:
                try:
                    parsed = verify_checkpoint(cp.note, verifier, origin=self.origin)
                except NoteError:
                    if self._predates(cp.size, verifier):
                        parsed = self._earlier_checkpoint(cp, retired)
                    elif not self._log_rotations:
                        # No key history (an older log): a retired key may have signed
                        # it, but nothing opens unchecked.
                        parsed = self._earlier_checkpoint(cp, retired, strict=True)
                    else:
                        raise
        except NoteError as exc:
            raise InconsistentLogError(f"stored checkpoint {cp.size} is invalid: {exc}") from exc
        if (parsed.origin, parsed.size, parsed.root_hash) != (self.origin, cp.size, cp.root_hash):
            raise InconsistentLogError(f"stored checkpoint {cp.size} does not match its note")

    @property
    def log_key_history(self) -> list[tuple[int, bytes]]:
        """``(index, new key id)`` of every ``key_rotated`` entry for the log key, in order.

        Read at open and not updated by later appends (the node logs rotations right
        after opening, and only then).
        """
        return list(self._log_rotations)

    def _refuse_retired(self, verifier: NoteVerifier) -> None:
        """Refuse a current log key that this log has already retired.

        An auditor fails a log that rotates back to a retired log key (spec §16.2: a
        leaked retired key could otherwise sign trees past its retirement after a
        correctly chained rotation back to it), so a node restored with an old key file
        stops here instead of writing that entry.
        """
        current = verifier.public_key.key_id
        history = self._log_rotations
        if history and history[-1][1] != current:
            for index, key in history[:-1]:
                if key == current:
                    raise ConfigError(
                        f"the log key {current.hex()[:16]}… was retired after audit entry "
                        f"{index}; a retired log key is never used again (spec §16.2): put "
                        "a new key in place (hansa node rotate-key --key log)"
                    )

    def _predates(self, size: int, verifier: NoteVerifier) -> bool:
        """Whether a checkpoint of ``size`` was signed before ``verifier``'s key came into force.

        The key came into force with the last ``key_rotated`` entry (role ``log``) naming
        it, inside every tree larger than that entry's index. A key no entry names while
        others do is new (the node logs it right after opening), so every stored
        checkpoint predates it. A log with no such entry at all (made before rotations
        were logged, or not by a node) gives no schedule: every checkpoint must verify
        under this key or a retired one.
        """
        current = verifier.public_key.key_id
        for index, new in reversed(self._log_rotations):
            if new == current:
                return size <= index
        return bool(self._log_rotations)

    def _earlier_checkpoint(
        self, cp: StoredCheckpoint, retired: Sequence[NoteVerifier], *, strict: bool = False
    ) -> Checkpoint:
        """Check a checkpoint from before the current log key under a retired one.

        Raises:
            NoteError: ``strict`` and no retired key signed it.
        """
        for old in retired:
            try:
                return verify_checkpoint(cp.note, old, origin=self.origin)
            except NoteError:
                continue
        if strict:
            raise NoteError("note is not signed by the log key or a retired one")
        # Signed by a key this node no longer holds: its root matched the stored leaves
        # (checked above), which is what the store needs; the note must still parse.
        self.unchecked_checkpoints.append(cp.size)
        return Checkpoint.from_text(Note.from_bytes(cp.note).text)

    def close(self) -> None:
        """Close the store; later calls raise :class:`AuditLogError`."""
        with self._queue_cond:
            self._closed = True
        with self._write_lock, self._read_lock:
            self._conn.close()
            self._reader.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- appending

    def append(self, entry: AuditEntry, envelopes: Iterable[bytes] = ()) -> int:
        """Append one entry; return only once it is durable.

        Args:
            entry: the entry.
            envelopes: envelopes to store beside the tree (keyed by SHA-256), in the
                same transaction, e.g. the request envelope of a ``RequestReceived``.

        Returns:
            The entry's leaf index.

        Raises:
            AuditLogError: the store is closed or the commit failed (the log then
                refuses further appends: fail closed).
            TooLargeError: the entry is too large.
        """
        return self.append_many([entry], envelopes)[0]

    def append_many(
        self,
        entries: Sequence[AuditEntry | bytes],
        envelopes: Iterable[bytes] = (),
        *,
        envelope_ids: Sequence[bytes] | None = None,
    ) -> list[int]:
        """Append entries in order, contiguously, and return once they are durable.

        Concurrent callers are committed together (group commit): one caller at a time
        leads, committing every queued job in one transaction, while the others sleep
        until their job is done.

        Args:
            entries: the entries, in order: entry objects, or leaves the caller already
                encoded with :func:`encode_entry` (trusted: stored as given).
            envelopes: envelopes to store beside the tree, keyed by SHA-256.
            envelope_ids: the SHA-256 (message id) of each envelope, in order, when the
                caller has them already (the node computed them when it opened or
                sealed the envelopes); else they are computed here. Trusted: a wrong id
                stores an envelope that :meth:`envelope` then reports as edited.

        Returns:
            The leaf indices, contiguous and in order.

        Raises:
            AuditLogError: the store is closed or the commit failed.
            TooLargeError: an entry is too large.
            ConfigError: ``envelope_ids`` does not have one id per envelope.
        """
        leaves = [e if isinstance(e, bytes) else encode_entry(e) for e in entries]
        if envelope_ids is None:
            envs = [(message_id(bytes(b)), bytes(b)) for b in envelopes]
        else:
            blobs = [bytes(b) for b in envelopes]
            if len(blobs) != len(envelope_ids) or any(len(h) != HASH_SIZE for h in envelope_ids):
                raise ConfigError("append_many needs one 32-byte id per envelope")
            envs = list(zip([bytes(h) for h in envelope_ids], blobs, strict=True))
        if not leaves and not envs:
            return []
        # Hashing happens here, in the caller's thread, not under the write lock.
        job = _Job(entries, leaves, [leaf_hash(b) for b in leaves], envs)
        with self._queue_cond:
            if self._closed:
                raise AuditLogError("the audit log is closed")
            self._queue.append(job)
            # Followers sleep until a leader has committed their job. A waiting caller
            # becomes the leader when none is active.
            while self._leading and not job.done:
                self._queue_cond.wait()
            lead = not job.done
            if lead:
                self._leading = True
        if lead:
            try:
                # A round commits the queue head (at most max_batch jobs); a job further
                # back waits for a later round, run by this leader or the next one.
                while not job.done:
                    self._commit_round()
            finally:
                with self._queue_cond:
                    self._leading = False
                    self._queue_cond.notify_all()
        if job.error is not None:
            raise AuditLogError(job.error)
        return job.indices

    def _commit_round(self) -> None:
        """Commit the queued jobs in one transaction; wake their callers."""
        with self._queue_cond:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
        try:
            with self._write_lock:
                self._commit(batch)
        finally:
            with self._queue_cond:
                for job in batch:
                    if not job.done:  # an unexpected exception: never leave a caller waiting
                        job.indices, job.error, job.done = [], "audit log write failed", True
                self._queue_cond.notify_all()

    def _commit(self, batch: list[_Job]) -> None:
        """Write ``batch`` (caller holds the write lock) and mark its jobs done."""
        if self._broken is not None:
            self._fail(batch, self._broken)
            return
        base = self._tree.size  # only committers grow the tree, under the write lock
        rows: list[tuple[int, bytes]] = []
        envs: list[tuple[bytes, bytes]] = []
        for job in batch:
            job.indices = list(range(base + len(rows), base + len(rows) + len(job.leaves)))
            rows.extend(zip(job.indices, job.leaves, strict=True))
            envs.extend(job.envelopes)
        leaves = [b for job in batch for b in job.leaves] if len(batch) > 1 else batch[0].leaves
        placed: list[tuple[int, bytes, bytes]] = []
        spare: dict[bytes, int] = {}
        try:
            if self._by_leaf:
                placed, spare = self._place(base, leaves, envs)
            self._conn.execute("BEGIN IMMEDIATE")
            _insert(self._conn, "INSERT INTO leaves VALUES ", rows, 2)
            if self._by_leaf:
                _insert(
                    self._conn, "INSERT INTO envelopes (rowid, hash, envelope) VALUES ", placed, 3
                )
            else:
                _insert(self._conn, "INSERT OR IGNORE INTO envelopes VALUES ", envs, 2)
            self._conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            # The outcome of a failed commit is unknown until the next open: fail closed.
            self._broken = f"audit log write failed: {exc}"
            _log.error("audit log %s: %s", self.path, self._broken)
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._fail(batch, self._broken)
            return
        hashes = [h for job in batch for h in job.hashes] if len(batch) > 1 else batch[0].hashes
        with self._state_lock:
            self._tree.extend_leaf_hashes(hashes)  # one pass per level, not one call per leaf
            _index_leaves(self._by_id, base, leaves)
            if spare:
                self._spare_rows.update(spare)
                self._next_spare = min(spare.values()) - 1
        for job in batch:
            job.done = True

    def _place(
        self, base: int, leaves: Sequence[bytes], envs: Sequence[tuple[bytes, bytes]]
    ) -> tuple[list[tuple[int, bytes, bytes]], dict[bytes, int]]:
        """The by-leaf rows ``(rowid, hash, envelope)`` of a batch's new envelopes.

        An envelope takes the index of the leaf that logs it; one no leaf logs (or whose
        leaf came without it) takes the next spare rowid, returned in the second value.
        An envelope stored before is skipped, as the hash index did for older stores.
        """
        logged: dict[bytes, int] = {}
        _index_leaves(logged, base, leaves)
        by_id, spare_rows = self._by_id, self._spare_rows
        placed: list[tuple[int, bytes, bytes]] = []
        spare: dict[bytes, int] = {}
        seen: set[bytes] = set()
        next_spare = self._next_spare
        for digest, blob in envs:
            if digest in seen or digest in spare_rows:
                continue
            seen.add(digest)
            at = by_id.get(digest)
            if at is not None:
                if self._stored_at(at, digest):
                    continue  # the same envelope again (e.g. a replayed request)
                at = None  # its leaf was logged without it earlier
            else:
                at = logged.get(digest)
            if at is None:
                at = spare[digest] = next_spare
                next_spare -= 1
            placed.append((at, digest, blob))
        return placed, spare

    def _stored_at(self, rowid: int, digest: bytes) -> bool:
        """Whether the envelope with ``digest`` is stored at ``rowid`` (writer connection)."""
        row = self._conn.execute("SELECT hash FROM envelopes WHERE rowid = ?", (rowid,)).fetchone()
        return row is not None and row[0] == digest

    @staticmethod
    def _fail(batch: list[_Job], reason: str) -> None:
        for job in batch:
            job.indices = []
            job.error = reason
            job.done = True

    # ---------------------------------------------------------------- checkpoints

    def checkpoint(self, signer: NoteSigner) -> bytes:
        """Sign a checkpoint over the current tree and store it durably.

        Args:
            signer: the log key; its name must be the log's origin.

        Returns:
            The signed C2SP checkpoint note.

        Raises:
            ConfigError: the signer's name is not the origin.
            AuditLogError: the store is closed or the write failed.
        """
        return self._checkpoint(signer).note

    def _checkpoint(self, signer: NoteSigner) -> StoredCheckpoint:
        if signer.name != self.origin:
            raise ConfigError(f"log key {signer.name!r} does not match origin {self.origin!r}")
        with self._write_lock:
            self._check_usable()
            with self._state_lock:
                size, root = self._tree.size, self._tree.root()
            note = sign_checkpoint(Checkpoint(self.origin, size, root), signer)
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute(
                    "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)", (size, root, note)
                )
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._broken = f"audit checkpoint write failed: {exc}"
                raise AuditLogError(self._broken) from exc
            stored = StoredCheckpoint(size, root, note)
            with self._state_lock:
                self._checkpoints[size] = stored
        return stored

    def checkpoint_if_due(
        self, signer: NoteSigner, policy: CheckpointPolicy, now: float
    ) -> bytes | None:
        """Sign a checkpoint when ``policy`` says one is due.

        Args:
            signer: the log key.
            policy: the policy; updated when a checkpoint is signed.
            now: the current time in the policy's clock.

        Returns:
            The new note, or None when none was due.

        Raises:
            ConfigError: as for :meth:`checkpoint`.
            AuditLogError: as for :meth:`checkpoint`.
        """
        size = self.size
        if not policy.due(now, size):
            return None
        stored = self._checkpoint(signer)
        policy.record(now, stored.size)
        return stored.note

    def _check_usable(self) -> None:
        with self._queue_cond:
            if self._closed:
                raise AuditLogError("the audit log is closed")
        if self._broken is not None:
            raise AuditLogError(self._broken)

    def checkpoints(self) -> list[StoredCheckpoint]:
        """Return the stored checkpoints, by size."""
        with self._state_lock:
            return [self._checkpoints[s] for s in sorted(self._checkpoints)]

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        """Return the checkpoint with the largest size, or None."""
        with self._state_lock:
            return self._checkpoints[max(self._checkpoints)] if self._checkpoints else None

    # ---------------------------------------------------------------- reading and proofs

    @property
    def size(self) -> int:
        """The number of durable entries."""
        with self._state_lock:
            return self._tree.size

    def root(self, size: int | None = None) -> bytes:
        """Return the tree root now, or at an earlier ``size``.

        Raises:
            ProofError: ``size`` is larger than the log.
        """
        with self._state_lock:
            return self._tree.root() if size is None else self._tree.root_at(size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Return the inclusion proof of leaf ``index`` in the tree of ``size`` leaves.

        Args:
            index: the leaf index.
            size: the tree size (e.g. a checkpoint's); defaults to the current size.

        Returns:
            The RFC 9162 audit path, leaf to root.

        Raises:
            ProofError: ``index`` or ``size`` is out of range.
        """
        with self._state_lock:
            return self._tree.inclusion_proof(index, size)

    def index_of(self, message_id: bytes) -> int | None:
        """Return the leaf index logging a message id (request received or answer sent)."""
        with self._state_lock:
            return self._by_id.get(bytes(message_id))

    def inclusion_proof_for(
        self, message_id: bytes, size: int | None = None
    ) -> tuple[int, list[bytes]]:
        """Return ``(index, proof)`` for the leaf that logged ``message_id``.

        Args:
            message_id: SHA-256 of a request or answer envelope.
            size: the tree size; defaults to the current size.

        Returns:
            The leaf index and its inclusion proof.

        Raises:
            ProofError: the message is not logged (within ``size``), or ``size`` is out
                of range.
        """
        with self._state_lock:
            index = self._by_id.get(bytes(message_id))
            if index is None:
                raise ProofError("no audit leaf logs this message id")
            return index, self._tree.inclusion_proof(index, size)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """Return the consistency proof between two tree sizes (e.g. two checkpoints).

        Args:
            old_size: the earlier size (at least 1).
            new_size: the later size; defaults to the current size.

        Returns:
            The RFC 9162 consistency proof.

        Raises:
            ProofError: the sizes are out of range.
        """
        with self._state_lock:
            return self._tree.consistency_proof(old_size, new_size)

    def leaf_hash_at(self, index: int) -> bytes:
        """Return the leaf hash at ``index``.

        Raises:
            ProofError: ``index`` is out of range.
        """
        with self._state_lock:
            return self._tree.leaf_hash_at(index)

    def leaves(self, start: int, stop: int) -> list[bytes]:
        """Return the durable leaves ``[start, stop)`` (clipped to the log size).

        Args:
            start: the first index.
            stop: one past the last index.

        Returns:
            The leaf bytes in order.

        Raises:
            AuditLogError: the store cannot be read.
        """
        stop = min(stop, self.size)
        if start >= stop:
            return []
        with self._read_lock:
            try:
                rows = self._reader.execute(
                    "SELECT leaf FROM leaves WHERE idx >= ? AND idx < ? ORDER BY idx",
                    (start, stop),
                ).fetchall()
            except sqlite3.Error as exc:
                raise AuditLogError(f"cannot read audit leaves: {exc}") from exc
        return [bytes(r[0]) for r in rows]

    def entry(self, index: int) -> AuditEntry:
        """Return the decoded entry at ``index``.

        Raises:
            AuditLogError: ``index`` is out of range or the store cannot be read.
        """
        found = self.leaves(index, index + 1) if index >= 0 else []
        if not found:
            raise AuditLogError(f"no audit entry {index}")
        return decode_entry(found[0])

    def envelope(self, digest: bytes) -> bytes | None:
        """Return the stored envelope with SHA-256 ``digest``, or None.

        Raises:
            InconsistentLogError: the stored bytes do not hash to ``digest`` (edited).
            AuditLogError: the store cannot be read.
        """
        digest = bytes(digest)
        key: int | bytes
        if self._by_leaf:
            with self._state_lock:
                at = self._spare_rows.get(digest)
                if at is None:
                    at = self._by_id.get(digest)
            if at is None:
                return None
            sql, key = "SELECT hash, envelope FROM envelopes WHERE rowid = ?", at
        else:
            sql, key = "SELECT hash, envelope FROM envelopes WHERE hash = ?", digest
        with self._read_lock:
            try:
                row = self._reader.execute(sql, (key,)).fetchone()
            except sqlite3.Error as exc:
                raise AuditLogError(f"cannot read audit envelopes: {exc}") from exc
        if row is None or row[0] != digest:  # by leaf: that leaf was logged without it
            return None
        envelope = row[1]
        if not isinstance(envelope, bytes) or message_id(envelope) != digest:
            raise InconsistentLogError("a stored envelope does not hash to its key")
        return envelope


_MAX_PARAMETERS: Final = 999
"""Parameters per multi-row INSERT at most: SQLite's oldest limit."""


@functools.lru_cache(maxsize=512)
def _insert_sql(head: str, rows: int, width: int) -> str:
    row = "(" + ", ".join(["?"] * width) + ")"
    return head + ", ".join([row] * rows)


def _insert(
    conn: sqlite3.Connection, head: str, rows: Sequence[tuple[object, ...]], width: int
) -> None:
    """Insert rows of ``width`` columns with one multi-row ``INSERT`` per chunk.

    Not ``executemany``: that steps the statement once per row, and ``sqlite3`` lets go
    of the GIL and takes it back around every step. Taking it back waits for the event
    loop thread, which holds it while it works: a convoy costing more than the inserts.
    One statement per chunk needs one hand-over per chunk instead.
    """
    step = _MAX_PARAMETERS // width
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        conn.execute(_insert_sql(head, len(chunk), width), [v for row in chunk for v in row])


def _lock(path: Path) -> int:
    """Take the single-writer lock ``<path>.lock`` (two writers would fork the log)."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise AuditLogError(f"cannot open the audit log lock {lock_path}: {exc}") from exc
    try:
        # flock locks belong to the open file: a second open, even in this process,
        # fails, and the kernel drops the lock when a killed process's files close.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise AuditLogError(f"audit log {path} is already open elsewhere") from exc
    return fd


def _connect(path: Path, durable: bool) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        conn.close()
        raise sqlite3.OperationalError(f"cannot enable WAL mode (got {mode})")
    # FULL: in WAL mode every commit fsyncs the WAL, so a returned append is on disk.
    conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
    # The commit that crosses this many WAL pages copies them into the database (and
    # fsyncs it) before it returns, and every waiting caller stalls behind it. 10,000
    # pages (~40 MB of WAL) instead of SQLite's 1,000: fewer stalls and pages written
    # once per checkpoint more often (bench/node.py (a): about +0.01-0.02 x bare).
    conn.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT}")
    return conn
