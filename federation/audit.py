"""The auditor: a local store of a city's audit log, and the checks run over it.

Theory of operation
-------------------
An auditor keeps, per city, what it has fetched from that city's node (issue 5, part
6): the log's leaves by index, the envelopes beside them by hash, every checkpoint it
has ever been shown (with whatever cosignatures it carried), and the log and witness
verifier keys it pinned on first fetch: the roster's when the city's roster entry names
them (spec §16.1), else whatever the node served (TOFU, crypto-audit-anchors §6). Nothing is
ever overwritten: a leaf offered again with different bytes is kept beside the stored
one as a *conflict*, and every checkpoint note ever seen stays, so a node that rewrites
history between two fetches is caught by the next :func:`verify_log`.

:func:`verify_log` trusts nothing the node said. Given the stored contents and the
alliance roster(s) it:

1. recomputes the RFC 9162 tree from the leaves (a missing index is a failure);
2. checks every checkpoint's log signature (the log key the rosters name for the city,
   or the pinned one when none does: reported as trusted on first use) and that the key
   that signed it was in force at its size by the log's own ``key_rotated`` entries for
   the log key (step 6), its witness
   cosignature quorum (roster ``witness_quorum``; the roster's witness keys of witness
   cities other than the log's own, or their pinned keys when the roster names none)
   and that its root equals the recomputed tree at its size. All
   checkpoints are then consistent with one another exactly when each matches the same
   leaves; two checkpoints of one size with different roots are an equivocation;
3. decodes every leaf (``hansa-audit/v1``, with the shared strict codec of
   :mod:`hansa.protocol.auditleaf`; the node's store lives in ``hansa.node``, which the
   auditor does not run) and counts them by type;
4. for every ``request_received``: the stored envelope hashes to the logged id, its
   signature verifies under a key the roster (the version the request cites) names for
   the requester as an analyst, the leaf's key id is that key's, this city is among
   its targets; the freshness rules (``issued_at - skew <= log_time <= expires_at +
   skew``) and replay rules (no repeated message id or (requester, nonce)) hold unless the node
   refused the request, or answered a byte-identical repeat with the answer it had already
   released (same answer id, spec §8.3);
5. for every ``decision`` and ``answer_sent``: the request was logged before it; the
   answer (or refusal) envelope is signed by the city's node key from the roster, cites
   the request, names this city and the requester; the decision's outcome, reason,
   disclosure-settings version and data version agree with the signed answer or
   refusal; and an answer's disclosure version is the one the latest
   ``settings_changed`` entry for its dataset set before the decision;
6. for every ``key_rotated`` (node, log or witness key): it rotates from the key the log
   last recorded as in force for that role (all zeros before the first), and never back
   to a log key it retired before; every answer or refusal after a node-key rotation is
   signed by the key it names, and every checkpoint of a size ``S`` by the key the last
   log-key rotation below index ``S`` names: that entry is inside the tree the
   checkpoint signs, so a retired log key (perhaps leaked since) cannot vouch for a
   tree that records its retirement (spec §16.2). Checkpoints no log-key rotation
   precedes (logs from before rotations were logged) are checked against every trusted
   log key, and the report says so.

Signature checks (step 4 and the answer signatures of step 5) run on every core the
process may use: one fewer worker process (:class:`~concurrent.futures.ProcessPoolExecutor`)
than cores, and this process, which parses the leaves, submits their envelopes to the pool
in chunks as it goes, rebuilds the tree and checks the checkpoints and the log's structure
while the workers sign, then takes back the chunks no worker has started and checks them
itself. Results come back as plain tuples (cheap to pickle) and are checked chunk by chunk
in log order. The cyclic garbage collector is paused meanwhile (nothing here makes cycles).
For a 100,000-entry log this costs ~6 us per entry on top of the ~41 us libsodium signature
check, ~0.87x the rate of bare ``crypto_sign_open`` on all cores (``bench/audit.py``). Bodies
are decoded with msgspec's schema checks but not the codec's identifier-shape checks: the
auditor compares the fields it reads exactly.

:func:`compare_stores` compares two auditors' stores of one city: a node that shows
each of them a different (forked) history cannot make both agree. :func:`reconcile`
checks analysts' evidence bundles against cities' logs.

No asyncio or aiohttp here; the store is stdlib ``sqlite3``.
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from hansa.crypto.envelope import open_envelope
from hansa.crypto.keys import PublicKey, key_id, verify_signed
from hansa.crypto.merkle import HASH_SIZE, MerkleTree, leaf_hash
from hansa.crypto.note import (
    Checkpoint,
    Note,
    NoteVerifier,
    VerifiedCheckpoint,
    open_checkpoint,
)
from hansa.federation.evidence import EvidenceBundle
from hansa.federation.roster import Role, Roster
from hansa.protocol.auditleaf import (
    ENTRY_NAMES,
    KEY_ROLE_LOG,
    KEY_ROLE_NODE,
    KEY_ROLE_WITNESS,
    EntryType,
    LeafFields,
    Outcome,
    SettingsScope,
    unpack_leaf,
)
from hansa.protocol.codec import decode_as
from hansa.protocol.envelope import PayloadType, decode_envelope, message_id, pae_prefix
from hansa.protocol.errors import ConfigError, ErrorCode, HansaError, NoteError, ProtocolError
from hansa.protocol.messages import (
    Capabilities,
    Decision,
    QueryAnswer,
    QueryRefusal,
    QueryRequest,
)

__all__ = [
    "DEFAULT_SKEW_MS",
    "ENTRY_NAMES",
    "INLINE_LIMIT",
    "AuditFailure",
    "AuditReport",
    "AuditStoreError",
    "AuditorStore",
    "CompareReport",
    "Leaf",
    "LogContents",
    "ReconcileReport",
    "SeenCheckpoint",
    "compare_stores",
    "parse_leaf",
    "reconcile",
    "usable_cpus",
    "verify_log",
]

DEFAULT_SKEW_MS: Final = 30_000
"""Clock skew tolerated around a request's validity window (as the node's ReplayGuard)."""
INLINE_LIMIT: Final = 2048
"""Below this many leaves, checking the signatures in this process beats starting workers."""
_MIN_CHUNK: Final = 128
_MAX_CHUNK: Final = 4096
"""Envelopes per chunk of signature checks: large enough that handing a chunk over costs
little next to checking it (~45 us per signature), small enough that the last chunks end
together and progress moves."""

# --------------------------------------------------------------------------- leaves

# hansa-audit/v1 leaves are decoded by the one shared codec (hansa.protocol.auditleaf),
# in its flat form; the plain int constants keep the hot loops on int comparisons.
REQUEST_RECEIVED: Final = int(EntryType.REQUEST_RECEIVED)
DECISION: Final = int(EntryType.DECISION)
ANSWER_SENT: Final = int(EntryType.ANSWER_SENT)
ROSTER_INSTALLED: Final = int(EntryType.ROSTER_INSTALLED)
KEY_ROTATED: Final = int(EntryType.KEY_ROTATED)
SETTINGS_CHANGED: Final = int(EntryType.SETTINGS_CHANGED)
OUTCOME_ANSWERED: Final = int(Outcome.ANSWERED)
OUTCOME_SUPPRESSED: Final = int(Outcome.ANSWERED_SUPPRESSED)
OUTCOME_REFUSED: Final = int(Outcome.REFUSED)
SCOPE_DISCLOSURE: Final = int(SettingsScope.DISCLOSURE)


class AuditStoreError(HansaError):
    """The auditor store cannot be opened, read or written, or a pin conflicts."""

    default_code = ErrorCode.INTERNAL


Leaf = LeafFields
"""A decoded leaf in the auditor's flat form (:class:`hansa.protocol.auditleaf.LeafFields`)."""


def parse_leaf(leaf: bytes) -> Leaf:
    """Decode one leaf strictly (:func:`hansa.protocol.auditleaf.unpack_leaf`).

    Args:
        leaf: the leaf bytes.

    Returns:
        The decoded leaf.

    Raises:
        ValueError: the leaf is not a valid ``hansa-audit/v1`` leaf (the message says why).
    """
    try:
        return unpack_leaf(leaf)
    except ProtocolError as exc:
        raise ValueError(exc.message) from exc


# --------------------------------------------------------------------------- store

_FORMAT: Final = "hansa-auditor-store/v1"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pins (name TEXT PRIMARY KEY, role TEXT NOT NULL, vkey TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leaves (idx INTEGER PRIMARY KEY, leaf BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS envelopes (hash BLOB PRIMARY KEY, envelope BLOB NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    note BLOB PRIMARY KEY, size INTEGER NOT NULL, root BLOB NOT NULL, seen_ms INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conflicts (
    idx INTEGER NOT NULL, stored BLOB NOT NULL, offered BLOB NOT NULL, seen_ms INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class SeenCheckpoint:
    """A checkpoint note the auditor was shown (not yet verified).

    Attributes:
        note: the signed note bytes as received.
        size: the tree size its text states.
        root: the root hash its text states.
        seen_ms: when the auditor first stored it.
    """

    note: bytes
    size: int
    root: bytes
    seen_ms: int


@dataclass(frozen=True)
class LogContents:
    """Everything an auditor holds for one city's log: the input of :func:`verify_log`.

    Attributes:
        city: the city id.
        origin: the log's checkpoint origin.
        log_vkey: the pinned log verifier key, or None if none was pinned.
        witness_vkeys: pinned witness verifier keys by cosigner name.
        leaves: ``(index, leaf)`` pairs in index order (gaps are failures).
        envelopes: stored envelopes by SHA-256.
        checkpoints: every checkpoint note seen, oldest first.
        conflicts: ``(index, stored leaf, offered leaf)`` for leaves shown differently.
    """

    city: str
    origin: str
    log_vkey: str | None
    witness_vkeys: Mapping[str, str]
    leaves: Sequence[tuple[int, bytes]]
    envelopes: Mapping[bytes, bytes]
    checkpoints: Sequence[SeenCheckpoint]
    conflicts: Sequence[tuple[int, bytes, bytes]] = ()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _parse_checkpoint(note: bytes) -> Checkpoint:
    return Checkpoint.from_text(Note.from_bytes(note).text)


class AuditorStore:
    """One city's log as an auditor holds it: ``<directory>/<city>.sqlite``.

    Use :meth:`open`; close with :meth:`close` or a ``with`` block. Writes are
    append-only: leaves are never replaced (a different leaf at a stored index is kept
    as a conflict), checkpoints are never removed, pins never change.

    Attributes:
        path: the SQLite file.
        city: the city id.
        origin: the log's origin.
    """

    def __init__(self, path: Path, city: str, origin: str, conn: sqlite3.Connection) -> None:
        """Use :meth:`open`."""
        self.path = path
        self.city = city
        self.origin = origin
        self._conn = conn

    @classmethod
    def open(cls, directory: str | Path, city: str, origin: str | None = None) -> AuditorStore:
        """Open or create the store of ``city`` in ``directory``.

        Args:
            directory: the auditor's store directory (created if absent).
            city: the city id (the file name).
            origin: the log origin; required when creating, checked when given.

        Returns:
            The open store.

        Raises:
            AuditStoreError: the file cannot be opened, is not an auditor store, belongs
                to another origin, or is new and no origin was given.
        """
        if not city or "/" in city or city.startswith("."):
            raise AuditStoreError(f"invalid city id {city!r}")
        directory = Path(directory)
        path = directory / f"{city}.sqlite"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except (OSError, sqlite3.Error) as exc:
            raise AuditStoreError(f"cannot open auditor store {path}: {exc}") from exc
        try:
            if not meta:
                if origin is None:
                    raise AuditStoreError(f"no auditor store for {city!r} in {directory}")
                Checkpoint(origin, 0, bytes(HASH_SIZE))  # validates the origin
                conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("format", _FORMAT), ("city", city), ("origin", origin)],
                )
            elif meta.get("format") != _FORMAT or meta.get("city") != city:
                raise AuditStoreError(f"{path} is not the auditor store of {city!r}")
            elif origin is not None and meta.get("origin") != origin:
                raise AuditStoreError(
                    f"{path} holds the log {meta.get('origin')!r}, not {origin!r}"
                )
        except BaseException:
            conn.close()
            raise
        return cls(path, city, str(meta.get("origin", origin)), conn)

    @staticmethod
    def cities(directory: str | Path) -> list[str]:
        """Return the cities with a store in ``directory``, sorted."""
        return sorted(p.stem for p in Path(directory).glob("*.sqlite"))

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def __enter__(self) -> AuditorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, sql: str, rows: Iterable[tuple[object, ...]]) -> None:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(sql, rows)
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise AuditStoreError(f"cannot write auditor store {self.path}: {exc}") from exc

    # ------------------------------------------------------------------ pins

    def pin(self, name: str, vkey: str, role: str) -> None:
        """Pin a verifier key on first use; a different key later is refused.

        Args:
            name: the key name (the log origin, or the witness cosigner name).
            vkey: the C2SP verifier key string.
            role: ``"log"`` or ``"witness"``.

        Raises:
            AuditStoreError: a different key is already pinned under this name, or the
                vkey is not valid or not named ``name``.
        """
        try:
            verifier = NoteVerifier.from_vkey(vkey)
        except HansaError as exc:
            raise AuditStoreError(f"invalid verifier key for {name}: {exc}") from exc
        if verifier.name != name:
            raise AuditStoreError(f"verifier key is named {verifier.name!r}, not {name!r}")
        row = self._conn.execute("SELECT vkey FROM pins WHERE name = ?", (name,)).fetchone()
        if row is not None:
            if row[0] != vkey:
                raise AuditStoreError(f"{name} offers a key other than the one pinned")
            return
        self._write("INSERT INTO pins VALUES (?, ?, ?)", [(name, role, vkey)])

    def pins(self, role: str) -> dict[str, str]:
        """Return the pinned vkeys with ``role``, by name."""
        rows = self._conn.execute("SELECT name, vkey FROM pins WHERE role = ?", (role,))
        return {str(n): str(v) for n, v in rows}

    # ------------------------------------------------------------------ contents

    @property
    def size(self) -> int:
        """One past the highest stored leaf index (where an incremental fetch resumes)."""
        row = self._conn.execute("SELECT MAX(idx) FROM leaves").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def add_leaves(self, start: int, leaves: Sequence[bytes]) -> int:
        """Store leaves at ``start, start+1, ...``; a differing re-offer becomes a conflict.

        Args:
            start: the index of the first leaf.
            leaves: the leaf bytes.

        Returns:
            The number of conflicts found.
        """
        now = _now_ms()
        have = dict(
            self._conn.execute(
                "SELECT idx, leaf FROM leaves WHERE idx >= ? AND idx < ?",
                (start, start + len(leaves)),
            ).fetchall()
        )
        new: list[tuple[object, ...]] = []
        conflicts: list[tuple[object, ...]] = []
        for i, leaf in enumerate(leaves, start):
            old = have.get(i)
            if old is None:
                new.append((i, bytes(leaf)))
            elif bytes(old) != bytes(leaf):
                conflicts.append((i, bytes(old), bytes(leaf), now))
        self._write("INSERT INTO leaves VALUES (?, ?)", new)
        if conflicts:
            self._write("INSERT INTO conflicts VALUES (?, ?, ?, ?)", conflicts)
        return len(conflicts)

    def add_envelopes(self, envelopes: Iterable[bytes]) -> None:
        """Store envelopes keyed by their SHA-256 (message id)."""
        self._write(
            "INSERT OR IGNORE INTO envelopes VALUES (?, ?)",
            ((message_id(bytes(e)), bytes(e)) for e in envelopes),
        )

    def add_checkpoint(self, note: bytes) -> SeenCheckpoint:
        """Keep a checkpoint note as shown (verification is :func:`verify_log`'s job).

        Args:
            note: the signed note bytes.

        Returns:
            The stored checkpoint.

        Raises:
            NoteError: the note is not a checkpoint note at all.
            AuditStoreError: it belongs to another origin.
        """
        checkpoint = _parse_checkpoint(note)
        if checkpoint.origin != self.origin:
            raise AuditStoreError(f"checkpoint of {checkpoint.origin!r}, not {self.origin!r}")
        seen = SeenCheckpoint(bytes(note), checkpoint.size, checkpoint.root_hash, _now_ms())
        self._write(
            "INSERT OR IGNORE INTO checkpoints VALUES (?, ?, ?, ?)",
            [(seen.note, seen.size, seen.root, seen.seen_ms)],
        )
        return seen

    def checkpoints(self) -> list[SeenCheckpoint]:
        """Every checkpoint seen, oldest first."""
        rows = self._conn.execute(
            "SELECT note, size, root, seen_ms FROM checkpoints ORDER BY seen_ms, size"
        )
        return [SeenCheckpoint(bytes(n), int(s), bytes(r), int(t)) for n, s, r, t in rows]

    def envelope(self, digest: bytes) -> bytes | None:
        """Return the stored envelope with this hash, or None."""
        row = self._conn.execute(
            "SELECT envelope FROM envelopes WHERE hash = ?", (bytes(digest),)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def contents(self) -> LogContents:
        """Read everything held for this city (the input of :func:`verify_log`).

        Raises:
            AuditStoreError: the store cannot be read.
        """
        try:
            leaves = [
                (int(i), bytes(b))
                for i, b in self._conn.execute("SELECT idx, leaf FROM leaves ORDER BY idx")
            ]
            envelopes = {
                bytes(h): bytes(e)
                for h, e in self._conn.execute("SELECT hash, envelope FROM envelopes")
            }
            conflicts = [
                (int(i), bytes(a), bytes(b))
                for i, a, b in self._conn.execute(
                    "SELECT idx, stored, offered FROM conflicts ORDER BY idx"
                )
            ]
            checkpoints = self.checkpoints()
        except (sqlite3.Error, TypeError, ValueError) as exc:
            raise AuditStoreError(f"cannot read auditor store {self.path}: {exc}") from exc
        log = self.pins("log").get(self.origin)
        return LogContents(
            self.city,
            self.origin,
            log,
            self.pins("witness"),
            leaves,
            envelopes,
            checkpoints,
            conflicts,
        )


# --------------------------------------------------------------------------- signatures

# A checked envelope travels back from a worker as a plain tuple (pickling one is several
# times cheaper than a NamedTuple or a dataclass, which matters at 100,000 envelopes), or
# as a string saying why the check failed. The fields, by position:
#
# request  (kid, requester, targets, issued_at, expires_at, nonce, roster_version)
# answer   (kid, request_id, responder, requester, decision, disclosure_version, dataset,
#           dataset_version)
# refusal  (kid, request_id, responder, requester, code)
_Wire = tuple[Any, ...] | str
"""What an envelope check returns (layouts above)."""
_REFUSAL_FIELDS: Final = 5
"""Length of a refusal's tuple (an answer's is 8): how :meth:`_EntryChecks._answer` tells
the two apart."""

_REQUEST_TYPE: Final = PayloadType.QUERY_REQUEST.value
_ANSWER_TYPE: Final = PayloadType.QUERY_ANSWER.value
_PREFIXES: Final = {
    t: pae_prefix(t) for t in (_REQUEST_TYPE, _ANSWER_TYPE, PayloadType.QUERY_REFUSAL.value)
}
# Bodies are decoded with msgspec's schema checks (types, bounds, cross-field rules)
# but without the codec's identifier-shape checks: the auditor compares the fields it
# reads with the roster and the log exactly, so a name's shape adds nothing here.
_REQUEST: Final = msgspec.msgpack.Decoder(QueryRequest)
_ANSWER: Final = msgspec.msgpack.Decoder(QueryAnswer)
_REFUSAL: Final = msgspec.msgpack.Decoder(QueryRefusal)
_KEYS: dict[bytes, bytes] = {}
"""Key id -> raw public key, set in each worker process by :func:`_init_worker`."""


def _init_worker(keys: Mapping[bytes, bytes]) -> None:
    # A worker process only checks chunks, which make no reference cycles: see
    # _gc_paused for why the collector only costs time here.
    gc.disable()
    _KEYS.clear()
    _KEYS.update(keys)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (restored on exit, nesting-safe).

    A large log makes hundreds of thousands of small acyclic objects (decoded leaves,
    bodies, result tuples); each allocation burst triggers collections that walk every
    live object, the whole log included. Nothing here makes reference cycles, so
    reference counting frees it all and the collector only costs time (~15% of this
    process's work for a 100,000-entry log). Let the objects go before the block ends:
    the first allocation after it walks every object allocated inside that still lives.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_one(data: bytes, is_request: bool, keys: Mapping[bytes, bytes]) -> _Wire:
    """Verify one envelope against ``keys`` and summarise its body (layouts above)."""
    try:
        env = decode_envelope(data)
    except HansaError as exc:
        return f"malformed envelope: {exc.message}"
    payload_type = env.payload_type
    prefix = _PREFIXES.get(payload_type)
    if prefix is None or is_request != (payload_type == _REQUEST_TYPE):
        return f"unexpected payload type {payload_type[:64]!r}"
    kid = env.key_id
    pk = keys.get(kid)
    if pk is None:
        return f"signed by key {kid.hex()[:16]}… that no roster names"
    payload = env.payload
    if not verify_signed(pk, b"%s%s%d %s" % (env.signature, prefix, len(payload), payload)):
        return "signature does not verify"
    try:
        if is_request:
            r = _REQUEST.decode(payload)
            return (
                kid,
                r.requester,
                r.targets,
                r.issued_at,
                r.expires_at,
                r.nonce,
                r.roster_version,
            )
        if payload_type == _ANSWER_TYPE:
            a = _ANSWER.decode(payload)
            return (
                kid,
                a.request_id,
                a.responder,
                a.requester,
                str(a.decision),
                a.disclosure_version,
                a.dataset,
                a.dataset_version,
            )
        f = _REFUSAL.decode(payload)
        return (kid, f.request_id, f.responder, f.requester, int(f.code))
    except (msgspec.MsgspecError, ValueError) as exc:
        return f"signed body does not decode: {str(exc)[:200]}"


def _check_chunk(
    envelopes: Sequence[bytes], kinds: bytes, keys: Mapping[bytes, bytes]
) -> list[_Wire]:
    """Check a chunk of envelopes; ``kinds[i]`` is the entry type that logged the i-th."""
    return [
        _check_one(data, kind == REQUEST_RECEIVED, keys)
        for data, kind in zip(envelopes, kinds, strict=True)
    ]


def _worker_chunk(envelopes: Sequence[bytes], kinds: bytes) -> list[_Wire]:
    """:func:`_check_chunk` in a worker process, with the keys its initializer set."""
    return _check_chunk(envelopes, kinds, _KEYS)


def usable_cpus() -> int:
    """Return how many CPUs this process may run on (its affinity mask, if the OS has one).

    ``os.cpu_count()`` counts the machine's CPUs, which overcounts under ``taskset`` or a
    container's CPU set.

    Returns:
        At least 1.
    """
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return max(1, len(affinity(0)))
    return os.cpu_count() or 1


class _Signatures:
    """Envelope checks spread over worker processes and this one.

    The caller submits envelopes in chunks as it reads the leaves, and each chunk goes to
    the pool at once, so the workers start signing while this process is still parsing
    leaves and rebuilding the tree. When this process has nothing else to do it
    takes back the chunks no worker has started (:meth:`Future.cancel` succeeds exactly
    for those) and checks them itself: ``N`` workers and this process keep ``N + 1`` cores
    busy to the end. Chunks shrink towards the end of the log (:meth:`step`: a quarter of
    what is left per process, within bounds), so the last ones finish close together.
    """

    def __init__(self, keys: Mapping[bytes, bytes], workers: int | None, upper: int) -> None:
        n = usable_cpus() - 1 if workers is None else max(workers, 0)
        self._keys = dict(keys)
        self._pool: ProcessPoolExecutor | None = None
        if n > 0 and upper >= INLINE_LIMIT:
            self._pool = ProcessPoolExecutor(n, initializer=_init_worker, initargs=(self._keys,))
        self._processes = n + 1 if self._pool is not None else 1
        self._upper = upper
        self._chunks: list[tuple[list[bytes], bytes]] = []
        self._futures: list[Future[list[_Wire]] | None] = []
        self.total = 0

    def step(self, position: int) -> int:
        """How many of the ``upper`` leaves to read from ``position`` before submitting."""
        left = self._upper - position
        return max(1, _MIN_CHUNK, min(_MAX_CHUNK, left // (4 * self._processes)))

    def submit(self, envelopes: list[bytes], kinds: bytes) -> None:
        """Queue a chunk: ``kinds[i]`` is the type of the entry that logged ``envelopes[i]``."""
        if not envelopes:
            return
        self.total += len(envelopes)
        self._chunks.append((envelopes, kinds))
        pool = self._pool
        self._futures.append(None if pool is None else pool.submit(_worker_chunk, envelopes, kinds))

    def results(self, progress: Callable[[str, int, int], None] | None) -> Iterator[list[_Wire]]:
        """Yield each chunk's results in submission order.

        Between yields, this process checks every chunk no worker has started yet, in
        order, and yields each finished chunk as soon as all before it are finished.
        """
        chunks, futures = self._chunks, self._futures
        ready: dict[int, list[_Wire]] = {}
        head = done = 0

        def finished(i: int) -> bool:
            future = futures[i]
            return i in ready or (future is not None and future.done())

        def take(i: int) -> list[_Wire]:
            part = ready.pop(i, None)
            if part is None:
                future = futures[i]
                assert future is not None
                part = future.result()
            chunks[i] = ([], b"")  # let the envelopes go
            return part

        for i, future in enumerate(futures):
            if future is None or future.cancel():
                ready[i] = _check_chunk(*chunks[i], self._keys)
            while head < len(chunks) and finished(head):
                part = take(head)
                head += 1
                done += len(part)
                yield part
                if progress is not None:
                    progress("signatures", done, self.total)
        while head < len(chunks):
            part = take(head)
            head += 1
            done += len(part)
            yield part
            if progress is not None:
                progress("signatures", done, self.total)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True, slots=True)
class AuditFailure:
    """One failed check.

    Attributes:
        index: the leaf index concerned, or None (a checkpoint, the store).
        check: which check failed (``tree``, ``checkpoint``, ``request``, ...).
        reason: what is wrong, in words.
    """

    index: int | None
    check: str
    reason: str

    def __str__(self) -> str:
        where = "" if self.index is None else f"entry {self.index}: "
        return f"[{self.check}] {where}{self.reason}"


@dataclass
class AuditReport:
    """The outcome of :func:`verify_log`; true iff nothing failed.

    Attributes:
        city: the city audited.
        origin: the log origin.
        size: leaves held (contiguous from 0).
        counts: entries by type name.
        checkpoints: checkpoints checked.
        largest_checkpoint: the largest checkpoint size that verified (0: none).
        signatures: envelope signatures checked.
        failures: every failed check.
        warnings: what could not be checked (e.g. settings never logged).
        tofu: names of the keys trusted on first use because no supplied roster
            names them (the log's origin for its log key, ``witness/<city>``).
    """

    city: str
    origin: str
    size: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    checkpoints: int = 0
    largest_checkpoint: int = 0
    signatures: int = 0
    failures: list[AuditFailure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tofu: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return not self.failures

    def fail(self, index: int | None, check: str, reason: str) -> None:
        """Record a failure."""
        self.failures.append(AuditFailure(index, check, reason))


def _roster_keys(rosters: Sequence[Roster]) -> dict[bytes, bytes]:
    keys: dict[bytes, bytes] = {}
    for roster in rosters:
        for kid, holder in roster.holders.items():
            keys[kid] = holder.public_key.raw
    return keys


def _check_capabilities(
    contents: LogContents, index: int, entry: Leaf, rosters: Sequence[Roster], report: AuditReport
) -> None:
    """A disclosure settings change must point at the city's signed capability document.

    The node records a dataset's new disclosure settings by the message id of the signed
    capability document publishing them, stored beside the tree; that document must be
    signed by the city's node key (in any supplied roster), name the city, and give the
    dataset the logged settings version.
    """
    envelope = contents.envelopes.get(entry.first)
    if envelope is None or hashlib.sha256(envelope).digest() != entry.first:
        report.fail(index, "settings", "the capability document it records is not held")
        return
    keys = {}
    for roster in rosters:
        member = roster.member(contents.city)
        if member is not None:
            key = PublicKey(member.public_key)
            keys[key.key_id] = key
    try:
        capabilities = open_envelope(envelope, keys, Capabilities).message
    except HansaError as exc:
        report.fail(index, "settings", f"capability document: {exc.message}")
        return
    published = {d.name: d.disclosure.version for d in capabilities.datasets}
    if capabilities.city != contents.city:
        report.fail(index, "settings", f"capability document of {capabilities.city!r}")
    elif published.get(entry.text) != entry.version:
        report.fail(
            index,
            "settings",
            f"logged disclosure version {entry.version} of {entry.text!r}, but the signed "
            f"capability document publishes {published.get(entry.text)}",
        )


def _held(contents: LogContents, report: AuditReport) -> int:
    """Return how many leaves are held contiguously from 0; report gaps and conflicts."""
    size = 0
    for index, _leaf in contents.leaves:
        if index != size:
            report.fail(size, "tree", f"entries {size}..{index - 1} are missing")
            break
        size += 1
    for index, _stored, _offered in contents.conflicts:
        report.fail(index, "tree", "the log showed different bytes for this entry on a refetch")
    report.size = size
    return size


def _log_verifiers(
    contents: LogContents, rosters: Sequence[Roster], report: AuditReport
) -> list[NoteVerifier]:
    """The keys the city's checkpoints are checked against, newest roster's first.

    The log keys the supplied rosters name for the city (any version: checkpoints signed
    before a rotation stay valid under the key of their time, but only those: which key
    was in force at which size is the log's own record, :func:`_in_force`); the key
    pinned on first use only when no roster names one, and the report says so (spec §16.1).
    """
    named: list[NoteVerifier] = []
    for roster in sorted(rosters, key=lambda r: r.version, reverse=True):
        verifier = roster.log_verifier(contents.city, contents.origin)
        # By key: a verifier is built afresh per roster and compares by identity.
        if verifier is not None and all(v.public_key != verifier.public_key for v in named):
            named.append(verifier)
    pinned = contents.log_vkey
    if named:
        if pinned is not None and all(v.vkey != pinned for v in named):
            report.warnings.append(
                f"the store pinned a log key for {contents.origin} that no supplied roster "
                "names; checkpoints are checked against the roster's log key"
            )
        return named
    if pinned is None:
        return []
    report.tofu.append(contents.origin)
    report.warnings.append(
        f"log key of {contents.city} ({contents.origin}) trusted on first use: no supplied "
        "roster names one"
    )
    return [NoteVerifier.from_vkey(pinned)]


def _witness_verifiers(
    contents: LogContents, rosters: Sequence[Roster], newest: Roster, report: AuditReport
) -> tuple[list[NoteVerifier], set[str]]:
    """The witness keys that may cosign the city's checkpoints, and their names.

    Witness cities of the newest roster other than the log's own (a city cannot witness
    itself). A witness key the rosters name is used as it is; for a witness city whose
    entry names none, the key pinned on first use, reported as such.
    """
    verifiers: list[NoteVerifier] = []
    names: set[str] = set()
    tofu: list[str] = []
    for member in newest.members:
        if Role.WITNESS not in member.roles or member.city == contents.city:
            continue
        name = f"witness/{member.city}"
        names.add(name)
        named = [v for r in rosters if (v := r.witness_verifier(member.city)) is not None]
        if named:
            verifiers.extend(dict.fromkeys(named))
            continue
        vkey = contents.witness_vkeys.get(name)
        if vkey is None:
            continue
        try:
            verifiers.append(NoteVerifier.from_vkey(vkey))
        except HansaError as exc:
            report.fail(None, "checkpoint", f"pinned witness key {name} is invalid: {exc}")
            continue
        tofu.append(name)
    if tofu:
        report.tofu.extend(tofu)
        report.warnings.append(
            "witness keys trusted on first use (the roster names none): " + ", ".join(tofu)
        )
    return verifiers, names


def _open_checkpoint(
    note: bytes, logs: Sequence[NoteVerifier], origin: str, witnesses: Sequence[NoteVerifier]
) -> tuple[VerifiedCheckpoint, NoteVerifier]:
    """Open a checkpoint under the first of ``logs`` that signed it; return that key too."""
    first: HansaError | None = None
    for log_verifier in logs:
        try:
            opened = open_checkpoint(note, log_verifier, origin=origin, witnesses=witnesses)
        except HansaError as exc:
            first = first or exc
            continue
        return opened, log_verifier
    raise first or NoteError("no log key to check the checkpoint against")


KeyHistory = list[tuple[int, bytes]]
"""One role's ``key_rotated`` entries as ``(index, new key id)``, in log order."""
_KEY_ROLES: Final = (KEY_ROLE_NODE, KEY_ROLE_LOG, KEY_ROLE_WITNESS)


def _short(kid: bytes) -> str:
    return f"{kid.hex()[:16]}…"


def _key_history(leaves: Sequence[Leaf | None], report: AuditReport) -> dict[str, KeyHistory]:
    """Which key the log says was in force for each role from which index on (step 6).

    Each rotation must start from the key the log last recorded for its role (32 zero
    bytes before the first, spec §16.2); one that does not fails. A log key, once
    rotated away, must not come back: the first checkpoint over a rotation is signed by
    the key it puts in force, so whoever holds a retired (perhaps leaked) log key could
    otherwise append a rotation back to it and sign on. Such entries fail but still
    count: what follows them is checked against the key they name.
    """
    history: dict[str, KeyHistory] = {role: [] for role in _KEY_ROLES}
    retired: dict[bytes, int] = {}  # log key id -> index of the rotation that retired it
    for index, entry in enumerate(leaves):
        if entry is None or entry.kind != KEY_ROTATED:
            continue
        role, keys, new = entry.text, history.get(entry.text), entry.second
        if keys is None:
            continue  # a role this auditor has no rule for
        logged = keys[-1][1] if keys else bytes(32)
        if entry.first != logged:
            report.fail(
                index, "key", f"{role} key rotated from a key the log did not record as in force"
            )
        if role == KEY_ROLE_LOG:
            if new in retired:
                report.fail(
                    index,
                    "key",
                    f"log key rotated back to {_short(new)}, retired by key_rotated "
                    f"#{retired[new]}: a retired log key may have leaked, and only it signs "
                    "the checkpoints that would put it back in force",
                )
            if keys and logged != new:
                retired.setdefault(logged, index)
        keys.append((index, new))
    return history


def _in_force(log_keys: KeyHistory, size: int) -> int:
    """Position in ``log_keys`` of the log key in force for a tree of ``size`` leaves.

    That is the last log-key ``key_rotated`` entry with an index below ``size``: the
    entry is inside the tree, logged before the node signed anything with the key it
    names (spec §16.2). -1: no such entry.
    """
    return bisect.bisect_left(log_keys, (size, b"")) - 1


def _not_in_force(label: str, kid: bytes, log_keys: KeyHistory, at: int) -> str:
    """Why a checkpoint signed by ``kid`` fails when ``log_keys[at]`` is in force."""
    index, current = log_keys[at]
    in_force = f"the log key in force there is {_short(current)} (key_rotated #{index})"
    earlier = [j for j in range(at) if log_keys[j][1] == kid]
    if not earlier:
        return (
            f"{label} is signed by log key {_short(kid)}, which the log never recorded as "
            f"in force below that size; {in_force}"
        )
    retired = log_keys[earlier[-1] + 1][0]
    return (
        f"{label} is signed by log key {_short(kid)}, retired by key_rotated #{retired}, "
        f"inside the tree it signs; {in_force}"
    )


def _check_checkpoints(
    contents: LogContents,
    tree: MerkleTree,
    rosters: Sequence[Roster],
    newest: Roster,
    report: AuditReport,
    log_keys: KeyHistory,
) -> None:
    if not contents.checkpoints:
        report.warnings.append("no checkpoint seen: nothing vouches for the leaves")
        return
    logs = _log_verifiers(contents, rosters, report)
    if not logs:
        report.fail(None, "checkpoint", "no log key pinned: no checkpoint can be verified")
        return
    witnesses, roster_witnesses = _witness_verifiers(contents, rosters, newest, report)
    quorum = newest.witness_quorum
    roots: dict[int, bytes] = {}
    cosigned: dict[tuple[int, bytes], set[str]] = {}
    unrecorded: list[int] = []  # sizes of verified checkpoints no log-key rotation precedes
    for seen in contents.checkpoints:
        report.checkpoints += 1
        label = f"checkpoint of size {seen.size}"
        try:
            opened, signer = _open_checkpoint(seen.note, logs, contents.origin, witnesses)
        except HansaError as exc:
            report.fail(None, "checkpoint", f"{label}: {exc}{_unnamed(logs, log_keys, tree, seen)}")
            continue
        size, root = opened.checkpoint.size, opened.checkpoint.root_hash
        # The key in force at this size (step 6). Past the leaves held the auditor sees
        # no rotation, so it judges by those it holds: a key they retire fails here, and
        # the checkpoint fails anyway below for covering leaves not held.
        at = _in_force(log_keys, min(size, tree.size))
        if at < 0:
            unrecorded.append(size)
        elif signer.public_key.key_id != log_keys[at][1]:
            # A note may carry several log signatures: the one in force suffices.
            current = [v for v in logs if v.public_key.key_id == log_keys[at][1]]
            try:
                opened, signer = _open_checkpoint(seen.note, current, contents.origin, witnesses)
            except HansaError:
                kid = signer.public_key.key_id
                report.fail(None, "checkpoint", _not_in_force(label, kid, log_keys, at))
                continue
        if roots.setdefault(size, root) != root:
            report.fail(None, "checkpoint", f"equivocation: two signed checkpoints of size {size}")
        if size > tree.size:
            report.fail(None, "checkpoint", f"{label} covers more leaves than the {tree.size} held")
        elif size > 0 and tree.root_at(size) != root:
            report.fail(
                None,
                "checkpoint",
                f"{label}: its root differs from the recomputed tree (entries changed, "
                "removed, reordered or inserted)",
            )
        else:
            report.largest_checkpoint = max(report.largest_checkpoint, size)
        # Cosignatures of one checkpoint may arrive on several notes (as signed, then
        # as witnessed): the quorum counts them together.
        cosigned.setdefault((size, root), set()).update(opened.cosigners() & roster_witnesses)
    for (size, _root), cosigners in sorted(cosigned.items()):
        if quorum is not None and len(cosigners) < quorum:
            report.fail(
                None,
                "quorum",
                f"checkpoint of size {size} has {len(cosigners)} of the {quorum} witness "
                "cosignatures needed",
            )
    if unrecorded:
        if log_keys:
            where = f"they precede the log's first record of its log key (#{log_keys[0][0]})"
        else:
            where = "the log records no log key (no key_rotated entry for the log role)"
        report.warnings.append(
            f"{len(unrecorded)} checkpoint(s) of size up to {max(unrecorded)} were checked "
            f"against every trusted log key: {where}, so nothing says which key was in force "
            "for them, and a retired log key would pass"
        )
    if report.largest_checkpoint < report.size:
        report.warnings.append(
            f"entries {report.largest_checkpoint}..{report.size - 1} are under no verified "
            "checkpoint yet"
        )


def _unnamed(
    logs: Sequence[NoteVerifier], log_keys: KeyHistory, tree: MerkleTree, seen: SeenCheckpoint
) -> str:
    """A hint when the log key in force at a checkpoint's (stated) size is not trusted."""
    at = _in_force(log_keys, min(seen.size, tree.size))
    if at < 0 or any(v.public_key.key_id == log_keys[at][1] for v in logs):
        return ""
    index, kid = log_keys[at]
    return (
        f" (the log puts log key {_short(kid)} in force at key_rotated #{index}; no "
        "supplied roster names it)"
    )


def verify_log(
    contents: LogContents,
    rosters: Sequence[Roster],
    *,
    skew_ms: int = DEFAULT_SKEW_MS,
    workers: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    roster_digests: Mapping[int, bytes] | None = None,
) -> AuditReport:
    """Verify one city's log as the auditor holds it (module docstring, steps 1-6).

    Args:
        contents: the stored log (:meth:`AuditorStore.contents`).
        rosters: the roster versions to check signers against (a request is checked
            against the version it cites; checkpoints against the log keys any of them
            names for the city, and the newest one's witnesses and quorum).
        skew_ms: clock skew tolerated around a request's validity window.
        workers: worker processes for signature checks besides this process, which
            checks signatures too once its own work is done (None: one fewer than the
            CPUs this process may use; 0: every check in this process).
        progress: called as ``progress(phase, done, total)`` while working.
        roster_digests: SHA-256 of each supplied roster's signed body by version; every
            ``roster_installed`` entry of a listed version must carry that digest.

    Returns:
        The report, with counts and every failure.

    Raises:
        ConfigError: no roster was given.
    """
    if not rosters:
        raise ConfigError("verify_log needs at least one roster")
    with _gc_paused():
        return _verify(contents, rosters, skew_ms, workers, progress, roster_digests or {})


def _verify(
    contents: LogContents,
    rosters: Sequence[Roster],
    skew_ms: int,
    workers: int | None,
    progress: Callable[[str, int, int], None] | None,
    roster_digests: Mapping[int, bytes],
) -> AuditReport:
    by_version = {r.version: r for r in rosters}
    newest = by_version[max(by_version)]
    report = AuditReport(contents.city, contents.origin)
    size = _held(contents, report)
    held = contents.leaves[:size]
    signatures = _Signatures(_roster_keys(rosters), workers, size)
    try:
        leaves, owners = _read_leaves(contents, held, rosters, signatures, report)
        # While the workers sign: the tree, the checkpoints, the log's structure.
        tree = MerkleTree.from_leaf_hashes([leaf_hash(leaf) for _i, leaf in held])
        if progress is not None:
            progress("tree", size, size)
        keys = _key_history(leaves, report)
        _check_checkpoints(contents, tree, rosters, newest, report, keys[KEY_ROLE_LOG])
        checks = _EntryChecks(
            contents.city, leaves, by_version, newest, skew_ms, report, keys[KEY_ROLE_NODE]
        )
        checks.check_rosters(roster_digests)
        # Each chunk is checked as it arrives; this process signs the chunks no worker
        # has started in between.
        fed = 0
        for part in signatures.results(progress):
            checks.feed(owners[fed : fed + len(part)], part)
            fed += len(part)
    finally:
        signatures.close()
    report.signatures = len(owners)
    return report


def _read_leaves(
    contents: LogContents,
    held: Sequence[tuple[int, bytes]],
    rosters: Sequence[Roster],
    signatures: _Signatures,
    report: AuditReport,
) -> tuple[list[Leaf | None], list[int]]:
    """Step 3 and the start of step 4: decode every leaf, queue every logged envelope
    for :class:`_Signatures`, chunk by chunk.

    Returns:
        The decoded leaves (None where undecodable), and the index of each entry whose
        envelope was queued, in order.
    """
    leaves: list[Leaf | None] = []
    owners: list[int] = []
    tally = [0] * 256
    envelopes, sha256 = contents.envelopes, hashlib.sha256
    position = 0
    while position < len(held):
        step = signatures.step(position)
        queued: list[bytes] = []
        kinds = bytearray()
        for index, leaf in held[position : position + step]:
            try:
                entry = unpack_leaf(leaf)
            except ProtocolError as exc:
                report.fail(index, "entry", f"undecodable leaf: {exc.message}")
                leaves.append(None)
                continue
            leaves.append(entry)
            kind = entry.kind
            tally[kind] += 1
            # Every logged request and answer envelope goes to the signature checks.
            if kind == REQUEST_RECEIVED:
                digest, what = entry.first, "request"
            elif kind == ANSWER_SENT:
                digest, what = entry.second, "answer"
            else:
                if kind == SETTINGS_CHANGED and entry.outcome == SCOPE_DISCLOSURE:
                    _check_capabilities(contents, index, entry, rosters, report)
                continue
            envelope = envelopes.get(digest)
            if envelope is None:
                report.fail(index, what, f"the logged {what} envelope is not held")
            elif sha256(envelope).digest() != digest:
                report.fail(index, what, f"the stored {what} envelope does not hash to its id")
            else:
                queued.append(envelope)
                kinds.append(kind)
                owners.append(index)
        signatures.submit(queued, bytes(kinds))
        position += step
    report.counts = {ENTRY_NAMES[kind]: n for kind, n in enumerate(tally) if n}
    return leaves, owners


class _EntryChecks:
    """Steps 4-5: requests, decisions, answers and settings.

    The log's structure (which decision and answer belong to which request, the
    settings in force) is read from the leaves up front; each signed envelope's summary
    is then fed in log order as the workers return it.
    """

    def __init__(
        self,
        city: str,
        leaves: Sequence[Leaf | None],
        by_version: Mapping[int, Roster],
        newest: Roster,
        skew_ms: int,
        report: AuditReport,
        node_keys: KeyHistory,
    ) -> None:
        self.city, self.leaves, self.report = city, leaves, report
        self.by_version, self.newest, self.skew_ms = by_version, newest, skew_ms
        # Per message id, in log order: how often the request and its answer were logged,
        # and the decisions. The k-th decision and the k-th answer belong to the k-th
        # logging of the request; ``occurrence`` holds k for the entries with k > 0.
        requests: dict[bytes, int] = {}
        answers: dict[bytes, int] = {}
        self.decisions: dict[bytes, list[tuple[int, Leaf]]] = defaultdict(list)
        # Per request id, the answer id of each answer_sent, in log order.
        self.answer_ids: dict[bytes, list[bytes]] = defaultdict(list)
        self.occurrence: dict[int, int] = {}
        self.settings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.first: dict[bytes, tuple[str, int]] = {}  # requester, roster version
        self.nonces: set[tuple[str, bytes]] = set()
        self.allowed: dict[tuple[str, bytes, int], bool] = {}  # few signers, many requests
        # The roster version the node had installed when each request was logged.
        self.installed: dict[int, int] = {}
        self.roster_entries: list[tuple[int, Leaf]] = []
        # (index, key id) of every key_rotated entry for the node key, in log order
        # (chained by _key_history).
        self.node_keys = node_keys
        current: int | None = None
        occurrence, installed = self.occurrence, self.installed
        for index, entry in enumerate(leaves):
            if entry is None:
                continue
            kind, mid = entry.kind, entry.first
            if kind == REQUEST_RECEIVED:
                if current is not None:
                    installed[index] = current
                k = requests.get(mid, 0)
                requests[mid] = k + 1
                if k:
                    occurrence[index] = k
            elif kind == DECISION:
                if mid not in requests:
                    report.fail(index, "decision", "decides a request not logged before it")
                self.decisions[mid].append((index, entry))
            elif kind == ANSWER_SENT:
                if mid not in self.decisions:
                    report.fail(
                        index, "answer", "answers a request with no decision logged before it"
                    )
                k = answers.get(mid, 0)
                answers[mid] = k + 1
                self.answer_ids[mid].append(entry.second)
                if k:
                    occurrence[index] = k
            elif kind == SETTINGS_CHANGED and entry.outcome == SCOPE_DISCLOSURE:
                self.settings[entry.text].append((index, entry.version))
            elif kind == ROSTER_INSTALLED:
                current = entry.version
                self.roster_entries.append((index, entry))

    def check_rosters(self, digests: Mapping[int, bytes]) -> None:
        """Each installed roster must be the alliance's roster of that version."""
        for index, entry in self.roster_entries:
            want = digests.get(entry.version)
            if want is None:
                if entry.version not in self.by_version:
                    self.report.warnings.append(
                        f"entry {index}: roster version {entry.version} installed, not supplied"
                    )
            elif want != entry.first:
                self.report.fail(
                    index,
                    "roster",
                    f"installed a roster v{entry.version} other than the alliance's",
                )

    def feed(self, indices: Sequence[int], part: Sequence[_Wire]) -> None:
        """Check the entries at ``indices`` given their envelopes' checked summaries."""
        leaves, report = self.leaves, self.report
        for index, wire in zip(indices, part, strict=True):
            entry = leaves[index]
            assert entry is not None  # only parsed leaves have envelopes checked
            if entry.kind == REQUEST_RECEIVED:
                if isinstance(wire, str):
                    report.fail(index, "request", wire)
                else:
                    self._request(index, entry, wire)
            elif isinstance(wire, str):
                report.fail(index, "answer", wire)
            else:
                decided = self.decisions.get(entry.first, [])
                k = self.occurrence.get(index, 0)
                if k < len(decided):
                    self._answer(entry.first, *decided[k], index, wire)

    def _request(self, index: int, entry: Leaf, req: tuple[Any, ...]) -> None:
        kid, requester, targets, issued_at, expires_at, nonce, roster_version = req
        report, skew_ms = self.report, self.skew_ms
        mid, log_time = entry.first, entry.log_time_ms
        k = self.occurrence.get(index, 0)
        if k == 0:
            self.first[mid] = (requester, roster_version)
        if kid != entry.second:
            report.fail(index, "request", "logged requester key id is not the signer's")
        roster = self.by_version.get(roster_version)
        if roster is None:
            report.fail(index, "request", f"cites roster version {roster_version}, not supplied")
            roster = self.newest
        else:
            who = (requester, kid, roster_version)
            ok = self.allowed.get(who)
            if ok is None:
                ok = self.allowed[who] = roster.is_allowed(requester, kid, Role.ANALYST)
            if not ok:
                report.fail(
                    index,
                    "request",
                    f"signer is not analyst {requester!r} in roster v{roster.version}",
                )
        decided = self.decisions.get(mid, [])
        refused = k < len(decided) and decided[k][1].outcome == OUTCOME_REFUSED
        if self.city not in targets and not refused:
            # Logged before the audience check (spec §16.2): a node that refused a
            # misaddressed request did right; one that answered it, or never decided, did not.
            report.fail(index, "request", f"not addressed to {self.city!r}: not among its targets")
        key = (requester, nonce)
        reused = k == 0 and key in self.nonces
        self.nonces.add(key)
        in_window = issued_at - skew_ms <= log_time <= expires_at + skew_ms
        roster_valid = log_time <= roster.expires_ms + skew_ms
        installed = self.installed.get(index, roster_version)
        if in_window and roster_valid and k == 0 and not reused and installed == roster_version:
            return
        if refused:
            return  # the node refused it, as it should
        if in_window and roster_valid and installed == roster_version and self._repeat(mid, k):
            return  # a byte-identical repeat given the answer already released (§8.3)
        problems = []
        if not in_window:
            problems.append("logged outside the request's validity window")
        if not roster_valid:
            problems.append(f"logged after roster v{roster.version} expired")
        if k > 0:
            problems.append("a replay of a message id logged before")
        if reused:
            problems.append("reuses a (requester, nonce) logged before")
        if installed != roster_version:
            problems.append(f"cites roster v{roster_version} while v{installed} was installed")
        for problem in problems:
            report.fail(index, "freshness", f"{problem}, yet not refused")

    def _repeat(self, mid: bytes, k: int) -> bool:
        """Whether the k-th logging (k > 0) of a request was answered with the first answer."""
        if k == 0:
            return False
        decided, ids = self.decisions.get(mid, []), self.answer_ids.get(mid, [])
        answered = (OUTCOME_ANSWERED, OUTCOME_SUPPRESSED)
        return (
            k < len(decided)
            and k < len(ids)
            and decided[0][1].outcome in answered
            and decided[k][1].outcome in answered
            and ids[k] == ids[0]
        )

    def _answer(
        self, mid: bytes, index: int, decision: Leaf, ans_index: int, ans: tuple[Any, ...]
    ) -> None:
        kid, request_id, responder, requester = ans[:4]
        report, city = self.report, self.city
        req = self.first.get(mid)
        roster = self.newest if req is None else self.by_version.get(req[1])
        roster = self.newest if roster is None else roster
        member = roster.member(city)
        if member is None or key_id(member.public_key) != kid:
            report.fail(
                ans_index, "answer", f"not signed by {city}'s node key in roster v{roster.version}"
            )
        at = bisect.bisect_left(self.node_keys, (ans_index, b"")) - 1
        if at >= 0 and self.node_keys[at][1] != kid:
            report.fail(
                ans_index,
                "answer",
                f"signed by key {kid.hex()[:16]}…, but the log's last key_rotated entry "
                f"(#{self.node_keys[at][0]}) names {self.node_keys[at][1].hex()[:16]}…",
            )
        if request_id != mid:
            report.fail(ans_index, "answer", "the signed answer cites another request")
        if responder != city:
            report.fail(ans_index, "answer", f"the signed answer names responder {responder!r}")
        if req is not None and requester != req[0]:
            report.fail(ans_index, "answer", "the signed answer names another requester")
        if len(ans) == _REFUSAL_FIELDS:
            code = ans[4]
            if decision.outcome != OUTCOME_REFUSED or decision.reason != code:
                report.fail(
                    index,
                    "decision",
                    f"logged outcome {decision.outcome}/{decision.reason} but the signed "
                    f"refusal has code {code}",
                )
            return
        applied, disclosure_version, dataset, dataset_version = ans[4:]
        want = OUTCOME_SUPPRESSED if applied == Decision.SUPPRESSED else OUTCOME_ANSWERED
        if decision.outcome != want:
            report.fail(
                index,
                "decision",
                f"logged outcome {decision.outcome} but the signed answer says {applied}",
            )
        if decision.version != disclosure_version:
            report.fail(
                index,
                "decision",
                f"logged disclosure version {decision.version} but the signed answer "
                f"applied {disclosure_version}",
            )
        if decision.text != dataset_version:
            report.fail(index, "decision", "logged data version differs from the signed answer's")
        published = [v for i, v in self.settings.get(dataset, []) if i < index]
        if not published:
            report.warnings.append(
                f"entry {index}: disclosure settings of {dataset!r} were never logged "
                "before this decision"
            )
        elif published[-1] != disclosure_version:
            report.fail(
                index,
                "settings",
                f"answered under disclosure version {disclosure_version} of "
                f"{dataset!r}, but version {published[-1]} was in force",
            )


# --------------------------------------------------------------------------- compare


@dataclass
class CompareReport:
    """The outcome of :func:`compare_stores`; true iff the two views agree.

    Attributes:
        city: the city compared.
        first_difference: the first leaf index where the two stores differ, or None.
        failures: the inconsistencies found (a forked history).
        checked_pairs: checkpoint pairs compared.
        unverified: per store (``a``, ``b``), the sizes of its checkpoints that no log
            key in use verifies, left out of the comparison (:func:`verify_log` reports
            them as failures).
    """

    city: str
    first_difference: int | None = None
    failures: list[str] = field(default_factory=list)
    checked_pairs: int = 0
    unverified: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))

    def __bool__(self) -> bool:
        return not self.failures


def _tree(contents: LogContents) -> MerkleTree:
    hashes = []
    for expected, (index, leaf) in enumerate(contents.leaves):
        if index != expected:
            break
        hashes.append(leaf_hash(leaf))
    return MerkleTree.from_leaf_hashes(hashes)


def _verified(
    contents: LogContents, verifiers: Sequence[NoteVerifier], unverified: list[int]
) -> list[tuple[int, bytes]]:
    """The (size, root) of every checkpoint some verifier signs; the rest in ``unverified``."""
    out = []
    for seen in contents.checkpoints:
        for verifier in verifiers:
            try:
                cp = open_checkpoint(seen.note, verifier, origin=contents.origin).checkpoint
            except HansaError:
                continue
            out.append((cp.size, cp.root_hash))
            break
        else:
            # verify_log reports it; only signed statements can fork.
            unverified.append(_note_size(seen.note))
    return out


def _note_size(note: bytes) -> int:
    """A checkpoint note's size, read without its signature (-1 when it does not parse)."""
    try:
        return Checkpoint.from_text(Note.from_bytes(note).text).size
    except HansaError:
        return -1


def compare_stores(a: LogContents, b: LogContents, rosters: Sequence[Roster] = ()) -> CompareReport:
    """Compare two auditors' views of one city's log: detect a forked history.

    Each signed checkpoint of one view must be consistent with every signed checkpoint
    of the other: equal roots at equal sizes, and the larger one's leaves (held by
    whichever store has them) must give the smaller one's root.

    A checkpoint counts when it is signed by a log key the supplied rosters name for the
    city (any version: two checkpoints that conflict are a fork or a leaked key, either
    way an alarm, whichever key signed them), else, with no roster naming one, by the
    key both stores pinned on first use. The others are left out and listed in
    :attr:`CompareReport.unverified`.

    Args:
        a: one auditor's store contents.
        b: another auditor's store contents of the same city.
        rosters: alliance roster versions naming the city's log keys.

    Returns:
        The comparison.

    Raises:
        ConfigError: the stores are of different logs.
    """
    if a.origin != b.origin:
        raise ConfigError(f"cannot compare logs {a.origin!r} and {b.origin!r}")
    report = CompareReport(a.city)
    verifiers: list[NoteVerifier] = []
    for roster in sorted(rosters, key=lambda r: r.version, reverse=True):
        named = roster.log_verifier(a.city, a.origin)
        # By key: a verifier is built afresh per roster and compares by identity.
        if named is not None and all(v.public_key != named.public_key for v in verifiers):
            verifiers.append(named)
    if not verifiers:
        if a.log_vkey is None or b.log_vkey is None:
            report.failures.append("a store has no pinned log key and no roster names one")
            return report
        if a.log_vkey != b.log_vkey:
            report.failures.append(
                "the two auditors pinned different log keys and no roster names the city's"
            )
            return report
        verifiers = [NoteVerifier.from_vkey(a.log_vkey)]
    trees = (_tree(a), _tree(b))
    for i in range(min(trees[0].size, trees[1].size)):
        if trees[0].leaf_hash_at(i) != trees[1].leaf_hash_at(i):
            report.first_difference = i
            break
    ca = _verified(a, verifiers, report.unverified[0])
    cb = _verified(b, verifiers, report.unverified[1])
    for sa, ra in ca:
        for sb, rb in cb:
            report.checked_pairs += 1
            if sa == sb:
                if ra != rb:
                    report.failures.append(f"fork: two signed checkpoints of size {sa}")
                continue
            (small, small_root), (big, big_root) = sorted(((sa, ra), (sb, rb)))
            # Whichever view holds leaves that give the larger root answers for the
            # prefix: those leaves must also give the smaller root.
            for tree in trees:
                if small > 0 and tree.size >= big and tree.root_at(big) == big_root:
                    if tree.root_at(small) != small_root:
                        report.failures.append(
                            f"fork: signed checkpoints of sizes {small} and {big} are inconsistent"
                        )
                    break
    return report


# --------------------------------------------------------------------------- reconcile


@dataclass
class ReconcileReport:
    """The outcome of :func:`reconcile`; true iff every answer is accounted for.

    Attributes:
        bundle_answers: replies held in the bundles that were looked up.
        logged_answers: logged answers to listed analysts.
        failures: every answer missing on one side.
        unaudited: cities in bundles with no log supplied.
    """

    bundle_answers: int = 0
    logged_answers: int = 0
    failures: list[str] = field(default_factory=list)
    unaudited: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return not self.failures


def _requester_of(envelope: bytes) -> str | None:
    try:
        env = decode_envelope(envelope)
        if env.payload_type == PayloadType.QUERY_ANSWER:
            return decode_as(env.payload, QueryAnswer).requester
        if env.payload_type == PayloadType.QUERY_REFUSAL:
            return decode_as(env.payload, QueryRefusal).requester
    except HansaError:
        return None
    return None


def reconcile(
    logs: Mapping[str, LogContents], bundles: Sequence[EvidenceBundle]
) -> ReconcileReport:
    """Reconcile analysts' evidence bundles with cities' logs (issue 5, part 6).

    Every reply (answer or refusal) an analyst holds must be logged as ``answer_sent``
    (with that answer id, for that request id) by the city that signed it; every
    ``answer_sent`` of a supplied log whose reply names a listed analyst (the bundles'
    requesters) must be in one of the bundles. Signatures are :func:`verify_log`'s and
    ``hansa verify``'s job; this checks completeness on both sides.

    Args:
        logs: the stored logs by city id.
        bundles: the analysts' evidence bundles (:func:`evidence.read_bundle`).

    Returns:
        The reconciliation.
    """
    report = ReconcileReport()
    logged: dict[str, dict[bytes, bytes]] = {}  # city -> answer id -> request id
    for city, contents in logs.items():
        table: dict[bytes, bytes] = {}
        for _index, leaf in contents.leaves:
            try:
                entry = parse_leaf(leaf)
            except ValueError:
                continue
            if entry.kind == ANSWER_SENT:
                table[entry.second] = entry.first
        logged[city] = table
    analysts = {b.requester for b in bundles}
    held: set[bytes] = set()
    for bundle in bundles:
        request_id = message_id(bundle.request)
        for ev in bundle.cities:
            if ev.reply is None:
                continue
            answer_id = message_id(ev.reply)
            held.add(answer_id)
            if ev.city not in logged:
                report.unaudited.add(ev.city)
                continue
            report.bundle_answers += 1
            if answer_id not in logged[ev.city]:
                report.failures.append(
                    f"{bundle.requester} holds a reply from {ev.city} "
                    f"({answer_id.hex()[:16]}…) that {ev.city}'s log does not record"
                )
            elif logged[ev.city][answer_id] != request_id:
                report.failures.append(
                    f"{ev.city} logged reply {answer_id.hex()[:16]}… for another request"
                )
    for city, table in logged.items():
        envelopes = logs[city].envelopes
        for answer_id in table:
            envelope = envelopes.get(answer_id)
            requester = None if envelope is None else _requester_of(envelope)
            if requester is None or requester not in analysts:
                continue
            report.logged_answers += 1
            if answer_id not in held:
                report.failures.append(
                    f"{city} logged a reply to {requester} ({answer_id.hex()[:16]}…) "
                    "that no bundle holds"
                )
    return report
