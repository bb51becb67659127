"""Node throughput: signed grouped counts vs a bare aiohttp route, same client, same run.

Run: ``.venv/bin/python bench/node.py [--seconds S] [--concurrency C] [--rows N]``

Setup (not timed): a node data directory with generated listings
(``hansa.node.synthetic``), an analyst key trusted by the node, and a stock
of pre-signed ``QueryRequest`` envelopes, each with its own nonce (a grouped
count by room type). Each server runs as its own process on 127.0.0.1 and
gets the same stock (each process has its own replay cache):

* **node**: the real ``hansa node serve`` (aiohttp on uvloop). Per request
  it checks the size, verifies the Ed25519 signature strictly, decodes the
  body, checks principal, audience, time window and replay, runs the query
  in DuckDB in its thread pool, applies disclosure control and seals the
  answer (a fresh signature).
* **pipeline**: the same node application (``hansa.node.server.serve``)
  with the engine's answer memoized after the first request (valid here
  only because every request asks the same query of unchanged data): the
  node's own protocol work without DuckDB.
* **bare**: this file with ``--bare``, aiohttp on uvloop with one route that
  reads the body and returns a pre-signed answer: the cost of HTTP alone.

One client (this process, aiohttp, ``C`` connections) sends requests to
each server for ``S`` seconds after a short warm-up. The bench also times
the query engine alone (``QueryEngine.answer`` in a pool of the node's
``max_concurrent_queries`` threads, in this process, no HTTP). It prints
requests/s for each and the ratios to bare (goal: node ≥ 0.5 × bare). The
servers and the client share the machine, so absolute figures depend on it;
the ratios are the figures to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import secrets
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

from hansa.crypto import SigningKey, seal
from hansa.node._cli_node import init_node
from hansa.node.app import ENVELOPE_MEDIA_TYPE, AnswerEngine, EngineOutput
from hansa.node.config import NodeLimits, add_trusted_key, config_path, load_config, render_config
from hansa.protocol.envelope import PayloadType, decode_envelope
from hansa.protocol.messages import (
    Count,
    DatasetInfo,
    Dimension,
    PolicyTags,
    Query,
    QueryRequest,
    ResultScope,
)

CITY: Final = "benchville"
ANALYST: Final = "bench@benchville"
GOAL: Final = 0.5
QUERY: Final = Query(dataset="listings", aggregates=(Count(),), group_by=(Dimension("room_type"),))


@dataclass
class Phase:
    """One measured run against one server."""

    name: str
    requests: int
    seconds: float
    non_200: int = 0
    refusals: int = 0

    @property
    def rate(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def _request(analyst: SigningKey, now: int) -> QueryRequest:
    return QueryRequest(
        requester=ANALYST,
        audience=CITY,
        issued_at=now,
        expires_at=now + 240_000,
        nonce=secrets.token_bytes(16),
        roster_version=0,
        policy=PolicyTags(
            purpose="research",
            legal_basis="benchmark",
            scope=ResultScope.ALLIANCE,
            analyst=ANALYST,
        ),
        query=QUERY,
        targets=(CITY,),
        quorum=1,
    )


# --- servers ---------------------------------------------------------------------------


def _start(argv: Sequence[str], timeout: float = 30.0) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise TimeoutError(f"{argv[:4]} did not start")
            if selector.select(left):
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"{argv[:4]} exited with {proc.wait()}")
                buffer += chunk
    line = buffer.decode()
    return proc, line[line.index("http://") :].split()[0]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _uvloop_run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(main())
        except KeyboardInterrupt:
            pass


def _bare_server(body_file: Path) -> None:
    body = body_file.read_bytes()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type=ENVELOPE_MEDIA_TYPE)

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/v1/query", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        print(f"bare listening on http://127.0.0.1:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    _uvloop_run(serve)


class _Memo:
    """The real engine, with its first answer reused for every later request."""

    def __init__(self, inner: AnswerEngine) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._result: EngineOutput | None = None

    def answer(self, request: QueryRequest) -> EngineOutput:
        with self._lock:
            if self._result is None:
                self._result = self.inner.answer(request)
            return self._result

    def datasets(self) -> tuple[DatasetInfo, ...]:
        return self.inner.datasets()

    def reload(self) -> None:
        self.inner.reload()

    def close(self) -> None:
        self.inner.close()


def _pipeline_server(data_dir: Path) -> None:
    from hansa.node.engine import QueryEngine
    from hansa.node.server import serve

    config = load_config(data_dir)
    engine = _Memo(QueryEngine(data_dir, threads=config.limits.engine_threads))

    async def main() -> None:
        try:
            await serve(config, engine=engine)
        finally:
            engine.close()

    _uvloop_run(main)


# --- client ----------------------------------------------------------------------------


async def _hammer(
    name: str,
    url: str,
    next_body: Callable[[], bytes | None],
    concurrency: int,
    warmup: float,
    seconds: float,
) -> Phase:
    headers = {"Content-Type": ENVELOPE_MEDIA_TYPE}
    connector = aiohttp.TCPConnector(limit=concurrency)
    phase = Phase(name, 0, 0.0)
    measuring = False
    stop_at = 0.0
    exhausted = False
    refusal_type = PayloadType.QUERY_REFUSAL.value.encode()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal exhausted
        while time.perf_counter() < stop_at:
            body = next_body()
            if body is None:
                exhausted = True
                return
            async with session.post(url + "/v1/query", data=body, headers=headers) as resp:
                data = await resp.read()
            if not measuring:
                continue
            phase.requests += 1
            if resp.status != 200:
                phase.non_200 += 1
            elif refusal_type in data[:80]:
                phase.refusals += 1

    async with aiohttp.ClientSession(connector=connector) as session:
        stop_at = time.perf_counter() + warmup
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        measuring = True
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        phase.seconds = time.perf_counter() - started
    if exhausted:
        print(f"warning: {name}: ran out of pre-signed requests; raise --stock", file=sys.stderr)
    return phase


def _from_stock(stock: Sequence[bytes]) -> Callable[[], bytes | None]:
    it = iter(stock)
    return lambda: next(it, None)


def _engine_alone(data_dir: Path, requests: Sequence[QueryRequest], seconds: float) -> Phase:
    from hansa.node.engine import QueryEngine

    limits = load_config(data_dir).limits
    engine = QueryEngine(data_dir, threads=limits.engine_threads)
    done = 0
    stop_at = time.perf_counter() + seconds
    lock = threading.Lock()
    source = itertools.cycle(requests)

    def work() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            with lock:
                request = next(source)
            engine.answer(request)
            with lock:
                done += 1

    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(limits.max_concurrent_queries) as pool:
            for f in [pool.submit(work) for _ in range(limits.max_concurrent_queries)]:
                f.result()
        return Phase("engine alone", done, time.perf_counter() - started)
    finally:
        engine.close()


# --- main -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per server")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per server")
    parser.add_argument("--concurrency", type=int, default=32, help="client connections")
    parser.add_argument("--rows", type=int, default=20_000, help="generated listings")
    parser.add_argument("--stock", type=int, default=20_000, help="pre-signed requests")
    parser.add_argument("--max-concurrent", type=int, default=NodeLimits().max_concurrent_queries)
    parser.add_argument("--engine-threads", type=int, default=NodeLimits().engine_threads)
    parser.add_argument("--bare", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare is not None:
        _bare_server(args.bare)
        return 0
    if args.pipeline is not None:
        _pipeline_server(args.pipeline)
        return 0

    from hansa.node.catalog import Catalog
    from hansa.node.synthetic import default_listing_roles, write_listings_csv

    started = time.perf_counter()
    me = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="hansa-bench-") as tmp:
        root = Path(tmp)
        analyst = SigningKey.generate()
        data_dir = root / CITY
        init_node(data_dir, city=CITY, port=0)
        limits = NodeLimits(
            max_concurrent_queries=args.max_concurrent, engine_threads=args.engine_threads
        )
        config_path(data_dir).write_text(
            render_config(city=CITY, port=0, limits=limits), encoding="utf-8"
        )
        add_trusted_key(data_dir, ANALYST, analyst.public_key.raw.hex())
        csv = write_listings_csv(root / "listings.csv", city=CITY, rows=args.rows, seed=7)
        with Catalog(data_dir) as catalog:
            catalog.add("listings", csv, roles=default_listing_roles())
        now = time.time_ns() // 1_000_000
        requests = [_request(analyst, now) for _ in range(args.stock)]
        stock = [seal(r, analyst) for r in requests]
        setup_s = time.perf_counter() - started

        phases: list[Phase] = []
        node, url = _start(
            [sys.executable, "-m", "hansa", "node", "serve", "--data-dir", str(data_dir)]
        )
        try:
            body = asyncio.run(_one(url, stock[0]))  # the bare server returns these bytes
            if decode_envelope(body).payload_type != PayloadType.QUERY_ANSWER:
                print("the node refused the benchmark query", file=sys.stderr)
                return 1
            (root / "answer.bin").write_bytes(body)
            phases.append(
                asyncio.run(
                    _hammer(
                        "node",
                        url,
                        _from_stock(stock[1:]),
                        args.concurrency,
                        args.warmup,
                        args.seconds,
                    )
                )
            )
        finally:
            _stop(node)
        pipeline, url = _start([sys.executable, me, "--pipeline", str(data_dir)])
        try:
            phases.append(
                asyncio.run(
                    _hammer(
                        "pipeline",
                        url,
                        _from_stock(stock),
                        args.concurrency,
                        args.warmup,
                        args.seconds,
                    )
                )
            )
        finally:
            _stop(pipeline)
        bare, url = _start([sys.executable, me, "--bare", str(root / "answer.bin")])
        try:
            cycle = itertools.cycle(stock)
            phases.append(
                asyncio.run(
                    _hammer(
                        "bare",
                        url,
                        lambda: next(cycle),
                        args.concurrency,
                        args.warmup,
                        args.seconds,
                    )
                )
            )
        finally:
            _stop(bare)
        engine_phase = _engine_alone(data_dir, requests, min(args.seconds, 3.0))

    bare_rate = phases[-1].rate
    print(f"node bench: {args.rows:,} generated listings, grouped count by room_type")
    print(
        f"  {args.concurrency} client connections, {args.seconds:g} s per server after "
        f"{args.warmup:g} s warm-up, {os.cpu_count()} CPUs shared by client and server; "
        f"node: max_concurrent_queries={limits.max_concurrent_queries}, "
        f"engine_threads={limits.engine_threads}; setup {setup_s:.1f} s"
    )
    for phase in [*phases, engine_phase]:
        vs_bare = f"{phase.rate / bare_rate:5.2f} x bare" if bare_rate else ""
        extra = (
            f", {phase.non_200} non-200, {phase.refusals} refusals"
            if phase.name != "engine alone"
            else ""
        )
        count = f"{phase.requests:,} in {phase.seconds:.1f} s{extra}"
        print(f"  {phase.name:<13}{phase.rate:>9,.0f} /s  {vs_bare}  ({count})")
    ratio = phases[0].rate / bare_rate if bare_rate else 0.0
    verdict = "meets" if ratio >= GOAL else "is below"
    print(f"  node/bare = {ratio:.2f}, which {verdict} the goal of {GOAL}")
    print(f"  total {time.perf_counter() - started:.1f} s")
    return 0


async def _one(url: str, body: bytes) -> bytes:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url + "/v1/query", data=body, headers={"Content-Type": ENVELOPE_MEDIA_TYPE}
        ) as resp:
            return await resp.read()


if __name__ == "__main__":
    raise SystemExit(main())
