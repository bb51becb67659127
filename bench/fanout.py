"""Fan-out coordinator overhead over the slowest peer (issue 4).

What is measured
----------------
For N peers (default 10, 100, 500), each delaying 20 ms, the wall time of one
fan-out minus the 20 ms of the slowest peer is the *overhead*; divided by N it
is the overhead per peer. The clients run in the same process, alternating,
median of ``--repeats`` timed runs each (the order rotates every run):

* **hansa**: :func:`hansa.federation.fanout.fan_out` as an analyst calls it:
  it builds and signs one request per city, posts them, verifies every reply's
  Ed25519 signature, request id, responder and requester, checks the answer
  fits the query, and combines the answers. Nothing is skipped.
* **naive**: ``asyncio.gather`` over one ``aiohttp.ClientSession`` that posts
  the same pre-sealed request bytes to the same URLs and reads the bodies: no
  signing, no verification, no decoding. It gets the same connection limit as
  hansa (``TCPConnector(limit=512, limit_per_host=0)``); aiohttp's default
  limit of 100 would serialise N = 500 into five waves and flatter hansa.
* **prepared** (for scale): :func:`~hansa.federation.fanout.send_prepared`
  with requests signed before the clock starts by
  :func:`~hansa.federation.fanout.prepare_requests`: the coordinator minus
  signing (everything else as hansa).
* **unchecked** (for scale, not part of the goal): hansa with libsodium's
  Ed25519 check replaced by "valid" for the duration of its fan-outs, and
  nothing else changed (every reply is still parsed, decoded, matched to its
  request and combined): what the coordinator costs here without the
  signature checks, so how much of hansa's overhead they are on this machine.
* **inline** (only with ``--inline``): hansa with ``verify_threads=0``, all
  signing and verification on the event loop, for an A/B of the thread pool.
* **old** (only with ``--old PATH``): the ``fan_out`` of another copy of
  ``federation/fanout.py`` (for example the previous commit's, saved under
  ``/tmp``), loaded as its own module, for an A/B in the same run.
* **raw** (for scale, not part of the goal): the same bytes over bare asyncio
  connections with a minimal HTTP/1.1 reader (:class:`RawHttp`), no aiohttp,
  no verification: the transport floor of this machine, which tells how much
  of the naive client's time is aiohttp's own.

Every client is timed in two session modes: **cold** (each fan-out opens and closes
its own session, so every city costs a TCP connect: the ``hansa query``
command line) and **warm** (each client reuses one keep-alive session across
runs, after a warm-up: a notebook or a node fanning out repeatedly).
Goal (issue 4): hansa's overhead per peer at most 0.5x the naive client's at
N = 500.

Peers
-----
``--peer-procs`` separate processes (default 2, the cores of the development
machine) run ``bench/_peers.py``: one server each on uvloop, with one
127.0.0.1 port per city. Distinct ports, not paths on one port, because real
cities are distinct hosts: the coordinator must open and keep one connection
per city, which is exactly the cost a fan-out pays. ``--peer-server lean``
(the default) is a bare ``asyncio.Protocol`` HTTP/1.1 server and
``--peer-server aiohttp`` an ``aiohttp.web`` one: the peers run on the
coordinator's cores, so the cheaper they are the more of the machine the
clients being measured get (real cities run elsewhere).

Pre-signed answers
------------------
A reply must cite the SHA-256 of the exact request envelope, and the requests
carry a fresh 16-byte nonce each, so an answer can only be signed in advance
when the nonces are known. ``fan_out`` and ``prepare_requests`` take a
``nonce_source`` and ``now_ms``/``issued_at`` (public parameters): the
benchmark passes a fixed time and a source handing out known nonces in
target order. Ed25519 signing is deterministic, so ``fan_out`` then seals
byte-identical envelopes to those ``prepare_requests`` sealed beforehand;
their ids are known, and every city's answer is signed by that city's own
key before timing starts. The coordinator still does all of its work; peers
do a dictionary look-up and a sleep. Every hansa run is checked afterwards:
all N cities must be ``ANSWERED`` with the quorum met, so a drift between the
pre-signed requests and ``fan_out``'s aborts the benchmark rather than
measuring errors. (The peers do not run a replay guard, so the same requests
may be re-sent every run.) An ``--old`` module without ``nonce_source`` gets
the known nonces by swapping its module's ``secrets`` for the same source.

Transport comparison (``--transport-compare``)
-----------------------------------------------
Issue 4 asks to measure before choosing the transport. This mode times, in
the same run, alternating, median of ``--repeats``, cold and warm:

* **http**: each pre-sealed request envelope POSTed to ``/v1/query`` over one
  ``aiohttp.ClientSession`` with keep-alive (the transport ``fan_out`` uses);
* **ws**: one persistent aiohttp WebSocket per city (``GET /v1/ws`` on the
  peer), carrying the same envelope as one binary frame; the peer answers each
  frame after the delay with one binary frame holding the same pre-signed
  answer, and the client correlates replies by order on each connection.

Both verify every reply the same way, on the event loop, as it arrives
(:func:`~hansa.federation.fanout.verify_reply`: signature under the city's key,
request id, responder, requester, fit to the query), so the difference is the
transport alone. Cold opens (and closes) one session, and for ws one WebSocket
per city, per fan-out; warm keeps them across fan-outs. The peers run the
``aiohttp`` server here (the lean one speaks no WebSocket), for both clients.
The decision it fed is recorded in spec §10.4.

Run: ``.venv/bin/python bench/fanout.py [--n 10 100 500] [--repeats 11]
[--peer-procs 2] [--peer-server lean|aiohttp] [--mode cold warm] [--old /tmp/fanout_old.py]
[--verify-threads K] [--inline] [--profile] [--transport-compare]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import gc
import hashlib
import importlib.util
import inspect
import io
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Final, cast
from unittest import mock

import aiohttp
import msgspec

import hansa.crypto.envelope as envelope_module
from hansa.crypto import SigningKey, seal
from hansa.crypto.keys import verify_signed
from hansa.federation.fanout import (
    DEFAULT_CONNECTION_LIMIT,
    ENVELOPE_MEDIA_TYPE,
    QUERY_PATH,
    CityStatus,
    FanOutResult,
    PreparedRequest,
    Target,
    fan_out,
    prepare_requests,
    send_prepared,
    verify_reply,
)
from hansa.federation.transport import HttpPool
from hansa.protocol.envelope import decode_envelope, pae
from hansa.protocol.messages import (
    MAX_TARGETS,
    Count,
    CountState,
    Decision,
    Dimension,
    Group,
    PolicyTags,
    Query,
    QueryAnswer,
    ResultScope,
)

DELAY_S = 0.020
"""Every peer's delay: the slowest peer's time, subtracted from the wall time."""
DEADLINE_S = 30.0
"""Far above any run, so no city times out."""
ISSUED_AT = 1_767_225_600_000
"""The fixed ``now_ms`` that makes the requests reproducible."""
EXPIRES_AT = ISSUED_AT + round(DEADLINE_S * 1000)
"""What ``fan_out`` signs as ``expires_at`` for ``DEADLINE_S``."""
REQUESTER = "ana@bench"
ROOM_TYPES = ("Entire home/apt", "Private room", "Shared room")
GOAL_N = 500
GOAL_RATIO = 0.5
WS_PATH = "/v1/ws"
"""The peers' benchmark-only WebSocket route (``bench/_peers.py``)."""
WS_WORTH_IT = 0.75
"""A second transport is worth specifying only if it costs under 0.75x HTTP's overhead."""
HERE = Path(__file__).resolve().parent

QUERY = Query(dataset="listings", aggregates=(Count(),), group_by=(Dimension("room_type"),))
POLICY = PolicyTags(
    purpose="housing", legal_basis="benchmark", scope=ResultScope.ALLIANCE, analyst=REQUESTER
)
ANALYST = SigningKey(hashlib.sha256(b"bench analyst").digest())


def city_name(i: int) -> str:
    """Return the id of city ``i``."""
    return f"city-{i:04d}"


def city_key(i: int) -> SigningKey:
    """Return city ``i``'s node key (deterministic)."""
    return SigningKey(hashlib.sha256(f"bench city {i}".encode()).digest())


def nonce(n: int, i: int) -> bytes:
    """Return the nonce of the request to city ``i`` in the fan-out to ``n`` cities."""
    return hashlib.sha256(f"nonce {n} {i}".encode()).digest()[:16]


class Nonces:
    """A ``nonce_source`` handing out the known nonces of one fan-out, in target order.

    Also stands in for ``secrets`` inside an ``--old`` fanout module (its
    :meth:`token_bytes`), which has no ``nonce_source`` parameter.
    """

    def __init__(self, n: int = 0) -> None:
        self.queue: deque[bytes] = deque(nonce(n, i) for i in range(n))

    def load(self, n: int) -> Nonces:
        """Queue the nonces of the fan-out to ``n`` cities; return ``self``."""
        self.queue = deque(nonce(n, i) for i in range(n))
        return self

    def token_bytes(self, nbytes: int) -> bytes:
        """Return the next queued nonce (one fan-out asks for 16 bytes per city)."""
        value = self.queue.popleft()
        assert len(value) == nbytes, "the coordinator changed its nonce size"
        return value

    __call__ = token_bytes


def prepared_requests(targets: Sequence[Target]) -> list[PreparedRequest]:
    """Sign the requests ``fan_out`` will sign for ``targets`` (same bytes)."""
    return prepare_requests(
        QUERY,
        POLICY,
        targets,
        signer=ANALYST,
        requester=REQUESTER,
        quorum=len(targets),
        roster_version=0,
        issued_at=ISSUED_AT,
        expires_at=EXPIRES_AT,
        nonce_source=Nonces(len(targets)),
    )


def signed_answer(i: int, key: SigningKey, request_id: bytes) -> bytes:
    """Return city ``i``'s signed answer (three room-type cells) to ``request_id``."""
    answer = QueryAnswer(
        request_id=request_id,
        responder=city_name(i),
        requester=REQUESTER,
        issued_at=ISSUED_AT + 5,
        dataset=QUERY.dataset,
        dataset_version="v1",
        disclosure_version=1,
        decision=Decision.ANSWERED,
        groups=tuple(
            Group(key=(room,), states=(CountState(n=100 + i + j),))
            for j, room in enumerate(ROOM_TYPES)
        ),
    )
    return seal(answer, key)


@dataclass(frozen=True)
class Setup:
    """Per N: the targets, the pre-signed requests and the answers peers send."""

    targets: dict[int, list[Target]]
    prepared: dict[int, list[PreparedRequest]]
    answers: dict[int, list[bytes]]
    peer_pids: tuple[int, ...] = ()
    """The peer processes (their CPU time is read from ``/proc`` by ``--transport-compare``)."""

    def requests(self, n: int) -> list[bytes]:
        """The request envelopes of the fan-out to ``n`` cities (for naive and raw)."""
        return [p.envelope for p in self.prepared[n]]


@contextlib.contextmanager
def peers(ns: Sequence[int], procs: int, server: str = "lean") -> Iterator[Setup]:
    """Sign every answer, start the peer processes, yield the :class:`Setup`."""
    top = max(ns)
    keys = [city_key(i) for i in range(top)]
    # Endpoints are not signed: placeholders now, the real ports once peers listen.
    unplaced = {
        n: prepared_requests(
            [Target(city_name(i), "http://127.0.0.1:9", keys[i].public_key) for i in range(n)]
        )
        for n in ns
    }
    answers = {
        n: [signed_answer(i, keys[i], p.request_id) for i, p in enumerate(reqs)]
        for n, reqs in unplaced.items()
    }
    by_city: list[dict[bytes, bytes]] = [{} for _ in range(top)]
    for n in ns:
        for i, (req, ans) in enumerate(zip(unplaced[n], answers[n], strict=True)):
            by_city[i][req.request_id] = ans
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hansa-bench-")))
        children: list[subprocess.Popen[bytes]] = []
        for p in range(procs):
            mine = [(city_name(i), by_city[i]) for i in range(p, top, procs)]
            spec = tmp / f"peers-{p}.msgpack"
            spec.write_bytes(
                msgspec.msgpack.encode({"delay_s": DELAY_S, "cities": mine, "server": server})
            )
            child = subprocess.Popen(
                [sys.executable, str(HERE / "_peers.py"), str(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            children.append(child)
            stack.callback(_stop, child)
        ports: dict[str, int] = {}
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            if not line:
                raise SystemExit("a peer process failed to start")
            ports.update(json.loads(line))
        targets = {
            n: [
                Target(city_name(i), f"http://127.0.0.1:{ports[city_name(i)]}", keys[i].public_key)
                for i in range(n)
            ]
            for n in ns
        }
        prepared = {
            n: [
                dataclasses.replace(p, target=t)
                for p, t in zip(unplaced[n], targets[n], strict=True)
            ]
            for n in ns
        }
        yield Setup(targets, prepared, answers, tuple(c.pid for c in children))


def _stop(child: subprocess.Popen[bytes]) -> None:
    assert child.stdin is not None
    child.stdin.close()
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def raise_fd_limit() -> None:
    """Raise the soft open-file limit to the hard limit (N = 500 needs ~1,000 sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def new_session() -> aiohttp.ClientSession:
    """A session like the one ``fan_out`` makes for itself."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=DEFAULT_CONNECTION_LIMIT, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=None),
    )


class RawHttp(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive client connection: the transport floor.

    One request at a time, replies with ``Content-Length`` only, no
    verification: what the bare sockets cost on this machine, to tell how
    much of the naive client's time is aiohttp's own.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail a pending request."""
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError("peer closed"))

    def data_received(self, data: bytes) -> None:
        """Complete the pending request once its whole body is in."""
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if not head.startswith(b"http/1.1 200") or at < 0:
            raise SystemExit(f"raw client: unexpected reply {head[:80]!r}")
        stop = head.find(b"\r\n", at + 2)
        size = int(head[at + 17 : stop if stop > 0 else len(head)])
        if len(self.buffer) < end + 4 + size:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + size])
        del self.buffer[: end + 4 + size]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(body)

    async def post(self, request: bytes) -> bytes:
        """Send one pre-built request; return the reply body."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


def load_old(path: Path) -> ModuleType:
    """Import another copy of ``federation/fanout.py`` as its own module (for an A/B)."""
    spec = importlib.util.spec_from_file_location("hansa_bench_old_fanout", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


Client = Callable[[int], Awaitable[None]]


_CHECK: Final = "verify_signed"
"""The libsodium check ``open_envelope`` calls, swapped out by the ``unchecked`` client."""


def _valid(public_key: bytes, signed: bytes) -> bool:
    """Stands in for libsodium's check in the ``unchecked`` client: no computation."""
    return True


class Clients:
    """The clients, in one session mode."""

    def __init__(
        self,
        setup: Setup,
        warm: bool,
        old: ModuleType | None,
        verify_threads: int | None,
        inline: bool = False,
    ) -> None:
        self.setup = setup
        self.warm = warm
        self.old = old
        self.verify_threads = verify_threads
        self.with_inline = inline
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self.pools: dict[str, HttpPool] = {}
        self.raw_connections: dict[str, RawHttp] = {}

    def all(self) -> dict[str, Client]:
        """The clients by name, in table order."""
        clients: dict[str, Client] = {
            "hansa": self.hansa,
            "prepared": self.prepared,
            "unchecked": self.unchecked,
        }
        if self.with_inline:
            clients["inline"] = self.inline
        if self.old is not None:
            clients["old"] = self.old_hansa
        clients["naive"] = self.naive
        clients["raw"] = self.raw
        return clients

    def session(self, name: str) -> aiohttp.ClientSession | None:
        """The client's own warm session (``None`` when cold: it makes its own)."""
        if not self.warm:
            return None
        if name not in self.sessions:
            self.sessions[name] = new_session()
        return self.sessions[name]

    def pool(self, name: str) -> HttpPool | None:
        """The Hansa client's own warm pool (``None`` when cold: it makes its own)."""
        if not self.warm:
            return None
        if name not in self.pools:
            self.pools[name] = HttpPool(limit=DEFAULT_CONNECTION_LIMIT)
        return self.pools[name]

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, *_: object) -> None:
        for session in self.sessions.values():
            await session.close()
        for pool in self.pools.values():
            await pool.close()
        for connection in self.raw_connections.values():
            if connection.transport is not None:
                connection.transport.close()

    @staticmethod
    def check(name: str, n: int, result: FanOutResult) -> None:
        """Abort unless every city answered and the answers combined."""
        if not result.quorum_met or result.combined is None:
            bad = [c for c in result.cities if c.status is not CityStatus.ANSWERED]
            raise SystemExit(f"{name} fan-out failed at N={n}: {bad[0].city}: {bad[0].detail}")

    async def _fan_out(self, name: str, n: int, verify_threads: int | None) -> None:
        result = await fan_out(
            QUERY,
            POLICY,
            self.setup.targets[n],
            signer=ANALYST,
            requester=REQUESTER,
            quorum=n,
            deadline_s=DEADLINE_S,
            pool=self.pool(name),
            now_ms=lambda: ISSUED_AT,
            nonce_source=Nonces(n),
            verify_threads=verify_threads,
        )
        self.check(name, n, result)

    async def hansa(self, n: int) -> None:
        """One full fan-out (sign, send, verify, combine); checks every city answered."""
        await self._fan_out("hansa", n, self.verify_threads)

    async def unchecked(self, n: int) -> None:
        """As :meth:`hansa`, with every Ed25519 check answering "valid" (for scale)."""
        real = getattr(envelope_module, _CHECK)
        setattr(envelope_module, _CHECK, _valid)
        try:
            await self._fan_out("unchecked", n, self.verify_threads)
        finally:
            setattr(envelope_module, _CHECK, real)

    async def inline(self, n: int) -> None:
        """As :meth:`hansa`, but everything on the event loop (``verify_threads=0``)."""
        await self._fan_out("inline", n, 0)

    async def prepared(self, n: int) -> None:
        """``send_prepared`` of requests signed before the clock started."""
        result = await send_prepared(
            self.setup.prepared[n],
            deadline_s=DEADLINE_S,
            pool=self.pool("prepared"),
            verify_threads=self.verify_threads,
        )
        self.check("prepared", n, result)

    async def old_hansa(self, n: int) -> None:
        """The ``--old`` module's ``fan_out`` with the known nonces.

        Passed as ``nonce_source`` when that ``fan_out`` takes one, else by
        swapping the module's ``secrets`` for the same source.
        """
        assert self.old is not None
        nonces = Nonces(n)
        extra: dict[str, object] = {}
        if "nonce_source" in inspect.signature(self.old.fan_out).parameters:
            extra["nonce_source"] = nonces
        with mock.patch.object(self.old, "secrets", nonces):
            result = await self.old.fan_out(
                QUERY,
                POLICY,
                self.setup.targets[n],
                signer=ANALYST,
                requester=REQUESTER,
                quorum=n,
                deadline_s=DEADLINE_S,
                session=self.session("old"),
                now_ms=lambda: ISSUED_AT,
                **extra,
            )
        if not result.quorum_met or result.combined is None:
            raise SystemExit(f"old fan-out failed at N={n}")

    async def naive(self, n: int) -> None:
        """Post the same bytes with ``asyncio.gather``; read the bodies; verify nothing."""
        posts = [
            (t.endpoint + QUERY_PATH, body)
            for t, body in zip(self.setup.targets[n], self.setup.requests(n), strict=True)
        ]
        headers = {"Content-Type": ENVELOPE_MEDIA_TYPE}

        async def one(session: aiohttp.ClientSession, url: str, body: bytes) -> bytes:
            async with session.post(url, data=body, headers=headers) as resp:
                return await resp.read()

        async def run(session: aiohttp.ClientSession) -> list[bytes]:
            return await asyncio.gather(*(one(session, url, body) for url, body in posts))

        warm = self.session("naive")
        if warm is not None:
            bodies = await run(warm)
        else:
            async with new_session() as session:
                bodies = await run(session)
        if bodies != self.setup.answers[n]:
            raise SystemExit(f"naive client got wrong bodies at N={n}")

    async def raw(self, n: int) -> None:
        """Post the same bytes over bare asyncio connections (:class:`RawHttp`)."""
        loop = asyncio.get_running_loop()

        async def one(target: Target, body: bytes) -> bytes:
            connection = self.raw_connections.get(target.city)
            if connection is None or connection.transport is None:
                port = int(target.endpoint.rsplit(":", 1)[1])
                _, connection = await loop.create_connection(RawHttp, "127.0.0.1", port)
                if self.warm:
                    self.raw_connections[target.city] = connection
            head = (
                f"POST {QUERY_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: {ENVELOPE_MEDIA_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            try:
                return await connection.post(head.encode() + body)
            finally:
                if not self.warm and connection.transport is not None:
                    connection.transport.close()

        bodies = await asyncio.gather(
            *(one(t, b) for t, b in zip(self.setup.targets[n], self.setup.requests(n), strict=True))
        )
        if bodies != self.setup.answers[n]:
            raise SystemExit(f"raw client got wrong bodies at N={n}")


async def timed(fn: Client, n: int) -> float:
    """Return the wall seconds of ``await fn(n)``."""
    gc.collect()
    t0 = time.perf_counter()
    await fn(n)
    return time.perf_counter() - t0


@dataclass(frozen=True)
class Row:
    """One line of the table: median overhead in ms per client."""

    mode: str
    n: int
    ms: dict[str, float]

    def ratio(self, name: str = "hansa") -> float:
        """A client's overhead over the naive client's (= the per-peer ratio)."""
        naive = self.ms["naive"]
        return self.ms[name] / naive if naive > 0 else float("inf")


class TransportClients:
    """The two transports of ``--transport-compare``, in one session mode.

    Both send the pre-sealed envelopes of :attr:`Setup.prepared` and verify
    every reply with :func:`verify_reply` on the event loop as it arrives.
    """

    def __init__(self, setup: Setup, warm: bool) -> None:
        self.setup = setup
        self.warm = warm
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self.sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}
        self.raw_connections: dict[str, RawHttp] = {}

    def all(self) -> dict[str, Client]:
        """The clients by name, in table order."""
        return {"http": self.http, "ws": self.ws, "raw": self.raw}

    async def __aenter__(self) -> TransportClients:
        return self

    async def __aexit__(self, *_: object) -> None:
        for ws in self.sockets.values():
            await ws.close()
        for session in self.sessions.values():
            await session.close()
        for connection in self.raw_connections.values():
            if connection.transport is not None:
                connection.transport.close()

    @contextlib.asynccontextmanager
    async def session(self, name: str) -> AsyncIterator[aiohttp.ClientSession]:
        """The client's warm session, or (cold) a new one closed afterwards."""
        if self.warm:
            if name not in self.sessions:
                self.sessions[name] = new_session()
            yield self.sessions[name]
            return
        async with new_session() as session:
            yield session

    @staticmethod
    def verified(name: str, n: int, status: int, body: bytes, request: PreparedRequest) -> None:
        """Verify one reply as ``fan_out`` does; abort the benchmark unless it answered."""
        verdict = verify_reply(
            status,
            body,
            target=request.target,
            request_id=request.request_id,
            requester=REQUESTER,
            query=QUERY,
        )
        if verdict.status is not CityStatus.ANSWERED:
            raise SystemExit(f"{name} at N={n}: {request.target.city}: {verdict.detail}")

    async def http(self, n: int) -> None:
        """POST every envelope over one keep-alive session; verify each reply."""
        headers = {"Content-Type": ENVELOPE_MEDIA_TYPE}

        async def one(session: aiohttp.ClientSession, request: PreparedRequest) -> None:
            url = request.target.endpoint + QUERY_PATH
            async with session.post(url, data=request.envelope, headers=headers) as resp:
                body = await resp.read()
                status = resp.status
            self.verified("http", n, status, body, request)

        async with self.session("http") as session:
            await asyncio.gather(*(one(session, r) for r in self.setup.prepared[n]))

    async def ws(self, n: int) -> None:
        """Send every envelope as a binary frame on the city's WebSocket; verify each reply."""

        async def one(session: aiohttp.ClientSession, request: PreparedRequest) -> None:
            city = request.target.city
            ws = self.sockets.get(city)
            if ws is None or ws.closed:
                ws = await session.ws_connect(
                    request.target.endpoint + WS_PATH,
                    compress=0,
                    autoping=True,
                    max_msg_size=4 * 1024 * 1024,
                )
                if self.warm:
                    self.sockets[city] = ws
            try:
                await ws.send_bytes(request.envelope)
                # One request in flight per connection: the next frame is its reply.
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    raise SystemExit(f"ws at N={n}: {city}: got {msg.type.name} {msg.data!r}")
                self.verified("ws", n, 200, cast(bytes, msg.data), request)
            finally:
                if not self.warm:
                    await ws.close()

        async with self.session("ws") as session:
            await asyncio.gather(*(one(session, r) for r in self.setup.prepared[n]))

    async def raw(self, n: int) -> None:
        """POST every envelope over bare keep-alive connections (:class:`RawHttp`); verify.

        For scale: HTTP/1.1 without aiohttp's client, to tell the protocol's
        cost from the library's.
        """
        loop = asyncio.get_running_loop()

        async def one(request: PreparedRequest) -> None:
            city = request.target.city
            connection = self.raw_connections.get(city)
            if connection is None or connection.transport is None:
                port = int(request.target.endpoint.rsplit(":", 1)[1])
                _, connection = await loop.create_connection(RawHttp, "127.0.0.1", port)
                if self.warm:
                    self.raw_connections[city] = connection
            head = (
                f"POST {QUERY_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: {ENVELOPE_MEDIA_TYPE}\r\n"
                f"Content-Length: {len(request.envelope)}\r\n\r\n"
            )
            try:
                body = await connection.post(head.encode() + request.envelope)
            finally:
                if not self.warm and connection.transport is not None:
                    connection.transport.close()
            self.verified("raw", n, 200, body, request)

        await asyncio.gather(*(one(r) for r in self.setup.prepared[n]))


def peer_cpu_s(pids: Sequence[int]) -> float:
    """Return the CPU seconds (user + system) the peer processes have used so far."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # not Linux, or gone: the column then reads 0
            return 0.0
        # Fields after the parenthesised command name; utime and stime are 14th and 15th.
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class TransportRow:
    """One line of the transport table, per client: median wall overhead and CPU, in ms."""

    mode: str
    n: int
    wall_ms: dict[str, float]
    cpu_ms: dict[str, float]
    """The coordinator process's CPU per fan-out (median)."""
    peer_ms: dict[str, float]
    """The peer processes' CPU per fan-out (mean over the timed runs; 10 ms ticks)."""

    def ratio(self, values: dict[str, float]) -> float:
        """ws over http for one of the three measures."""
        return values["ws"] / values["http"] if values["http"] > 0 else float("inf")


async def measure_transports(
    setup: Setup, ns: Sequence[int], modes: Sequence[str], repeats: int
) -> list[TransportRow]:
    """Time http against ws per mode and N, alternating which goes first."""
    rows = []
    for mode in modes:
        async with TransportClients(setup, mode == "warm") as clients:
            named = clients.all()
            order = list(named.values())
            for n in ns:
                walls: list[list[float]] = [[] for _ in order]
                cpus: list[list[float]] = [[] for _ in order]
                peer = [0.0 for _ in order]
                for fn in order:  # warm-up, checks, and (warm) opens the connections
                    await fn(n)
                for r in range(repeats):
                    for k in range(len(order)):
                        i = (k + r) % len(order)
                        gc.collect()
                        peer0 = peer_cpu_s(setup.peer_pids)
                        cpu0, t0 = time.process_time(), time.perf_counter()
                        await order[i](n)
                        walls[i].append(time.perf_counter() - t0)
                        cpus[i].append(time.process_time() - cpu0)
                        peer[i] += peer_cpu_s(setup.peer_pids) - peer0
                rows.append(
                    TransportRow(
                        mode,
                        n,
                        {
                            name: (statistics.median(t) - DELAY_S) * 1000
                            for name, t in zip(named, walls, strict=True)
                        },
                        {
                            name: statistics.median(t) * 1000
                            for name, t in zip(named, cpus, strict=True)
                        },
                        {name: p / repeats * 1000 for name, p in zip(named, peer, strict=True)},
                    )
                )
    return rows


def print_transports(rows: Sequence[TransportRow]) -> None:
    """Print the http/ws(/raw) table and the verdict (spec §10.4)."""
    print(
        f"Transport overhead over the slowest peer ({DELAY_S * 1000:.0f} ms), median wall, us per"
        " peer; all verify every reply (verify_reply, on the event loop). raw = HTTP/1.1 on bare"
        " asyncio connections, for scale."
    )
    print(
        "  cli/peer = CPU per fan-out of the coordinator process (median) and of the peer"
        " processes (mean, 10 ms ticks), us per peer"
    )
    print(
        f"  {'mode':<6}{'N':>5}{'http ms':>9}{'ws ms':>8}{'http/pr':>9}{'ws/pr':>7}{'raw/pr':>8}"
        f"{'ws/http':>9}{'raw/http':>9}{'cli http':>10}{'cli ws':>8}{'cli raw':>9}"
        f"{'peer http':>11}{'peer ws':>9}"
    )
    for row in rows:
        w, c, p, n = row.wall_ms, row.cpu_ms, row.peer_ms, row.n
        raw_ratio = w["raw"] / w["http"] if w["http"] > 0 else float("inf")
        print(
            f"  {row.mode:<6}{n:>5}{w['http']:>9.1f}{w['ws']:>8.1f}"
            f"{w['http'] * 1000 / n:>9.0f}{w['ws'] * 1000 / n:>7.0f}{w['raw'] * 1000 / n:>8.0f}"
            f"{row.ratio(w):>9.2f}{raw_ratio:>9.2f}"
            f"{c['http'] * 1000 / n:>10.0f}{c['ws'] * 1000 / n:>8.0f}{c['raw'] * 1000 / n:>9.0f}"
            f"{p['http'] * 1000 / n:>11.0f}{p['ws'] * 1000 / n:>9.0f}"
        )
    top = max(r.n for r in rows)
    for row in rows:
        if row.n != top:
            continue
        ratio = row.ratio(row.wall_ms)
        cheaper, by = ("ws", 1 - ratio) if ratio < 1 else ("http", 1 - 1 / ratio)
        worth = "worth" if ratio < WS_WORTH_IT else "NOT worth"
        print(
            f"  verdict ({row.mode}, N = {row.n}): {cheaper} is cheaper by {by:.0%}"
            f" (ws/http wall {ratio:.2f}, client CPU {row.ratio(row.cpu_ms):.2f});"
            f" a second transport is {worth} specifying (threshold ws/http < {WS_WORTH_IT})"
        )


async def measure(
    setup: Setup,
    ns: Sequence[int],
    modes: Sequence[str],
    repeats: int,
    old: ModuleType | None,
    verify_threads: int | None,
    inline: bool,
) -> list[Row]:
    """Time the clients per mode and N, rotating which goes first."""
    rows = []
    for mode in modes:
        async with Clients(setup, mode == "warm", old, verify_threads, inline) as clients:
            named = clients.all()
            order = list(named.values())
            for n in ns:
                times: list[list[float]] = [[] for _ in order]
                for fn in order:  # warm-up, checks, and (warm) opens the connections
                    await fn(n)
                for r in range(repeats):
                    for k in range(len(order)):
                        i = (k + r) % len(order)
                        times[i].append(await timed(order[i], n))
                rows.append(
                    Row(
                        mode,
                        n,
                        {
                            name: (statistics.median(t) - DELAY_S) * 1000
                            for name, t in zip(named, times, strict=True)
                        },
                    )
                )
    return rows


def print_table(rows: Sequence[Row]) -> None:
    """Print the overhead table and the goal line."""
    names = list(rows[0].ms)
    print(
        f"Fan-out overhead over the slowest peer ({DELAY_S * 1000:.0f} ms), median, ms and"
        " us per peer; hansa, prepared and old verify every reply, naive and raw verify nothing"
    )
    head = "".join(f"{name:>10}" for name in names)
    per_peer = "".join(f"{name[:6] + '/pr':>10}" for name in names)
    ratios = "".join(f"{name[:5] + '/nai':>10}" for name in names if name != "naive")
    print(f"  {'mode':<6}{'N':>5}{head}{per_peer}{ratios}")
    for row in rows:
        ms = "".join(f"{row.ms[name]:>10.1f}" for name in names)
        us = "".join(f"{row.ms[name] * 1000 / row.n:>10.0f}" for name in names)
        rs = "".join(f"{row.ratio(name):>10.2f}" for name in names if name != "naive")
        print(f"  {row.mode:<6}{row.n:>5}{ms}{us}{rs}")
    for row in rows:
        if row.n == GOAL_N:
            verdict = "met" if row.ratio() <= GOAL_RATIO else "NOT met"
            extra = ""
            if "old" in row.ms:
                extra = (
                    f"; old {row.ratio('old'):.2f}, hansa/old {row.ms['hansa'] / row.ms['old']:.2f}"
                )
            print(
                f"  goal ({row.mode}): hansa per-peer overhead <= {GOAL_RATIO}x naive at"
                f" N = {GOAL_N}: ratio {row.ratio():.2f}, {verdict}{extra}"
            )


def coordinator_work(setup: Setup, n: int, rows: Sequence[Row]) -> None:
    """Print the CPU cost of the coordinator's own steps for ``n`` cities, inline.

    Also what that cost alone (no transport at all) is against the naive
    client's whole overhead: the floor of the hansa/naive ratio on one core,
    and on two with perfect parallelism.
    """
    targets = setup.targets[n]
    t0 = time.perf_counter()
    prepared_requests(targets)
    seal_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    for p, body in zip(setup.prepared[n], setup.answers[n], strict=True):
        verdict = verify_reply(
            200, body, target=p.target, request_id=p.request_id, requester=REQUESTER, query=QUERY
        )
        assert verdict.status is CityStatus.ANSWERED, verdict.detail
    verify_ms = (time.perf_counter() - t0) * 1000
    signed = []
    for p, body in zip(setup.prepared[n], setup.answers[n], strict=True):
        envelope = decode_envelope(body)
        signed.append(
            (
                p.target.node_key.raw,
                envelope.signature + pae(envelope.payload_type, envelope.payload),
            )
        )
    t0 = time.perf_counter()
    for key, message in signed:
        assert verify_signed(key, message)
    ed25519_ms = (time.perf_counter() - t0) * 1000
    print(
        f"  N = {n}: on one thread, preparing (building, sealing) the {n} requests takes"
        f" {seal_ms:.1f} ms ({seal_ms * 1000 / n:.0f} us each), verify_reply of the {n}"
        f" answers {verify_ms:.1f} ms ({verify_ms * 1000 / n:.0f} us each, of which the"
        f" Ed25519 check alone {ed25519_ms * 1000 / n:.0f} us)"
    )
    crypto = seal_ms + verify_ms
    for row in rows:
        if row.n == n and row.ms["naive"] > 0:
            print(
                f"    {row.mode}: signing + verifying alone = {crypto / row.ms['naive']:.2f}x"
                f" naive's whole overhead ({crypto / 2 / row.ms['naive']:.2f}x if split"
                " perfectly over 2 cores)"
            )


async def profile(setup: Setup, n: int, mode: str, verify_threads: int | None) -> None:
    """Print the top functions of one hansa fan-out to ``n`` cities (event-loop thread)."""
    async with Clients(setup, mode == "warm", None, verify_threads) as clients:
        await clients.hansa(n)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            await clients.hansa(n)
        prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(25)
    print(f"cProfile, 3 hansa fan-outs to N = {n} ({mode}), by own time:")
    print(out.getvalue())


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` on uvloop (as the node does) unless ``HANSA_BENCH_ASYNCIO`` is set."""

    async def wrapper() -> None:
        await main()

    if os.environ.get("HANSA_BENCH_ASYNCIO"):
        asyncio.run(wrapper())
        return
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(wrapper())
    else:
        uvloop.run(wrapper())


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 500], help="peer counts")
    parser.add_argument("--repeats", type=int, default=11, help="timed runs per client (median)")
    parser.add_argument("--peer-procs", type=int, default=2, help="peer processes")
    parser.add_argument(
        "--peer-server",
        choices=("lean", "aiohttp"),
        default="lean",
        help="the peers' HTTP server (see Peers)",
    )
    parser.add_argument(
        "--mode", nargs="+", choices=("cold", "warm"), default=["cold", "warm"], help="sessions"
    )
    parser.add_argument(
        "--old", type=Path, help="another fanout.py to time as 'old' in the same run (A/B)"
    )
    parser.add_argument(
        "--verify-threads",
        type=int,
        default=None,
        help="fan_out's verify_threads (default: one per core; 0: on the event loop)",
    )
    parser.add_argument(
        "--inline",
        action="store_true",
        help="also time fan_out with verify_threads=0 ('inline': no thread pool) for an A/B",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile hansa at the largest N")
    parser.add_argument(
        "--transport-compare",
        action="store_true",
        help="time HTTP POST against one WebSocket per peer instead (aiohttp peers; spec §10.4)",
    )
    args = parser.parse_args()
    ns = sorted(set(args.n))
    if not ns or ns[0] < 1 or ns[-1] > MAX_TARGETS:
        parser.error(f"N must be between 1 and {MAX_TARGETS}")
    old = load_old(args.old) if args.old is not None else None
    raise_fd_limit()
    started = time.perf_counter()
    if args.transport_compare:
        # The lean peer server speaks no WebSocket: both transports use the aiohttp one.
        args.peer_server = "aiohttp"
        with peers(ns, max(1, args.peer_procs), args.peer_server) as setup:

            async def compare() -> None:
                print_transports(
                    await measure_transports(setup, ns, args.mode, max(1, args.repeats))
                )

            run(compare)
        print(
            f"  ({time.perf_counter() - started:.0f} s, {args.peer_procs} peer processes,"
            f" {args.peer_server} peer server)"
        )
        return
    with peers(ns, max(1, args.peer_procs), args.peer_server) as setup:

        async def go() -> None:
            rows = await measure(
                setup, ns, args.mode, max(1, args.repeats), old, args.verify_threads, args.inline
            )
            print_table(rows)
            print("Coordinator CPU work, for scale (no network):")
            for n in ns:
                coordinator_work(setup, n, rows)
            if args.profile:
                await profile(setup, ns[-1], args.mode[0], args.verify_threads)

        run(go)
    print(
        f"  ({time.perf_counter() - started:.0f} s, {args.peer_procs} peer processes,"
        f" {args.peer_server} peer server)"
    )


if __name__ == "__main__":
    main()
