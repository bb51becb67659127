"""HttpPool against aiohttp's ClientSession: CPU and wall time per request (issue 4).

What is measured
----------------
N concurrent POSTs (default 500, one ``asyncio.gather``), each to its own
127.0.0.1 port as a fan-out's cities are, each with a 300-byte body, each
answered ``200`` with a 400-byte body. Two clients, in the same process,
alternating which goes first, median of ``--repeats`` timed runs each:

* **pool**: :class:`hansa.federation.transport.HttpPool` with endpoints parsed
  once (``pool.endpoint``), as the fan-out will call it;
* **aiohttp**: one ``aiohttp.ClientSession`` with
  ``TCPConnector(limit=512, limit_per_host=0)``, URLs pre-parsed into
  ``yarl.URL`` once and the body read whole, as ``federation/fanout.py`` does
  today;
* **raw** (for scale): ``bench/fanout.py``'s ``RawHttp``, a minimal
  ``asyncio.Protocol`` reader (``Content-Length`` replies only, no limits, no
  pool, no error handling) over pre-built request bytes: the floor of this
  machine and event loop.

All check every status and body length. Two session modes: **cold** (every
run opens and closes its own pool or session, so every request pays a TCP
connect: the ``hansa query`` command line) and **warm** (one pool or session
kept across runs after a warm-up run, every request on a keep-alive
connection). For each the table gives the wall time and the client process's
CPU time (``time.process_time``), both in µs per request, and the
pool/aiohttp ratios from the same run. CPU per request is the figure that matters: the
fan-out's event loop spends it once per city.

Server
------
``--server-procs`` subprocesses (default 1: the client keeps the other core)
run this file with ``--serve``: a bare ``asyncio.Protocol`` HTTP/1.1 server
(``--server lean``, default; keep-alive, ``Content-Length`` bodies) or an
``aiohttp.web`` one (``--server aiohttp``), on uvloop, with
``--delay-ms`` (default 0) before each reply. Protocol with the parent: one
JSON line with the ports once they listen; the process exits when its stdin
closes.

Run: ``.venv/bin/python bench/transport.py [--n 500] [--repeats 11]
[--mode cold warm] [--server lean|aiohttp] [--server-procs 1] [--delay-ms 0]``.
The client runs on uvloop (as the node does) unless ``HANSA_BENCH_ASYNCIO`` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import cast

import aiohttp
import yarl
from _peers import take_request  # bench/_peers.py (this script's directory is on sys.path)
from aiohttp import web
from fanout import RawHttp, raise_fd_limit, run

from hansa.federation.transport import Endpoint, HttpPool

PATH = "/v1/query"
MEDIA_TYPE = "application/vnd.hansa.envelope+msgpack"
REQUEST_BODY = bytes(range(256)) + bytes(44)
"""300 bytes: the size of a signed one-aggregate query envelope, about."""
REPLY_BODY = bytes(400)
MAX_BODY = 4 * 1024 * 1024
LIMIT = 512


# --- server (subprocess) -----------------------------------------------------------------


class LeanServer(asyncio.Protocol):
    """One server connection: answer every complete POST with ``REPLY_BODY``."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.reply = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            MEDIA_TYPE.encode(),
            len(REPLY_BODY),
            REPLY_BODY,
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the transport."""
        self.transport = None

    def data_received(self, data: bytes) -> None:
        """Answer each complete request."""
        self.buffer += data
        while take_request(self.buffer) is not None:
            if self.delay > 0:
                asyncio.get_running_loop().call_later(self.delay, self.send)
            else:
                self.send()

    def send(self) -> None:
        """Write the reply, if the connection is still there."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.reply)


async def serve(ports: int, server: str, delay: float) -> None:
    """Listen on ``ports`` fresh ports; print them; run until stdin closes."""
    loop = asyncio.get_running_loop()
    found: list[int] = []
    runner: web.AppRunner | None = None
    if server == "aiohttp":

        async def handle(request: web.Request) -> web.Response:
            await request.read()
            if delay > 0:
                await asyncio.sleep(delay)
            return web.Response(body=REPLY_BODY, content_type=MEDIA_TYPE)

        app = web.Application()
        app.router.add_post(PATH, handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for _ in range(ports):
            await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
        found.extend(a[1] for a in runner.addresses if isinstance(a, tuple))
    else:
        for _ in range(ports):
            srv = await loop.create_server(lambda: LeanServer(delay), "127.0.0.1", 0, backlog=1024)
            found.append(srv.sockets[0].getsockname()[1])
    print(json.dumps(found), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    if runner is not None:
        await runner.cleanup()


# --- client ------------------------------------------------------------------------------


Client = Callable[[], Awaitable[None]]


class Clients:
    """The two clients in one session mode, over the same ports."""

    def __init__(self, ports: Sequence[int], warm: bool) -> None:
        self.warm = warm
        self.urls = [f"http://127.0.0.1:{port}" for port in ports]
        self.yarl_urls = [yarl.URL(url + PATH) for url in self.urls]
        self.ports = list(ports)
        self.raw_requests = [
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: %s\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (PATH.encode(), port, MEDIA_TYPE.encode(), len(REQUEST_BODY), REQUEST_BODY)
            for port in ports
        ]
        self.endpoints: list[Endpoint] = []
        self.warm_pool: HttpPool | None = None
        self.warm_session: aiohttp.ClientSession | None = None
        self.raw_connections: dict[int, RawHttp] = {}

    async def __aenter__(self) -> Clients:
        if self.warm:
            self.warm_pool = HttpPool(limit=LIMIT)
            self.warm_session = new_session()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.warm_pool is not None:
            await self.warm_pool.close()
        if self.warm_session is not None:
            await self.warm_session.close()
        for conn in self.raw_connections.values():
            if conn.transport is not None:
                conn.transport.close()

    async def pool(self) -> None:
        """One round over HttpPool."""
        pool = self.warm_pool if self.warm_pool is not None else HttpPool(limit=LIMIT)
        try:
            endpoint = pool.endpoint

            async def one(url: str) -> None:
                resp = await pool.post(
                    endpoint(url), PATH, REQUEST_BODY, MEDIA_TYPE, max_body=MAX_BODY
                )
                check(resp.status, resp.body)

            await asyncio.gather(*(one(url) for url in self.urls))
        finally:
            if pool is not self.warm_pool:
                await pool.close()

    async def aiohttp(self) -> None:
        """One round over aiohttp.ClientSession."""
        session = self.warm_session if self.warm_session is not None else new_session()
        headers = {"Content-Type": MEDIA_TYPE}
        try:

            async def one(url: yarl.URL) -> None:
                async with session.post(url, data=REQUEST_BODY, headers=headers) as resp:
                    check(resp.status, await resp.read())

            await asyncio.gather(*(one(url) for url in self.yarl_urls))
        finally:
            if session is not self.warm_session:
                await session.close()

    async def raw(self) -> None:
        """One round over bare RawHttp connections (warm: one kept per port)."""
        loop = asyncio.get_running_loop()

        async def one(port: int, request: bytes) -> None:
            conn = self.raw_connections.get(port)
            if conn is None or conn.transport is None:
                _, conn = await loop.create_connection(RawHttp, "127.0.0.1", port)
                if self.warm:
                    self.raw_connections[port] = conn
            try:
                check(200, await conn.post(request))
            finally:
                if not self.warm and conn.transport is not None:
                    conn.transport.close()

        await asyncio.gather(
            *(one(port, req) for port, req in zip(self.ports, self.raw_requests, strict=True))
        )

    def all(self) -> dict[str, Client]:
        """The clients by name, in table order."""
        return {"pool": self.pool, "aiohttp": self.aiohttp, "raw": self.raw}


def new_session() -> aiohttp.ClientSession:
    """A session like the one ``federation/fanout.py`` makes for itself."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=LIMIT, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=None),
    )


def check(status: int, body: bytes) -> None:
    """Abort on any reply but the expected one (never time errors)."""
    if status != 200 or len(body) != len(REPLY_BODY):
        raise SystemExit(f"unexpected reply {status} with {len(body)} bytes")


@dataclass(frozen=True)
class Row:
    """Medians of one mode, µs per request, per client."""

    mode: str
    n: int
    wall_us: dict[str, float]
    cpu_us: dict[str, float]


async def measure(ports: Sequence[int], modes: Sequence[str], repeats: int) -> list[Row]:
    """Time both clients per mode, alternating which goes first."""
    rows = []
    n = len(ports)
    for mode in modes:
        async with Clients(ports, mode == "warm") as clients:
            named = clients.all()
            order = list(named.values())
            for fn in order:  # warm-up, and (warm) opens the connections
                await fn()
            walls: list[list[float]] = [[] for _ in order]
            cpus: list[list[float]] = [[] for _ in order]
            for r in range(repeats):
                for k in range(len(order)):
                    i = (k + r) % len(order)
                    gc.collect()
                    cpu0, t0 = time.process_time(), time.perf_counter()
                    await order[i]()
                    walls[i].append(time.perf_counter() - t0)
                    cpus[i].append(time.process_time() - cpu0)
            rows.append(
                Row(
                    mode,
                    n,
                    {
                        name: statistics.median(w) * 1e6 / n
                        for name, w in zip(named, walls, strict=True)
                    },
                    {
                        name: statistics.median(c) * 1e6 / n
                        for name, c in zip(named, cpus, strict=True)
                    },
                )
            )
    return rows


def print_rows(rows: Sequence[Row]) -> None:
    """Print the table: µs per request and the pool/aiohttp ratios."""
    print(
        "HttpPool vs aiohttp.ClientSession: N concurrent POSTs, median of the timed runs,"
        " us per request (wall, and CPU of the client process)"
    )
    print(
        f"  {'mode':<6}{'N':>5}{'pool wall':>11}{'aio wall':>10}{'raw wall':>10}{'pool/aio':>10}"
        f"{'pool cpu':>10}{'aio cpu':>9}{'raw cpu':>9}{'pool/aio':>10}"
    )
    for row in rows:
        w, c = row.wall_us, row.cpu_us
        print(
            f"  {row.mode:<6}{row.n:>5}{w['pool']:>11.1f}{w['aiohttp']:>10.1f}{w['raw']:>10.1f}"
            f"{w['pool'] / w['aiohttp']:>10.2f}{c['pool']:>10.1f}{c['aiohttp']:>9.1f}"
            f"{c['raw']:>9.1f}{c['pool'] / c['aiohttp']:>10.2f}"
        )


def start_servers(
    n: int, procs: int, server: str, delay_ms: float
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """Start ``procs`` server processes sharing ``n`` ports; return them and the ports."""
    children = []
    ports: list[int] = []
    for p in range(procs):
        count = len(range(p, n, procs))
        child = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                str(count),
                "--server",
                server,
                "--delay-ms",
                str(delay_ms),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        children.append(child)
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            raise SystemExit("a server process failed to start")
        ports.extend(json.loads(line))
    return children, ports


def stop(child: subprocess.Popen[bytes]) -> None:
    """Close the child's stdin and wait for it."""
    assert child.stdin is not None
    child.stdin.close()
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=500, help="concurrent requests (and ports)")
    parser.add_argument("--repeats", type=int, default=11, help="timed runs per client (median)")
    parser.add_argument(
        "--mode", nargs="+", choices=("cold", "warm"), default=["cold", "warm"], help="sessions"
    )
    parser.add_argument("--server", choices=("lean", "aiohttp"), default="lean")
    parser.add_argument("--server-procs", type=int, default=1)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="server delay per reply")
    parser.add_argument("--serve", type=int, metavar="PORTS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_fd_limit()
    if args.serve is not None:
        run(lambda: serve(args.serve, args.server, args.delay_ms / 1000))
        return
    if args.n < 1:
        parser.error("N must be positive")
    started = time.perf_counter()
    children, ports = start_servers(args.n, max(1, args.server_procs), args.server, args.delay_ms)
    try:

        async def go() -> None:
            print_rows(await measure(ports, args.mode, max(1, args.repeats)))

        run(go)
    finally:
        for child in children:
            stop(child)
    loop = "asyncio" if os.environ.get("HANSA_BENCH_ASYNCIO") else "uvloop"
    print(
        f"  ({time.perf_counter() - started:.0f} s, {args.server} server in"
        f" {args.server_procs} process(es), delay {args.delay_ms} ms, client on {loop})"
    )


if __name__ == "__main__":
    main()
