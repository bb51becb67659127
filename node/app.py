"""The node's HTTP application: ``create_app(config) -> web.Application``.

Theory of operation
-------------------
The application is a thin shell: it reads bytes, hands them to the pure
layers (``hansa.crypto.open_envelope``, ``hansa.protocol.ReplayGuard``), runs
the query engine off the event loop, and writes back signed bytes.

``POST /v1/query`` (body: one envelope, ``Content-Type:
application/vnd.hansa.envelope+msgpack``) runs this pipeline, and every step
happens before any work of the next (``spec/protocol.md`` §8):

1. **Size**: a body over ``limits.max_request_bytes`` is refused before it is
   parsed (the declared ``Content-Length``, aiohttp's ``client_max_size``
   and an explicit length check).
2. **Signature**: the envelope must be signed, strictly, by a key allowed to
   query, and carry a ``QueryRequest``. With an alliance roster these are
   the analyst keys the roster names (its analysts, and member cities with
   the analyst role); without one, the ``[[trusted]]`` keys of ``node.toml``.
3. **Principal**: the request's ``requester`` must be the principal that key
   is bound to (``REQUESTER_NOT_ALLOWED`` otherwise). Then the alliance
   rules (``spec/protocol.md`` §8.2): with a roster, it must be unexpired
   (``EXPIRED``), the request's ``roster_version`` must be the node's
   (``ROSTER_MISMATCH``), this city and every target must be members
   (``ROSTER_MISMATCH``) and the purpose allowed for the analyst
   (``PURPOSE_NOT_ALLOWED``); with or without one, ``len(targets)`` and
   ``quorum`` must reach ``[alliance] min_participants``
   (``QUORUM_TOO_SMALL``).
4. **Freshness**: addressed to this city (one of the signed ``targets``), time
   window and replay (``ReplayGuard``, with the current wall-clock time).
5. **Work**: first ``engine.cached_answer(request)`` on the event loop, when
   the engine has one (``QueryEngine``'s result cache: the request rules run,
   then a lookup, no DuckDB); on a miss ``engine.answer(request)`` in a
   bounded thread pool, at most ``max_concurrent_queries`` at a time and
   ``max_queued_queries`` waiting (``UNAVAILABLE`` beyond that), under the
   query time limit. A cache hit skips only the aggregate computation: steps
   1-4 ran, and the answer is built and signed afresh for this request.

What comes back depends on whether the requester could be identified:

* identified (the signature verified under a trusted key): a **sealed**
  ``QueryAnswer``, or a **sealed** ``QueryRefusal`` carrying the error code,
  both with ``request_id`` = the request's message id, and **HTTP 200** in
  both cases: the signed body carries the verdict, and a status code is not
  signed, so clients must read the body, never the status.
* not identified (oversized, malformed, unknown key, bad signature): an
  **unsigned** ``ErrorMessage`` (MessagePack, ``Content-Type:
  application/vnd.hansa.error+msgpack``) with HTTP 413 (``TOO_LARGE``), 401
  (signature and key codes), 415 (wrong content type), 500 (``INTERNAL``)
  or 400 (everything else). Signing these would let anyone make the node
  sign arbitrary refusals.

The trusted roster is replaced at run time, without a restart, by ``POST
/v1/roster`` (body: the signed roster file, verified as the successor of the
current one and persisted atomically before it takes effect) or by SIGHUP
(the roster files are re-read and the chain verified from the pin). Each
request is judged against the roster current when it arrived. ``GET
/v1/roster`` returns the exact signed roster bytes the node trusts, which is
how a client learns the ``roster_version`` to sign.

The audit log (``spec/protocol.md`` §16, :mod:`hansa.node.auditlog`) wraps the
pipeline: once the signature has verified, ``request_received`` (with the request
envelope) takes its place in the log before step 3 begins (it is queued, in log order,
without waiting); the decision and ``answer_sent`` (with the signed reply) are queued
after it, and the reply is written only once one commit has made all three durable
(§16.2). So a request waits for one fsync, not two. Appends are batched on the event
loop: concurrent requests add their entries to the open batch, and one writer thread
commits batch after batch, each with one ``append_many`` (one transaction, one fsync)
while the next one fills; a request entry queued by a request that never reaches its
reply is committed by the next batch, by the checkpoint task within a second, or at
shutdown. Unverifiable input is never
logged. When the log cannot
write, the node signs nothing and answers 503 ``UNAVAILABLE`` (fail closed). Roster
take-ups and changed configuration or disclosure settings are logged too, and a
background task signs checkpoints (``[audit]`` checkpoint_seconds/checkpoint_entries).
``POST /v1/audit`` serves the log to auditor-role keys (and receipts to the analyst who
sent a request), ``GET /v1/log/keys`` the log and witness note keys, and the
``/v1/witness/*`` routes run :mod:`hansa.node.witness` for a witnessing city.

``GET /v1/capabilities`` returns a sealed ``Capabilities`` document, cached
and re-signed whenever the engine's dataset list changes. ``GET /healthz``
is a small JSON liveness document and ``GET /metrics`` the Prometheus page.
No route returns rows: the only data that leaves the node is the aggregate
states the engine releases after disclosure control.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol, TypeVar

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from hansa.crypto import PublicKey, SigningKey, open_envelope, seal
from hansa.crypto.keyfile import read_key_file, read_public_key, write_key_file
from hansa.crypto.note import (
    CosignatureSigner,
    Note,
    NoteSignature,
    NoteSigner,
    NoteVerifier,
    verify_cosignatures,
)
from hansa.federation.roster import MAX_ROSTER_SIGNATURES, MAX_ROSTER_SIZE, Member, Role
from hansa.node.auditlog import (
    AuditEntry,
    AuditLog,
    CheckpointPolicy,
    KeyRotated,
    Outcome,
    RequestReceived,
    RosterInstalled,
    SettingsChanged,
    SettingsScope,
    StoredCheckpoint,
    decode_entry,
    reply_leaves,
    request_received_leaf,
)
from hansa.node.config import (
    AUDIT_FILE,
    RETIRED_DIR,
    NodeConfig,
    TrustedRoster,
    config_path,
    install_roster,
    load_roster_store,
    retired_key_files,
)
from hansa.node.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from hansa.node.metrics import NodeMetrics
from hansa.node.witness import WITNESS_DB, Witness, WitnessConflict, WitnessStore, followed_logs
from hansa.node.witness import http_status as witness_status
from hansa.protocol.auditleaf import KEY_ROLE_LOG, KEY_ROLE_NODE, KEY_ROLE_WITNESS
from hansa.protocol.codec import decode_as, encode
from hansa.protocol.envelope import MAX_PAYLOAD_SIZE, decode_envelope, message_id, pae
from hansa.protocol.errors import (
    ErrorCode,
    FreshnessError,
    HansaError,
    PolicyDenied,
    ProofError,
    ProtocolError,
    SignatureError,
)
from hansa.protocol.freshness import ReplayGuard
from hansa.protocol.messages import (
    MAX_AUDIT_PAGE,
    MAX_TEXT,
    AddCheckpoint,
    AuditOp,
    AuditRequest,
    AuditResponse,
    Capabilities,
    DatasetInfo,
    Decision,
    ErrorMessage,
    Group,
    QueryAnswer,
    QueryRefusal,
    QueryRequest,
    SuppressedCell,
)

__all__ = [
    "AUDIT_ROUTE",
    "ENVELOPE_MEDIA_TYPE",
    "ERROR_MEDIA_TYPE",
    "LOG_KEYS_ROUTE",
    "NODE",
    "ROSTER_MEDIA_TYPE",
    "ROSTER_ROUTE",
    "WITNESSED_LOGS_FILE",
    "WITNESS_ADD_ROUTE",
    "WITNESS_COSIGNATURES_ROUTE",
    "AnswerEngine",
    "CachedAnswerEngine",
    "EngineOutput",
    "NodeState",
    "Trust",
    "create_app",
    "unsigned_status",
]

ENVELOPE_MEDIA_TYPE: Final = "application/vnd.hansa.envelope+msgpack"
"""Content type of a signed envelope (request bodies and 200 responses)."""
ERROR_MEDIA_TYPE: Final = "application/vnd.hansa.error+msgpack"
"""Content type of an unsigned ``ErrorMessage`` (non-200 responses)."""

ROSTER_MEDIA_TYPE: Final = "application/vnd.hansa.roster.v1+msgpack"
"""Content type of a signed roster file (``GET``/``POST /v1/roster``)."""

QUERY_ROUTE: Final = "/v1/query"
ROSTER_ROUTE: Final = "/v1/roster"
CAPABILITIES_ROUTE: Final = "/v1/capabilities"
HEALTH_ROUTE: Final = "/healthz"
METRICS_ROUTE: Final = "/metrics"
AUDIT_ROUTE: Final = "/v1/audit"
LOG_KEYS_ROUTE: Final = "/v1/log/keys"
WITNESS_ADD_ROUTE: Final = "/v1/witness/add-checkpoint"
WITNESS_COSIGNATURES_ROUTE: Final = "/v1/witness/cosignatures"
WITNESSED_LOGS_FILE: Final = "witness-logs.txt"
"""The log vkeys a witness follows, one per line, in the data directory (pinned by the
operator from each city's ``GET /v1/log/keys``)."""
_MAX_WITNESS_BODY: Final = 128 * 1024
COSIGNED_FILE: Final = "audit-cosigned.sqlite"
"""Checkpoint notes with merged witness cosignatures, and pinned witness keys."""
_PUSH_TIMEOUT_S: Final = 5.0

_AUDIT_THREADS: Final = 8
"""Threads answering audit requests (``POST /v1/audit``: log reads, proofs, and a
checkpoint signed on demand). Appends go through the one writer thread instead."""
_RESPONSE_BUDGET: Final = MAX_PAYLOAD_SIZE - 128 * 1024
"""Bytes of leaves or envelopes one ``AuditResponse`` carries at most (the rest of
the payload limit is left for the checkpoint note and the framing)."""
_SCAN_PAGE: Final = 5000

_TIMEOUT_GRACE_S: Final = 1.0
"""The engine enforces the query time limit itself; the server waits this much
longer before giving up on its own, as a backstop (the thread keeps its slot
until it returns, so the pool stays bounded)."""

_MAX_ROSTER_BODY: Final = MAX_ROSTER_SIZE + 65 * MAX_ROSTER_SIGNATURES + 64
"""Largest accepted ``POST /v1/roster`` body: the largest signed roster file."""

_BODY_TIMEOUT_S: Final = 30.0
"""Longest wait for a request body once its headers have arrived, in seconds. aiohttp
puts no time limit on a body: a client that trickled it, or stopped before its
``Content-Length``, held the handler and the connection until it went away
(tests/test_node_hostile.py). Headers and idle connections are bounded by the server's
keep-alive timeout (:data:`hansa.node.server.KEEPALIVE_TIMEOUT_S`)."""

_NO_STORE: Final = {"Cache-Control": "no-store"}
"""Every reply carries this header (spec §10)."""

log = logging.getLogger("hansa.node")
_T = TypeVar("_T")


class EngineOutput(Protocol):
    """What the engine returns for an answered query (``EngineResult``)."""

    @property
    def dataset_version(self) -> str: ...
    @property
    def disclosure_version(self) -> int: ...
    @property
    def decision(self) -> Decision: ...
    @property
    def groups(self) -> tuple[Group, ...]: ...
    @property
    def suppressed(self) -> tuple[SuppressedCell, ...]: ...


class AnswerEngine(Protocol):
    """The part of ``hansa.node.engine.QueryEngine`` the application uses."""

    def answer(self, request: QueryRequest) -> EngineOutput:
        """Answer one validated request (blocking, thread-safe)."""
        ...

    def datasets(self) -> tuple[DatasetInfo, ...]:
        """Return the published datasets for the capability document."""
        ...

    def reload(self) -> None:
        """Re-read the dataset catalog (new versions, roles, disclosure settings)."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...


class CachedAnswerEngine(AnswerEngine, Protocol):
    """An engine that can also answer from a result cache without blocking."""

    def cached_answer(self, request: QueryRequest) -> EngineOutput | None:
        """Return a cached answer, None on a miss; may raise the request-rule refusals."""
        ...


def _cache_lookup(engine: AnswerEngine) -> Callable[[QueryRequest], EngineOutput | None] | None:
    """Return the engine's non-blocking cache lookup, if it has one.

    Any engine works without it (test doubles, wrappers): every request then
    goes to the thread pool. A wrapper that changes what ``answer`` does
    must not expose ``cached_answer``.
    """
    lookup = getattr(engine, "cached_answer", None)
    return lookup if callable(lookup) else None


def unsigned_status(code: ErrorCode) -> int:
    """Return the HTTP status of an unsigned error with ``code``.

    Args:
        code: the error code.

    Returns:
        413 for ``TOO_LARGE``; 401 for signature and key failures; 500 for
        ``INTERNAL``; 400 otherwise.
    """
    if code is ErrorCode.TOO_LARGE:
        return 413
    if code in (ErrorCode.BAD_SIGNATURE, ErrorCode.UNKNOWN_KEY, ErrorCode.INVALID_KEY):
        return 401
    if code is ErrorCode.INTERNAL:
        return 500
    return 400


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _text(message: str) -> str:
    # Reasons go on the wire as `Text` (<= MAX_TEXT characters, one line).
    return " ".join(message.split())[:MAX_TEXT]


@dataclass(frozen=True, slots=True)
class _Reply:
    """An HTTP reply plus how to count it."""

    body: bytes
    status: int
    content_type: str
    outcome: str
    code: str


@dataclass(frozen=True, slots=True)
class _Answered:
    """What a repeat of an answered request is answered with (:meth:`NodeState._repeat`)."""

    answer_id: bytes
    outcome: Outcome
    dataset: str
    disclosure_version: int
    data_version: str


class _AnsweredCache:
    """Request id -> the answer released for it, for as long as the replay cache holds it.

    Entries are forgotten at the request's ``expires_at + max_skew_ms`` (when the replay
    guard forgets the request too; a repeat after that is refused as expired) and
    beyond ``capacity`` entries, oldest first, so memory stays bounded like the guard's.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: dict[bytes, tuple[int, _Answered]] = {}

    def get(self, request_id: bytes) -> _Answered | None:
        found = self._entries.get(request_id)
        return None if found is None else found[1]

    def remember(self, request_id: bytes, forget_at: int, answered: _Answered, now: int) -> None:
        entries = self._entries
        entries[request_id] = (forget_at, answered)
        # Insertion order is roughly expiry order (validity windows are short and alike).
        while entries:
            oldest = next(iter(entries))
            if entries[oldest][0] > now and len(entries) <= self.capacity:
                break
            del entries[oldest]


class _Identified(Exception):
    """A refusal for a requester whose signature verified."""

    def __init__(self, request_id: bytes, principal: str, error: HansaError) -> None:
        super().__init__(error.message)
        self.request_id = request_id
        self.principal = principal
        self.error = error


class _AuditUnavailable(HansaError):
    """The audit log could not record an event: the node must not act or sign (§16.2)."""

    default_code = ErrorCode.UNAVAILABLE


class _MediaTypeError(ProtocolError):
    """The request's Content-Type is not the expected media type (HTTP 415)."""


@contextlib.asynccontextmanager
async def _receiving() -> AsyncIterator[None]:
    """Bound a request body read in time; a broken body is the client's, not ours.

    A client that goes away mid-body (``ConnectionResetError``) or breaks the framing
    of a chunked body (aiohttp's payload errors) sent bad input: without this the
    handlers' catch-all logged it as an internal error, with a traceback.

    Raises:
        ProtocolError: (``MALFORMED``) the body did not arrive within
            :data:`_BODY_TIMEOUT_S`, or arrived broken or incomplete.
    """
    try:
        async with asyncio.timeout(_BODY_TIMEOUT_S):
            yield
    except TimeoutError:
        raise ProtocolError(
            f"the request body did not arrive within {_BODY_TIMEOUT_S:g} s", ErrorCode.MALFORMED
        ) from None
    except (ConnectionError, RequestPayloadError, HttpProcessingError) as exc:
        raise ProtocolError(
            "the request body is incomplete or malformed", ErrorCode.MALFORMED
        ) from exc


@dataclass(frozen=True, slots=True)
class Trust:
    """Who may query the node right now: one immutable snapshot.

    A request is judged entirely against the snapshot current when it
    arrived; a roster update swaps the whole snapshot at once.

    Attributes:
        keys: requester keys by key id (a ``KeyLookup`` for ``open_envelope``).
        principals: the principal each of those keys speaks for.
        roster: the trusted alliance roster, or None for a roster-less node.
    """

    keys: Mapping[bytes, PublicKey]
    principals: Mapping[bytes, str]
    roster: TrustedRoster | None = None

    @classmethod
    def from_config(cls, config: NodeConfig) -> Trust:
        """The ``[[trusted]]`` keys of a roster-less node."""
        return cls(config.key_lookup(), config.principals())

    @classmethod
    def from_roster(cls, trusted: TrustedRoster) -> Trust:
        """The analyst keys of an alliance roster (analysts and analyst-role members)."""
        roster = trusted.roster
        keys = roster.keys_for_role(Role.ANALYST)
        principals: dict[bytes, str] = {}
        for kid in keys:
            holder = roster.holder(kid)
            if holder is not None:
                principals[kid] = holder.principal
        return cls(keys, principals, trusted)


@dataclass(eq=False, slots=True)
class _LogBatch:
    """Entries queued on the event loop for one commit, in log order."""

    entries: list[AuditEntry | bytes] = field(default_factory=list)
    envelopes: list[bytes] = field(default_factory=list)
    ids: list[bytes] = field(default_factory=list)
    """The message id of each envelope (hashed when the node opened or sealed it)."""
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    """Callers to wake once the batch is durable (or lost)."""
    error: HansaError | None = None
    """Set by the writer when the commit failed."""


class _LogWriter:
    """The node's audit writer: one thread committing one batch at a time (spec §16.2).

    The event loop hands a batch over with :meth:`submit` and hears back through one
    ``call_soon_threadsafe`` per batch, once it is durable or has failed. This is a
    thread hop per commit without an executor's work item, concurrent future and pool
    bookkeeping, which the event loop would pay for on every batch.
    """

    def __init__(
        self,
        audit: AuditLog,
        loop: asyncio.AbstractEventLoop,
        committed: Callable[[_LogBatch], None],
    ) -> None:
        self._audit = audit
        self._loop = loop
        self._committed = committed
        self._inbox: queue.SimpleQueue[_LogBatch | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="hansa-audit-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: _LogBatch) -> None:
        """Commit ``batch`` after the ones submitted before it."""
        self._inbox.put(batch)

    def stop(self) -> None:
        """Let the thread finish the batches submitted so far, then end it (blocking)."""
        self._inbox.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (batch := self._inbox.get()) is not None:
            try:
                self._audit.append_many(batch.entries, batch.envelopes, envelope_ids=batch.ids)
            except HansaError as exc:
                log.error("audit log append failed: %s", exc.message)
                batch.error = _AuditUnavailable("the audit log is unavailable")
            except BaseException:  # never leave a caller waiting
                log.exception("audit log append failed")
                batch.error = _AuditUnavailable("the audit log is unavailable")
            try:
                self._loop.call_soon_threadsafe(self._committed, batch)
            except RuntimeError:  # the event loop is closed: nobody waits any more
                return


class NodeState:
    """Everything the handlers share: keys, replay guard, engine, pool, metrics.

    Created by :func:`create_app` and reachable as ``app[NODE]``.

    Args:
        config: the node configuration.
        signing_key: the node's signing key.
        clock_ms: the wall clock, in integer ms since the epoch (injectable for tests).
    """

    def __init__(
        self,
        config: NodeConfig,
        signing_key: SigningKey,
        clock_ms: Callable[[], int],
        roster: TrustedRoster | None = None,
        *,
        log_key: SigningKey | None = None,
        witness_key: SigningKey | None = None,
    ) -> None:
        self.config = config
        self.signing_key = signing_key
        self.clock_ms = clock_ms
        if config.alliance.has_roster and roster is None:
            raise HansaError("a node configured with a roster needs it loaded", ErrorCode.CONFIG)
        self.trust = Trust.from_roster(roster) if roster is not None else Trust.from_config(config)
        self._roster_lock = asyncio.Lock()
        self.guard = ReplayGuard(config.city, config.limits.freshness())
        # The answers released for the requests the replay cache remembers (§8.3 repeats).
        self._answered = _AnsweredCache(self.guard.limits.capacity)
        self.pending = 0
        self.metrics = NodeMetrics(
            in_flight=lambda: float(self.pending),
            replay_entries=lambda: float(len(self.guard)),
            witness_alarms=lambda: float(self.witness.alarm_count if self.witness else 0),
        )
        self._engine: AnswerEngine | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._slots = asyncio.Semaphore(config.limits.max_concurrent_queries)
        self._capabilities: tuple[tuple[DatasetInfo, ...], bytes] | None = None
        self._lookup: Callable[[QueryRequest], EngineOutput | None] | None = None
        # --- the audit log (spec §16) ---
        origin = config.log_origin(roster.roster.alliance if roster is not None else None)
        self.log_signer = NoteSigner(origin, log_key or SigningKey.generate())
        self.log_verifier = NoteVerifier(origin, self.log_signer.signing_key.public_key)
        self._witness_key = witness_key
        self.witness_signer = (
            CosignatureSigner(f"witness/{config.city}", witness_key)
            if witness_key is not None
            else None
        )
        self.audit: AuditLog | None = None
        self._audit_pool: ThreadPoolExecutor | None = None
        self._policy = CheckpointPolicy(
            config.audit.checkpoint_seconds, config.audit.checkpoint_entries
        )
        self._checkpoint_lock = threading.Lock()  # the policy and checkpoint signing
        self._checkpoint_wake: asyncio.Event | None = None
        self._logged = _LoggedState()
        self._settings_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: _LogWriter | None = None
        self._log_next = _LogBatch()  # filling up on the event loop
        self._log_busy: _LogBatch | None = None  # being committed by the writer
        self._kick_soon = False  # a _kick_log call is scheduled
        self._log_failed = False  # a batch failed: fail closed until a restart (§16.2)
        self.witness: Witness | None = None
        self._cosigned: _CosignedNotes | None = None
        self._session: aiohttp.ClientSession | None = None
        self._push_task: asyncio.Task[None] | None = None
        self._pushed_size = 0
        self._witness_sizes: dict[str, int] = {}
        self._witnessed: dict[str, NoteVerifier] = {}

    @property
    def origin(self) -> str:
        """The audit log's checkpoint origin."""
        return self.log_signer.name

    @property
    def engine(self) -> AnswerEngine:
        """The query engine (available while the application runs).

        Raises:
            HansaError: (``UNAVAILABLE``) the application is not running.
        """
        if self._engine is None:
            raise HansaError("the node is not running", ErrorCode.UNAVAILABLE)
        return self._engine

    # --- POST /v1/query --------------------------------------------------------

    async def handle_query(self, request: web.Request) -> _Reply:
        """Run the ``/v1/query`` pipeline and build the reply (never raises)."""
        try:
            data = await self._read_body(request)
            try:
                return await self._answer(data)
            except _Identified as refusal:
                reply, code = self._refusal(refusal.request_id, refusal.principal, refusal.error)
                await self._log_reply(
                    refusal.request_id, Outcome.REFUSED, reply.body, reason=int(code)
                )
                return reply
        except _AuditUnavailable as exc:
            # Fail closed: nothing the log did not record is signed (spec §16.2).
            return self._unsigned(ErrorCode.UNAVAILABLE, exc.message, 503)
        except HansaError as exc:
            if exc.code in (ErrorCode.BAD_SIGNATURE, ErrorCode.UNKNOWN_KEY, ErrorCode.INVALID_KEY):
                self.metrics.verification_failures.inc(exc.code.name)
            status = 415 if isinstance(exc, _MediaTypeError) else unsigned_status(exc.code)
            return self._unsigned(exc.code, exc.message, status)
        except Exception:
            log.exception("internal error before the requester was identified")
            return self._unsigned(ErrorCode.INTERNAL, "internal error", 500)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.limits.max_request_bytes
        # The exact header value first: parsing it costs more than the comparison.
        if (
            request.headers.get(hdrs.CONTENT_TYPE) != ENVELOPE_MEDIA_TYPE
            and request.content_type != ENVELOPE_MEDIA_TYPE
        ):
            raise _MediaTypeError(
                f"Content-Type must be {ENVELOPE_MEDIA_TYPE}", ErrorCode.MALFORMED
            )
        declared = request.content_length
        if declared is not None and declared > limit:
            raise ProtocolError(
                f"request of {declared} bytes exceeds the limit of {limit}", ErrorCode.TOO_LARGE
            )
        try:
            if request.content.is_eof():
                # The whole body came with the headers (a query's usual few hundred
                # bytes): nothing is awaited, so nothing to bound. Saves the timer and
                # context manager on the hot path (bench/node.py (a): ~6 %).
                data = await request.read()
            else:
                async with _receiving():
                    data = await request.read()
        except (ConnectionError, RequestPayloadError, HttpProcessingError) as exc:
            # The fast path too: a connection lost after the body arrived still fails it.
            raise ProtocolError(
                "the request body is incomplete or malformed", ErrorCode.MALFORMED
            ) from exc
        except web.HTTPRequestEntityTooLarge:
            raise ProtocolError(
                f"request exceeds the limit of {limit} bytes", ErrorCode.TOO_LARGE
            ) from None
        if len(data) > limit:  # explicit, whatever the framework did
            raise ProtocolError(
                f"request of {len(data)} bytes exceeds the limit of {limit}", ErrorCode.TOO_LARGE
            )
        return data

    async def _answer(self, data: bytes) -> _Reply:
        limit = self.config.limits.max_request_bytes
        trust = self.trust  # this request is judged against one snapshot (§8.2)
        try:
            opened = open_envelope(data, trust.keys, QueryRequest, max_size=limit)
        except SignatureError:
            raise
        except ProtocolError as exc:
            # The body may be malformed under a valid signature: then the
            # requester is known and gets a signed refusal.
            who = self._identify(data, trust)
            if who is None:
                raise
            self._log_request(who[0], who[2], data)
            raise _Identified(who[0], who[1], exc) from exc
        request_id = opened.message_id
        principal = trust.principals[opened.envelope.key_id]
        # Placed in the log before anything is decided or done about it; durable with
        # the reply's commit, before the reply is sent (spec §16.2).
        self._log_request(request_id, opened.envelope.key_id, data)
        req = opened.message
        if req.requester != principal:
            raise _Identified(
                request_id,
                principal,
                HansaError(
                    f"the signing key speaks for {principal!r}, not {req.requester!r}",
                    ErrorCode.REQUESTER_NOT_ALLOWED,
                ),
            )
        try:
            self._check_alliance(trust, principal, req)
            try:
                self.guard.check(
                    message_id=request_id,
                    requester=principal,
                    nonce=req.nonce,
                    audience=req.targets,
                    issued_at=req.issued_at,
                    expires_at=req.expires_at,
                    now_ms=self.clock_ms(),
                )
            except FreshnessError as exc:
                repeat = self._answered.get(request_id) if exc.code is ErrorCode.REPLAYED else None
                if repeat is None:
                    raise
                return await self._repeat(request_id, repeat, exc)
            lookup = self._lookup
            result = lookup(req) if lookup is not None else None
            if result is None:
                result = await self._run(req)
            answer = QueryAnswer(
                request_id=request_id,
                responder=self.config.city,
                requester=principal,
                issued_at=self.clock_ms(),
                dataset=req.query.dataset,
                dataset_version=result.dataset_version,
                disclosure_version=result.disclosure_version,
                decision=result.decision,
                groups=result.groups,
                suppressed=result.suppressed,
            )
            body = seal(answer, self.signing_key)
        except HansaError as exc:
            raise _Identified(request_id, principal, exc) from exc
        except Exception as exc:
            # Logged with the request id only: never the body, rows or keys.
            log.exception("internal error answering request %s", request_id.hex())
            raise _Identified(
                request_id, principal, HansaError("internal error", ErrorCode.INTERNAL)
            ) from exc
        dataset = req.query.dataset
        if self._logged.versions.get(dataset) != result.disclosure_version:
            # The engine took up new settings (a reload) that the log does not yet
            # record: record them before the first decision that applies them (§16.2).
            await self._log_settings(dataset, result.disclosure_version)
        outcome = (
            Outcome.ANSWERED
            if result.decision is Decision.ANSWERED
            else Outcome.ANSWERED_SUPPRESSED
        )
        await self._log_reply(
            request_id,
            outcome,
            body,
            disclosure_version=result.disclosure_version,
            data_version=result.dataset_version,
        )
        self._answered.remember(
            request_id,
            req.expires_at + self.guard.limits.max_skew_ms,
            _Answered(
                message_id(body),
                outcome,
                dataset,
                result.disclosure_version,
                result.dataset_version,
            ),
            self.clock_ms(),
        )
        return _Reply(body, 200, ENVELOPE_MEDIA_TYPE, "answered", "none")

    async def _repeat(self, request_id: bytes, repeat: _Answered, refusal: HansaError) -> _Reply:
        """Answer a byte-identical repeat of an answered request with the same answer.

        The same envelope (same message id) delivered again while the replay cache
        remembers it, e.g. by another target city that received it (spec §7.1, threat
        model T-XFWD) or a client's retry after a reset, gets the signed answer already
        released, logged again (request, decision, answer sent with the same answer id):
        nothing new is computed or disclosed (spec §8.3). Falls back to ``refusal``
        (``REPLAYED``) when the disclosure settings changed since or the answer is gone.

        Raises:
            HansaError: ``refusal``, when the answer cannot be repeated.
        """
        audit, pool = self.audit, self._audit_pool
        if audit is None or pool is None:
            raise refusal
        if self._logged.versions.get(repeat.dataset) != repeat.disclosure_version:
            raise refusal
        loop = asyncio.get_running_loop()
        try:
            body = await loop.run_in_executor(pool, audit.envelope, repeat.answer_id)
        except HansaError:
            log.exception("cannot read a logged answer to repeat it")
            raise refusal from None
        if body is None:
            raise refusal
        await self._log_reply(
            request_id,
            repeat.outcome,
            body,
            disclosure_version=repeat.disclosure_version,
            data_version=repeat.data_version,
        )
        return _Reply(body, 200, ENVELOPE_MEDIA_TYPE, "repeated", "none")

    def _check_alliance(self, trust: Trust, principal: str, req: QueryRequest) -> None:
        """Apply the roster and participation rules (spec §8.2) to a bound request.

        Raises:
            FreshnessError: (``EXPIRED``) the trusted roster has expired.
            PolicyDenied: ``ROSTER_MISMATCH``, ``PURPOSE_NOT_ALLOWED`` or
                ``QUORUM_TOO_SMALL``.
        """
        trusted = trust.roster
        if trusted is not None:
            roster = trusted.roster
            if self.clock_ms() >= roster.expires_ms:
                raise FreshnessError(
                    f"this node's alliance roster (version {roster.version}) has expired; "
                    "no query is answered until a newer roster is installed",
                    ErrorCode.EXPIRED,
                )
            if req.roster_version != roster.version:
                raise PolicyDenied(
                    f"the request names roster version {req.roster_version}; this node "
                    f"holds version {roster.version} (GET {ROSTER_ROUTE})",
                    ErrorCode.ROSTER_MISMATCH,
                )
            if roster.member(self.config.city) is None:
                raise PolicyDenied(
                    f"this node's city {self.config.city!r} is not a member of roster "
                    f"version {roster.version}",
                    ErrorCode.ROSTER_MISMATCH,
                )
            strangers = [city for city in req.targets if roster.member(city) is None]
            if strangers:
                raise PolicyDenied(
                    f"target {strangers[0]!r} is not a member of roster version {roster.version}",
                    ErrorCode.ROSTER_MISMATCH,
                )
            if not roster.allows_purpose(principal, req.policy.purpose):
                raise PolicyDenied(
                    f"the roster does not allow {principal!r} the purpose {req.policy.purpose!r}",
                    ErrorCode.PURPOSE_NOT_ALLOWED,
                )
        minimum = self.config.alliance.min_participants
        if len(req.targets) < minimum or req.quorum < minimum:
            raise PolicyDenied(
                f"this node takes part only with at least {minimum} participating cities; "
                f"the request has {len(req.targets)} target(s) and quorum {req.quorum}",
                ErrorCode.QUORUM_TOO_SMALL,
            )

    def _identify(self, data: bytes, trust: Trust) -> tuple[bytes, str, bytes] | None:
        """Return (message id, principal, key id) if ``data`` is signed by a trusted key."""
        try:
            env = decode_envelope(data, max_size=self.config.limits.max_request_bytes)
        except HansaError:
            return None
        key = trust.keys.get(env.key_id)
        if key is None or not key.verify(pae(env.payload_type, env.payload), env.signature):
            return None
        return message_id(data), trust.principals[env.key_id], env.key_id

    async def _run(self, req: QueryRequest) -> EngineOutput:
        limits = self.config.limits
        if self.pending >= limits.max_concurrent_queries + limits.max_queued_queries:
            raise HansaError(
                "the node is at its query capacity; retry later", ErrorCode.UNAVAILABLE
            )
        engine = self.engine
        pool = self._pool
        if pool is None:
            raise HansaError("the node is not running", ErrorCode.UNAVAILABLE)
        self.pending += 1
        try:
            await self._slots.acquire()
            loop = asyncio.get_running_loop()
            try:
                future = loop.run_in_executor(pool, engine.answer, req)
            except BaseException:
                self._slots.release()
                raise
            # The slot is freed when the thread returns, not when we stop waiting,
            # so a query that overran the backstop still counts against the pool.
            future.add_done_callback(self._release_slot)
            try:
                return await asyncio.wait_for(
                    asyncio.shield(future), limits.query_timeout_s + _TIMEOUT_GRACE_S
                )
            except TimeoutError:
                raise HansaError(
                    f"the query exceeded the time limit of {limits.query_timeout_s} s",
                    ErrorCode.QUERY_TIMEOUT,
                ) from None
        finally:
            self.pending -= 1

    def _release_slot(self, future: asyncio.Future[EngineOutput]) -> None:
        self._slots.release()
        if not future.cancelled():
            future.exception()  # mark retrieved: a late failure was already answered

    def _refusal(
        self, request_id: bytes, principal: str, error: HansaError
    ) -> tuple[_Reply, ErrorCode]:
        if not error.code.on_wire:
            # A local-only failure (6xx: key file, configuration, ...) is the
            # node's own problem; its details stay in the log.
            log.error("local error answering request %s: %s", request_id.hex(), error.message)
            error = HansaError("internal error", ErrorCode.INTERNAL)
        if error.code in (ErrorCode.BAD_SIGNATURE, ErrorCode.UNKNOWN_KEY, ErrorCode.INVALID_KEY):
            self.metrics.verification_failures.inc(error.code.name)
        refusal = QueryRefusal(
            request_id=request_id,
            responder=self.config.city,
            requester=principal,
            issued_at=self.clock_ms(),
            code=error.code,
            reason=_text(error.message),
        )
        body = seal(refusal, self.signing_key)
        return _Reply(body, 200, ENVELOPE_MEDIA_TYPE, "refused", error.code.name), error.code

    def _unsigned(self, code: ErrorCode, message: str, status: int) -> _Reply:
        if not code.on_wire:
            log.error("local error on an unidentified request: %s", message)
            code, message, status = ErrorCode.INTERNAL, "internal error", 500
        body = encode(ErrorMessage(code=code, message=_text(message)))
        return _Reply(body, status, ERROR_MEDIA_TYPE, "rejected", code.name)

    # --- the audit log (spec §16) -------------------------------------------------

    def _log_batch(self) -> _LogBatch:
        """The batch that entries queued now join (they become durable with it).

        Raises:
            _AuditUnavailable: the log is not open, or an earlier batch failed.
        """
        if self._writer is None:
            raise _AuditUnavailable("the audit log is not open")
        if self._log_failed:
            raise _AuditUnavailable("the audit log is unavailable")
        return self._log_next

    async def _append(self, entries: list[AuditEntry], envelopes: list[bytes]) -> None:
        """Append durably (see :meth:`_log_batch`), hashing the envelopes here."""
        batch = self._log_batch()
        batch.entries += entries
        batch.envelopes += envelopes
        batch.ids += [message_id(b) for b in envelopes]
        await self._durable(batch)

    async def _durable(self, batch: _LogBatch) -> None:
        """Return once ``batch`` (and so every entry queued before it) is durable.

        Group commit on the event loop: callers add their entries to the open batch;
        while the writer thread commits one batch (one ``append_many``, one
        transaction, one fsync), the next one fills up. Batches commit in order, and
        each caller's entries are contiguous and after every entry queued before them.

        Raises:
            _AuditUnavailable: the batch, or one before it, could not be committed.
        """
        loop = self._loop
        if loop is None:
            raise _AuditUnavailable("the audit log is not open")
        done = loop.create_future()
        batch.waiters.append(done)
        if self._log_busy is None and not self._kick_soon:
            # At the end of this turn of the loop, so that every request handled in
            # it joins the batch: one commit for all of them, not one for the first.
            self._kick_soon = True
            loop.call_soon(self._kick_log)
        await done

    def _kick_log(self) -> None:
        """Hand the open batch to the writer unless it is busy (it comes back for more)."""
        self._kick_soon = False
        writer = self._writer
        batch = self._log_next
        if (
            self._log_busy is None
            and writer is not None
            and not self._log_failed
            and (batch.entries or batch.envelopes)
        ):
            self._log_next = _LogBatch()
            self._log_busy = batch
            writer.submit(batch)

    def _committed(self, batch: _LogBatch) -> None:
        """The writer finished ``batch`` (on the event loop): wake its callers, go on."""
        self._log_busy = None
        error = batch.error
        if error is not None:
            # A lost batch may hold request entries whose replies are queued in a
            # later one: nothing more may become durable after it (spec §16.2).
            self._log_failed = True
            lost, self._log_next = self._log_next, _LogBatch()
            for done in (*batch.waiters, *lost.waiters):
                if not done.done():
                    done.set_exception(error)
            return
        for done in batch.waiters:
            if not done.done():
                done.set_result(None)
        audit, wake = self.audit, self._checkpoint_wake
        if (
            audit is not None
            and wake is not None
            and audit.size - self._policy.last_size >= self._policy.every_entries
        ):
            wake.set()
        self._kick_log()

    async def _flush_log(self) -> None:
        """Wait until every queued entry is durable or lost (shutdown)."""
        pending = self._log_next
        batch = pending if pending.entries or pending.envelopes else self._log_busy
        if batch is not None and not self._log_failed:
            with contextlib.suppress(_AuditUnavailable):
                await self._durable(batch)

    def _log_request(self, request_id: bytes, key_id: bytes, envelope: bytes) -> None:
        """Place a verified request and its envelope in the log (before the node acts).

        Not waited for: the reply's append (:meth:`_log_reply`) commits it, in order,
        before the reply is sent (spec §16.2).
        """
        batch = self._log_batch()
        batch.entries.append(request_received_leaf(self.clock_ms(), request_id, key_id))
        batch.envelopes.append(envelope)
        batch.ids.append(request_id)

    async def _log_reply(
        self,
        request_id: bytes,
        outcome: Outcome,
        reply: bytes,
        *,
        reason: int = 0,
        disclosure_version: int = 0,
        data_version: str = "",
    ) -> None:
        """Log the decision and the reply envelope (before the reply is sent)."""
        answer_id = message_id(reply)
        batch = self._log_batch()
        batch.entries += reply_leaves(
            self.clock_ms(),
            request_id,
            outcome,
            answer_id,
            reason=reason,
            disclosure_version=disclosure_version,
            data_version=data_version,
        )
        batch.envelopes.append(reply)
        batch.ids.append(answer_id)
        await self._durable(batch)

    async def _log_roster(self, trusted: TrustedRoster) -> None:
        await self._append([RosterInstalled(self.clock_ms(), trusted.digest, trusted.version)], [])

    def _logged_state(self, audit: AuditLog) -> _LoggedState:
        """Scan the log for the latest roster and settings it records (start-up)."""
        state = _LoggedState()
        size = audit.size
        for start in range(0, size, _SCAN_PAGE):
            for leaf in audit.leaves(start, min(size, start + _SCAN_PAGE)):
                entry = decode_entry(leaf)
                if isinstance(entry, RosterInstalled):
                    state.roster = entry.roster_digest
                elif isinstance(entry, KeyRotated):
                    state.keys[entry.role] = entry.new_key_id
                elif isinstance(entry, SettingsChanged):
                    if entry.scope is SettingsScope.CONFIG:
                        state.config = (entry.digest, entry.settings_version)
                    else:
                        state.disclosure[entry.subject] = entry.digest
                        state.versions[entry.subject] = entry.settings_version
        return state

    def _settings_entries(
        self, audit: AuditLog, state: _LoggedState, config_digest: bytes | None
    ) -> tuple[list[AuditEntry], list[bytes]]:
        """Entries recording settings that differ from what the log last recorded.

        A dataset's disclosure settings are recorded by the message id of the
        signed capability document that publishes them (stored beside the tree).
        """
        now = self.clock_ms()
        entries: list[AuditEntry] = []
        envelopes: list[bytes] = []
        if config_digest is not None and (state.config is None or state.config[0] != config_digest):
            version = 1 if state.config is None else state.config[1] + 1
            entries.append(SettingsChanged(now, SettingsScope.CONFIG, config_digest, version))
            state.config = (config_digest, version)
        if self._engine is None:
            return entries, envelopes
        capabilities = self.capabilities()
        capabilities_id = message_id(capabilities)
        for dataset in self.engine.datasets():
            logged = state.disclosure.get(dataset.name)
            if logged is not None and _profile_in(audit, logged, dataset.name) == encode(
                dataset.disclosure
            ):
                state.versions[dataset.name] = dataset.disclosure.version
                continue
            entries.append(
                SettingsChanged(
                    now,
                    SettingsScope.DISCLOSURE,
                    capabilities_id,
                    dataset.disclosure.version,
                    dataset.name,
                )
            )
            state.disclosure[dataset.name] = capabilities_id
            state.versions[dataset.name] = dataset.disclosure.version
        if any(
            isinstance(e, SettingsChanged) and e.scope is SettingsScope.DISCLOSURE for e in entries
        ):
            envelopes.append(capabilities)
        return entries, envelopes

    def _key_entries(self, state: _LoggedState) -> list[AuditEntry]:
        """``key_rotated`` entries for every key that differs from the one last logged.

        The node key signs answers and refusals, the log key checkpoints, the witness
        key cosignatures. A key the log has never recorded is logged with an all-zero
        old key id (its first use); a key replaced while the node was down (``hansa node
        rotate-key``, or a restored backup) is logged with the key it replaced, before
        the node signs anything with it (spec §16.2).
        """
        keys = [(KEY_ROLE_NODE, self.signing_key), (KEY_ROLE_LOG, self.log_signer.signing_key)]
        if self._witness_key is not None:
            keys.append((KEY_ROLE_WITNESS, self._witness_key))
        entries: list[AuditEntry] = []
        now = self.clock_ms()
        for role, key in keys:
            new = key.public_key.key_id
            old = state.keys.get(role)
            if old != new:
                entries.append(KeyRotated(now, old or bytes(32), new, role))
                if old is not None:
                    log.warning(
                        "audit log: the %s key changed (%s… -> %s…); logged as key_rotated",
                        role,
                        old.hex()[:16],
                        new.hex()[:16],
                    )
                state.keys[role] = new
        return entries

    def _retired_log_verifiers(self) -> list[NoteVerifier]:
        """Verifiers of the log keys ``hansa node rotate-key --key log`` retired (blocking).

        A retired key file that cannot be read is skipped with a warning: the checkpoints
        it signed then open as unchecked (:attr:`AuditLog.unchecked_checkpoints`).
        """
        verifiers: list[NoteVerifier] = []
        for path in retired_key_files(self.config.path(self.config.audit.log_key_file)):
            try:
                verifiers.append(NoteVerifier(self.origin, read_public_key(path)))
            except HansaError as exc:
                log.warning("audit log: skipping retired log key %s: %s", path, exc.message)
        return verifiers

    def _open_audit(self) -> None:
        """Open the log, record what changed while the node was down (blocking)."""
        cfg = self.config
        audit = AuditLog.open(
            cfg.data_dir / AUDIT_FILE,
            self.origin,
            durable=cfg.audit.durable,
            verifier=self.log_verifier,
            retired=self._retired_log_verifiers(),
        )
        try:
            if audit.repaired:
                log.warning("audit log: %d damaged tail entries were removed", audit.repaired)
            if audit.unchecked_checkpoints:
                sizes = audit.unchecked_checkpoints
                log.warning(
                    "audit log: %d stored checkpoint(s) up to size %d were signed by a log key "
                    "this node no longer holds (none under %s/); their roots match the stored "
                    "entries",
                    len(sizes),
                    max(sizes),
                    RETIRED_DIR,
                )
            state = self._logged_state(audit)
            entries: list[AuditEntry] = self._key_entries(state)
            trusted = self.trust.roster
            if trusted is not None and state.roster != trusted.digest:
                entries.append(RosterInstalled(self.clock_ms(), trusted.digest, trusted.version))
            try:
                config_digest = hashlib.sha256(config_path(cfg.data_dir).read_bytes()).digest()
            except OSError:
                config_digest = None  # a node built from a NodeConfig without a file
            more, envelopes = self._settings_entries(audit, state, config_digest)
            entries += more
            if entries:
                audit.append_many(entries, envelopes)
            self._logged = state
            latest = audit.latest_checkpoint()
            # last_time 0: a log that grew since its last checkpoint (a crash) gets one now.
            self._policy.record(0.0, latest.size if latest is not None else 0)
        except BaseException:
            audit.close()
            raise
        self.audit = audit
        log.info("audit log %s open: %d entries, origin %s", audit.path, audit.size, self.origin)

    async def _log_settings(self, dataset: str | None = None, version: int = 0) -> None:
        """Record changed disclosure settings (after a catalog reload, or on first use).

        Args:
            dataset: when given, only act if the log does not yet record
                ``version`` as this dataset's disclosure version (checked again
                under the lock, so concurrent requests log it once).
            version: the disclosure version an answer is about to cite.
        """
        async with self._settings_lock:
            audit = self.audit
            if audit is None:
                return
            if dataset is not None and self._logged.versions.get(dataset) == version:
                return
            entries, envelopes = await asyncio.to_thread(
                self._settings_entries, audit, self._logged, None
            )
            if entries:
                await self._append(entries, envelopes)

    def _checkpoint_now(self, min_size: int = 0) -> StoredCheckpoint | None:
        """Return the latest checkpoint, signing one first if it covers fewer than
        ``min_size`` entries or none exists (blocking)."""
        audit = self.audit
        if audit is None:
            raise _AuditUnavailable("the audit log is not open")
        with self._checkpoint_lock:
            latest = audit.latest_checkpoint()
            if latest is None or latest.size < min_size:
                audit.checkpoint(self.log_signer)
                latest = audit.latest_checkpoint()
                if latest is not None:
                    self._policy.record(time.monotonic(), latest.size)
            return latest

    def _checkpoint_if_due(self) -> bytes | None:
        audit = self.audit
        if audit is None:
            return None
        with self._checkpoint_lock:
            return audit.checkpoint_if_due(self.log_signer, self._policy, time.monotonic())

    async def _checkpoint_loop(self, wake: asyncio.Event) -> None:
        """Sign a checkpoint every T seconds and after every N entries (while growing)."""
        period = max(0.01, min(self.config.audit.checkpoint_seconds / 4, 1.0))
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), period)
            wake.clear()
            # Request entries whose requests never reached a reply (§16.6) become
            # durable within a period even when no other request comes.
            self._kick_log()
            try:
                await asyncio.to_thread(self._checkpoint_if_due)
            except HansaError as exc:
                log.error("audit checkpoint failed: %s", exc.message)
            self._schedule_push()

    # --- POST /v1/audit, GET /v1/log/keys ---------------------------------------

    def log_keys(self) -> dict[str, str | None]:
        """The log's origin and note verifier keys (``GET /v1/log/keys``, unsigned, spec §16.1).

        Clients check them against the keys the roster names, and trust them on first
        use only for a city whose roster entry names none.
        """
        witness = self.witness_signer
        return {
            "origin": self.origin,
            "log_vkey": self.log_signer.vkey,
            "witness_vkey": None if witness is None else witness.vkey,
        }

    async def handle_audit(self, request: web.Request) -> _Reply:
        """Answer a signed ``AuditRequest`` (never raises; spec §16.3)."""
        try:
            data = await self._read_body(request)
            return await self._audit(data)
        except _Identified as refusal:
            return self._refusal(refusal.request_id, refusal.principal, refusal.error)[0]
        except HansaError as exc:
            if exc.code in (ErrorCode.BAD_SIGNATURE, ErrorCode.UNKNOWN_KEY, ErrorCode.INVALID_KEY):
                self.metrics.verification_failures.inc(exc.code.name)
            if isinstance(exc, _MediaTypeError):
                status = 415
            elif isinstance(exc, _AuditUnavailable):
                status = 503
            else:
                status = unsigned_status(exc.code)
            return self._unsigned(exc.code, exc.message, status)
        except Exception:
            log.exception("internal error before the auditor was identified")
            return self._unsigned(ErrorCode.INTERNAL, "internal error", 500)

    def _audit_trust(self) -> tuple[dict[bytes, PublicKey], dict[bytes, str], set[bytes]]:
        """Keys that may send audit requests, their principals, and the auditor keys."""
        trust = self.trust
        keys = dict(trust.keys)
        principals = dict(trust.principals)
        auditors: set[bytes] = set()
        if trust.roster is not None:
            roster = trust.roster.roster
            for kid, key in roster.keys_for_role(Role.AUDITOR).items():
                holder = roster.holder(kid)
                if holder is not None:
                    keys[kid] = key
                    principals[kid] = holder.principal
                    auditors.add(kid)
        return keys, principals, auditors

    async def _audit(self, data: bytes) -> _Reply:
        keys, principals, auditors = self._audit_trust()
        limit = self.config.limits.max_request_bytes
        try:
            opened = open_envelope(data, keys, AuditRequest, max_size=limit)
        except SignatureError:
            raise
        except ProtocolError as exc:
            who = self._identify(data, Trust(keys, principals))
            if who is None:
                raise
            raise _Identified(who[0], who[1], exc) from exc
        request_id = opened.message_id
        kid = opened.envelope.key_id
        principal = principals[kid]
        req = opened.message
        try:
            if req.requester != principal:
                raise PolicyDenied(
                    f"the signing key speaks for {principal!r}, not {req.requester!r}",
                    ErrorCode.REQUESTER_NOT_ALLOWED,
                )
            auditor = kid in auditors
            if not auditor and req.op is not AuditOp.RECEIPT:
                raise PolicyDenied(
                    "only keys with the auditor role may read the audit log; "
                    "analysts may fetch receipts of their own requests",
                    ErrorCode.REQUESTER_NOT_ALLOWED,
                )
            trusted = self.trust.roster
            if trusted is not None and req.roster_version != trusted.version:
                raise PolicyDenied(
                    f"the request names roster version {req.roster_version}; this node "
                    f"holds version {trusted.version}",
                    ErrorCode.ROSTER_MISMATCH,
                )
            self.guard.check(
                message_id=request_id,
                requester=principal,
                nonce=req.nonce,
                audience=req.audience,
                issued_at=req.issued_at,
                expires_at=req.expires_at,
                now_ms=self.clock_ms(),
            )
            pool = self._audit_pool
            if pool is None:
                raise _AuditUnavailable("the audit log is not open")
            loop = asyncio.get_running_loop()
            response = await loop.run_in_executor(
                pool, self._audit_response, req, request_id, kid, auditor
            )
            body = seal(response, self.signing_key)
        except _AuditUnavailable:
            raise
        except HansaError as exc:
            raise _Identified(request_id, principal, exc) from exc
        except Exception as exc:
            log.exception("internal error answering audit request %s", request_id.hex())
            raise _Identified(
                request_id, principal, HansaError("internal error", ErrorCode.INTERNAL)
            ) from exc
        return _Reply(body, 200, ENVELOPE_MEDIA_TYPE, "answered", "none")

    def _audit_response(
        self, req: AuditRequest, request_id: bytes, kid: bytes, auditor: bool
    ) -> AuditResponse:
        """Build the response to a checked audit request (blocking; spec §16.3)."""
        audit = self.audit
        if audit is None:
            raise _AuditUnavailable("the audit log is not open")
        op = req.op
        respond = functools.partial(
            AuditResponse,
            request_id=request_id,
            responder=self.config.city,
            issued_at=self.clock_ms(),
            op=op,
        )
        try:
            if op is AuditOp.CHECKPOINT:
                # Checkpoints are cheap: the auditor gets one covering every entry.
                cp = self._checkpoint_now(audit.size)
                return respond(checkpoint=self._served_note(cp), tree_size=cp.size if cp else 0)
            if op is AuditOp.ENTRIES:
                leaves = _budgeted(audit.leaves(req.start, req.end), len)
                return respond(
                    checkpoint=self._served_note(audit.latest_checkpoint()),
                    entries=tuple(leaves),
                    first_index=req.start,
                    tree_size=audit.size,
                )
            if op is AuditOp.ENVELOPES:
                found: list[tuple[bytes, bytes]] = []
                for digest in req.hashes:
                    envelope = audit.envelope(digest)
                    if envelope is not None:
                        found.append((digest, envelope))
                return respond(
                    checkpoint=self._served_note(audit.latest_checkpoint()),
                    envelopes=tuple(_budgeted(found, lambda e: len(e[1]) + 40)),
                    tree_size=audit.size,
                )
            if op is AuditOp.CONSISTENCY:
                latest = audit.latest_checkpoint()
                new_size = req.new_size or (latest.size if latest is not None else 0)
                if not req.old_size <= new_size <= audit.size:
                    raise _invalid(f"no consistency proof from {req.old_size} to {new_size}")
                return respond(
                    checkpoint=self._served_note(latest),
                    proof=tuple(audit.consistency_proof(req.old_size, new_size)),
                    index=req.old_size,
                    tree_size=new_size,
                )
            # inclusion and receipt: one leaf under a checkpoint (signed now if needed)
            if req.message_id is not None:
                index = audit.index_of(req.message_id)
                if index is None:
                    raise _invalid("no audit entry logs this message id")
            else:
                index = req.index
            if index >= audit.size:
                raise _invalid(f"the log has no entry {index}")
            if op is AuditOp.RECEIPT:
                entry = audit.entry(index)
                if not isinstance(entry, RequestReceived) or (
                    not auditor and entry.requester_key_id != kid
                ):
                    # The same answer whether the request is absent or someone else's.
                    raise _invalid("no request of yours with this message id is logged")
            cp = self._checkpoint_now(index + 1)
            size = req.new_size or (cp.size if cp is not None else 0)
            if not index < size <= audit.size:
                raise _invalid(f"entry {index} is not in a tree of size {size}")
            return respond(
                checkpoint=self._served_note(cp),
                # The leaf itself: a requester cannot rebuild it (it holds the
                # node's log time) and may not fetch entries (spec §16.4).
                entries=tuple(audit.leaves(index, index + 1)),
                first_index=index,
                proof=tuple(audit.inclusion_proof(index, size)),
                index=index,
                tree_size=size,
            )
        except ProofError as exc:  # a local code: the request asked for the impossible
            raise _invalid(exc.message) from exc

    # --- pushing checkpoints to the roster's witnesses (spec §16.5) ---------------

    def _served_note(self, checkpoint: StoredCheckpoint | None) -> bytes | None:
        """The checkpoint note with every witness cosignature the node holds."""
        if checkpoint is None:
            return None
        store = self._cosigned
        held = store.note(checkpoint.size) if store is not None else None
        return held if held is not None else checkpoint.note

    def _witnesses(self) -> list[Member]:
        trusted = self.trust.roster
        if trusted is None:
            return []
        return [
            m
            for m in trusted.roster.members
            if Role.WITNESS in m.roles and m.city != self.config.city
        ]

    def _schedule_push(self) -> None:
        """Start a push of the latest checkpoint unless one is running (best effort)."""
        audit, session = self.audit, self._session
        if audit is None or session is None:
            return
        latest = audit.latest_checkpoint()
        if latest is None or latest.size <= self._pushed_size:
            return
        if self._push_task is not None and not self._push_task.done():
            return
        self._pushed_size = latest.size
        witnesses = self._witnesses()
        if witnesses:
            self._push_task = asyncio.create_task(self._push(session, latest, witnesses))

    async def _push(
        self, session: aiohttp.ClientSession, checkpoint: StoredCheckpoint, witnesses: list[Member]
    ) -> None:
        lines = await asyncio.gather(
            *(self._push_to(session, checkpoint, m) for m in witnesses), return_exceptions=True
        )
        signatures: list[NoteSignature] = []
        for member, line in zip(witnesses, lines, strict=True):
            if isinstance(line, NoteSignature):
                signatures.append(line)
            elif isinstance(line, BaseException):
                log.warning("witness %s: checkpoint push failed: %s", member.city, line)
        store = self._cosigned
        if not signatures or store is None:
            return
        try:
            base = Note.from_bytes(store.note(checkpoint.size) or checkpoint.note)
            present = {(s.name, s.key_id) for s in base.signatures}
            fresh = [s for s in signatures if (s.name, s.key_id) not in present]
            merged = base.with_signatures(*fresh).to_bytes()
            await asyncio.to_thread(store.put, checkpoint.size, merged)
        except HansaError as exc:
            log.error("cannot store cosignatures for size %d: %s", checkpoint.size, exc.message)

    async def _push_to(
        self, session: aiohttp.ClientSession, checkpoint: StoredCheckpoint, member: Member
    ) -> NoteSignature | None:
        """tlog-witness add-checkpoint at one witness; return its verified cosignature."""
        audit = self.audit
        if audit is None:
            return None
        verifier = await self._witness_verifier(session, member)
        base = member.endpoint.rstrip("/")
        old = self._witness_sizes.get(member.city, 0)
        for _ in range(2):  # a 409 tells the size the witness holds: retry from it once
            if old > checkpoint.size:
                return None
            proof = audit.consistency_proof(old, checkpoint.size) if 0 < old else []
            body = encode(
                AddCheckpoint(old_size=old, proof=tuple(proof), checkpoint=checkpoint.note)
            )
            async with session.post(base + WITNESS_ADD_ROUTE, data=body) as resp:
                data = await resp.read()
                if resp.status == 409 and resp.content_type == "text/x.tlog.size":
                    old = int(data.decode("ascii").strip())
                    continue
                if resp.status != 200:
                    raise HansaError(
                        f"add-checkpoint answered {resp.status}", ErrorCode.UNAVAILABLE
                    )
            signature = NoteSignature.from_line(data.decode("utf-8").rstrip("\n"))
            note = Note.from_bytes(checkpoint.note).with_signatures(signature)
            if not verify_cosignatures(note, [verifier]):
                raise HansaError("the cosignature does not verify", ErrorCode.BAD_SIGNATURE)
            self._witness_sizes[member.city] = checkpoint.size
            return signature
        return None

    async def _witness_verifier(
        self, session: aiohttp.ClientSession, member: Member
    ) -> NoteVerifier:
        """The witness's cosignature key: the roster's, else pinned on first use (§16.1)."""
        trusted = self.trust.roster
        named = None if trusted is None else trusted.roster.witness_verifier(member.city)
        if named is not None:
            return named
        store = self._cosigned
        pinned = store.witness_vkey(member.city) if store is not None else None
        if pinned is None:
            async with session.get(member.endpoint.rstrip("/") + LOG_KEYS_ROUTE) as resp:
                document = json.loads(await resp.read())
            pinned = document.get("witness_vkey") if isinstance(document, dict) else None
            if not isinstance(pinned, str):
                raise HansaError(f"{member.city} publishes no witness key", ErrorCode.UNKNOWN_KEY)
            verifier = NoteVerifier.from_vkey(pinned)
            if verifier.name != f"witness/{member.city}":
                raise HansaError(
                    f"{member.city}'s witness key is named {verifier.name!r}", ErrorCode.UNKNOWN_KEY
                )
            if store is not None:
                await asyncio.to_thread(store.pin, member.city, pinned)
            return verifier
        return NoteVerifier.from_vkey(pinned)

    # --- POST /v1/witness/add-checkpoint, GET /v1/witness/cosignatures ------------

    def _load_witnessed(self) -> None:
        """Set the logs this witness follows: the roster's log keys, then ``witness-logs.txt``.

        The file holds one vkey a line; an origin the roster names a log key for keeps
        the roster's key (:func:`hansa.node.witness.followed_logs`, spec §16.5).
        """
        path = self.config.data_dir / WITNESSED_LOGS_FILE
        followed: dict[str, NoteVerifier] = {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                verifier = NoteVerifier.from_vkey(text)
            except HansaError as exc:
                log.error("%s line %d: not a log vkey: %s", path, number, exc.message)
                continue
            followed[verifier.name] = verifier
        trusted = self.trust.roster
        roster = None if trusted is None else trusted.roster
        self._witnessed, overridden = followed_logs(followed, roster, self.config.city)
        for origin in overridden:
            log.warning(
                "%s pins a log key for %s other than the one the roster names; following the "
                "roster's",
                path,
                origin,
            )

    def _log_verifier_for(self, origin: str) -> NoteVerifier | None:
        """The log key this witness checks ``origin``'s checkpoints with (None: not followed).

        Looked up at each call, so a SIGHUP or a new roster changes it at once.
        """
        return self._witnessed.get(origin)

    def _open_witness(self) -> None:
        if self.witness_signer is None:
            return
        self._load_witnessed()
        store = WitnessStore(self.config.data_dir / WITNESS_DB)
        self.witness = Witness(store, self.witness_signer, self._log_verifier_for)

    async def handle_add_checkpoint(self, request: web.Request) -> web.Response:
        """tlog-witness add-checkpoint with an ``AddCheckpoint`` body (never raises)."""
        witness = self.witness
        if witness is None:
            return _reply_response(
                self._unsigned(ErrorCode.UNKNOWN_KEY, "this node is not a witness", 404)
            )
        try:
            declared = request.content_length
            if declared is not None and declared > _MAX_WITNESS_BODY:
                raise ProtocolError("add-checkpoint body too large", ErrorCode.TOO_LARGE)
            # Until the end of the body: one read(n) returns what has arrived so far, and
            # a body in several TCP segments was cut short (a spurious MALFORMED).
            parts: list[bytes] = []
            size = 0
            async with _receiving():
                while size <= _MAX_WITNESS_BODY:
                    part = await request.content.read(_MAX_WITNESS_BODY + 1 - size)
                    if not part:
                        break
                    parts.append(part)
                    size += len(part)
            data = b"".join(parts)
            body = decode_as(data, AddCheckpoint, max_size=_MAX_WITNESS_BODY)
            line = await asyncio.to_thread(
                witness.add_checkpoint,
                body.checkpoint,
                body.old_size,
                body.proof,
                self.clock_ms() // 1000,
            )
        except WitnessConflict as exc:
            return web.Response(
                body=f"{exc.last_size}\n".encode(),
                status=409,
                content_type="text/x.tlog.size",
                headers=_NO_STORE,
            )
        except HansaError as exc:
            return _reply_response(self._unsigned(exc.code, exc.message, witness_status(exc)))
        except Exception:
            log.exception("internal error in add-checkpoint")
            return _reply_response(self._unsigned(ErrorCode.INTERNAL, "internal error", 500))
        return web.Response(body=line, content_type="text/plain", headers=_NO_STORE)

    async def handle_cosignatures(self, request: web.Request) -> web.Response:
        """The checkpoints this witness cosigned for ``?origin=`` (JSON, newest first)."""
        witness = self.witness
        if witness is None:
            return _reply_response(
                self._unsigned(ErrorCode.UNKNOWN_KEY, "this node is not a witness", 404)
            )
        origin = request.query.get("origin", "")
        if not origin or len(origin) > 256:
            return _reply_response(
                self._unsigned(ErrorCode.INVALID_FIELD, "give ?origin=<log origin>", 400)
            )
        try:
            found = await asyncio.to_thread(witness.store.cosigned, origin)
        except HansaError as exc:
            log.error("witness store: %s", exc.message)
            return _reply_response(self._unsigned(ErrorCode.INTERNAL, "internal error", 500))
        notes = [c.note.decode("utf-8") for c in found]
        return web.json_response({"origin": origin, "notes": notes}, headers=_NO_STORE)

    # --- GET and POST /v1/roster ---------------------------------------------

    def roster_reply(self) -> _Reply:
        """Return the exact signed roster bytes the node trusts (404 without a roster)."""
        trusted = self.trust.roster
        if trusted is None:
            return self._unsigned(
                ErrorCode.ROSTER_MISMATCH, "this node has no alliance roster configured", 404
            )
        return _Reply(trusted.data, 200, ROSTER_MEDIA_TYPE, "ok", "none")

    async def handle_roster_post(self, request: web.Request) -> _Reply:
        """Take up a newer signed roster at run time (``POST /v1/roster``, never raises).

        The body must verify as the successor of the current roster (spec
        §15.1); it is persisted atomically and then governs every request
        that arrives afterwards. Posting the current roster again is a no-op.
        Refusals are unsigned ``ErrorMessage`` replies: the roster's own
        signatures carry the authority, the node's signature would add nothing.
        """
        try:
            if self.trust.roster is None:
                return self._unsigned(
                    ErrorCode.ROSTER_MISMATCH, "this node has no alliance roster configured", 404
                )
            if request.content_type != ROSTER_MEDIA_TYPE:
                return self._unsigned(
                    ErrorCode.MALFORMED, f"Content-Type must be {ROSTER_MEDIA_TYPE}", 415
                )
            data = await self._read_roster_body(request)
            async with self._roster_lock:
                current = self.trust.roster
                if current is None:  # pragma: no cover — checked above; never unset
                    raise HansaError("no roster", ErrorCode.INTERNAL)
                if data == current.data:
                    return self._roster_ok(current, "unchanged")
                installed = await asyncio.to_thread(
                    install_roster,
                    self.config.data_dir,
                    self.config.alliance,
                    data,
                    current,
                    self.clock_ms(),
                )
                # Persisted, then logged, then in effect: a node that cannot log the
                # change keeps the old roster until a restart logs and takes it up.
                await self._log_roster(installed)
                self._take_up(installed)
            return self._roster_ok(installed, "installed")
        except HansaError as exc:
            if exc.code.on_wire:
                log.warning("roster update refused: %s", exc.message)
            else:  # local (e.g. the disk): _unsigned reports INTERNAL, details stay here
                log.error("roster update failed: %s", exc.message)
            status = 413 if exc.code is ErrorCode.TOO_LARGE else 400
            return self._unsigned(exc.code, exc.message, status)
        except Exception:
            log.exception("internal error installing a roster")
            return self._unsigned(ErrorCode.INTERNAL, "internal error", 500)

    async def _read_roster_body(self, request: web.Request) -> bytes:
        # Read from the stream: aiohttp's client_max_size is the (smaller)
        # query limit, and a roster may be larger than any query.
        declared = request.content_length
        if declared is not None and declared > _MAX_ROSTER_BODY:
            raise ProtocolError(
                f"roster of {declared} bytes exceeds the limit of {_MAX_ROSTER_BODY}",
                ErrorCode.TOO_LARGE,
            )
        chunks: list[bytes] = []
        size = 0
        async with _receiving():
            async for chunk in request.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > _MAX_ROSTER_BODY:
                    raise ProtocolError(
                        f"roster exceeds the limit of {_MAX_ROSTER_BODY} bytes",
                        ErrorCode.TOO_LARGE,
                    )
                chunks.append(chunk)
        return b"".join(chunks)

    def _roster_ok(self, trusted: TrustedRoster, outcome: str) -> _Reply:
        body = json.dumps(
            {
                "outcome": outcome,
                "alliance": trusted.roster.alliance,
                "version": trusted.version,
                "digest": trusted.digest.hex(),
            }
        ).encode()
        return _Reply(body, 200, "application/json", outcome, "none")

    def _take_up(self, trusted: TrustedRoster) -> None:
        """Make ``trusted`` the roster for every request from now on."""
        self.trust = Trust.from_roster(trusted)
        log.info(
            "alliance %r roster version %d in effect", trusted.roster.alliance, trusted.version
        )
        _warn_membership(
            trusted,
            self.config.city,
            self.signing_key,
            self.log_signer.signing_key,
            self._witness_key,
        )
        if self.witness_signer is not None:
            self._load_witnessed()  # the roster's log keys may have changed

    async def reload_roster(self) -> bool:
        """Re-read the roster files (SIGHUP) and take up a newer verified roster.

        Returns:
            Whether the roster in effect is the one on disk (a failure or an
            older file is logged; the current roster stays in effect).
        """
        if not self.config.alliance.has_roster:
            return True
        async with self._roster_lock:
            try:
                loaded = await asyncio.to_thread(
                    load_roster_store, self.config.data_dir, self.config.alliance
                )
            except HansaError as exc:
                log.error("roster reload failed, keeping the current roster: %s", exc.message)
                return False
            current = self.trust.roster
            if loaded is None or current is None:  # pragma: no cover — has_roster above
                return False
            if loaded.data == current.data:
                return True
            if loaded.version <= current.version:
                log.error(
                    "roster file holds version %d, not newer than version %d in effect; "
                    "keeping the current roster (rollback refused)",
                    loaded.version,
                    current.version,
                )
                return False
            try:
                await self._log_roster(loaded)
            except _AuditUnavailable as exc:
                log.error("roster reload not taken up: %s", exc.message)
                return False
            self._take_up(loaded)
            return True

    # --- GET /v1/capabilities ------------------------------------------------

    def capabilities(self) -> bytes:
        """Return the sealed capability document, re-signing when datasets changed."""
        datasets = self.engine.datasets()
        cached = self._capabilities
        if cached is not None and cached[0] == datasets:
            return cached[1]
        document = Capabilities(
            city=self.config.city,
            node_key=self.signing_key.public_key.raw,
            issued_at=self.clock_ms(),
            datasets=datasets,
        )
        body = seal(document, self.signing_key)
        self._capabilities = (datasets, body)
        return body

    async def reload(self) -> bool:
        """Reload the roster and the engine's catalog (SIGHUP); the capability cache follows.

        Returns:
            Whether both reloads succeeded (a failure is logged; the previous
            roster or catalog stays in effect).
        """
        if self.witness_signer is not None:
            self._load_witnessed()
        roster_ok = await self.reload_roster()
        return await self._reload_catalog() and roster_ok

    async def _reload_catalog(self) -> bool:
        pool = self._pool
        if pool is None:
            return False
        engine = self.engine
        try:
            await asyncio.get_running_loop().run_in_executor(pool, engine.reload)
        except HansaError as exc:
            log.error("reload failed, keeping the previous catalog: %s", exc.message)
            return False
        log.info("catalog reloaded: %d dataset(s)", len(engine.datasets()))
        try:
            await self._log_settings()
        except _AuditUnavailable as exc:
            log.error("changed disclosure settings not logged: %s", exc.message)
            return False
        return True

    # --- lifecycle -----------------------------------------------------------

    async def run_context(
        self, app: web.Application, engine: AnswerEngine | None
    ) -> AsyncIterator[None]:
        """Open the engine and the query pool; close them on shutdown (cleanup_ctx)."""
        limits = self.config.limits
        owned = engine is None
        if engine is None:
            engine = await asyncio.to_thread(self._open_engine)
        self._engine = engine
        self._lookup = _cache_lookup(engine)
        self._pool = ThreadPoolExecutor(
            max_workers=limits.max_concurrent_queries, thread_name_prefix="hansa-query"
        )
        self._audit_pool = ThreadPoolExecutor(
            max_workers=_AUDIT_THREADS, thread_name_prefix="hansa-audit"
        )
        checkpoints: asyncio.Task[None] | None = None
        try:
            await asyncio.to_thread(self._open_audit)
            if self.audit is not None:
                self._loop = asyncio.get_running_loop()
                self._writer = _LogWriter(self.audit, self._loop, self._committed)
            await asyncio.to_thread(self._open_witness)
            self._cosigned = await asyncio.to_thread(
                _CosignedNotes, self.config.data_dir / COSIGNED_FILE
            )
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=_PUSH_TIMEOUT_S)
            )
            wake = self._checkpoint_wake = asyncio.Event()
            checkpoints = asyncio.create_task(self._checkpoint_loop(wake))
            yield
        finally:
            if checkpoints is not None:
                checkpoints.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await checkpoints
            push, self._push_task = self._push_task, None
            if push is not None:
                push.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await push
            session, self._session = self._session, None
            if session is not None:
                await session.close()
            pool, self._pool = self._pool, None
            # In-flight handlers have finished by now (aiohttp waits for them
            # before cleanup); wait for any thread that outlived its request.
            await asyncio.to_thread(pool.shutdown, wait=True)
            # Entries of requests that never reached a reply become durable now.
            await self._flush_log()
            writer, self._writer = self._writer, None
            if writer is not None:
                await asyncio.to_thread(writer.stop)
            await asyncio.to_thread(self._close_audit)
            witness, self.witness = self.witness, None
            if witness is not None:
                witness.store.close()
            cosigned, self._cosigned = self._cosigned, None
            if cosigned is not None:
                cosigned.close()
            self._engine = None
            self._lookup = None
            if owned:
                await asyncio.to_thread(engine.close)
                log.info("engine closed")

    def _close_audit(self) -> None:
        """Cover every entry with a last checkpoint, then close the log (blocking)."""
        audit, self.audit = self.audit, None
        pool, self._audit_pool = self._audit_pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        if audit is None:
            return
        try:
            with self._checkpoint_lock:
                latest = audit.latest_checkpoint()
                if audit.size and (latest is None or latest.size < audit.size):
                    audit.checkpoint(self.log_signer)
        except HansaError as exc:
            log.error("final audit checkpoint failed: %s", exc.message)
        finally:
            audit.close()
            log.info("audit log closed")

    def _open_engine(self) -> AnswerEngine:
        # Imported here: DuckDB loads only when a node runs.
        from hansa.node.engine import QueryEngine

        limits = self.config.limits
        engine: AnswerEngine = QueryEngine(
            self.config.data_dir,
            timeout_s=limits.query_timeout_s,
            memory_limit=limits.memory_limit,
            threads=limits.engine_threads,
        )
        return engine


def _warn_membership(
    trusted: TrustedRoster,
    city: str,
    signing_key: SigningKey,
    log_key: SigningKey | None = None,
    witness_key: SigningKey | None = None,
) -> None:
    """Log what would make every query fail or every answer, checkpoint or cosignature
    unverifiable (the roster pins the log and witness keys it names, spec §16.1)."""
    member = trusted.roster.member(city)
    if member is None:
        log.warning(
            "city %r is not a member of roster version %d: every query will be refused",
            city,
            trusted.version,
        )
        return
    if member.public_key != signing_key.public_key.raw:
        log.warning(
            "roster version %d names another node key for %r: clients will reject this "
            "node's signed replies",
            trusted.version,
            city,
        )
    if member.log_key is not None and (log_key is None or member.log_key != log_key.public_key.raw):
        log.warning(
            "roster version %d names another log key for %r: auditors, witnesses and "
            "analysts will reject this node's checkpoints and receipts",
            trusted.version,
            city,
        )
    if member.witness_key is not None and (
        witness_key is None or member.witness_key != witness_key.public_key.raw
    ):
        log.warning(
            "roster version %d names another witness key for %r: its cosignatures will not count",
            trusted.version,
            city,
        )


class _CosignedNotes:
    """Checkpoint notes with the witnesses' cosignatures merged in, and pinned witness keys.

    Kept beside the audit store (``audit-cosigned.sqlite``): the cosignatures are not part
    of the log, and losing them loses no entry (witnesses serve them too).
    """

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(
                "CREATE TABLE IF NOT EXISTS notes (size INTEGER PRIMARY KEY, note BLOB NOT NULL);"
                "CREATE TABLE IF NOT EXISTS witness_keys"
                " (city TEXT PRIMARY KEY, vkey TEXT NOT NULL);"
            )
        except sqlite3.Error as exc:
            raise HansaError(f"cannot open {path}: {exc}", ErrorCode.INTERNAL) from exc

    def _run(self, sql: str, args: tuple[object, ...]) -> tuple[object, ...] | None:
        with self._lock:
            try:
                row: tuple[object, ...] | None = self._conn.execute(sql, args).fetchone()
            except sqlite3.Error as exc:
                raise HansaError(f"cosigned checkpoint store: {exc}", ErrorCode.INTERNAL) from exc
        return row

    def note(self, size: int) -> bytes | None:
        row = self._run("SELECT note FROM notes WHERE size = ?", (size,))
        return bytes(row[0]) if row is not None and isinstance(row[0], bytes) else None

    def put(self, size: int, note: bytes) -> None:
        self._run("INSERT OR REPLACE INTO notes VALUES (?, ?)", (size, note))

    def witness_vkey(self, city: str) -> str | None:
        row = self._run("SELECT vkey FROM witness_keys WHERE city = ?", (city,))
        return str(row[0]) if row is not None else None

    def pin(self, city: str, vkey: str) -> None:
        self._run("INSERT OR IGNORE INTO witness_keys VALUES (?, ?)", (city, vkey))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@dataclass
class _LoggedState:
    """What the audit log last recorded about the roster and the settings."""

    roster: bytes | None = None
    keys: dict[str, bytes] = field(default_factory=dict)
    """The key id last logged per role (``key_rotated`` entries)."""
    config: tuple[bytes, int] | None = None
    disclosure: dict[str, bytes] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    """The disclosure version last logged per dataset (what answers must cite)."""


def _profile_in(audit: AuditLog, digest: bytes, dataset: str) -> bytes | None:
    """The encoded disclosure profile of ``dataset`` in a logged capability document."""
    try:
        envelope = audit.envelope(digest)
        if envelope is None:
            return None
        document = decode_as(decode_envelope(envelope).payload, Capabilities)
    except HansaError:
        return None
    for info in document.datasets:
        if info.name == dataset:
            return encode(info.disclosure)
    return None


def _budgeted(items: Sequence[_T], size: Callable[[_T], int]) -> list[_T]:
    """The longest prefix of ``items`` (at most a page) that fits one response."""
    total = 0
    out: list[_T] = []
    for item in items[:MAX_AUDIT_PAGE]:
        total += size(item)
        if total > _RESPONSE_BUDGET and out:
            break
        out.append(item)
    return out


def _invalid(message: str) -> HansaError:
    return ProtocolError(message, ErrorCode.INVALID_FIELD)


NODE: Final = web.AppKey("hansa_node", NodeState)
"""Application key of the :class:`NodeState`."""


def _reply_response(reply: _Reply) -> web.Response:
    return web.Response(
        body=reply.body,
        status=reply.status,
        content_type=reply.content_type,
        headers=_NO_STORE,
    )


async def _query(request: web.Request) -> web.Response:
    node = request.app[NODE]
    started = time.perf_counter()
    reply = await node.handle_query(request)
    node.metrics.query_latency.observe(time.perf_counter() - started)
    node.metrics.requests.inc(QUERY_ROUTE, reply.outcome, reply.code)
    return _reply_response(reply)


async def _capabilities(request: web.Request) -> web.Response:
    node = request.app[NODE]
    try:
        body = node.capabilities()
    except HansaError as exc:
        reply = node._unsigned(exc.code, exc.message, 503)
    except Exception:
        log.exception("internal error building the capability document")
        reply = node._unsigned(ErrorCode.INTERNAL, "internal error", 500)
    else:
        reply = _Reply(body, 200, ENVELOPE_MEDIA_TYPE, "ok", "none")
    node.metrics.requests.inc(CAPABILITIES_ROUTE, reply.outcome, reply.code)
    return _reply_response(reply)


async def _roster_get(request: web.Request) -> web.Response:
    node = request.app[NODE]
    reply = node.roster_reply()
    node.metrics.requests.inc(ROSTER_ROUTE, reply.outcome, reply.code)
    return _reply_response(reply)


async def _roster_post(request: web.Request) -> web.Response:
    node = request.app[NODE]
    reply = await node.handle_roster_post(request)
    node.metrics.requests.inc(ROSTER_ROUTE, reply.outcome, reply.code)
    return _reply_response(reply)


async def _audit(request: web.Request) -> web.Response:
    node = request.app[NODE]
    reply = await node.handle_audit(request)
    node.metrics.requests.inc(AUDIT_ROUTE, reply.outcome, reply.code)
    return _reply_response(reply)


async def _log_keys(request: web.Request) -> web.Response:
    node = request.app[NODE]
    node.metrics.requests.inc(LOG_KEYS_ROUTE, "ok", "none")
    return web.json_response(node.log_keys(), headers=_NO_STORE)


async def _witness_add(request: web.Request) -> web.Response:
    node = request.app[NODE]
    response = await node.handle_add_checkpoint(request)
    node.metrics.requests.inc(WITNESS_ADD_ROUTE, str(response.status), "none")
    return response


async def _witness_cosignatures(request: web.Request) -> web.Response:
    node = request.app[NODE]
    response = await node.handle_cosignatures(request)
    node.metrics.requests.inc(WITNESS_COSIGNATURES_ROUTE, str(response.status), "none")
    return response


async def _health(request: web.Request) -> web.Response:
    node = request.app[NODE]
    node.metrics.requests.inc(HEALTH_ROUTE, "ok", "none")
    return web.json_response({"ok": True, "city": node.config.city}, headers=_NO_STORE)


async def _metrics(request: web.Request) -> web.Response:
    node = request.app[NODE]
    node.metrics.requests.inc(METRICS_ROUTE, "ok", "none")
    return web.Response(
        text=node.metrics.render(),
        headers={"Content-Type": METRICS_CONTENT_TYPE, **_NO_STORE},
    )


def _audit_key(path: Path, *, create: bool = False) -> SigningKey:
    """Read an (unencrypted) audit key file; create the log key of an older node."""
    if create and not path.exists():
        # Nodes initialised before the audit log had no log key (spec §16.1).
        log.warning("no audit log key at %s: creating one", path)
        write_key_file(path, SigningKey.generate())
    return read_key_file(path)


def create_app(
    config: NodeConfig,
    *,
    engine: AnswerEngine | None = None,
    signing_key: SigningKey | None = None,
    clock_ms: Callable[[], int] = _now_ms,
) -> web.Application:
    """Build the node's aiohttp application.

    Args:
        config: the node configuration.
        engine: a query engine to use; the caller keeps ownership and closes
            it. When ``None`` the application opens a ``QueryEngine`` on
            ``config.data_dir`` at start-up and closes it at shutdown.
        signing_key: the node's signing key; when ``None`` it is read from
            ``config.key_file`` (with the configured passphrase, if any).
        clock_ms: the wall clock in integer ms since the epoch.

    Returns:
        The application; run it with ``web.AppRunner`` (see ``hansa.node.server``).

    Raises:
        KeyFileError: the key file cannot be read.
        ConfigError: the key passphrase variable is configured but not set, or
            the configured roster cannot be read or does not verify from its pin.
    """
    if signing_key is None:
        signing_key = read_key_file(config.key_file, passphrase=config.passphrase())
    roster = load_roster_store(config.data_dir, config.alliance)
    log_key = _audit_key(config.path(config.audit.log_key_file), create=True)
    witness_file = config.audit.witness_key_file
    witness_key = None if witness_file is None else _audit_key(config.path(witness_file))
    if roster is not None:
        _warn_membership(roster, config.city, signing_key, log_key, witness_key)
    state = NodeState(
        config, signing_key, clock_ms, roster, log_key=log_key, witness_key=witness_key
    )
    app = web.Application(client_max_size=config.limits.max_request_bytes)
    app[NODE] = state

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        async for _ in state.run_context(app, engine):
            yield

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post(QUERY_ROUTE, _query)
    app.router.add_get(CAPABILITIES_ROUTE, _capabilities)
    app.router.add_get(ROSTER_ROUTE, _roster_get)
    app.router.add_post(ROSTER_ROUTE, _roster_post)
    app.router.add_post(AUDIT_ROUTE, _audit)
    app.router.add_get(LOG_KEYS_ROUTE, _log_keys)
    app.router.add_post(WITNESS_ADD_ROUTE, _witness_add)
    app.router.add_get(WITNESS_COSIGNATURES_ROUTE, _witness_cosignatures)
    app.router.add_get(HEALTH_ROUTE, _health)
    app.router.add_get(METRICS_ROUTE, _metrics)
    return app
