"""Node throughput: signed grouped counts vs a bare aiohttp route, same client, same run.

Run: ``.venv/bin/python bench/node.py [--seconds S] [--concurrency C] [--rows N]
[--no-durable] [--only-repeated] [--ab REF]``. The node's audit log (spec §16) is durable
(fsynced group commits) as in production; ``--no-durable`` writes it without fsync, for
reference only. ``--only-repeated`` measures (a) and bare alone (quicker; e.g. while
profiling the node with py-spy). ``--ab REF`` also runs (a) on a second node built from
git ``REF`` (e.g. ``HEAD``, on a copy of the data directory), in the same alternating
slices: on a shared machine, an A/B ratio from one run is the trustworthy way to tell
whether a change pays. Each server phase also reports the server process's CPU time
(user + system, from ``/proc``) per request over its measured slices.

Setup (not timed): a node data directory with generated listings
(``hansa.node.synthetic``), an analyst key trusted by the node, and two
stocks of pre-signed ``QueryRequest`` envelopes, each request with its own
nonce:

* **repeated**: the same grouped count by room type in every request;
* **distinct**: the grouped count by room type with a filter
  ``price <= L`` whose literal ``L`` differs in every request (all above
  the largest price, so the answers match), so no two queries are equal.

Servers, each its own process on 127.0.0.1:

* **node**: the real ``hansa node serve`` (aiohttp on uvloop). Per request
  it checks the size, verifies the Ed25519 signature strictly, decodes the
  body, checks principal, audience, time window and replay, answers the
  query (engine result cache, else DuckDB in its thread pool, then
  disclosure control) and seals the answer (a fresh signature). It is
  measured twice:

  (a) **node, repeated query**: the repeated stock. After the first
      request the engine's result cache holds the answer, so this is the
      node's protocol work plus a cache lookup: every request is still
      fully verified, replay-checked and freshly signed. This is the
      issue's figure (goal: ≥ 0.5 × bare).
  (b) **node, distinct queries**: the distinct stock. Every query misses
      the cache and runs in DuckDB: the cold engine cost.

* **bare**: this file with ``--bare``, aiohttp on uvloop with one route that
  reads the body and returns a pre-signed answer: the cost of HTTP alone.
* **floor**: the bare route plus the two signatures every answered query
  costs and nothing else: parse the envelope, verify the request's Ed25519
  signature (libsodium, strict) and sign the answer's payload afresh into a
  new envelope. No decoding, checks, replay cache, engine, audit log or
  metrics: the ceiling any node answering signed queries can reach on this
  machine and client, measured in the same run (issue 3's goal needs a node
  that spends on everything else less than what separates 0.5 from it).

One client (this process, aiohttp, ``C`` connections per server) warms
each up, then measures each for ``S`` seconds in total, in alternating
slices of ``--slice`` seconds (rotating order), so that the load of the
shared machine, which drifts within seconds, hits all three alike. The bench also times the
query engine alone on the distinct queries (``QueryEngine.answer`` with the
result cache off, in a pool of the node's ``max_concurrent_queries``
threads, in this process, no HTTP). It prints requests/s for each and the
ratios to bare. The servers and the client share the machine, so absolute
figures depend on it; the ratios are the figures to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import os
import selectors
import shutil
import subprocess
import sys
import tarfile
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

from hansa.crypto import PublicKey, SigningKey, seal, seal_bytes
from hansa.crypto.keys import verify_signed
from hansa.federation.fanout import build_request
from hansa.node._cli_node import init_node
from hansa.node.app import ENVELOPE_MEDIA_TYPE
from hansa.node.config import (
    AuditConfig,
    NodeLimits,
    add_trusted_key,
    config_path,
    load_config,
    render_config,
)
from hansa.protocol.envelope import PayloadType, decode_envelope, pae
from hansa.protocol.messages import (
    Count,
    Dimension,
    Filter,
    FilterOp,
    PolicyTags,
    Query,
    QueryRequest,
    ResultScope,
)

CITY: Final = "benchville"
ANALYST: Final = "bench@benchville"
GOAL: Final = 0.5
QUERY: Final = Query(dataset="listings", aggregates=(Count(),), group_by=(Dimension("room_type"),))
PRICE_ABOVE_ALL: Final = 10**9
"""Above every generated price: the distinct queries' filters keep every row."""


def distinct_query(i: int) -> Query:
    """The grouped count with a filter literal of its own (a result-cache miss)."""
    return Query(
        dataset="listings",
        aggregates=(Count(),),
        group_by=(Dimension("room_type"),),
        filters=(Filter("price", FilterOp.LE, (PRICE_ABOVE_ALL + i,)),),
    )


@dataclass
class Phase:
    """One measured run against one server."""

    name: str
    requests: int
    seconds: float
    non_200: int = 0
    refusals: int = 0
    cpu_seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        """The server process's CPU time (user + system) per completed request, in us."""
        return 1e6 * self.cpu_seconds / self.requests if self.requests else 0.0


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (Linux ``/proc``; else 0)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _request(analyst: SigningKey, now: int, query: Query = QUERY) -> QueryRequest:
    return build_request(
        query,
        PolicyTags(
            purpose="research",
            legal_basis="benchmark",
            scope=ResultScope.ALLIANCE,
            analyst=ANALYST,
        ),
        requester=ANALYST,
        targets=(CITY,),
        issued_at=now,
        expires_at=now + 240_000,
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


_SUBPACKAGES: Final = ("protocol", "crypto", "federation", "node")
"""The source folders installed as ``hansa.<name>`` (pyproject ``package-dir``)."""

_FROM_TREE: Final = """\
import runpy, sys
src = sys.argv.pop(1)
# Not the editable install of this checkout: the package laid out under src.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path.insert(0, src)
sys.argv[0] = "hansa"
runpy.run_module("hansa", run_name="__main__", alter_sys=True)
"""
"""Runs ``python -m hansa`` from another source tree (``--ab``)."""


def _export(ref: str, into: Path) -> Path:
    """Lay out the package as of git ``ref`` under ``into`` (``into/hansa/node`` ...)."""
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", ref, "hansa", *_SUBPACKAGES],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    for name in _SUBPACKAGES:
        (into / name).rename(into / "hansa" / name)
    return into


def _uvloop_run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(main())
        except KeyboardInterrupt:
            pass


def _bare_server(body_file: Path, floor: str | None = None) -> None:
    """Serve the pre-signed answer; with ``floor`` (the requester's public key, hex), sign
    for every request as a node does: verify the request, seal the answer payload afresh.
    """
    body = body_file.read_bytes()
    answer = decode_envelope(body)
    node_key = SigningKey.generate()
    requester = None if floor is None else PublicKey(bytes.fromhex(floor))

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type=ENVELOPE_MEDIA_TYPE)

    async def handle_floor(request: web.Request) -> web.Response:
        data = await request.read()
        env = decode_envelope(data)
        assert requester is not None and env.key_id == requester.key_id
        signed = env.signature + pae(env.payload_type, env.payload)
        if not verify_signed(requester.raw, signed):
            raise web.HTTPForbidden()
        fresh = seal_bytes(answer.payload_type, answer.payload, node_key)
        return web.Response(body=fresh, content_type=ENVELOPE_MEDIA_TYPE)

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/v1/query", handle if requester is None else handle_floor)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        print(
            f"{'bare' if floor is None else 'floor'} listening on http://127.0.0.1:{port}",
            flush=True,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    _uvloop_run(serve)


# --- client ----------------------------------------------------------------------------


@dataclass
class Target:
    """A server under test and where its request bodies come from."""

    phase: Phase
    url: str
    next_body: Callable[[], bytes | None]
    pid: int
    exhausted: bool = False


async def _slice(
    session: aiohttp.ClientSession,
    target: Target,
    concurrency: int,
    seconds: float,
    *,
    measure: bool,
) -> None:
    """Keep ``concurrency`` requests in flight to ``target`` for ``seconds``."""
    headers = {"Content-Type": ENVELOPE_MEDIA_TYPE}
    refusal_type = PayloadType.QUERY_REFUSAL.value.encode()
    phase = target.phase
    cpu_before = _cpu_seconds(target.pid)
    started = time.perf_counter()
    stop_at = started + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            body = target.next_body()
            if body is None:
                target.exhausted = True
                return
            async with session.post(target.url + "/v1/query", data=body, headers=headers) as resp:
                data = await resp.read()
            if not measure:
                continue
            phase.requests += 1
            if resp.status != 200:
                phase.non_200 += 1
            elif refusal_type in data[:80]:
                phase.refusals += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if measure:
        # Until the last in-flight request returned: a slice's tail is work too.
        phase.seconds += time.perf_counter() - started
        phase.cpu_seconds += _cpu_seconds(target.pid) - cpu_before


async def _interleaved(
    targets: Sequence[Target], concurrency: int, warmup: float, seconds: float, slice_s: float
) -> None:
    """Measure every target for ``seconds`` in alternating slices of ``slice_s``.

    The machine is shared and its load drifts within seconds; alternating
    short slices (in a rotating order) exposes every server to the same
    drift, so the ratios between them hold even when absolute rates do not.
    """
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) for _ in targets
    ]
    try:
        for target, session in zip(targets, sessions, strict=True):
            await _slice(session, target, concurrency, warmup, measure=False)
        rounds = max(1, round(seconds / slice_s))
        for r in range(rounds):
            for k in range(len(targets)):
                i = (r + k) % len(targets)
                await _slice(sessions[i], targets[i], concurrency, seconds / rounds, measure=True)
    finally:
        for session in sessions:
            await session.close()
    for target in targets:
        if target.exhausted:
            print(
                f"warning: {target.phase.name}: ran out of pre-signed requests; raise --stock",
                file=sys.stderr,
            )


def _from_stock(stock: Sequence[bytes]) -> Callable[[], bytes | None]:
    it = iter(stock)
    return lambda: next(it, None)


def _engine_alone(data_dir: Path, requests: Sequence[QueryRequest], seconds: float) -> Phase:
    from hansa.node.engine import QueryEngine

    limits = load_config(data_dir).limits
    # The result cache is off: every answer runs in DuckDB (the node's cache-miss cost).
    engine = QueryEngine(data_dir, threads=limits.engine_threads, cache_entries=0)
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
        return Phase("engine alone, distinct (no HTTP)", done, time.perf_counter() - started)
    finally:
        engine.close()


# --- main -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per phase")
    parser.add_argument(
        "--slice", type=float, default=0.5, help="seconds per alternating measurement slice"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="client connections")
    parser.add_argument("--rows", type=int, default=20_000, help="generated listings")
    parser.add_argument(
        "--stock",
        type=int,
        default=0,
        help="pre-signed repeated-query requests (default: 16,000 per second of warm-up + run)",
    )
    parser.add_argument(
        "--distinct-stock", type=int, default=12_000, help="pre-signed distinct-query requests"
    )
    parser.add_argument("--max-concurrent", type=int, default=NodeLimits().max_concurrent_queries)
    parser.add_argument("--engine-threads", type=int, default=NodeLimits().engine_threads)
    parser.add_argument(
        "--no-durable",
        action="store_true",
        help="[audit] durable = false: the log is written without fsync (reference only)",
    )
    parser.add_argument(
        "--only-repeated",
        action="store_true",
        help="measure only (a) and bare (e.g. while profiling the node)",
    )
    parser.add_argument(
        "--ab",
        metavar="REF",
        help="also measure (a) on a node run from git REF (e.g. HEAD), in the same slices",
    )
    parser.add_argument("--bare", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--floor", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare is not None:
        _bare_server(args.bare, args.floor)
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
        stock_size = args.stock or int(16_000 * (args.warmup + args.seconds))
        limits = NodeLimits(
            max_concurrent_queries=args.max_concurrent,
            engine_threads=args.engine_threads,
            # Every request of both stocks stays in the replay cache for the whole run.
            replay_capacity=max(NodeLimits().replay_capacity, stock_size + args.distinct_stock),
        )
        config_path(data_dir).write_text(
            render_config(
                city=CITY, port=0, limits=limits, audit=AuditConfig(durable=not args.no_durable)
            ),
            encoding="utf-8",
        )
        add_trusted_key(data_dir, ANALYST, analyst.public_key.raw.hex())
        csv = write_listings_csv(root / "listings.csv", city=CITY, rows=args.rows, seed=7)
        with Catalog(data_dir) as catalog:
            catalog.add("listings", csv, roles=default_listing_roles())
        now = time.time_ns() // 1_000_000
        stock = [seal(_request(analyst, now), analyst) for _ in range(stock_size)]
        distinct_requests = [
            _request(analyst, now, distinct_query(i)) for i in range(args.distinct_stock)
        ]
        distinct = [seal(r, analyst) for r in distinct_requests]
        ab_dir = root / "ab"
        if args.ab is not None:
            # A second node on a copy of the data directory (its own audit log).
            shutil.copytree(data_dir, ab_dir / CITY)
            _export(args.ab, (ab_dir / "src").resolve())
        setup_s = time.perf_counter() - started

        repeated = Phase("(a) node, repeated query", 0, 0.0)
        other = Phase(f"(a) node at {args.ab}", 0, 0.0)
        cold = Phase("(b) node, distinct queries", 0, 0.0)
        bare = Phase("bare aiohttp route", 0, 0.0)
        floor = Phase("floor: bare + verify + sign", 0, 0.0)
        node, url = _start(
            [sys.executable, "-m", "hansa", "node", "serve", "--data-dir", str(data_dir)]
        )
        ab: tuple[subprocess.Popen[bytes], str] | None = None
        try:
            if args.ab is not None:
                ab = _start(
                    [
                        sys.executable,
                        "-c",
                        _FROM_TREE,
                        str(ab_dir / "src"),
                        "node",
                        "serve",
                        "--data-dir",
                        str(ab_dir / CITY),
                    ]
                )
            body = asyncio.run(_one(url, stock[0]))  # the bare server returns these bytes
            if decode_envelope(body).payload_type != PayloadType.QUERY_ANSWER:
                print("the node refused the benchmark query", file=sys.stderr)
                return 1
            (root / "answer.bin").write_bytes(body)
            bare_proc, bare_url = _start([sys.executable, me, "--bare", str(root / "answer.bin")])
            floor_proc, floor_url = _start(
                [
                    sys.executable,
                    me,
                    "--bare",
                    str(root / "answer.bin"),
                    "--floor",
                    analyst.public_key.raw.hex(),
                ]
            )
            try:
                cycle = itertools.cycle(stock)
                floor_cycle = itertools.cycle(stock)
                targets = [
                    Target(repeated, url, _from_stock(stock[1:]), node.pid),
                    Target(cold, url, _from_stock(distinct), node.pid),
                    Target(bare, bare_url, lambda: next(cycle), bare_proc.pid),
                    Target(floor, floor_url, lambda: next(floor_cycle), floor_proc.pid),
                ]
                if args.only_repeated:
                    del targets[1]
                if ab is not None:
                    # The same requests: each node has its own replay cache.
                    targets.insert(1, Target(other, ab[1], _from_stock(stock[1:]), ab[0].pid))
                asyncio.run(
                    _interleaved(targets, args.concurrency, args.warmup, args.seconds, args.slice)
                )
            finally:
                _stop(bare_proc)
                _stop(floor_proc)
        finally:
            _stop(node)
            if ab is not None:
                _stop(ab[0])
        engine_phase = (
            Phase("engine alone, distinct (no HTTP)", 0, 0.0)
            if args.only_repeated
            else _engine_alone(data_dir, distinct_requests, min(args.seconds, 3.0))
        )

    print(f"node bench: {args.rows:,} generated listings, grouped count by room_type")
    print(
        f"  {args.concurrency} client connections, {args.seconds:g} s per phase in alternating "
        f"{args.slice:g} s slices after {args.warmup:g} s warm-up each, {os.cpu_count()} CPUs "
        "shared by client and servers; "
        f"node: max_concurrent_queries={limits.max_concurrent_queries}, "
        f"engine_threads={limits.engine_threads}, audit durable={not args.no_durable}; "
        f"setup {setup_s:.1f} s"
    )
    skipped = ([] if ab else [other]) + ([cold, engine_phase] if args.only_repeated else [])
    phases = [p for p in (repeated, other, cold, bare, floor, engine_phase) if p not in skipped]
    for phase in phases:
        vs_bare = f"{phase.rate / bare.rate:5.2f} x bare" if bare.rate else ""
        extra = (
            f", {phase.non_200} non-200, {phase.refusals} refusals"
            if phase is not engine_phase
            else ""
        )
        if phase.cpu_seconds:
            extra += f"; server CPU {phase.cpu_us:.0f} us/request"
        count = f"{phase.requests:,} in {phase.seconds:.1f} s{extra}"
        print(f"  {phase.name:<34}{phase.rate:>8,.0f} /s  {vs_bare}  ({count})")
    for label, phase in (("(a) repeated", repeated), ("(b) distinct", cold)):
        if phase in skipped:
            continue
        ratio = phase.rate / bare.rate if bare.rate else 0.0
        print(f"  {label}: node/bare = {ratio:.2f}")
    if floor.rate:
        print(
            f"  floor (HTTP + verify + sign only)/bare = {floor.rate / bare.rate:.2f}; "
            f"(a) node/floor = {repeated.rate / floor.rate:.2f}"
        )
    if ab is not None and other.rate:
        print(f"  (a) this tree / {args.ab}: {repeated.rate / other.rate:.3f}")
    ratio = repeated.rate / bare.rate if bare.rate else 0.0
    verdict = "meets" if ratio >= GOAL else "is below"
    print(f"  goal (a) node/bare >= {GOAL}: {ratio:.2f} {verdict} it")
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
