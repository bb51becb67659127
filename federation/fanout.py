"""The fan-out coordinator: one query to many cities, one combined answer.

Theory of operation
-------------------
:func:`fan_out` is the analyst side of ``POST /v1/query`` (issue 4, part 2).
It is the one module of :mod:`hansa.federation` that does network I/O, so
nothing else in the package imports it (``hansa.federation`` stays pure).

1. **Requests.** One :class:`~hansa.protocol.messages.QueryRequest` per
   target city. Every signed body carries the same ``targets`` tuple, the
   same ``quorum``, ``issued_at`` and ``expires_at = issued_at + deadline``,
   so each node can check its own minimum of participating cities against
   the signed list (spec §7); the audience and a fresh 16-byte nonce differ
   per city. The request ids (SHA-256 of each envelope) are what the replies
   must cite.
2. **Transport.** All requests go out concurrently over one
   ``aiohttp.ClientSession`` (one keep-alive connection pool,
   ``TCPConnector(limit=...)``). The deadline is enforced for the fan-out as
   a whole: every per-city task runs under ``asyncio.timeout_at`` of the same
   loop-clock instant, so a slow city is cut off at the deadline and never
   holds the others back.
3. **Retries** happen only for connection failures, i.e. the connection was
   refused or reset before any response arrived
   (``aiohttp.ClientConnectionError``), with exponential backoff plus jitter,
   at most ``max_attempts`` times and only while the deadline leaves room for
   the backoff. The *same* envelope bytes are re-sent: if a reset request did
   reach the node, the node's replay guard answers ``REPLAYED`` rather than
   answering twice, and the evidence holds exactly one request per city.
4. **Verification** as replies arrive: each reply is opened with
   :func:`hansa.crypto.open_envelope` against that city's node key only, and
   must cite the request id sent to that city, name the city as responder
   and our principal as requester. With more than
   :data:`VERIFY_THREAD_THRESHOLD` targets the checks run in a
   ``ThreadPoolExecutor`` (libsodium releases the GIL, so signatures are
   checked on every core while the event loop keeps reading sockets); below
   it, a thread hand-off costs more than the check itself (see the constant).
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
import random
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

import aiohttp

from hansa.crypto import PublicKey, SigningKey, open_envelope, seal
from hansa.federation.combine import CombinedResult, combine_answers
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
    "ReplyVerdict",
    "Target",
    "fan_out",
    "verify_reply",
]

ENVELOPE_MEDIA_TYPE: Final = "application/vnd.hansa.envelope+msgpack"
"""Content type of a signed envelope (spec §8). The node defines the same
constant in ``hansa.node.app``; it is repeated here because federation may not
import node (layering), and a test checks that the two agree."""

QUERY_PATH: Final = "/v1/query"
"""The node's query route, appended to a target's endpoint."""

VERIFY_THREAD_THRESHOLD: Final = 32
"""Verify replies in a thread pool only above this many targets.

Measured on the shared 2-core development machine (Python 3.11, PyNaCl) with
``verify_reply`` on a one-cell answer: about 51 µs per reply on the event loop.
A burst of n checks through a 2-thread ``ThreadPoolExecutor`` against the same
checks inline: n = 8: 0.57 vs 0.42 ms (the hand-off loses); n = 32: 1.44 vs
1.64 ms (break-even); n = 128: 6.1 vs 6.5 ms; n = 512: 25.7 vs 26.1 ms. On two
busy cores the pool gains little wall time, but above the break-even it takes
the signature checks off the event loop (libsodium releases the GIL), so
sockets keep being read while replies are verified; with more cores it also
spreads the work. ``bench/fanout.py`` (issue 4) is where this is re-measured.
"""

DEFAULT_CONNECTION_LIMIT: Final = 512
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
        city: the city id (the request's audience).
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
        request: the sealed request envelope sent to this city.
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
    must also fit ``query`` (checked with ``combine_answers`` on its own).

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
        combine_answers(query, (reply,))
    except HansaError as exc:
        return ReplyVerdict(CityStatus.PROTOCOL_ERROR, exc.code, _one_line(exc.message))
    return ReplyVerdict(CityStatus.ANSWERED, None, reply.decision.value, reply)


class _BodyTooLarge(Exception):
    pass


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    declared = resp.content_length
    if declared is not None and declared > limit:
        raise _BodyTooLarge(f"reply declares {declared} bytes, over the limit of {limit}")
    parts: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge(f"reply exceeds the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


@dataclass(slots=True)
class _Job:
    """One city's request and the shared context it runs in."""

    target: Target
    envelope: bytes
    request_id: bytes


class _Coordinator:
    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        deadline: float,
        requester: str,
        query: Query,
        executor: ThreadPoolExecutor | None,
        max_attempts: int,
        on_status: Callable[[CityResult], None] | None,
    ) -> None:
        self.session = session
        self.deadline = deadline
        self.requester = requester
        self.query = query
        self.executor = executor
        self.max_attempts = max_attempts
        self.on_status = on_status

    async def run(self, job: _Job) -> CityResult:
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempts = 0
        last_failure: str | None = None

        def done(
            status: CityStatus,
            code: ErrorCode | None,
            detail: str,
            reply: bytes | None = None,
            answer: QueryAnswer | None = None,
        ) -> CityResult:
            result = CityResult(
                city=job.target.city,
                status=status,
                code=code,
                reply=reply,
                request=job.envelope,
                latency_ms=(loop.time() - started) * 1000.0,
                detail=detail,
                answer=answer,
                attempts=attempts,
            )
            if self.on_status is not None:
                try:
                    self.on_status(result)
                except Exception:  # a display must not break the fan-out
                    log.exception("on_status callback failed for %s", job.target.city)
            return result

        try:
            async with asyncio.timeout_at(self.deadline):
                while True:
                    attempts += 1
                    try:
                        status, body = await self._post(job)
                    except aiohttp.ClientConnectionError as exc:
                        # Refused or reset before a response (spec: retry only these).
                        last_failure = _one_line(str(exc) or type(exc).__name__)
                        delay = BACKOFF_BASE_S * 2 ** (attempts - 1)
                        delay *= 1.0 + random.random() / 2  # noqa: S311 (jitter, not secrets)
                        if attempts >= self.max_attempts or loop.time() + delay >= self.deadline:
                            return done(
                                CityStatus.UNREACHABLE,
                                None,
                                f"connection failed after {attempts} attempt(s): {last_failure}",
                            )
                        await asyncio.sleep(delay)
                        continue
                    except _BodyTooLarge as exc:
                        return done(CityStatus.PROTOCOL_ERROR, ErrorCode.TOO_LARGE, str(exc))
                    except aiohttp.ClientError as exc:
                        return done(
                            CityStatus.PROTOCOL_ERROR,
                            None,
                            f"bad HTTP reply: {_one_line(str(exc) or type(exc).__name__)}",
                        )
                    except Exception as exc:
                        # Never lose a city to an unforeseen failure: it gets a status too.
                        log.exception("unexpected failure asking %s", job.target.city)
                        return done(
                            CityStatus.PROTOCOL_ERROR,
                            None,
                            f"unexpected failure: {_one_line(str(exc) or type(exc).__name__)}",
                        )
                    verdict = await self._check(job, status, body)
                    keep = verdict.status in (CityStatus.ANSWERED, CityStatus.REFUSED)
                    return done(
                        verdict.status,
                        verdict.code,
                        verdict.detail,
                        body if keep else None,
                        verdict.answer,
                    )
        except TimeoutError:
            if last_failure is not None:
                return done(
                    CityStatus.UNREACHABLE,
                    None,
                    f"connection failed until the deadline ({attempts} attempt(s)): {last_failure}",
                )
            return done(CityStatus.TIMEOUT, None, "no reply before the deadline")

    async def _post(self, job: _Job) -> tuple[int, bytes]:
        url = job.target.endpoint.rstrip("/") + QUERY_PATH
        async with self.session.post(
            url, data=job.envelope, headers={"Content-Type": ENVELOPE_MEDIA_TYPE}
        ) as resp:
            return resp.status, await _read_limited(resp, MAX_ENVELOPE_SIZE)

    async def _check(self, job: _Job, status: int, body: bytes) -> ReplyVerdict:
        def check() -> ReplyVerdict:
            return verify_reply(
                status,
                body,
                target=job.target,
                request_id=job.request_id,
                requester=self.requester,
                query=self.query,
            )

        if self.executor is None:
            return check()
        return await asyncio.get_running_loop().run_in_executor(self.executor, check)


def _check_inputs(targets: Sequence[Target], quorum: int, deadline_s: float) -> None:
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
    if not deadline_s > 0:  # also refuses NaN
        raise ProtocolError("the deadline must be positive", ErrorCode.INVALID_FIELD)


def _requests(
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
) -> list[_Job]:
    cities = tuple(t.city for t in targets)
    jobs = []
    for target in targets:
        try:
            request = QueryRequest(
                requester=requester,
                audience=target.city,
                issued_at=issued_at,
                expires_at=expires_at,
                nonce=secrets.token_bytes(16),
                roster_version=roster_version,
                policy=policy,
                query=query,
                targets=cities,
                quorum=quorum,
            )
        except ValueError as exc:
            raise ProtocolError(str(exc), ErrorCode.INVALID_FIELD) from exc
        envelope = seal(request, signer)
        jobs.append(_Job(target, envelope, message_id(envelope)))
    return jobs


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
    session: aiohttp.ClientSession | None = None,
    on_status: Callable[[CityResult], None] | None = None,
    now_ms: Callable[[], int] = _wall_ms,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    connection_limit: int = DEFAULT_CONNECTION_LIMIT,
    verify_threads: int | None = None,
) -> FanOutResult:
    """Send one signed query to every target city and combine the answers.

    Args:
        query: the aggregate query.
        policy: purpose, legal basis, scope and analyst (signed in every request).
        targets: the cities to ask (unique city ids; signed, in this order,
            in every request).
        signer: the analyst's signing key.
        requester: the principal the key speaks for.
        quorum: how many cities must answer for a combined result (signed).
        deadline_s: the whole fan-out's time budget in seconds; also the
            requests' validity (``expires_at = issued_at + deadline``).
        roster_version: the roster version the targets were taken from.
        session: an ``aiohttp.ClientSession`` to reuse (the caller owns it);
            when ``None`` one is created with a keep-alive
            ``TCPConnector(limit=connection_limit)`` and closed afterwards.
        on_status: called on the event loop with each city's result as soon
            as it is known (for a live display); its exceptions are logged.
        now_ms: the wall clock in integer ms since the epoch.
        max_attempts: attempts per city on connection failures (>= 1).
        connection_limit: size of the pool created when ``session`` is None.
        verify_threads: verification threads when there are more than
            :data:`VERIFY_THREAD_THRESHOLD` targets (``None``: one per core).

    Returns:
        The :class:`FanOutResult`: every target with its status, the verified
        answers, and the combined result if the quorum was met.

    Raises:
        ProtocolError: ``INVALID_FIELD`` for no or duplicate targets, a quorum
            outside ``1..len(targets)``, a non-positive deadline, or a request
            that breaks the schema (the request is checked before it is signed).
    """
    _check_inputs(targets, quorum, deadline_s)
    if max_attempts < 1:
        raise ProtocolError("max_attempts must be >= 1", ErrorCode.INVALID_FIELD)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    issued_at = now_ms()
    expires_at = issued_at + max(1, round(deadline_s * 1000))
    jobs = _requests(
        query,
        policy,
        targets,
        signer=signer,
        requester=requester,
        quorum=quorum,
        roster_version=roster_version,
        issued_at=issued_at,
        expires_at=expires_at,
    )
    executor = None
    if len(targets) > VERIFY_THREAD_THRESHOLD:
        workers = verify_threads if verify_threads is not None else (os.cpu_count() or 1)
        executor = ThreadPoolExecutor(
            max_workers=max(1, workers), thread_name_prefix="hansa-verify"
        )
    own_session = session is None
    if session is None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connection_limit, limit_per_host=0),
            # The deadline is enforced by the coordinator, not per request.
            timeout=aiohttp.ClientTimeout(total=None),
        )
    try:
        coordinator = _Coordinator(
            session=session,
            deadline=deadline,
            requester=requester,
            query=query,
            executor=executor,
            max_attempts=max_attempts,
            on_status=on_status,
        )
        results = tuple(await asyncio.gather(*(coordinator.run(job) for job in jobs)))
    finally:
        if own_session:
            await session.close()
        if executor is not None:
            # A check still running past the deadline finishes on its own.
            executor.shutdown(wait=False, cancel_futures=True)
    answers = tuple(r.answer for r in results if r.answer is not None)
    quorum_met = len(answers) >= quorum
    combined: CombinedResult | None = None
    reason: str | None = None
    if not quorum_met:
        reason = f"quorum not met: {len(answers)} of {quorum} required cities answered"
    else:
        try:
            combined = combine_answers(query, answers)
        except HansaError as exc:
            reason = f"the answers could not be combined: {_one_line(exc.message)}"
    return FanOutResult(
        query=query,
        targets=tuple(t.city for t in targets),
        quorum=quorum,
        issued_at=issued_at,
        expires_at=expires_at,
        cities=results,
        answers=answers,
        quorum_met=quorum_met,
        combined=combined,
        reason=reason,
    )
