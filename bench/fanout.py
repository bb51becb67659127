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
* **raw** (for scale, not part of the goal): the same bytes over bare asyncio
  connections with a minimal HTTP/1.1 reader (:class:`RawHttp`), no aiohttp,
  no verification: the transport floor of this machine, which tells how much
  of the naive client's time is aiohttp's own.

Both are timed in two session modes: **cold** (each fan-out opens and closes
its own session, so every city costs a TCP connect: the ``hansa query``
command line) and **warm** (each client reuses one keep-alive session across
runs, after a warm-up: a notebook or a node fanning out repeatedly).
Goal (issue 4): hansa's overhead per peer at most 0.5x the naive client's at
N = 500.

Peers
-----
``--peer-procs`` separate processes (default 2, the cores of the development
machine) run ``bench/_peers.py``: one aiohttp server each on uvloop, with one
127.0.0.1 port per city. Distinct ports, not paths on one port, because real
cities are distinct hosts: the coordinator must open and keep one connection
per city, which is exactly the cost a fan-out pays.

Pre-signed answers
------------------
A reply must cite the SHA-256 of the exact request envelope, and ``fan_out``
draws a fresh 16-byte nonce per request, so no answer could be signed in
advance. The benchmark therefore makes the requests reproducible: it passes a
fixed ``now_ms`` (a public parameter) and swaps the module's nonce source
(``hansa.federation.fanout.secrets``) for a shim handing out known nonces.
Ed25519 signing is deterministic, so ``fan_out`` then seals byte-identical
envelopes to those this file sealed beforehand; their ids are known, and every
city's answer is signed by that city's own key before timing starts. The
coordinator still does all of its work (one nonce draw is the only thing
replaced); peers do a dictionary look-up and a sleep. Every hansa run is
checked afterwards: all N cities must be ``ANSWERED`` with the quorum met, so a
drift between this file's requests and ``fan_out``'s aborts the benchmark
rather than measuring errors. (The peers do not run a replay guard, so the
same requests may be re-sent every run.) ``fan_out`` offers no entry point
for pre-sealed requests; see the report for the one proposed.

Run: ``.venv/bin/python bench/fanout.py [--n 10 100 500] [--repeats 11]
[--peer-procs 2] [--mode cold warm] [--profile]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import hashlib
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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from unittest import mock

import aiohttp
import msgspec

from hansa.crypto import SigningKey, seal
from hansa.federation import fanout
from hansa.federation.fanout import (
    DEFAULT_CONNECTION_LIMIT,
    ENVELOPE_MEDIA_TYPE,
    QUERY_PATH,
    CityStatus,
    Target,
    fan_out,
    verify_reply,
)
from hansa.protocol.envelope import message_id
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
    QueryRequest,
    ResultScope,
)

DELAY_S = 0.020
"""Every peer's delay: the slowest peer's time, subtracted from the wall time."""
DEADLINE_S = 30.0
"""Far above any run, so no city times out."""
ISSUED_AT = 1_767_225_600_000
"""The fixed ``now_ms`` that makes the requests reproducible."""
REQUESTER = "ana@bench"
ROOM_TYPES = ("Entire home/apt", "Private room", "Shared room")
GOAL_N = 500
GOAL_RATIO = 0.5
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
    """Stands in for ``secrets`` inside ``fanout``: hands out queued nonces in order."""

    def __init__(self) -> None:
        self.queue: deque[bytes] = deque()

    def load(self, n: int) -> None:
        """Queue the nonces of the fan-out to ``n`` cities, in target order."""
        self.queue = deque(nonce(n, i) for i in range(n))

    def token_bytes(self, nbytes: int) -> bytes:
        """Return the next queued nonce (``fan_out`` asks for 16 bytes per city)."""
        value = self.queue.popleft()
        assert len(value) == nbytes, "fan_out changed its nonce size"
        return value


def sealed_requests(n: int) -> list[bytes]:
    """Seal the requests ``fan_out`` will seal for ``n`` cities (same bytes)."""
    cities = tuple(city_name(i) for i in range(n))
    return [
        seal(
            QueryRequest(
                requester=REQUESTER,
                audience=city,
                issued_at=ISSUED_AT,
                expires_at=ISSUED_AT + round(DEADLINE_S * 1000),
                nonce=nonce(n, i),
                roster_version=0,
                policy=POLICY,
                query=QUERY,
                targets=cities,
                quorum=n,
            ),
            ANALYST,
        )
        for i, city in enumerate(cities)
    ]


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
    """Per N: the targets and the pre-sealed requests (for the naive client)."""

    targets: dict[int, list[Target]]
    requests: dict[int, list[bytes]]
    answers: dict[int, list[bytes]]


@contextlib.contextmanager
def peers(ns: Sequence[int], procs: int) -> Iterator[Setup]:
    """Sign every answer, start the peer processes, yield the :class:`Setup`."""
    top = max(ns)
    keys = [city_key(i) for i in range(top)]
    requests = {n: sealed_requests(n) for n in ns}
    answers = {
        n: [signed_answer(i, keys[i], message_id(r)) for i, r in enumerate(reqs)]
        for n, reqs in requests.items()
    }
    by_city: list[dict[bytes, bytes]] = [{} for _ in range(top)]
    for n in ns:
        for i, (req, ans) in enumerate(zip(requests[n], answers[n], strict=True)):
            by_city[i][message_id(req)] = ans
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hansa-bench-")))
        children: list[subprocess.Popen[bytes]] = []
        for p in range(procs):
            mine = [(city_name(i), by_city[i]) for i in range(p, top, procs)]
            spec = tmp / f"peers-{p}.msgpack"
            spec.write_bytes(msgspec.msgpack.encode({"delay_s": DELAY_S, "cities": mine}))
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
        yield Setup(targets, requests, answers)


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


class Clients:
    """The two clients, in one session mode."""

    def __init__(self, setup: Setup, nonces: Nonces, warm: bool) -> None:
        self.setup = setup
        self.nonces = nonces
        self.warm = warm
        self.hansa_session: aiohttp.ClientSession | None = None
        self.naive_session: aiohttp.ClientSession | None = None
        self.raw_connections: dict[str, RawHttp] = {}

    async def __aenter__(self) -> Clients:
        if self.warm:
            self.hansa_session = new_session()
            self.naive_session = new_session()
        return self

    async def __aexit__(self, *_: object) -> None:
        for session in (self.hansa_session, self.naive_session):
            if session is not None:
                await session.close()
        for connection in self.raw_connections.values():
            if connection.transport is not None:
                connection.transport.close()

    async def hansa(self, n: int) -> None:
        """One full fan-out with verification; checks every city answered."""
        self.nonces.load(n)
        result = await fan_out(
            QUERY,
            POLICY,
            self.setup.targets[n],
            signer=ANALYST,
            requester=REQUESTER,
            quorum=n,
            deadline_s=DEADLINE_S,
            session=self.hansa_session,
            now_ms=lambda: ISSUED_AT,
        )
        if not result.quorum_met or result.combined is None:
            bad = [c for c in result.cities if c.status is not CityStatus.ANSWERED]
            raise SystemExit(f"hansa fan-out failed at N={n}: {bad[0].city}: {bad[0].detail}")

    async def naive(self, n: int) -> None:
        """Post the same bytes with ``asyncio.gather``; read the bodies; verify nothing."""
        posts = [
            (t.endpoint + QUERY_PATH, body)
            for t, body in zip(self.setup.targets[n], self.setup.requests[n], strict=True)
        ]
        headers = {"Content-Type": ENVELOPE_MEDIA_TYPE}

        async def one(session: aiohttp.ClientSession, url: str, body: bytes) -> bytes:
            async with session.post(url, data=body, headers=headers) as resp:
                return await resp.read()

        async def run(session: aiohttp.ClientSession) -> list[bytes]:
            return await asyncio.gather(*(one(session, url, body) for url, body in posts))

        if self.naive_session is not None:
            bodies = await run(self.naive_session)
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
            *(one(t, b) for t, b in zip(self.setup.targets[n], self.setup.requests[n], strict=True))
        )
        if bodies != self.setup.answers[n]:
            raise SystemExit(f"raw client got wrong bodies at N={n}")


async def timed(fn: Callable[[int], Awaitable[None]], n: int) -> float:
    """Return the wall seconds of ``await fn(n)``."""
    gc.collect()
    t0 = time.perf_counter()
    await fn(n)
    return time.perf_counter() - t0


@dataclass(frozen=True)
class Row:
    """One line of the table (medians, in ms)."""

    mode: str
    n: int
    hansa_ms: float
    naive_ms: float
    raw_ms: float

    @property
    def ratio(self) -> float:
        """Hansa's overhead over the naive client's (= the per-peer ratio)."""
        return self.hansa_ms / self.naive_ms if self.naive_ms > 0 else float("inf")


async def measure(setup: Setup, ns: Sequence[int], modes: Sequence[str], repeats: int) -> list[Row]:
    """Time the clients per mode and N, rotating which goes first."""
    nonces = Nonces()
    rows = []
    with mock.patch.object(fanout, "secrets", nonces):
        for mode in modes:
            async with Clients(setup, nonces, warm=mode == "warm") as clients:
                for n in ns:
                    order = [clients.hansa, clients.naive, clients.raw]
                    times: list[list[float]] = [[], [], []]
                    for fn in order:  # warm-up, checks, and (warm) opens the connections
                        await fn(n)
                    for r in range(repeats):
                        for k in range(3):
                            i = (k + r) % 3
                            times[i].append(await timed(order[i], n))
                    hansa, naive, raw = ((statistics.median(t) - DELAY_S) * 1000 for t in times)
                    rows.append(Row(mode, n, hansa, naive, raw))
    return rows


def print_table(rows: Sequence[Row]) -> None:
    """Print the overhead table and the goal line."""
    print(
        f"Fan-out overhead over the slowest peer ({DELAY_S * 1000:.0f} ms), median, ms and"
        " us per peer; hansa verifies every reply, naive and raw verify nothing"
    )
    print(
        f"  {'mode':<6}{'N':>5}{'hansa':>8}{'naive':>8}{'raw':>8}"
        f"{'hansa/peer':>12}{'naive/peer':>12}{'raw/peer':>10}{'hansa/naive':>13}"
    )
    for row in rows:
        print(
            f"  {row.mode:<6}{row.n:>5}{row.hansa_ms:>8.1f}{row.naive_ms:>8.1f}{row.raw_ms:>8.1f}"
            f"{row.hansa_ms * 1000 / row.n:>12.0f}{row.naive_ms * 1000 / row.n:>12.0f}"
            f"{row.raw_ms * 1000 / row.n:>10.0f}{row.ratio:>13.2f}"
        )
    for row in rows:
        if row.n == GOAL_N:
            verdict = "met" if row.ratio <= GOAL_RATIO else "NOT met"
            print(
                f"  goal ({row.mode}): hansa per-peer overhead <= {GOAL_RATIO}x naive at"
                f" N = {GOAL_N}: ratio {row.ratio:.2f}, {verdict}"
            )


def coordinator_work(setup: Setup, n: int) -> None:
    """Print the CPU cost of the coordinator's own steps for ``n`` cities, inline."""
    targets = setup.targets[n]
    t0 = time.perf_counter()
    sealed_requests(n)
    seal_ms = (time.perf_counter() - t0) * 1000
    ids = [message_id(r) for r in setup.requests[n]]
    t0 = time.perf_counter()
    for target, rid, body in zip(targets, ids, setup.answers[n], strict=True):
        verdict = verify_reply(
            200, body, target=target, request_id=rid, requester=REQUESTER, query=QUERY
        )
        assert verdict.status is CityStatus.ANSWERED, verdict.detail
    verify_ms = (time.perf_counter() - t0) * 1000
    print(
        f"  N = {n}: on one thread, sealing the {n} requests takes {seal_ms:.1f} ms"
        f" ({seal_ms * 1000 / n:.0f} us each), verify_reply of the {n} answers"
        f" {verify_ms:.1f} ms ({verify_ms * 1000 / n:.0f} us each)"
    )


async def profile(setup: Setup, n: int, mode: str) -> None:
    """Print the top functions of one hansa fan-out to ``n`` cities (event-loop thread)."""
    nonces = Nonces()
    with mock.patch.object(fanout, "secrets", nonces):
        async with Clients(setup, nonces, warm=mode == "warm") as clients:
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
        "--mode", nargs="+", choices=("cold", "warm"), default=["cold", "warm"], help="sessions"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile hansa at the largest N")
    args = parser.parse_args()
    ns = sorted(set(args.n))
    if not ns or ns[0] < 1 or ns[-1] > MAX_TARGETS:
        parser.error(f"N must be between 1 and {MAX_TARGETS}")
    raise_fd_limit()
    started = time.perf_counter()
    with peers(ns, max(1, args.peer_procs)) as setup:

        async def go() -> None:
            rows = await measure(setup, ns, args.mode, max(1, args.repeats))
            print_table(rows)
            print("Coordinator CPU work, for scale (no network):")
            for n in ns:
                coordinator_work(setup, n)
            if args.profile:
                await profile(setup, ns[-1], args.mode[0])

        run(go)
    print(f"  ({time.perf_counter() - started:.0f} s, {args.peer_procs} peer processes)")


if __name__ == "__main__":
    main()
