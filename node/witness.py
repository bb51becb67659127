"""A C2SP ``tlog-witness`` for the other cities' audit logs: checks, cosigns, raises alarms.

Member cities named as witnesses in the roster cosign the other cities' checkpoints
(issue 5, part 5) so that a city cannot show one history to some auditors and another
to the rest (a *split view*). This module is the witness's logic and its SQLite store;
the node's ``POST /v1/witness/add-checkpoint`` route calls :meth:`Witness.add_checkpoint`
and translates its errors with :func:`http_status`. No aiohttp here.

Theory of operation
===================

``add_checkpoint(note, old_size, proof, now_s)`` follows ``c2sp.org/tlog-witness@v1.0.0``
§add-checkpoint, in this order:

1. The note parses as a C2SP checkpoint (else 400), its origin names a log this witness
   follows (``log_verifiers(origin)``; else 404) and the log's signature verifies (else
   403). Lines from other keys (other witnesses' cosignatures) are ignored.
2. ``old_size`` is at most the checkpoint's size (else 400).
3. **Same size, different root** as the last cosigned checkpoint is an equivocation,
   whatever ``old_size`` says: the log signed two different trees of one size.
4. ``old_size`` equals the size of the last checkpoint cosigned for the origin, or 0 when
   none was (else :class:`WitnessConflict` carrying that size: HTTP 409, so the log
   retries with the right proof).
5. From ``old_size`` 0 the proof must be empty (the first checkpoint is trusted on first
   use, as upstream witnesses do), and a size-0 checkpoint must carry the empty-tree root
   ``SHA-256("")``. At equal sizes the proof must be empty and the roots equal (step 3).
   Otherwise the RFC 9162 §2.1.4.2 consistency proof from the stored root to the new root
   must verify (else 422).
6. The witness signs a ``cosignature/v1`` line at ``now_s`` and persists the new state
   with a compare-and-swap in one SQLite transaction (``synchronous=FULL``) *before*
   returning the line, so two racing requests cannot roll the witness back (the race
   tlog-witness §add-checkpoint describes); the loser gets a :class:`WitnessConflict`.

Equivocation
------------

An alarm is raised only on *proof* that the log signed two inconsistent trees, so a
replayed genuine checkpoint with a garbage proof (the route is unauthenticated) cannot
raise false alarms:

* ``same-size``: two validly signed checkpoints of one size with different roots;
* ``inconsistent-proof``: the consistency proof hashes up to the new, validly signed root
  but implies a different root at the old size than the one the witness cosigned. A proof
  that reaches the signed new root pins its old-size prefix (changing any hash changes
  the new root, by SHA-256 collision resistance), so the two signed roots cannot both be
  prefixes of one log.

NOTE: when ``old_size`` is a power of two, RFC 9162 consistency proofs omit the old root
(the verifier prepends it), so a failing proof cannot say which root it implies: the
witness refuses it (422, logged as a possible fork) but cannot prove equivocation. It
never cosigns the fork, so the fork cannot gather a quorum through this witness.

An equivocation stores both signed notes (the one cosigned before and the one presented,
with the proof when there is one) as evidence, logs an ``ALARM`` line at ERROR level,
increments :attr:`Witness.alarm_count` and raises :class:`EquivocationError`. The stored
state is left untouched (the witness keeps following the history it cosigned first).
``hansa witness alarms --data-dir D`` prints the stored alarms.

Errors and HTTP statuses
========================

Every error is a :class:`WitnessError` (a :class:`~hansa.protocol.errors.HansaError`)
with a wire code, and :func:`http_status` maps it as tlog-witness asks:

=============================================  ========================  ======
condition                                      code                      status
=============================================  ========================  ======
note or proof malformed, ``old_size`` > size   MALFORMED, INVALID_FIELD  400
log signature missing or bad                   BAD_SIGNATURE             403
origin not followed by this witness            UNKNOWN_KEY               404
``old_size`` is not the last cosigned size     ROSTER_MISMATCH           409
equivocation (two inconsistent signed notes)   INVALID_FIELD             409
consistency proof or empty-tree root wrong     INVALID_FIELD             422
the witness's own store fails                  INTERNAL                  500
=============================================  ========================  ======

NOTE: ROSTER_MISMATCH ("names a version the node does not hold") is reused for a tree
size the witness does not hold; :attr:`WitnessConflict.last_size` is what the route
returns (tlog-witness: body ``<size>\\n``, ``Content-Type: text/x.tlog.size``).

Use from the node (blocking calls: run them off the event loop)::

    store = WitnessStore(data_dir / WITNESS_DB)
    witness = Witness(store, CosignatureSigner(f"witness/{city}", key), log_verifier_for)
    line = witness.add_checkpoint(body.checkpoint, body.old_size, body.proof, now_s)
    # on HansaError: status = http_status(exc); a WitnessConflict carries last_size
    notes = [c.note for c in store.cosigned(origin)]  # GET /v1/witness/cosignatures
    witness.alarm_count  # a metric
"""

from __future__ import annotations

import enum
import hashlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

from hansa.crypto.merkle import EMPTY_ROOT, HASH_SIZE, verify_consistency
from hansa.crypto.note import (
    Checkpoint,
    CosignatureSigner,
    Note,
    NoteSignature,
    NoteVerifier,
    SignatureType,
    open_checkpoint,
    verify_cosignatures,
)
from hansa.federation.roster import Roster
from hansa.protocol.errors import ErrorCode, HansaError, NoteError

__all__ = [
    "MAX_PROOF_HASHES",
    "WITNESS_DB",
    "AlarmKind",
    "CosignedCheckpoint",
    "EquivocationAlarm",
    "EquivocationError",
    "LogSignatureError",
    "ProofRejectedError",
    "UnknownLogError",
    "Witness",
    "WitnessConflict",
    "WitnessError",
    "WitnessStore",
    "WitnessStoreError",
    "alarm_holds",
    "cosignature_quorum",
    "followed_logs",
    "http_status",
    "implied_old_root",
]

_log = logging.getLogger(__name__)

WITNESS_DB: Final = "witness.db"
"""The witness store's file name inside a node's data directory."""
MAX_PROOF_HASHES: Final = 63
"""Most consistency-proof hashes accepted (tlog-witness: 0..63 lines, enough for 2^63)."""
_MAX_SIZE: Final = 2**63 - 1  # SQLite INTEGER is signed 64-bit
_FORMAT: Final = "hansa-witness-store/v1"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS latest (
    origin TEXT PRIMARY KEY, size INTEGER NOT NULL, root BLOB NOT NULL,
    note BLOB NOT NULL, cosigned_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS cosigned (
    origin TEXT NOT NULL, size INTEGER NOT NULL, root BLOB NOT NULL,
    note BLOB NOT NULL, cosigned_at INTEGER NOT NULL, PRIMARY KEY (origin, size));
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY, origin TEXT NOT NULL, detected_at INTEGER NOT NULL,
    kind TEXT NOT NULL, cosigned_size INTEGER NOT NULL, cosigned_note BLOB NOT NULL,
    presented_size INTEGER NOT NULL, presented_note BLOB NOT NULL,
    old_size INTEGER NOT NULL, proof BLOB NOT NULL, log_vkey TEXT NOT NULL);
"""


# --------------------------------------------------------------------------- errors


class WitnessError(HansaError):
    """A checkpoint the witness will not cosign (HTTP 400 unless a subclass says otherwise).

    Attributes:
        http_status: the tlog-witness HTTP status for the route to return.
    """

    default_code = ErrorCode.INVALID_FIELD
    http_status: int = 400


class WitnessStoreError(WitnessError):
    """The witness store cannot be opened, read or written (500; a local failure)."""

    default_code = ErrorCode.INTERNAL
    http_status = 500


class UnknownLogError(WitnessError):
    """The checkpoint's origin is not a log this witness follows (404)."""

    default_code = ErrorCode.UNKNOWN_KEY
    http_status = 404


class LogSignatureError(WitnessError):
    """The checkpoint is not validly signed by its log's key (403)."""

    default_code = ErrorCode.BAD_SIGNATURE
    http_status = 403


class ProofRejectedError(WitnessError):
    """The consistency proof (or the empty tree's root) is wrong (422)."""

    http_status = 422


class WitnessConflict(WitnessError):
    """``old_size`` is not the size the witness last cosigned (409).

    Attributes:
        last_size: the size of the last checkpoint cosigned for the origin (0 if none);
            the log retries from it.
    """

    default_code = ErrorCode.ROSTER_MISMATCH
    http_status = 409

    def __init__(self, last_size: int, message: str | None = None) -> None:
        """Build the conflict.

        Args:
            last_size: the witness's last cosigned size for the origin.
            message: overrides the default message.
        """
        super().__init__(message or f"the witness last cosigned size {last_size}")
        self.last_size = last_size


class EquivocationError(WitnessError):
    """The log signed two inconsistent checkpoints (409); the alarm holds both notes.

    Attributes:
        alarm: the stored evidence.
    """

    http_status = 409

    def __init__(self, alarm: EquivocationAlarm) -> None:
        """Build the error from the alarm it reports.

        Args:
            alarm: the evidence (both signed notes).
        """
        super().__init__(
            f"equivocation by {alarm.origin}: the witness cosigned size {alarm.cosigned_size}"
            f" and was shown an inconsistent checkpoint of size {alarm.presented_size}"
        )
        self.alarm = alarm


_GENERIC_STATUS: Final[dict[ErrorCode, int]] = {
    ErrorCode.MALFORMED: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.INVALID_FIELD: 400,
    ErrorCode.BAD_SIGNATURE: 403,
    ErrorCode.UNKNOWN_KEY: 404,
}


def http_status(error: HansaError) -> int:
    """Return the tlog-witness HTTP status for an error from :meth:`Witness.add_checkpoint`.

    Args:
        error: the error raised.

    Returns:
        :attr:`WitnessError.http_status` for witness errors; otherwise 400/403/404/413 by
        code, and 500 for anything else (a local failure such as an unwritable store).
    """
    if isinstance(error, WitnessError):
        return error.http_status
    return _GENERIC_STATUS.get(error.code, 500)


# --------------------------------------------------------------------------- records


class AlarmKind(enum.StrEnum):
    """How an equivocation was proven (module docstring, "Equivocation")."""

    SAME_SIZE = "same-size"
    INCONSISTENT_PROOF = "inconsistent-proof"


@dataclass(frozen=True, slots=True)
class CosignedCheckpoint:
    """A checkpoint the witness cosigned.

    Attributes:
        origin: the log's origin.
        size: the tree size.
        root_hash: the tree root.
        note: the checkpoint note with the log's signature and this witness's cosignature.
        cosigned_at: the cosignature timestamp (POSIX seconds).
    """

    origin: str
    size: int
    root_hash: bytes
    note: bytes
    cosigned_at: int


@dataclass(frozen=True, slots=True)
class EquivocationAlarm:
    """Proof that a log signed two inconsistent checkpoints.

    Attributes:
        origin: the log's origin.
        detected_at: when the witness saw it (POSIX seconds, the caller's ``now_s``).
        kind: same size with different roots, or a proof implying another old root.
        cosigned_size: size of the checkpoint the witness had cosigned.
        cosigned_note: that checkpoint, as stored (log signature and cosignature).
        presented_size: size of the conflicting checkpoint.
        presented_note: the conflicting checkpoint note, as presented.
        old_size: the ``old_size`` of the request that presented it.
        proof: the consistency proof presented (empty for ``same-size``).
        log_vkey: the log's verifier key both notes were verified with.
    """

    origin: str
    detected_at: int
    kind: AlarmKind
    cosigned_size: int
    cosigned_note: bytes
    presented_size: int
    presented_note: bytes
    old_size: int
    proof: tuple[bytes, ...]
    log_vkey: str


# --------------------------------------------------------------------------- store


class WitnessStore:
    """The witness's SQLite store: last cosigned checkpoint per origin, history, alarms.

    WAL mode with ``synchronous=FULL``: a cosignature is returned only once the state it
    commits to is on disk. Safe to share between threads; several processes may open the
    same file (every update is a compare-and-swap inside ``BEGIN IMMEDIATE``).

    Args:
        path: the SQLite file, created with its tables when absent.

    Raises:
        WitnessStoreError: the file cannot be opened or is not a witness store.
    """

    def __init__(self, path: str | Path) -> None:
        """Open (or create) the store at ``path``."""
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
        except sqlite3.Error as exc:
            raise _store_error(f"cannot open witness store {self.path}: {exc}") from exc
        try:
            self._init()
        except BaseException:
            self._conn.close()
            raise

    def _init(self) -> None:
        with self._sql("open"):
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise _store_error(f"cannot enable WAL mode on {self.path} (got {mode})")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
                if row is None:
                    self._conn.execute("INSERT INTO meta VALUES ('format', ?)", (_FORMAT,))
                elif row[0] != _FORMAT:
                    raise _store_error(f"{self.path} is not a {_FORMAT} store")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _sql(self, what: str) -> Iterator[None]:
        """Hold the lock and translate SQLite failures (third-party errors stop here)."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                raise _store_error(f"witness store {self.path}: cannot {what}: {exc}") from exc

    def close(self) -> None:
        """Close the store."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ reads

    def latest(self, origin: str) -> CosignedCheckpoint | None:
        """Return the last checkpoint cosigned for ``origin``, or None.

        Args:
            origin: the log's origin.

        Returns:
            The stored state, or None when nothing was cosigned for the origin.

        Raises:
            WitnessStoreError: the store cannot be read or a row is damaged.
        """
        with self._sql("read"):
            row = self._conn.execute(
                "SELECT origin, size, root, note, cosigned_at FROM latest WHERE origin = ?",
                (origin,),
            ).fetchone()
        return None if row is None else _cosigned_row(row)

    def cosigned(self, origin: str, limit: int = 100) -> list[CosignedCheckpoint]:
        """Return the checkpoints cosigned for ``origin``, largest size first.

        Args:
            origin: the log's origin.
            limit: the most returned (at least 1).

        Returns:
            Up to ``limit`` checkpoints, one per size (the latest cosignature of that size).

        Raises:
            WitnessStoreError: the store cannot be read.
        """
        with self._sql("read"):
            rows = self._conn.execute(
                "SELECT origin, size, root, note, cosigned_at FROM cosigned WHERE origin = ?"
                " ORDER BY size DESC LIMIT ?",
                (origin, max(1, limit)),
            ).fetchall()
        return [_cosigned_row(row) for row in rows]

    def origins(self) -> list[str]:
        """Return every origin the witness has cosigned for, sorted."""
        with self._sql("read"):
            rows = self._conn.execute("SELECT origin FROM latest ORDER BY origin").fetchall()
        return [str(row[0]) for row in rows]

    def alarms(self) -> list[EquivocationAlarm]:
        """Return every stored equivocation alarm, oldest first.

        Raises:
            WitnessStoreError: the store cannot be read or a row is damaged.
        """
        with self._sql("read"):
            rows = self._conn.execute(
                "SELECT origin, detected_at, kind, cosigned_size, cosigned_note,"
                " presented_size, presented_note, old_size, proof, log_vkey FROM alarms"
                " ORDER BY id"
            ).fetchall()
        return [_alarm_row(row) for row in rows]

    def alarm_total(self) -> int:
        """Return how many alarms are stored."""
        with self._sql("read"):
            (count,) = self._conn.execute("SELECT COUNT(*) FROM alarms").fetchone()
        return int(count)

    # ------------------------------------------------------------ writes

    def advance(self, expected: CosignedCheckpoint | None, new: CosignedCheckpoint) -> bool:
        """Replace the origin's state with ``new`` if it still equals ``expected``.

        The compare-and-swap and both writes happen in one durable transaction.

        Args:
            expected: the state the caller checked ``new`` against (None: no state).
            new: the newly cosigned checkpoint.

        Returns:
            True when stored; False when another writer changed the state first.

        Raises:
            WitnessStoreError: the store cannot be written.
        """
        with self._sql("store a cosigned checkpoint"):
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT size, root FROM latest WHERE origin = ?", (new.origin,)
                ).fetchone()
                want = None if expected is None else (expected.size, expected.root_hash)
                if (None if row is None else (row[0], row[1])) != want:
                    conn.execute("ROLLBACK")
                    return False
                values = (new.origin, new.size, new.root_hash, new.note, new.cosigned_at)
                conn.execute("INSERT OR REPLACE INTO latest VALUES (?, ?, ?, ?, ?)", values)
                conn.execute("INSERT OR REPLACE INTO cosigned VALUES (?, ?, ?, ?, ?)", values)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return True

    def add_alarm(self, alarm: EquivocationAlarm) -> None:
        """Store an equivocation alarm durably.

        Args:
            alarm: the evidence.

        Raises:
            WitnessStoreError: the store cannot be written.
        """
        with self._sql("store an alarm"):
            self._conn.execute(
                "INSERT INTO alarms (origin, detected_at, kind, cosigned_size, cosigned_note,"
                " presented_size, presented_note, old_size, proof, log_vkey)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    alarm.origin,
                    alarm.detected_at,
                    alarm.kind.value,
                    alarm.cosigned_size,
                    alarm.cosigned_note,
                    alarm.presented_size,
                    alarm.presented_note,
                    alarm.old_size,
                    b"".join(alarm.proof),
                    alarm.log_vkey,
                ),
            )


def _store_error(message: str) -> WitnessStoreError:
    return WitnessStoreError(message)


def _cosigned_row(row: tuple[object, ...]) -> CosignedCheckpoint:
    """A ``latest``/``cosigned`` row, type-checked (the file may have been edited)."""
    origin, size, root, note, at = row
    if not (
        isinstance(origin, str)
        and isinstance(size, int)
        and isinstance(root, bytes)
        and len(root) == HASH_SIZE
        and isinstance(note, bytes)
        and isinstance(at, int)
    ):
        raise _store_error(f"damaged witness store row for {origin!r}")
    return CosignedCheckpoint(origin, size, root, note, at)


def _alarm_row(row: tuple[object, ...]) -> EquivocationAlarm:
    origin, at, kind, c_size, c_note, p_size, p_note, old, proof, vkey = row
    if not (
        isinstance(origin, str)
        and isinstance(at, int)
        and kind in set(AlarmKind)
        and isinstance(c_size, int)
        and isinstance(c_note, bytes)
        and isinstance(p_size, int)
        and isinstance(p_note, bytes)
        and isinstance(old, int)
        and isinstance(proof, bytes)
        and len(proof) % HASH_SIZE == 0
        and isinstance(vkey, str)
    ):
        raise _store_error(f"damaged witness alarm row for {origin!r}")
    hashes = tuple(proof[i : i + HASH_SIZE] for i in range(0, len(proof), HASH_SIZE))
    return EquivocationAlarm(
        origin, at, AlarmKind(str(kind)), c_size, c_note, p_size, p_note, old, hashes, vkey
    )


# --------------------------------------------------------------------------- witness


class Witness:
    """A tlog-witness: checks checkpoints against what it cosigned before, then cosigns.

    Args:
        store: where the state and alarms live.
        cosigner: this witness's cosignature/v1 key (named ``witness/<city>``).
        log_verifiers: maps an origin to its log's verifier, or None for an origin the
            witness does not follow.

    Attributes:
        store: the store.
        cosigner: the cosignature key.
    """

    def __init__(
        self,
        store: WitnessStore,
        cosigner: CosignatureSigner,
        log_verifiers: Callable[[str], NoteVerifier | None],
    ) -> None:
        """Create the witness; :attr:`alarm_count` starts at the number of stored alarms."""
        self.store = store
        self.cosigner = cosigner
        self._log_verifiers = log_verifiers
        self._alarms_lock = threading.Lock()
        self._alarm_count = store.alarm_total()

    @property
    def alarm_count(self) -> int:
        """Equivocations detected: those stored when opened plus every one since (a metric)."""
        return self._alarm_count

    @property
    def verifier(self) -> NoteVerifier:
        """This witness's cosignature verifier (publish its ``vkey``)."""
        return self.cosigner.verifier

    def alarms(self) -> list[EquivocationAlarm]:
        """Return every stored equivocation alarm, oldest first."""
        return self.store.alarms()

    def add_checkpoint(
        self, note: bytes, old_size: int, proof: Sequence[bytes], now_s: int
    ) -> bytes:
        """Check a checkpoint against the last one cosigned for its origin and cosign it.

        tlog-witness §add-checkpoint; the steps are in the module docstring.

        Args:
            note: the checkpoint note, signed by its log (other lines are ignored).
            old_size: the size of the checkpoint the log believes this witness last cosigned.
            proof: the RFC 9162 consistency proof from ``old_size`` to the note's size.
            now_s: the cosignature timestamp, POSIX seconds (injected).

        Returns:
            The cosignature line (``— <name> <base64>\\n``, UTF-8) to append to the note.

        Raises:
            WitnessError: malformed note or proof, or ``old_size`` above the size (400).
            LogSignatureError: the log's signature is missing or bad (403).
            UnknownLogError: the origin is not followed (404).
            WitnessConflict: ``old_size`` is not the last cosigned size, or another
                request advanced the state first (409).
            EquivocationError: the note is provably inconsistent with the one cosigned
                before; both are stored as an alarm (409).
            ProofRejectedError: bad consistency proof or empty-tree root (422).
            NoteError: ``now_s`` is outside 0..2^63-1 (a caller bug).
        """
        checkpoint, log_lines, log_verifier = self._open(note)
        hashes = _check_request(old_size, proof, checkpoint.size)
        origin = checkpoint.origin
        stored = self.store.latest(origin)
        last_size = 0 if stored is None else stored.size
        if stored is not None and checkpoint.size == stored.size:
            if checkpoint.root_hash != stored.root_hash:
                self._equivocation(
                    AlarmKind.SAME_SIZE, stored, note, log_verifier, old_size, (), now_s
                )
        if old_size != last_size:
            raise WitnessConflict(
                last_size, f"old size {old_size} is not {last_size}, the last size cosigned"
            )
        if checkpoint.size == 0 and checkpoint.root_hash != EMPTY_ROOT:
            raise ProofRejectedError("a checkpoint of size 0 must carry the empty tree's root")
        if stored is None or old_size in (0, checkpoint.size):
            # tlog-witness: "The proof MUST be empty if the old size is zero"; at equal
            # sizes the roots were compared above and there is nothing to prove.
            if hashes:
                raise ProofRejectedError(
                    f"the consistency proof from size {old_size} must be empty"
                )
        elif not verify_consistency(
            old_size, checkpoint.size, stored.root_hash, checkpoint.root_hash, hashes
        ):
            implied = implied_old_root(old_size, checkpoint.size, checkpoint.root_hash, hashes)
            if implied is not None and implied != stored.root_hash:
                self._equivocation(
                    AlarmKind.INCONSISTENT_PROOF,
                    stored,
                    note,
                    log_verifier,
                    old_size,
                    hashes,
                    now_s,
                )
            _log.warning(
                "witness: consistency proof for %s from %d to %d does not verify%s",
                origin,
                old_size,
                checkpoint.size,
                " (old size is a power of two: a fork cannot be told from a bad proof)"
                if implied is None
                else "",
            )
            raise ProofRejectedError(
                f"the consistency proof from size {old_size} to {checkpoint.size} does not verify"
            )
        line = self.cosigner.sign(checkpoint.to_text(), now_s)
        # Keep only lines this witness checked (the log's) plus its own, so the stored
        # note is evidence of what was verified.
        cosigned = Note(checkpoint.to_text(), (*log_lines, line)).to_bytes()
        new = CosignedCheckpoint(origin, checkpoint.size, checkpoint.root_hash, cosigned, now_s)
        if not self.store.advance(stored, new):
            current = self.store.latest(origin)
            size = 0 if current is None else current.size
            raise WitnessConflict(size, f"the witness state for {origin} changed; now {size}")
        return line.line.encode("utf-8")

    def _open(self, note: bytes) -> tuple[Checkpoint, tuple[NoteSignature, ...], NoteVerifier]:
        """Parse the note, find the origin's log key and verify its signature."""
        try:
            text = Note.from_bytes(note).text
            origin = Checkpoint.from_text(text).origin
        except NoteError as exc:
            raise WitnessError(
                f"not a checkpoint note: {exc.message}", ErrorCode.MALFORMED
            ) from exc
        verifier = self._log_verifiers(origin)
        if verifier is None:
            raise UnknownLogError(f"this witness does not follow the log {origin!r}")
        try:
            opened = open_checkpoint(note, verifier, origin=origin)
        except NoteError as exc:
            raise LogSignatureError(f"checkpoint of {origin}: {exc.message}") from exc
        lines = tuple(v.signature for v in opened.note.verified if v.verifier == verifier)
        return opened.checkpoint, lines, verifier

    def _equivocation(
        self,
        kind: AlarmKind,
        stored: CosignedCheckpoint,
        note: bytes,
        log_verifier: NoteVerifier,
        old_size: int,
        proof: tuple[bytes, ...],
        now_s: int,
    ) -> None:
        """Store the evidence, count and log the alarm, and raise it."""
        presented = Checkpoint.from_text(Note.from_bytes(note).text)
        alarm = EquivocationAlarm(
            origin=stored.origin,
            detected_at=now_s,
            kind=kind,
            cosigned_size=stored.size,
            cosigned_note=stored.note,
            presented_size=presented.size,
            presented_note=bytes(note),
            old_size=old_size,
            proof=proof,
            log_vkey=log_verifier.vkey,
        )
        self.store.add_alarm(alarm)
        with self._alarms_lock:
            self._alarm_count += 1
        _log.error(
            "ALARM: log %s equivocates (%s): cosigned size %d root %s, shown size %d root %s;"
            " both signed notes are stored (hansa witness alarms)",
            stored.origin,
            kind.value,
            stored.size,
            stored.root_hash.hex(),
            presented.size,
            presented.root_hash.hex(),
        )
        raise EquivocationError(alarm)


def _check_request(old_size: object, proof: Sequence[object], size: int) -> tuple[bytes, ...]:
    """Validate ``old_size`` and the proof's shape (400 when malformed)."""
    if isinstance(old_size, bool) or not isinstance(old_size, int) or old_size < 0:
        raise WitnessError("old size must be a non-negative integer")
    if size > _MAX_SIZE:
        raise WitnessError(f"checkpoint size {size} is above 2^63-1")
    if old_size > size:
        # tlog-witness: "The old size MUST be equal to or lower than the checkpoint size."
        raise WitnessError(f"old size {old_size} is above the checkpoint size {size}")
    if len(proof) > MAX_PROOF_HASHES:
        raise WitnessError(f"consistency proof has more than {MAX_PROOF_HASHES} hashes")
    hashes: list[bytes] = []
    for h in proof:
        if not isinstance(h, bytes | bytearray) or len(h) != HASH_SIZE:
            raise WitnessError(
                f"consistency proof hashes must be {HASH_SIZE} bytes", ErrorCode.MALFORMED
            )
        hashes.append(bytes(h))
    return tuple(hashes)


def implied_old_root(
    old_size: int, new_size: int, new_root: bytes, proof: Sequence[bytes]
) -> bytes | None:
    """Return the old root a consistency proof commits to, when it reaches ``new_root``.

    Runs RFC 9162 §2.1.4.2 without the old root: ``fr`` and ``sr`` are folded from the
    proof alone. When ``sr`` equals ``new_root`` the proof pins the new tree's prefix of
    ``old_size`` leaves, whose root is ``fr``.

    Args:
        old_size: the earlier size (must not be a power of two: those proofs omit the old
            root, so nothing can be derived).
        new_size: the later size, above ``old_size``.
        new_root: the signed root at ``new_size``.
        proof: the proof hashes.

    Returns:
        The implied root at ``old_size``, or None when the proof does not reach
        ``new_root``, is malformed, or ``old_size`` is a power of two (or 0).
    """
    if not 0 < old_size < new_size or old_size & (old_size - 1) == 0 or not proof:
        return None
    if any(len(h) != HASH_SIZE for h in proof):
        return None
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = bytes(proof[0])
    for c in proof[1:]:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            fr = _node(c, fr)
            sr = _node(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = _node(sr, c)
        fn >>= 1
        sn >>= 1
    return fr if sn == 0 and sr == new_root else None


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()  # RFC 9162 §2.1.1 interior node


def alarm_holds(alarm: EquivocationAlarm) -> bool:
    """Re-check an alarm's evidence offline, trusting nothing but its log key.

    Both notes must verify under :attr:`EquivocationAlarm.log_vkey` for the alarm's origin
    and be provably inconsistent: the same size with different roots, or a proof that
    reaches the presented root and implies another root at the cosigned size.

    Args:
        alarm: a stored alarm.

    Returns:
        True when the evidence proves equivocation by the holder of the log key.
    """
    try:
        verifier = NoteVerifier.from_vkey(alarm.log_vkey)
        old = open_checkpoint(alarm.cosigned_note, verifier, origin=alarm.origin).checkpoint
        new = open_checkpoint(alarm.presented_note, verifier, origin=alarm.origin).checkpoint
    except HansaError:
        return False
    if (old.size, new.size) != (alarm.cosigned_size, alarm.presented_size):
        return False
    if alarm.kind is AlarmKind.SAME_SIZE:
        return old.size == new.size and old.root_hash != new.root_hash
    implied = implied_old_root(old.size, new.size, new.root_hash, alarm.proof)
    return implied is not None and implied != old.root_hash


# --------------------------------------------------------------------------- followed logs


def followed_logs(
    pinned: Mapping[str, NoteVerifier], roster: Roster | None, own_city: str
) -> tuple[dict[str, NoteVerifier], list[str]]:
    """Return the logs a witness follows, by origin: the roster's keys first (spec §16.5).

    Every other member city whose roster entry names a log key is followed under its
    default origin (``hansa/<alliance>/<city>``, spec §16.1) with that key. The logs the
    operator pinned (``witness-logs.txt``) are followed too, except that an origin the
    roster covers keeps the roster's key: a file entry with another key for it is
    ignored and reported, never trusted.

    Args:
        pinned: the operator's log verifiers by origin (their names).
        roster: the roster in effect, or None for a node outside any alliance.
        own_city: this witness's city (it does not witness its own log).

    Returns:
        ``(verifiers by origin, origins whose pinned key the roster overrides)``.
    """
    followed = dict(pinned)
    overridden: list[str] = []
    if roster is None:
        return followed, overridden
    for member in roster.members:
        if member.city == own_city:
            continue
        verifier = roster.log_verifier(member.city)
        if verifier is None:
            continue
        origin = verifier.name  # the default origin, hansa/<alliance>/<city>
        held = followed.get(origin)
        if held is not None and held != verifier:
            overridden.append(origin)
        followed[origin] = verifier
    return followed, overridden


# --------------------------------------------------------------------------- quorum


def cosignature_quorum(
    note: bytes, witness_verifiers: Sequence[NoteVerifier], quorum: int
) -> tuple[bool, tuple[str, ...]]:
    """Say whether a checkpoint carries cosignatures from at least ``quorum`` witnesses.

    Pure. The log signature is not checked here (use
    :func:`~hansa.crypto.note.open_checkpoint`). Following signed-note §Signatures, a
    line from a listed witness that does not verify rejects the note: the result is then
    ``(False, ())``.

    Args:
        note: the checkpoint note.
        witness_verifiers: the roster's witness keys (cosignature/v1, type 0x04).
        quorum: how many distinct witnesses must have cosigned (0 always passes).

    Returns:
        ``(ok, names)``: whether the quorum is met and the distinct witness names whose
        cosignatures verified, sorted.

    Raises:
        NoteError: the note is not a checkpoint note, or a verifier is not a
            cosignature/v1 key.
        ValueError: ``quorum`` is negative.
    """
    if quorum < 0:
        raise ValueError("quorum must be at least 0")
    for w in witness_verifiers:
        if w.sig_type is not SignatureType.COSIGNATURE_V1:
            raise NoteError(f"witness {w.name} is not a cosignature/v1 (type 0x04) key")
    parsed = Note.from_bytes(note)
    Checkpoint.from_text(parsed.text)
    try:
        cosignatures = verify_cosignatures(parsed, witness_verifiers)
    except NoteError:
        # Malformed notes and wrong key types were ruled out above: a listed witness's
        # line does not verify (or two listed keys are ambiguous), which rejects the note.
        return False, ()
    names = tuple(sorted({c.name for c in cosignatures}))
    return len(names) >= quorum, names
