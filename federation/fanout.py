"""The fan-out coordinator: one query to many cities, one combined answer.

Theory of operation
-------------------
:func:`fan_out` is the analyst side of ``POST /v1/query`` (issue 4, part 2).
It is the one module of :mod:`hansa.federation` that does network I/O, so
nothing else in the package imports it (``hansa.federation`` stays pure).

1. **One request.** One :class:`~hansa.protocol.messages.QueryRequest`,
   built by :func:`build_request` and signed once, is addressed to every
   target city: its signed ``targets`` tuple is the audience (spec §7.1), so
   each node answers only if it is listed and checks its own minimum of
   participating cities against the list. It carries the ``quorum``,
   ``issued_at``, ``expires_at = issued_at + deadline`` and one fresh 16-byte
   nonce. Every city gets the same envelope bytes and every reply must cite
   their SHA-256 (the request id). One signature instead of one per city:
   at N = 500 that was 500 Ed25519 signatures and 500 copies of the
   500-city target list (~5 KB each) per fan-out (``bench/fanout.py``).
   :func:`prepare_requests` signs it without sending; :func:`send_prepared`
   sends it; :func:`fan_out` does both.
2. **Transport.** All requests go out concurrently over one
   :class:`~hansa.federation.transport.HttpPool` (keep-alive HTTP/1.1
   connections, one per city, at most ``connection_limit`` open): a lean
   client on llhttp, because aiohttp's ``ClientSession`` cost more per
   request than verifying the reply (``bench/transport.py``,
   ``bench/fanout.py``). The deadline is enforced for the fan-out as
   a whole: one ``asyncio.wait`` with the time left to the deadline, after
   which every city still pending is cancelled and gets ``TIMEOUT`` (or
   ``UNREACHABLE`` when its connection attempts had failed), so a slow city
   never holds the others back.
3. **Retries** happen only for connection failures, i.e. the connection was
   refused or reset before any response arrived
   (:class:`~hansa.federation.transport.ConnectFailed`), with exponential
   backoff plus jitter,
   at most ``max_attempts`` times and only while the deadline leaves room for
   the backoff. The *same* envelope bytes are re-sent: if a reset request did
   reach the node and was answered, the node replies with the answer it already
   released (spec §8.3 repeats) rather than answering twice, and the evidence
   holds the one request.
4. **Verification** as replies arrive (:func:`verify_reply`): each reply is
   opened with :func:`hansa.crypto.open_envelope` against that city's node
   key only, must cite the request id sent to that city, name the city as
   responder and our principal as requester, and an answer must fit the
   query (:func:`hansa.federation.combine.check_answer`). With more than
   :data:`VERIFY_THREAD_THRESHOLD` targets, on a machine with more than two
   usable cores, the checks run on the process's verification threads
   (:class:`_VerifyThreads`: libsodium releases the GIL, so signatures are
   checked on the spare cores while the event loop keeps reading sockets);
   on one or two cores they run on the event loop, which measured faster
   there (:func:`_default_verify_threads`). Below the threshold a thread
   hand-off costs more than the check itself (see the constant).
5. **Result.** Every target appears in :attr:`FanOutResult.cities` with a
   :class:`CityStatus`; never is a city dropped. When at least ``quorum``
   cities answered, their answers are combined with
   :func:`hansa.federation.combine.combine_answers`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import queue
import random
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

from hansa.crypto import PublicKey, SigningKey, open_envelope, seal
from hansa.federation.combine import CombinedResult, check_answer, combine_answers
from hansa.federation.transport import (
    DEFAULT_LIMIT,
    BadResponse,
    ConnectFailed,
    HttpPool,
    TransportError,
)
from hansa.protocol.codec import decode_as
from hansa.protocol.envelope import MAX_ENVELOPE_SIZE, PayloadType, decode_envelope, message_id
from hansa.protocol.errors import ErrorCode, HansaError, ProtocolError, SignatureError
from hansa.protocol.messages import (
    MAX_TARGETS,
    ErrorMessage,
    PolicyTags,
    Query,
    QueryAnswer,
    QueryRefusal,
    QueryRequest,
)

__all__ = [
    "ENVELOPE_MEDIA_TYPE",
    "QUERY_PATH",
    "VERIFY_THREAD_THRESHOLD",
    "CityResult",
    "CityStatus",
    "FanOutResult",
    "PreparedRequest",
    "ReplyVerdict",
    "Target",
    "build_request",
    "fan_out",
    "prepare_requests",
    "send_prepared",
    "verify_reply",
]

ENVELOPE_MEDIA_TYPE: Final = "application/vnd.hansa.envelope+msgpack"
"""Content type of a signed envelope (spec §8). The node defines the same
constant in ``hansa.node.app``; it is repeated here because federation may not
import node (layering), and a test checks that the two agree."""

QUERY_PATH: Final = "/v1/query"
"""The node's query route, appended to a target's endpoint."""

VERIFY_THREAD_THRESHOLD: Final = 32
"""Sign and verify in a thread pool only above this many targets.

Measured on the shared 2-core development machine (Python 3.11, PyNaCl) with
``verify_reply`` on a one-cell answer: about 51 µs per reply on the event loop
(of which ~40 µs is the Ed25519 check itself). A burst of n checks through a
2-thread ``ThreadPoolExecutor``, one submit per check, against the same
checks inline: n = 8: 0.57 vs 0.42 ms (the hand-off loses); n = 32: 1.44 vs
1.64 ms (break-even); n = 128: 6.1 vs 6.5 ms; n = 512: 25.7 vs 26.1 ms.
Batching per event-loop iteration (one submit per batch and thread) moves
the break-even lower, but on two busy cores the pool gains little wall time:
it matters because it takes the signature work off the event loop, so
sockets keep being read. ``bench/fanout.py --inline`` re-measures the pool
against ``verify_threads=0`` in one run (N = 500, cold sessions: 175 ms with
the pool vs 221 ms inline; warm: equal, under a load average of 4).
"""

DEFAULT_CONNECTION_LIMIT: Final = DEFAULT_LIMIT
"""Most simultaneous connections of the pool :func:`fan_out` creates itself."""

DEFAULT_MAX_ATTEMPTS: Final = 3
"""Attempts per city when the connection fails before a response (1 = no retry)."""

BACKOFF_BASE_S: Final = 0.05
"""First retry delay; each further retry doubles it (plus up to 50 % jitter)."""

log = logging.getLogger("hansa.federation.fanout")


class CityStatus(enum.StrEnum):
    """What became of one city's request."""

    ANSWERED = "answered"
    """A verified ``QueryAnswer`` that fits the query."""
    REFUSED = "refused"
    """A verified ``QueryRefusal``; :attr:`CityResult.code` holds its code."""
    TIMEOUT = "timeout"
    """No complete reply before the deadline."""
    UNREACHABLE = "unreachable"
    """The connection failed (refused, reset) on every attempt."""
    BAD_SIGNATURE = "bad_signature"
    """The reply is not signed by the city's node key, or does not verify, or
    cites another request id, responder or requester."""
    PROTOCOL_ERROR = "protocol_error"
    """An unsigned error, a malformed reply, or an answer that does not fit the query."""


@dataclass(frozen=True, slots=True)
class Target:
    """One city to ask.

    Attributes:
        city: the city id (one of the request's targets).
        endpoint: base URL of the city's node, e.g. ``http://127.0.0.1:8470``.
        node_key: the only key the city's replies are accepted under.
    """

    city: str
    endpoint: str
    node_key: PublicKey


@dataclass(frozen=True, slots=True)
class CityResult:
    """The outcome for one city.

    Attributes:
        city: the city id.
        status: what happened.
        code: the refusal's code (``REFUSED``), the unsigned error's code
            (``PROTOCOL_ERROR`` from an ``ErrorMessage``), the verification
            failure's code (``BAD_SIGNATURE``), else ``None``.
        reply: the verified signed reply envelope (answer or refusal) exactly
            as received, for the evidence bundle; ``None`` unless ``ANSWERED``
            or ``REFUSED``.
        request: the sealed request envelope sent (the same bytes to every city).
        latency_ms: from the first send to the end of verification (to the
            deadline for ``TIMEOUT``).
        detail: a one-line human readable explanation.
        answer: the decoded answer (``ANSWERED`` only).
        attempts: connection attempts made.
    """

    city: str
    status: CityStatus
    code: ErrorCode | None
    reply: bytes | None
    request: bytes
    latency_ms: float
    detail: str
    answer: QueryAnswer | None = None
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class FanOutResult:
    """The outcome of one fan-out.

    Attributes:
        query: the query asked.
        targets: the target cities, in the order given (as signed in every request).
        quorum: the signed quorum.
        issued_at: the requests' ``issued_at`` (ms since the epoch).
        expires_at: the requests' ``expires_at`` (the deadline).
        cities: one result per target, in target order.
        answers: the verified answers, in target order.
        quorum_met: whether at least ``quorum`` cities answered.
        combined: the combined result when the quorum is met, else ``None``.
        reason: why ``combined`` is ``None`` (``None`` when it is not).
    """

    query: Query
    targets: tuple[str, ...]
    quorum: int
    issued_at: int
    expires_at: int
    cities: tuple[CityResult, ...]
    answers: tuple[QueryAnswer, ...]
    quorum_met: bool
    combined: CombinedResult | None
    reason: str | None

    def city(self, city: str) -> CityResult:
        """Return the result of ``city``.

        Args:
            city: a target city id.

        Returns:
            Its :class:`CityResult`.

        Raises:
            KeyError: ``city`` was not a target.
        """
        for result in self.cities:
            if result.city == city:
                return result
        raise KeyError(city)

    def by_status(self, status: CityStatus) -> tuple[str, ...]:
        """Return the cities with ``status``, in target order."""
        return tuple(r.city for r in self.cities if r.status is status)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class ReplyVerdict:
    """What :func:`verify_reply` found.

    Attributes:
        status: the city's status.
        code: the error code behind it, if any (see :attr:`CityResult.code`).
        detail: a one-line explanation.
        answer: the verified answer (``ANSWERED`` only).
    """

    status: CityStatus
    code: ErrorCode | None
    detail: str
    answer: QueryAnswer | None = None


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def verify_reply(
    http_status: int,
    body: bytes,
    *,
    target: Target,
    request_id: bytes,
    requester: str,
    query: Query,
) -> ReplyVerdict:
    """Verify and classify one ``/v1/query`` reply (pure, thread-safe, never raises).

    A 200 reply is read only through ``open_envelope`` under the city's own
    key (spec §8: the status code is not signed, the body carries the
    verdict); anything else must be an unsigned ``ErrorMessage``. An answer
    must also fit ``query`` (:func:`hansa.federation.combine.check_answer`).

    Args:
        http_status: the HTTP status of the reply.
        body: the exact reply bytes.
        target: the city asked (its id and the only key accepted).
        request_id: the message id of the request sent to that city.
        requester: our principal id.
        query: the query asked.

    Returns:
        The :class:`ReplyVerdict`.
    """
    if http_status != 200:
        try:
            error = decode_as(body, ErrorMessage)
        except HansaError as exc:
            return ReplyVerdict(
                CityStatus.PROTOCOL_ERROR,
                None,
                f"HTTP {http_status} with an undecodable body: {_one_line(exc.message)}",
            )
        return ReplyVerdict(
            CityStatus.PROTOCOL_ERROR,
            error.code,
            f"unsigned error HTTP {http_status} {error.code.name}: {_one_line(error.message)}",
        )
    keys = {target.node_key.key_id: target.node_key}
    try:
        kind = decode_envelope(body).payload_type
        expected: type[QueryAnswer] | type[QueryRefusal]
        expected = QueryRefusal if kind == PayloadType.QUERY_REFUSAL else QueryAnswer
        opened = open_envelope(body, keys, expected)
    except SignatureError as exc:
        return ReplyVerdict(CityStatus.BAD_SIGNATURE, exc.code, _one_line(exc.message))
    except HansaError as exc:
        return ReplyVerdict(CityStatus.PROTOCOL_ERROR, exc.code, _one_line(exc.message))
    reply = opened.message
    # A valid signature over the wrong request would let a city replay an old
    # answer: the reply must cite exactly what we sent to *this* city.
    if reply.request_id != request_id:
        return ReplyVerdict(
            CityStatus.BAD_SIGNATURE, ErrorCode.BAD_SIGNATURE, "reply cites another request id"
        )
    if reply.responder != target.city:
        return ReplyVerdict(
            CityStatus.BAD_SIGNATURE,
            ErrorCode.BAD_SIGNATURE,
            f"reply names responder {reply.responder!r}, not {target.city!r}",
        )
    if reply.requester != requester:
        return ReplyVerdict(
            CityStatus.BAD_SIGNATURE,
            ErrorCode.BAD_SIGNATURE,
            f"reply names requester {reply.requester!r}, not {requester!r}",
        )
    if isinstance(reply, QueryRefusal):
        return ReplyVerdict(
            CityStatus.REFUSED, reply.code, f"{reply.code.name}: {_one_line(reply.reason)}"
        )
    try:
        # Checked per city, now, so that one answer that does not fit the
        # query is that city's protocol error instead of failing the combination.
        check_answer(query, reply)
    except HansaError as exc:
        return ReplyVerdict(CityStatus.PROTOCOL_ERROR, exc.code, _one_line(exc.message))
    return ReplyVerdict(CityStatus.ANSWERED, None, reply.decision.value, reply)


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """The fan-out's signed request for one of its cities (see :func:`prepare_requests`).

    Every city of one fan-out shares ``request``, ``envelope`` and
    ``request_id``: one request, signed once, addressed to all the targets.

    Attributes:
        target: the city it is sent to.
        request: the signed request body.
        envelope: the sealed envelope bytes, sent as they are (also on a retry).
        request_id: their message id, which every city's reply must cite.
    """

    target: Target
    request: QueryRequest
    envelope: bytes
    request_id: bytes


def build_request(
    query: Query,
    policy: PolicyTags,
    *,
    requester: str,
    targets: Sequence[str],
    issued_at: int,
    expires_at: int,
    quorum: int = 1,
    roster_version: int = 0,
    nonce: bytes | None = None,
) -> QueryRequest:
    """Build one unsigned :class:`~hansa.protocol.messages.QueryRequest` (spec §7).

    The one place requests are put together: :func:`prepare_requests` builds
    the fan-out's request with it, and so do the tests and benchmarks that
    send a request themselves.

    Args:
        query: the aggregate query.
        policy: the signed policy tags.
        requester: the principal the signing key speaks for.
        targets: every city the request is addressed to, in order.
        issued_at: ms since the epoch.
        expires_at: ms since the epoch, after ``issued_at``.
        quorum: the signed quorum.
        roster_version: the roster version the targets were taken from.
        nonce: 16 bytes (``None``: fresh from :func:`secrets.token_bytes`).

    Returns:
        The request, ready to seal.

    Raises:
        ProtocolError: ``INVALID_FIELD`` when the request breaks a rule checked
            on construction (expiry after issue, unique targets, a quorum
            within them).
    """
    try:
        return QueryRequest(
            requester=requester,
            issued_at=issued_at,
            expires_at=expires_at,
            nonce=secrets.token_bytes(16) if nonce is None else nonce,
            roster_version=roster_version,
            policy=policy,
            query=query,
            targets=tuple(targets),
            quorum=quorum,
        )
    except ValueError as exc:
        raise ProtocolError(str(exc), ErrorCode.INVALID_FIELD) from exc


def prepare_requests(
    query: Query,
    policy: PolicyTags,
    targets: Sequence[Target],
    *,
    signer: SigningKey,
    requester: str,
    quorum: int,
    roster_version: int,
    issued_at: int,
    expires_at: int,
    nonce_source: Callable[[int], bytes] = secrets.token_bytes,
) -> list[PreparedRequest]:
    """Build and sign the fan-out's one request, without sending it.

    The request is addressed to every target: its signed ``targets`` tuple
    lists the cities in this order (spec §7.1), with the ``quorum``,
    ``issued_at``, ``expires_at`` and one 16-byte nonce. Ed25519 signing is
    deterministic, so the same inputs and nonce give byte-identical
    envelopes: a caller that supplies ``nonce_source`` (a benchmark, a test)
    knows the request id in advance.

    Args:
        query: the aggregate query.
        policy: the signed policy tags.
        targets: the cities to ask (unique ids).
        signer: the analyst's signing key.
        requester: the principal the key speaks for.
        quorum: how many cities must answer.
        roster_version: the roster version the targets were taken from.
        issued_at: ms since the epoch.
        expires_at: ms since the epoch (the requests' deadline).
        nonce_source: called once with 16, for the request's nonce.

    Returns:
        One :class:`PreparedRequest` per target, in target order, all sharing
        the one signed request.

    Raises:
        ProtocolError: ``INVALID_FIELD`` for no, too many or duplicate targets,
            a quorum outside ``1..len(targets)``, or expiry not after issue.
    """
    _check_targets(targets, quorum)
    request = build_request(
        query,
        policy,
        requester=requester,
        targets=[t.city for t in targets],
        issued_at=issued_at,
        expires_at=expires_at,
        quorum=quorum,
        roster_version=roster_version,
        nonce=nonce_source(16),
    )
    envelope = seal(request, signer)
    request_id = message_id(envelope)
    return [PreparedRequest(target, request, envelope, request_id) for target in targets]


@dataclass(slots=True)
class _Attempt:
    """Mutable per-city progress, read when the deadline cuts a city off."""

    prepared: PreparedRequest
    started: float
    attempts: int = 0
    last_failure: str | None = None
    received: bool = False


_MAX_VERIFY_THREADS: Final = 32
"""Most verification threads, whatever ``verify_threads`` asks for."""

_BATCH: Final = 16
"""Most replies a verification thread takes from its queue at once: enough that a
burst costs one loop wake-up per batch, few enough that both threads get work."""

_Work = tuple[
    asyncio.AbstractEventLoop,
    "asyncio.Future[ReplyVerdict]",
    "PreparedRequest",
    int,
    bytes,
    str,
    Query,
]


class _VerifyThreads:
    """Daemon threads that verify replies for every fan-out of the process.

    Started once (per thread count) and kept: creating a ``ThreadPoolExecutor`` per
    fan-out cost two thread starts, and its ``submit`` a lock shared with busy
    workers, each time (``bench/fanout.py --profile``). A reply goes in through one
    ``SimpleQueue.put`` (C, no Python lock); a thread takes up to :data:`_BATCH`
    queued replies, verifies them (libsodium releases the GIL, so both cores check
    signatures while the event loop reads sockets) and hands the verdicts back with
    one ``call_soon_threadsafe`` per batch and event loop.
    """

    _pools: ClassVar[dict[int, _VerifyThreads]] = {}
    _pools_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, count: int) -> None:
        self.queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        for i in range(count):
            thread = threading.Thread(
                target=self._work, name=f"hansa-verify-{count}-{i}", daemon=True
            )
            thread.start()

    @classmethod
    def get(cls, count: int) -> _VerifyThreads:
        """The process's threads for ``count`` (started on first use)."""
        pool = cls._pools.get(count)
        if pool is None:
            with cls._pools_lock:
                pool = cls._pools.get(count)
                if pool is None:
                    pool = cls._pools[count] = _VerifyThreads(count)
        return pool

    def _work(self) -> None:
        get, get_nowait = self.queue.get, self.queue.get_nowait
        while True:
            batch = [get()]
            try:
                while len(batch) < _BATCH:
                    batch.append(get_nowait())
            except queue.Empty:
                pass
            by_loop: dict[
                asyncio.AbstractEventLoop,
                list[tuple[asyncio.Future[ReplyVerdict], ReplyVerdict]],
            ] = {}
            for loop, future, prepared, status, body, requester, query in batch:
                try:
                    verdict = verify_reply(
                        status,
                        body,
                        target=prepared.target,
                        request_id=prepared.request_id,
                        requester=requester,
                        query=query,
                    )
                except Exception as exc:  # verify_reply never raises; never lose a city
                    verdict = ReplyVerdict(
                        CityStatus.PROTOCOL_ERROR, None, f"verification failed: {exc!r}"[:300]
                    )
                by_loop.setdefault(loop, []).append((future, verdict))
            for loop, verdicts in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_settle, verdicts)
                except RuntimeError:  # the loop closed after its deadline: nobody waits
                    pass


def _settle(verdicts: list[tuple[asyncio.Future[ReplyVerdict], ReplyVerdict]]) -> None:
    for future, verdict in verdicts:
        if not future.done():  # else cancelled at the deadline
            future.set_result(verdict)


class _Verifier:
    """Runs :func:`verify_reply` inline, or on the process's verification threads."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threads: _VerifyThreads | None,
        requester: str,
        query: Query,
    ) -> None:
        self.loop = loop
        self.threads = threads
        self.requester = requester
        self.query = query

    def now(self, prepared: PreparedRequest, status: int, body: bytes) -> ReplyVerdict:
        return verify_reply(
            status,
            body,
            target=prepared.target,
            request_id=prepared.request_id,
            requester=self.requester,
            query=self.query,
        )

    def later(
        self, prepared: PreparedRequest, status: int, body: bytes
    ) -> asyncio.Future[ReplyVerdict]:
        assert self.threads is not None
        future: asyncio.Future[ReplyVerdict] = self.loop.create_future()
        self.threads.queue.put(
            (self.loop, future, prepared, status, body, self.requester, self.query)
        )
        return future


class _Coordinator:
    def __init__(
        self,
        *,
        pool: HttpPool,
        deadline: float,
        verifier: _Verifier,
        threaded: bool,
        max_attempts: int,
        on_status: Callable[[CityResult], None] | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.pool = pool
        self.deadline = deadline
        self.verifier = verifier
        self.threaded = threaded
        self.max_attempts = max_attempts
        self.on_status = on_status

    def done(
        self,
        attempt: _Attempt,
        status: CityStatus,
        code: ErrorCode | None,
        detail: str,
        reply: bytes | None = None,
        answer: QueryAnswer | None = None,
    ) -> CityResult:
        result = CityResult(
            city=attempt.prepared.target.city,
            status=status,
            code=code,
            reply=reply,
            request=attempt.prepared.envelope,
            latency_ms=(self.loop.time() - attempt.started) * 1000.0,
            detail=detail,
            answer=answer,
            attempts=attempt.attempts,
        )
        if self.on_status is not None:
            try:
                self.on_status(result)
            except Exception:  # a display must not break the fan-out
                log.exception("on_status callback failed for %s", result.city)
        return result

    def cut_off(self, attempt: _Attempt) -> CityResult:
        """The result of a city still pending at the deadline."""
        if attempt.last_failure is not None:
            return self.done(
                attempt,
                CityStatus.UNREACHABLE,
                None,
                f"connection failed until the deadline ({attempt.attempts} attempt(s)): "
                f"{attempt.last_failure}",
            )
        if attempt.received:
            return self.done(
                attempt,
                CityStatus.TIMEOUT,
                None,
                "a reply arrived but was not verified before the deadline",
            )
        return self.done(attempt, CityStatus.TIMEOUT, None, "no reply before the deadline")

    async def ask(self, attempt: _Attempt) -> CityResult:
        prepared = attempt.prepared
        while True:
            attempt.attempts += 1
            try:
                # Inside the try: a malformed endpoint is that city's error, not the fan-out's.
                endpoint = self.pool.endpoint(prepared.target.endpoint)
                response = await self.pool.post(
                    endpoint,
                    QUERY_PATH,
                    prepared.envelope,
                    ENVELOPE_MEDIA_TYPE,
                    max_body=MAX_ENVELOPE_SIZE,
                )
                status, body = response.status, response.body
                attempt.received = True
            except ConnectFailed as exc:
                # Refused or reset before a response (spec: retry only these).
                attempt.last_failure = _one_line(exc.message)
                delay = BACKOFF_BASE_S * 2 ** (attempt.attempts - 1)
                delay *= 1.0 + random.random() / 2  # noqa: S311 (jitter, not secrets)
                if (
                    attempt.attempts >= self.max_attempts
                    or self.loop.time() + delay >= self.deadline
                ):
                    return self.done(
                        attempt,
                        CityStatus.UNREACHABLE,
                        None,
                        f"connection failed after {attempt.attempts} attempt(s): "
                        f"{attempt.last_failure}",
                    )
                await asyncio.sleep(delay)
                continue
            except BadResponse as exc:
                code = ErrorCode.TOO_LARGE if exc.code is ErrorCode.TOO_LARGE else None
                return self.done(
                    attempt,
                    CityStatus.PROTOCOL_ERROR,
                    code,
                    f"bad HTTP reply: {_one_line(exc.message)}",
                )
            except TransportError as exc:  # a bad endpoint URL, or the pool was closed
                return self.done(attempt, CityStatus.PROTOCOL_ERROR, None, _one_line(exc.message))
            except Exception as exc:
                # Never lose a city to an unforeseen failure: it gets a status too.
                log.exception("unexpected failure asking %s", prepared.target.city)
                return self.done(
                    attempt,
                    CityStatus.PROTOCOL_ERROR,
                    None,
                    f"unexpected failure: {_one_line(str(exc) or type(exc).__name__)}",
                )
            if self.threaded:
                verdict = await self.verifier.later(prepared, status, body)
            else:
                verdict = self.verifier.now(prepared, status, body)
            keep = verdict.status in (CityStatus.ANSWERED, CityStatus.REFUSED)
            return self.done(
                attempt,
                verdict.status,
                verdict.code,
                verdict.detail,
                body if keep else None,
                verdict.answer,
            )

    async def run(self, requests: Sequence[PreparedRequest]) -> list[CityResult]:
        """Send every request at once; collect results until the deadline."""
        loop = self.loop
        started = loop.time()
        attempts = [_Attempt(prepared, started) for prepared in requests]
        tasks = [loop.create_task(self.ask(attempt)) for attempt in attempts]
        try:
            # One timer for the whole fan-out, not one per city (spec: one deadline).
            if tasks:
                await asyncio.wait(tasks, timeout=max(0.0, self.deadline - loop.time()))
        except BaseException:
            # The caller cancelled us: leave no request running.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        results = []
        late: list[asyncio.Task[CityResult]] = []
        for attempt, task in zip(attempts, tasks, strict=True):
            if task.done() and not task.cancelled():
                results.append(task.result())
            else:
                task.cancel()
                late.append(task)
                results.append(self.cut_off(attempt))
        if late:
            await asyncio.gather(*late, return_exceptions=True)
        return results


def _default_verify_threads() -> int:
    """Verification threads by default: one per usable core beyond two, else none.

    Measured with ``bench/fanout.py --inline`` at N = 500 on the 2-core development
    machine: verifying on the event loop was ~8 % faster than on threads, cold and warm
    (46 vs 50 ms and 35 vs 39 ms of overhead). Per reply ~30 µs of the work holds the
    GIL (reading the reply, decoding, checking the answer, settling the city) and only
    the ~40 µs Ed25519 check runs without it; with the peers on the same two cores the
    threads' hand-offs cost more than the parallel checks gain. With more cores the
    checks do run in parallel.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return cores - 1 if cores > 2 else 0


def _check_targets(targets: Sequence[Target], quorum: int) -> None:
    if not targets:
        raise ProtocolError("at least one target city is needed", ErrorCode.INVALID_FIELD)
    if len(targets) > MAX_TARGETS:
        raise ProtocolError(
            f"{len(targets)} targets exceed the limit of {MAX_TARGETS}", ErrorCode.INVALID_FIELD
        )
    cities = [t.city for t in targets]
    if len(set(cities)) != len(cities):
        raise ProtocolError("target cities must be unique", ErrorCode.INVALID_FIELD)
    if not 1 <= quorum <= len(targets):
        raise ProtocolError(
            f"quorum must be between 1 and {len(targets)}, not {quorum}", ErrorCode.INVALID_FIELD
        )


def _check_run(deadline_s: float, max_attempts: int) -> None:
    if not deadline_s > 0:  # also refuses NaN
        raise ProtocolError("the deadline must be positive", ErrorCode.INVALID_FIELD)
    if max_attempts < 1:
        raise ProtocolError("max_attempts must be >= 1", ErrorCode.INVALID_FIELD)


async def _send(
    requests: Sequence[PreparedRequest],
    *,
    query: Query,
    requester: str,
    deadline: float,
    pool: HttpPool | None,
    on_status: Callable[[CityResult], None] | None,
    max_attempts: int,
    connection_limit: int,
    verify_threads: int | None,
) -> list[CityResult]:
    workers = verify_threads if verify_threads is not None else _default_verify_threads()
    threads = None
    if len(requests) > VERIFY_THREAD_THRESHOLD and workers > 0:
        # Threads live for the process, one set per count: keep the counts few.
        threads = _VerifyThreads.get(min(workers, _MAX_VERIFY_THREADS))
    loop = asyncio.get_running_loop()
    verifier = _Verifier(loop, threads, requester, query)
    own_pool = pool is None
    if pool is None:
        # No per-request timeout: the coordinator enforces the one deadline.
        pool = HttpPool(limit=connection_limit)
    try:
        coordinator = _Coordinator(
            pool=pool,
            deadline=deadline,
            verifier=verifier,
            threaded=threads is not None,
            max_attempts=max_attempts,
            on_status=on_status,
        )
        return await coordinator.run(requests)
    finally:
        if own_pool:
            await pool.close()


def _result(
    query: Query,
    targets: tuple[str, ...],
    quorum: int,
    issued_at: int,
    expires_at: int,
    results: Sequence[CityResult],
) -> FanOutResult:
    answers = tuple(r.answer for r in results if r.answer is not None)
    quorum_met = len(answers) >= quorum
    combined: CombinedResult | None = None
    reason: str | None = None
    if not quorum_met:
        reason = f"quorum not met: {len(answers)} of {quorum} required cities answered"
    else:
        try:
            # verify_reply ran check_answer on each: the states are not re-checked.
            combined = combine_answers(query, answers, checked=True)
        except HansaError as exc:
            reason = f"the answers could not be combined: {_one_line(exc.message)}"
    return FanOutResult(
        query=query,
        targets=targets,
        quorum=quorum,
        issued_at=issued_at,
        expires_at=expires_at,
        cities=tuple(results),
        answers=answers,
        quorum_met=quorum_met,
        combined=combined,
        reason=reason,
    )


async def send_prepared(
    prepared: Sequence[PreparedRequest],
    *,
    deadline_s: float,
    pool: HttpPool | None = None,
    on_status: Callable[[CityResult], None] | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    connection_limit: int = DEFAULT_CONNECTION_LIMIT,
    verify_threads: int | None = None,
) -> FanOutResult:
    """Send requests made by :func:`prepare_requests`, verify the replies, combine the answers.

    Args:
        prepared: one fan-out's requests, in target order (as returned).
        deadline_s: the time budget from now, in seconds. The signed
            ``expires_at`` is the nodes' limit; this is the coordinator's.
        pool: an :class:`~hansa.federation.transport.HttpPool` to reuse (the
            caller owns it); when ``None`` one of ``connection_limit``
            keep-alive connections is created and closed afterwards.
        on_status: called on the event loop with each city's result as soon
            as it is known (for a live display); its exceptions are logged.
        max_attempts: attempts per city on connection failures (>= 1).
        connection_limit: size of the pool created when ``pool`` is None.
        verify_threads: verification threads when there are more than
            :data:`VERIFY_THREAD_THRESHOLD` targets (``None``: one per usable
            core beyond two, none on one or two cores; ``0``: verify on the
            event loop).

    Returns:
        The :class:`FanOutResult` (see :func:`fan_out`).

    Raises:
        ProtocolError: ``INVALID_FIELD`` for no requests, requests that are
            not one fan-out's (different query, targets, quorum or times, or
            not in target order), a non-positive deadline or ``max_attempts < 1``.
    """
    _check_run(deadline_s, max_attempts)
    if not prepared:
        raise ProtocolError("at least one target city is needed", ErrorCode.INVALID_FIELD)
    first = prepared[0]
    if message_id(first.envelope) != first.request_id or (
        decode_as(decode_envelope(first.envelope).payload, QueryRequest) != first.request
    ):
        raise ProtocolError(
            "the prepared request's envelope, id and body do not match", ErrorCode.INVALID_FIELD
        )
    cities = first.request.targets
    same = len(prepared) == len(cities) and all(
        p.target.city == city
        and p.request_id == first.request_id
        and (p.envelope is first.envelope or p.envelope == first.envelope)
        for p, city in zip(prepared, cities, strict=False)
    )
    if not same:
        raise ProtocolError(
            "the prepared requests are not one fan-out's, in target order",
            ErrorCode.INVALID_FIELD,
        )
    request = first.request
    deadline = asyncio.get_running_loop().time() + deadline_s
    results = await _send(
        prepared,
        query=request.query,
        requester=request.requester,
        deadline=deadline,
        pool=pool,
        on_status=on_status,
        max_attempts=max_attempts,
        connection_limit=connection_limit,
        verify_threads=verify_threads,
    )
    return _result(
        request.query, cities, request.quorum, request.issued_at, request.expires_at, results
    )


async def fan_out(
    query: Query,
    policy: PolicyTags,
    targets: Sequence[Target],
    *,
    signer: SigningKey,
    requester: str,
    quorum: int,
    deadline_s: float,
    roster_version: int = 0,
    pool: HttpPool | None = None,
    on_status: Callable[[CityResult], None] | None = None,
    now_ms: Callable[[], int] = _wall_ms,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    connection_limit: int = DEFAULT_CONNECTION_LIMIT,
    verify_threads: int | None = None,
    nonce_source: Callable[[int], bytes] = secrets.token_bytes,
) -> FanOutResult:
    """Send one signed query to every target city and combine the answers.

    The same as :func:`prepare_requests` then :func:`send_prepared`: one
    request, signed once, addressed to every target (spec §7.1).

    Args:
        query: the aggregate query.
        policy: purpose, legal basis, scope and analyst (signed in the request).
        targets: the cities to ask (unique city ids; signed, in this order,
            in the request).
        signer: the analyst's signing key.
        requester: the principal the key speaks for.
        quorum: how many cities must answer for a combined result (signed).
        deadline_s: the whole fan-out's time budget in seconds; also the
            requests' validity (``expires_at = issued_at + deadline``).
        roster_version: the roster version the targets were taken from.
        pool: an :class:`~hansa.federation.transport.HttpPool` to reuse (the
            caller owns it); when ``None`` one of ``connection_limit``
            keep-alive connections is created and closed afterwards.
        on_status: called on the event loop with each city's result as soon
            as it is known (for a live display); its exceptions are logged.
        now_ms: the wall clock in integer ms since the epoch.
        max_attempts: attempts per city on connection failures (>= 1).
        connection_limit: size of the pool created when ``pool`` is None.
        verify_threads: verification threads when there are more than
            :data:`VERIFY_THREAD_THRESHOLD` targets (``None``: one per usable
            core beyond two, none on one or two cores; ``0``: verify on the
            event loop).
        nonce_source: the requests' nonces (see :func:`prepare_requests`).

    Returns:
        The :class:`FanOutResult`: every target with its status, the verified
        answers, and the combined result if the quorum was met.

    Raises:
        ProtocolError: ``INVALID_FIELD`` for no or duplicate targets, a quorum
            outside ``1..len(targets)``, a non-positive deadline, or a request
            that breaks the schema (the request is checked before it is signed).
    """
    _check_targets(targets, quorum)
    _check_run(deadline_s, max_attempts)
    deadline = asyncio.get_running_loop().time() + deadline_s
    issued_at = now_ms()
    expires_at = issued_at + max(1, round(deadline_s * 1000))
    # Signed before anything is sent: a request that breaks a rule is refused
    # with nothing on the wire.
    prepared = prepare_requests(
        query,
        policy,
        targets,
        signer=signer,
        requester=requester,
        quorum=quorum,
        roster_version=roster_version,
        issued_at=issued_at,
        expires_at=expires_at,
        nonce_source=nonce_source,
    )
    results = await _send(
        prepared,
        query=query,
        requester=requester,
        deadline=deadline,
        pool=pool,
        on_status=on_status,
        max_attempts=max_attempts,
        connection_limit=connection_limit,
        verify_threads=verify_threads,
    )
    return _result(query, tuple(t.city for t in targets), quorum, issued_at, expires_at, results)
