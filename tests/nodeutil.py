"""Shared test helpers: real city nodes on 127.0.0.1 and signed requests.

Nothing here mocks the network: :func:`running_node` starts
``create_app`` behind ``web.AppRunner`` on an ephemeral port of 127.0.0.1 and
talks to it over HTTP with an ``aiohttp.ClientSession``; :func:`node_process`
runs ``hansa node serve`` as a subprocess.

Typical use::

    analyst = Analyst.create("ana@melbourne")
    config = init_test_node(tmp_path, "melbourne", analysts=[analyst])
    async with running_node(config) as node:
        reply = await node.query(analyst.seal(analyst.request("melbourne", count_by_room_type())))
        assert isinstance(reply, QueryAnswer)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from hansa.crypto import PublicKey, SigningKey, open_envelope, seal
from hansa.crypto.keyfile import read_public_key
from hansa.federation.fanout import build_request
from hansa.node._cli_node import init_node
from hansa.node.app import ENVELOPE_MEDIA_TYPE, NODE, NodeState, create_app
from hansa.node.config import NodeConfig, add_trusted_key, load_config
from hansa.protocol.codec import decode_as
from hansa.protocol.envelope import PayloadType, decode_envelope, message_id
from hansa.protocol.messages import (
    Aggregate,
    Count,
    Dimension,
    ErrorMessage,
    Filter,
    GroupKey,
    Mean,
    PolicyTags,
    Quantiles,
    Query,
    QueryAnswer,
    QueryRefusal,
    QueryRequest,
    ResultScope,
)

__all__ = [
    "DATASET",
    "PURPOSE",
    "Analyst",
    "NodeProcess",
    "Reply",
    "RunningNode",
    "ThreadedNode",
    "count_by_room_type",
    "init_test_node",
    "node_process",
    "now_ms",
    "open_reply",
    "price_summary_by_room_type",
    "running_node",
    "threaded_node",
]

DATASET = "listings"
"""Name the test nodes publish their listings under."""
PURPOSE = "research"
"""A purpose on the default allow-list of a dataset."""

Reply = QueryAnswer | QueryRefusal | ErrorMessage


def now_ms() -> int:
    """Return the wall clock in integer ms since the epoch."""
    return time.time_ns() // 1_000_000


# --- analysts and requests -----------------------------------------------------------


@dataclass(frozen=True)
class Analyst:
    """A requester: principal id and signing key."""

    principal: str
    key: SigningKey

    @classmethod
    def create(cls, principal: str = "ana@melbourne", seed: bytes | None = None) -> Analyst:
        """Return an analyst with a fresh (or seeded) key."""
        return cls(principal, SigningKey(seed) if seed is not None else SigningKey.generate())

    def request(
        self,
        city: str,
        query: Query,
        *,
        targets: Sequence[str] | None = None,
        issued_at: int | None = None,
        validity_ms: int = 60_000,
        nonce: bytes | None = None,
        requester: str | None = None,
        purpose: str = PURPOSE,
    ) -> QueryRequest:
        """Build a fresh request to ``city`` (or ``targets``), valid for ``validity_ms``.

        Built by :func:`hansa.federation.fanout.build_request`, as the fan-out
        builds its requests.
        """
        issued = now_ms() if issued_at is None else issued_at
        return build_request(
            query,
            PolicyTags(
                purpose=purpose,
                legal_basis="test suite",
                scope=ResultScope.ALLIANCE,
                analyst=self.principal,
            ),
            requester=self.principal if requester is None else requester,
            issued_at=issued,
            expires_at=issued + validity_ms,
            targets=(city,) if targets is None else targets,
            nonce=nonce,
        )

    def seal(self, request: QueryRequest) -> bytes:
        """Return the request sealed in an envelope signed by this analyst."""
        return seal(request, self.key)


def count_by_room_type(*, dataset: str = DATASET) -> Query:
    """A grouped count: listings per room type."""
    return Query(dataset=dataset, aggregates=(Count(),), group_by=(Dimension("room_type"),))


def price_summary_by_room_type(*, dataset: str = DATASET, filters: Sequence[Filter] = ()) -> Query:
    """Count, mean price and median/p90 price per room type."""
    aggregates: tuple[Aggregate, ...] = (
        Count(),
        Mean("price"),
        Quantiles("price", (0.5, 0.9)),
    )
    group_by: tuple[GroupKey, ...] = (Dimension("room_type"),)
    return Query(dataset=dataset, aggregates=aggregates, filters=tuple(filters), group_by=group_by)


def open_reply(status: int, body: bytes, node_key: PublicKey) -> Reply:
    """Verify and decode a ``/v1/query`` reply.

    A 200 reply must be an envelope signed by ``node_key`` holding a
    ``QueryAnswer`` or ``QueryRefusal``; any other status must be an
    unsigned ``ErrorMessage``.

    Raises:
        HansaError: the reply does not verify or decode.
    """
    if status != 200:
        return decode_as(body, ErrorMessage)
    keys = {node_key.key_id: node_key}
    if decode_envelope(body).payload_type == PayloadType.QUERY_ANSWER:
        return open_envelope(body, keys, QueryAnswer).message
    return open_envelope(body, keys, QueryRefusal).message


# --- nodes ---------------------------------------------------------------------------


def init_test_node(
    root: Path,
    city: str,
    *,
    analysts: Sequence[Analyst] = (),
    rows: int = 400,
    seed: int = 1,
    dataset: str | None = DATASET,
    port: int = 0,
) -> NodeConfig:
    """Create a node data directory under ``root/city`` with synthetic listings.

    Args:
        root: parent directory (e.g. ``tmp_path``).
        city: the city id.
        analysts: requesters to trust.
        rows: synthetic listings to generate.
        seed: generator seed.
        dataset: publish the listings under this name (``None``: no dataset).
        port: configured port (0 = any free port).

    Returns:
        The node's configuration.
    """
    from hansa.node.catalog import Catalog
    from hansa.node.synthetic import default_listing_roles, write_listings_csv

    data_dir = root / city
    init_node(data_dir, city=city, port=port)
    for analyst in analysts:
        add_trusted_key(data_dir, analyst.principal, analyst.key.public_key.raw.hex())
    if dataset is not None:
        csv = write_listings_csv(root / f"{city}-listings.csv", city=city, rows=rows, seed=seed)
        with Catalog(data_dir) as catalog:
            catalog.add(dataset, csv, roles=default_listing_roles())
    return load_config(data_dir)


@dataclass
class RunningNode:
    """A node application served on 127.0.0.1, with a client session."""

    url: str
    app: web.Application
    session: aiohttp.ClientSession
    config: NodeConfig
    node_key: PublicKey
    statuses: list[int] = field(default_factory=list)

    @property
    def state(self) -> NodeState:
        """The application's shared state."""
        return self.app[NODE]

    async def post(
        self, body: bytes, *, content_type: str = ENVELOPE_MEDIA_TYPE, path: str = "/v1/query"
    ) -> tuple[int, bytes]:
        """POST raw bytes; return (status, body)."""
        async with self.session.post(
            self.url + path, data=body, headers={"Content-Type": content_type}
        ) as resp:
            data = await resp.read()
            self.statuses.append(resp.status)
            return resp.status, data

    async def get(self, path: str) -> tuple[int, bytes, str]:
        """GET a path; return (status, body, content type)."""
        async with self.session.get(self.url + path) as resp:
            return resp.status, await resp.read(), resp.content_type

    async def query(self, envelope: bytes) -> Reply:
        """POST a sealed request and return the verified reply."""
        status, body = await self.post(envelope)
        return open_reply(status, body, self.node_key)


@contextlib.asynccontextmanager
async def running_node(config: NodeConfig, **kwargs: Any) -> AsyncIterator[RunningNode]:
    """Serve ``create_app(config, **kwargs)`` on 127.0.0.1:0 until the block ends."""
    app = create_app(config, **kwargs)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        node_key = app[NODE].signing_key.public_key
        async with aiohttp.ClientSession() as session:
            yield RunningNode(f"http://127.0.0.1:{port}", app, session, config, node_key)
    finally:
        await runner.cleanup()


@dataclass
class ThreadedNode:
    """A node served from a background thread's event loop (for synchronous tests)."""

    url: str
    node_key: PublicKey

    def post(self, body: bytes, *, content_type: str = ENVELOPE_MEDIA_TYPE) -> tuple[int, bytes]:
        """POST raw bytes to ``/v1/query`` with urllib; return (status, body)."""
        request = urllib.request.Request(
            self.url + "/v1/query",
            data=body,
            headers={"Content-Type": content_type},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())


@contextlib.contextmanager
def threaded_node(config: NodeConfig, **kwargs: Any) -> Iterator[ThreadedNode]:
    """Serve ``create_app(config, **kwargs)`` on 127.0.0.1:0 from a background thread.

    Hypothesis drives synchronous tests, so this runs the server's event loop
    in its own thread and talks to it over real HTTP.
    """
    loop = asyncio.new_event_loop()
    started: concurrent.futures.Future[ThreadedNode] = concurrent.futures.Future()
    stop = asyncio.Event()

    async def serve() -> None:
        try:
            async with running_node(config, **kwargs) as node:
                started.set_result(ThreadedNode(node.url, node.node_key))
                await stop.wait()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        yield started.result(timeout=30)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        loop.close()


# --- a real `hansa node serve` process -----------------------------------------------

_READY = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


@dataclass
class NodeProcess:
    """A ``hansa node serve`` subprocess and its URL."""

    proc: subprocess.Popen[bytes]
    url: str
    node_key: PublicKey

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> tuple[int, str]:
        """Send ``sig``, wait for exit; return (exit status, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        return self.proc.returncode, err.decode(errors="replace")


@contextlib.contextmanager
def node_process(
    data_dir: Path,
    *,
    timeout: float = 30.0,
    extra_env: dict[str, str] | None = None,
    command: Sequence[str] | None = None,
) -> Iterator[NodeProcess]:
    """Run ``hansa node serve --data-dir DIR --port 0`` until the block ends.

    Waits for the ready line on stdout (at most ``timeout`` seconds). ``command``
    replaces the command line (a script serving the node some other way); it must print
    the same ready line.
    """
    env = {**os.environ, **(extra_env or {})}
    argv = command or (
        sys.executable,
        "-m",
        "hansa",
        "node",
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        "0",
    )
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        url = _wait_ready(proc, timeout)
        yield NodeProcess(proc, url, read_public_key(load_config(data_dir).key_file))
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _wait_ready(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:  # EOF: the process exited before it was ready
                proc.wait(timeout=10)
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"node exited with {proc.returncode}: {err.strip()[-2000:]}")
            buffer += chunk
            match = _READY.search(buffer.decode(errors="replace"))
            if match:
                return match.group(1)
    raise TimeoutError(f"node did not become ready in {timeout} s (stdout: {buffer!r})")


def request_id_of(envelope: bytes) -> bytes:
    """Return the message id a reply to ``envelope`` must cite."""
    return message_id(envelope)
