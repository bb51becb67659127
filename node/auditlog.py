"""The node's durable, tamper-evident audit log: leaf format, store and checkpoints.

Every event the node sees is appended here *before* the node acts on it or replies
(issue 5, part 1). The log is an RFC 9162 Merkle tree (:mod:`hansa.crypto.merkle`) over
fixed binary leaves; the node signs C2SP checkpoints over it (part 2). This module is a
library: the server wires it in separately.

Leaf layout (``hansa-audit/v1``)
================================

Every leaf is at most :data:`MAX_LEAF_SIZE` (65,535) bytes, so it fits a C2SP
``tlog-tiles`` entry bundle. All integers are unsigned big-endian; ``[32]`` is a raw
32-byte hash. The layout is a common header, a fixed body chosen by ``entry_type``, and
one trailing length-prefixed byte string ``data``::

    offset  size  field
    0       15    magic        "hansa-audit/v1\\n" (ASCII, version in the magic)
    15      1     entry_type   u8, below
    16      8     log_time_ms  u64, POSIX milliseconds when the node logged the event
    24      B     body         fixed size B for the entry type, below
    24+B    2     data_len     u16
    26+B    n     data         n = data_len bytes; the leaf ends here exactly

    entry_type              body fields (in order)                               B   data
    0x01 request_received   message_id[32] requester_key_id[32]                 64  empty
    0x02 decision           message_id[32] u8 outcome u16 reason                43  data version
                            u64 disclosure_version                                  (UTF-8)
    0x03 answer_sent        request_id[32] answer_id[32]                        64  empty
    0x04 roster_installed   roster_digest[32] u64 roster_version                40  empty
    0x05 key_rotated        old_key_id[32] new_key_id[32]                       64  key role (UTF-8)
    0x06 settings_changed   u8 scope digest[32] u64 settings_version            41  subject (UTF-8)

* ``message_id`` / ``request_id`` / ``answer_id``: SHA-256 of the exact envelope bytes
  (:func:`hansa.protocol.envelope.message_id`). The envelopes themselves are stored
  beside the tree, keyed by that hash (crypto-audit-anchors §6.2): an auditor checks
  they hash to the leaf fields and verifies their signatures.
* ``requester_key_id``, ``old_key_id``, ``new_key_id``: Hansa key ids
  (:func:`hansa.crypto.keys.key_id`); ``old_key_id`` is 32 zero bytes for a first key.
* ``outcome``: 1 answered, 2 answered with suppressed cells, 3 refused. ``reason`` is 0
  for the two answered outcomes and a non-zero wire :class:`ErrorCode` for a refusal.
  ``disclosure_version`` is the dataset's disclosure-settings version the decision
  applied (0 when none applied, e.g. a refusal before the dataset was resolved); ``data``
  holds the dataset's data version string (``"v<counter>-<12 hex>"``), or is empty.
* ``scope``: 1 node configuration, 2 a dataset's disclosure settings; ``data`` names the
  subject (the dataset for scope 2, empty for scope 1). ``digest`` is SHA-256 of the new
  settings as the node holds them.
* Decoding is strict: exact length (no truncation, no trailing bytes), known magic and
  entry type, known enum values, empty ``data`` where the table says so, and valid
  UTF-8 text. A leaf hash is ``SHA-256(0x00 || leaf)`` (RFC 9162 §2.1.1).

Store
=====

SQLite (stdlib ``sqlite3``) in WAL mode with ``synchronous=FULL``: a commit returns only
after the WAL is fsynced, so :meth:`AuditLog.append` returns only once the entry is on
disk. Tables: ``leaves(idx, leaf)``, ``envelopes(hash, envelope)``,
``checkpoints(size, root, note)`` and ``meta`` (format and origin).

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

import enum
import fcntl
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
]

_log = logging.getLogger(__name__)

MAGIC: Final = b"hansa-audit/v1\n"
"""The leaf prefix; the format version lives in it."""
_MAGIC_FAMILY: Final = b"hansa-audit/"
MAX_LEAF_SIZE: Final = 65_535
"""Largest leaf in bytes (fits a C2SP tlog-tiles entry bundle, crypto-audit-anchors §0)."""
_HEADER: Final = struct.Struct(">15sBQ")
_DATA_LEN: Final = struct.Struct(">H")
_U64_MAX: Final = 2**64 - 1
_ZERO_HASH: Final = bytes(HASH_SIZE)


class AuditLogError(HansaError):
    """The audit log store cannot be opened or written (I/O, corruption, misuse)."""

    default_code = ErrorCode.INTERNAL


class InconsistentLogError(AuditLogError):
    """The stored leaves do not match a stored checkpoint: tampering or lost entries."""


class EntryType(enum.IntEnum):
    """``entry_type`` byte of a leaf (module docstring, "Leaf layout")."""

    REQUEST_RECEIVED = 0x01
    DECISION = 0x02
    ANSWER_SENT = 0x03
    ROSTER_INSTALLED = 0x04
    KEY_ROTATED = 0x05
    SETTINGS_CHANGED = 0x06


class Outcome(enum.IntEnum):
    """What the node decided about a request."""

    ANSWERED = 1
    ANSWERED_SUPPRESSED = 2
    REFUSED = 3


class SettingsScope(enum.IntEnum):
    """Which settings a ``settings_changed`` entry records."""

    CONFIG = 1
    DISCLOSURE = 2


def _field_error(message: str) -> ProtocolError:
    return ProtocolError(message, ErrorCode.INVALID_FIELD)


def _check_hash(value: object, name: str) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise _field_error(f"audit entry {name} must be {HASH_SIZE} bytes")


def _check_uint(value: object, bits: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise _field_error(f"audit entry {name} must be an integer in 0..2^{bits}-1")


def _check_text(value: object, name: str) -> None:
    if not isinstance(value, str):
        raise _field_error(f"audit entry {name} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise _field_error(f"audit entry {name} is not encodable as UTF-8") from exc


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A signed request arrived (logged before the node evaluates it).

    Attributes:
        log_time_ms: POSIX milliseconds when logged.
        message_id: SHA-256 of the request envelope bytes.
        requester_key_id: the requester's Hansa key id.
    """

    log_time_ms: int
    message_id: bytes
    requester_key_id: bytes

    def __post_init__(self) -> None:
        _check_uint(self.log_time_ms, 64, "log_time_ms")
        _check_hash(self.message_id, "message_id")
        _check_hash(self.requester_key_id, "requester_key_id")


@dataclass(frozen=True, slots=True)
class Decision:
    """The node's decision about a request (logged before the answer is sent).

    Attributes:
        log_time_ms: POSIX milliseconds when logged.
        message_id: SHA-256 of the request envelope the decision is about.
        outcome: answered, answered with suppressed cells, or refused.
        reason: 0 when answered; the non-zero wire error code when refused.
        disclosure_version: the disclosure-settings version applied (0: none).
        data_version: the dataset's data version string, or empty.
    """

    log_time_ms: int
    message_id: bytes
    outcome: Outcome
    reason: int = 0
    disclosure_version: int = 0
    data_version: str = ""

    def __post_init__(self) -> None:
        _check_uint(self.log_time_ms, 64, "log_time_ms")
        _check_hash(self.message_id, "message_id")
        if not isinstance(self.outcome, Outcome):
            raise _field_error("decision outcome must be an Outcome")
        _check_uint(self.reason, 16, "reason")
        if (self.outcome is Outcome.REFUSED) != (self.reason != 0):
            raise _field_error("a refusal needs a non-zero reason; an answer needs reason 0")
        _check_uint(self.disclosure_version, 64, "disclosure_version")
        _check_text(self.data_version, "data_version")


@dataclass(frozen=True, slots=True)
class AnswerSent:
    """An answer or refusal envelope is about to be sent.

    Attributes:
        log_time_ms: POSIX milliseconds when logged.
        request_id: SHA-256 of the request envelope answered.
        answer_id: SHA-256 of the answer (or refusal) envelope bytes.
    """

    log_time_ms: int
    request_id: bytes
    answer_id: bytes

    def __post_init__(self) -> None:
        _check_uint(self.log_time_ms, 64, "log_time_ms")
        _check_hash(self.request_id, "request_id")
        _check_hash(self.answer_id, "answer_id")


@dataclass(frozen=True, slots=True)
class RosterInstalled:
    """The node installed a new alliance roster.

    Attributes:
        log_time_ms: POSIX milliseconds when logged.
        roster_digest: SHA-256 of the roster body.
        roster_version: the roster's version number.
    """

    log_time_ms: int
    roster_digest: bytes
    roster_version: int

    def __post_init__(self) -> None:
        _check_uint(self.log_time_ms, 64, "log_time_ms")
        _check_hash(self.roster_digest, "roster_digest")
        _check_uint(self.roster_version, 64, "roster_version")


@dataclass(frozen=True, slots=True)
class KeyRotated:
    """One of the node's keys was replaced.

    Attributes:
        log_time_ms: POSIX milliseconds when logged.
        old_key_id: key id of the retired key (32 zero bytes for a first key).
        new_key_id: key id of the new key.
        role: which key (e.g. ``"node"`` or ``"log"``).
    """

    log_time_ms: int
    old_key_id: bytes
    new_key_id: bytes
    role: str = ""

    def __post_init__(self) -> None:
        _check_uint(self.log_time_ms, 64, "log_time_ms")
        _check_hash(self.old_key_id, "old_key_id")
        _check_hash(self.new_key_id, "new_key_id")
        _check_text(self.role, "role")


@dataclass(frozen=True, slots=True)
class SettingsChanged:
    """The node's configuration or a dataset's disclosure settings changed.

    Attributes:
        log_time_ms: POSIX milliseconds when logged.
        scope: configuration or disclosure settings.
        digest: SHA-256 of the new settings.
        settings_version: the new settings version.
        subject: the dataset name for disclosure settings; empty for configuration.
    """

    log_time_ms: int
    scope: SettingsScope
    digest: bytes
    settings_version: int
    subject: str = ""

    def __post_init__(self) -> None:
        _check_uint(self.log_time_ms, 64, "log_time_ms")
        if not isinstance(self.scope, SettingsScope):
            raise _field_error("settings scope must be a SettingsScope")
        _check_hash(self.digest, "digest")
        _check_uint(self.settings_version, 64, "settings_version")
        _check_text(self.subject, "subject")


AuditEntry = (
    RequestReceived | Decision | AnswerSent | RosterInstalled | KeyRotated | SettingsChanged
)
"""Any decoded audit log entry."""

# Fixed body layouts (module docstring table). Each is packed after the header and
# followed by ``u16 data_len || data``.
_REQUEST: Final = struct.Struct(">32s32s")
_DECISION: Final = struct.Struct(">32sBHQ")
_ANSWER: Final = struct.Struct(">32s32s")
_ROSTER: Final = struct.Struct(">32sQ")
_KEY: Final = struct.Struct(">32s32s")
_SETTINGS: Final = struct.Struct(">B32sQ")
_BODIES: Final[dict[EntryType, struct.Struct]] = {
    EntryType.REQUEST_RECEIVED: _REQUEST,
    EntryType.DECISION: _DECISION,
    EntryType.ANSWER_SENT: _ANSWER,
    EntryType.ROSTER_INSTALLED: _ROSTER,
    EntryType.KEY_ROTATED: _KEY,
    EntryType.SETTINGS_CHANGED: _SETTINGS,
}


def _parts(entry: AuditEntry) -> tuple[EntryType, bytes, bytes]:
    """Return (type, packed body, data) of an entry."""
    if isinstance(entry, RequestReceived):
        body = _REQUEST.pack(entry.message_id, entry.requester_key_id)
        return EntryType.REQUEST_RECEIVED, body, b""
    if isinstance(entry, Decision):
        body = _DECISION.pack(
            entry.message_id, entry.outcome, entry.reason, entry.disclosure_version
        )
        return EntryType.DECISION, body, entry.data_version.encode("utf-8")
    if isinstance(entry, AnswerSent):
        return EntryType.ANSWER_SENT, _ANSWER.pack(entry.request_id, entry.answer_id), b""
    if isinstance(entry, RosterInstalled):
        body = _ROSTER.pack(entry.roster_digest, entry.roster_version)
        return EntryType.ROSTER_INSTALLED, body, b""
    if isinstance(entry, KeyRotated):
        body = _KEY.pack(entry.old_key_id, entry.new_key_id)
        return EntryType.KEY_ROTATED, body, entry.role.encode("utf-8")
    if isinstance(entry, SettingsChanged):
        body = _SETTINGS.pack(entry.scope, entry.digest, entry.settings_version)
        return EntryType.SETTINGS_CHANGED, body, entry.subject.encode("utf-8")
    raise _field_error(f"not an audit entry: {type(entry).__name__}")


def encode_entry(entry: AuditEntry) -> bytes:
    """Encode an entry as a ``hansa-audit/v1`` leaf.

    Args:
        entry: the entry (its fields were validated when it was built).

    Returns:
        The leaf bytes.

    Raises:
        TooLargeError: the leaf would exceed :data:`MAX_LEAF_SIZE`.
        ProtocolError: ``entry`` is not an audit entry (code ``INVALID_FIELD``).
    """
    kind, body, data = _parts(entry)
    size = _HEADER.size + len(body) + _DATA_LEN.size + len(data)
    if size > MAX_LEAF_SIZE:
        raise TooLargeError(f"audit leaf of {size} bytes exceeds {MAX_LEAF_SIZE}")
    return b"".join(
        (_HEADER.pack(MAGIC, kind, entry.log_time_ms), body, _DATA_LEN.pack(len(data)), data)
    )


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _field_error(f"audit leaf {name} is not valid UTF-8") from exc


def _no_data(data: bytes, kind: EntryType) -> None:
    if data:
        raise _field_error(f"audit leaf of type {kind.name.lower()} must carry no data")


def decode_entry(leaf: bytes) -> AuditEntry:
    """Decode a ``hansa-audit/v1`` leaf strictly.

    Args:
        leaf: the leaf bytes.

    Returns:
        The entry.

    Raises:
        TooLargeError: the leaf exceeds :data:`MAX_LEAF_SIZE`.
        ProtocolError: truncated, trailing bytes or bad magic (``MALFORMED``), another
            format version (``UNSUPPORTED_VERSION``), or an unknown entry type, enum value,
            non-empty data where none is allowed, or invalid UTF-8 (``INVALID_FIELD``).
    """
    if not isinstance(leaf, bytes | bytearray | memoryview):
        raise ProtocolError("an audit leaf must be bytes")
    leaf = bytes(leaf)
    if len(leaf) > MAX_LEAF_SIZE:
        raise TooLargeError(f"audit leaf of {len(leaf)} bytes exceeds {MAX_LEAF_SIZE}")
    if len(leaf) < _HEADER.size:
        raise ProtocolError("audit leaf is truncated (no complete header)")
    magic, raw_kind, log_time_ms = _HEADER.unpack_from(leaf)
    if magic != MAGIC:
        if magic.startswith(_MAGIC_FAMILY):
            raise ProtocolError(
                f"unsupported audit leaf version {magic!r}", ErrorCode.UNSUPPORTED_VERSION
            )
        raise ProtocolError("not an audit leaf (bad magic)")
    try:
        kind = EntryType(raw_kind)
    except ValueError as exc:
        raise _field_error(f"unknown audit entry type 0x{raw_kind:02x}") from exc
    body_layout = _BODIES[kind]
    data_at = _HEADER.size + body_layout.size
    if len(leaf) < data_at + _DATA_LEN.size:
        raise ProtocolError("audit leaf is truncated (incomplete body)")
    (data_len,) = _DATA_LEN.unpack_from(leaf, data_at)
    end = data_at + _DATA_LEN.size + data_len
    if len(leaf) < end:
        raise ProtocolError("audit leaf is truncated (incomplete data)")
    if len(leaf) > end:
        raise ProtocolError("audit leaf has trailing bytes")
    data = leaf[data_at + _DATA_LEN.size :]
    try:
        return _build(kind, log_time_ms, leaf, data)
    except ValueError as exc:  # an enum byte with no member
        raise _field_error(f"audit leaf has an invalid field: {exc}") from exc


def _build(kind: EntryType, t: int, leaf: bytes, data: bytes) -> AuditEntry:
    """Build the entry of type ``kind`` from its body (at offset 24) and data."""
    at = _HEADER.size
    if kind is EntryType.REQUEST_RECEIVED:
        _no_data(data, kind)
        mid, requester = _REQUEST.unpack_from(leaf, at)
        return RequestReceived(t, mid, requester)
    if kind is EntryType.DECISION:
        mid, outcome, reason, disclosure = _DECISION.unpack_from(leaf, at)
        return Decision(t, mid, Outcome(outcome), reason, disclosure, _text(data, "data version"))
    if kind is EntryType.ANSWER_SENT:
        _no_data(data, kind)
        request_id, answer_id = _ANSWER.unpack_from(leaf, at)
        return AnswerSent(t, request_id, answer_id)
    if kind is EntryType.ROSTER_INSTALLED:
        _no_data(data, kind)
        digest, version = _ROSTER.unpack_from(leaf, at)
        return RosterInstalled(t, digest, version)
    if kind is EntryType.KEY_ROTATED:
        old, new = _KEY.unpack_from(leaf, at)
        return KeyRotated(t, old, new, _text(data, "key role"))
    scope, digest, version = _SETTINGS.unpack_from(leaf, at)
    return SettingsChanged(t, SettingsScope(scope), digest, version, _text(data, "subject"))


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
    """One caller's pending append: filled in by whichever caller commits it."""

    entries: Sequence[AuditEntry]
    leaves: list[bytes]
    hashes: list[bytes]
    envelopes: list[tuple[bytes, bytes]]
    indices: list[int] = field(default_factory=list)
    error: str | None = None
    done: bool = False


_FORMAT: Final = "hansa-audit-store/v1"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leaves (idx INTEGER PRIMARY KEY, leaf BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS envelopes (hash BLOB PRIMARY KEY, envelope BLOB NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY, root BLOB NOT NULL, note BLOB NOT NULL);
"""


def _stored_checkpoint(row: tuple[object, ...]) -> StoredCheckpoint:
    """A checkpoints row, type-checked (the file may have been edited)."""
    size, root, note = row
    if not (isinstance(size, int) and isinstance(root, bytes) and isinstance(note, bytes)):
        raise InconsistentLogError(f"stored checkpoint row {size!r} has the wrong types")
    return StoredCheckpoint(size, root, note)


def _indexed_id(entry: AuditEntry) -> bytes | None:
    """The message id an entry is found by (request received, answer sent)."""
    if isinstance(entry, RequestReceived):
        return entry.message_id
    if isinstance(entry, AnswerSent):
        return entry.answer_id
    return None


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
        self.commits = 0
        self._conn = conn
        self._reader = reader
        self._max_batch = max_batch
        self._tree = MerkleTree()
        self._by_id: dict[bytes, int] = {}
        self._checkpoints: dict[int, StoredCheckpoint] = {}
        self._queue: list[_Job] = []
        # guards _queue, _leading, _closed and the jobs' results
        self._queue_cond = threading.Condition(threading.Lock())
        self._leading = False  # a caller is committing rounds
        self._write_lock = threading.Lock()  # owns _conn: one writer (commit or checkpoint)
        self._state_lock = threading.Lock()  # guards _tree, _by_id, _checkpoints
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
        max_batch: int = 4096,
    ) -> AuditLog:
        """Open (or create) the log at ``path`` and check it against its checkpoints.

        Args:
            path: the SQLite file; created with its tables when absent.
            origin: the log's checkpoint origin; must match the one the file was made with.
            durable: fsync every commit (WAL, ``synchronous=FULL``). False sets
                ``synchronous=OFF`` and is for benchmarks only.
            verifier: when given, every stored checkpoint's signature is verified too.
            max_batch: most caller jobs committed in one transaction.

        Returns:
            The open log.

        Raises:
            InconsistentLogError: a stored checkpoint does not match the recomputed tree,
                or damaged leaves are covered by a checkpoint.
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
            log._load(verifier)
        except BaseException:
            log.close()
            raise
        return log

    def _load(self, verifier: NoteVerifier | None) -> None:
        conn = self._conn
        try:
            conn.executescript(_SCHEMA)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("format", _FORMAT), ("origin", self.origin)],
                )
                conn.execute("COMMIT")
            elif meta.get("format") != _FORMAT:
                raise AuditLogError(f"{self.path} is not a {_FORMAT} store")
            elif meta.get("origin") != self.origin:
                raise AuditLogError(
                    f"{self.path} is the log of {meta.get('origin')!r}, not {self.origin!r}"
                )
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
            for cp in checkpoints:
                self._check_checkpoint(cp, verifier)
                self._checkpoints[cp.size] = cp
            # Only once the checkpoints vouch for the prefix is the bad tail removed.
            if bad_at is not None:
                self._repair_tail(conn, bad_at)
        except sqlite3.Error as exc:
            raise AuditLogError(f"cannot read audit log {self.path}: {exc}") from exc

    def _load_leaves(self, conn: sqlite3.Connection) -> tuple[list[bytes], int | None]:
        """Leaf hashes of the good prefix, and the first bad index (None if all good)."""
        hashes: list[bytes] = []
        for idx, leaf in conn.execute("SELECT idx, leaf FROM leaves ORDER BY idx"):
            if idx != len(hashes) or not isinstance(leaf, bytes):
                return hashes, len(hashes)
            try:
                entry = decode_entry(leaf)
            except ProtocolError:
                return hashes, len(hashes)
            key = _indexed_id(entry)
            if key is not None:
                self._by_id.setdefault(key, idx)
            hashes.append(leaf_hash(leaf))
        return hashes, None

    def _repair_tail(self, conn: sqlite3.Connection, bad_at: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        removed = conn.execute("DELETE FROM leaves WHERE idx >= ?", (bad_at,)).rowcount
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

    def _check_checkpoint(self, cp: StoredCheckpoint, verifier: NoteVerifier | None) -> None:
        if cp.size > self._tree.size:
            raise InconsistentLogError(
                f"checkpoint of size {cp.size} but only {self._tree.size} leaves are stored"
            )
        if self._tree.root_at(cp.size) != cp.root_hash:
            raise InconsistentLogError(
                f"stored leaves do not match the checkpoint of size {cp.size}"
            )
        try:
            if verifier is not None:
                parsed = verify_checkpoint(cp.note, verifier, origin=self.origin)
            else:
                parsed = Checkpoint.from_text(Note.from_bytes(cp.note).text)
        except NoteError as exc:
            raise InconsistentLogError(f"stored checkpoint {cp.size} is invalid: {exc}") from exc
        if (parsed.origin, parsed.size, parsed.root_hash) != (self.origin, cp.size, cp.root_hash):
            raise InconsistentLogError(f"stored checkpoint {cp.size} does not match its note")

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
        self, entries: Sequence[AuditEntry], envelopes: Iterable[bytes] = ()
    ) -> list[int]:
        """Append entries in order, contiguously, and return once they are durable.

        Concurrent callers are committed together (group commit): one caller at a time
        leads, committing every queued job in one transaction, while the others sleep
        until their job is done.

        Args:
            entries: the entries, in order.
            envelopes: envelopes to store beside the tree, keyed by SHA-256.

        Returns:
            The leaf indices, contiguous and in order.

        Raises:
            AuditLogError: the store is closed or the commit failed.
            TooLargeError: an entry is too large.
        """
        leaves = [encode_entry(e) for e in entries]
        envs = [(message_id(bytes(b)), bytes(b)) for b in envelopes]
        if not leaves and not envs:
            return []
        # Hashing happens here, in the caller's thread, not under the write lock.
        job = _Job(list(entries), leaves, [leaf_hash(b) for b in leaves], envs)
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
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany("INSERT INTO leaves VALUES (?, ?)", rows)
            self._conn.executemany("INSERT OR IGNORE INTO envelopes VALUES (?, ?)", envs)
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
        with self._state_lock:
            for job in batch:
                for index, h, entry in zip(job.indices, job.hashes, job.entries, strict=True):
                    self._tree.append_leaf_hash(h)
                    key = _indexed_id(entry)
                    if key is not None:
                        self._by_id.setdefault(key, index)
        for job in batch:
            job.done = True

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
        with self._read_lock:
            try:
                row = self._reader.execute(
                    "SELECT envelope FROM envelopes WHERE hash = ?", (bytes(digest),)
                ).fetchone()
            except sqlite3.Error as exc:
                raise AuditLogError(f"cannot read audit envelopes: {exc}") from exc
        if row is None:
            return None
        envelope = row[0]
        if not isinstance(envelope, bytes) or message_id(envelope) != bytes(digest):
            raise InconsistentLogError("a stored envelope does not hash to its key")
        return envelope


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
    return conn
