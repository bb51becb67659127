"""Running a node: aiohttp on uvloop with a graceful shutdown.

``serve(config)`` opens the application (engine, query pool), listens on the
configured address, prints one ready line to stdout and then waits for
SIGTERM or SIGINT. SIGHUP re-reads the alliance roster files (a newer roster
installed offline with ``hansa node roster install`` takes effect for the
next request; an older or unverifiable one is logged and ignored, spec
§15.3) and reloads the dataset catalog, e.g. after an operator edited
``datasets.toml`` (the capability document is re-signed on the next
request). On SIGTERM or SIGINT it stops accepting connections, lets
in-flight requests finish (for up to ``limits.shutdown_timeout_s``), then
closes the query pool and the engine (aiohttp's ``AppRunner.cleanup`` does
these steps in this order).

The ready line has a fixed shape that scripts and tests may rely on::

    hansa node <city> listening on http://<host>:<port>

With ``port = 0`` the operating system picks a free port and the line names it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable
from typing import Final, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from hansa.node.app import NODE, AnswerEngine, create_app
from hansa.node.config import NodeConfig

__all__ = ["KEEPALIVE_TIMEOUT_S", "READY_PREFIX", "configure_logging", "run", "serve"]

READY_PREFIX: Final = "hansa node "
GC_THRESHOLDS: Final = (50_000, 50, 100)
"""The serving process's cyclic-GC thresholds (CPython's default: 700, 10, 10).

A query allocates a few hundred container objects, nearly all freed by reference
counting within the request; with the default the young generation is collected every
few requests, each time walking the requests still in flight. ``bench/node.py`` (a),
same run: +4-6 % requests/s, about as much as with the cyclic GC switched off. Young
cyclic garbage waits for at most 50,000 allocations (a few MB); garbage that was alive
through a collection waits for the older generations' (5,000 young collections for the
oldest). Serving makes next to none: with CPython's defaults, 6 s of (a) ran four full
collections that freed nothing."""
KEEPALIVE_TIMEOUT_S: Final = 75.0
"""Seconds a connection may stay open without a complete request: from its opening, and
after each reply. aiohttp's own default is 3630 s, and its timer is the only bound on a
client that connects and sends nothing, or trickles its headers (slowloris): each such
connection held a file descriptor for an hour (tests/test_node_hostile.py). Fan-out
clients reuse idle connections for 15 s at most (``hansa.federation.transport``)."""
log = logging.getLogger("hansa.node")


class _MalformedHttpFilter(logging.Filter):
    """One warning line, without a traceback, for a request aiohttp could not parse.

    aiohttp logs bad framing, header floods, over-long lines and undecodable
    compressed bodies at ERROR with a traceback (``aiohttp.server``): the client's
    input, not a node failure, and a cheap way to fill the node's log. Every other
    record passes unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | RequestPayloadError):
            args = record.args
            remote = args[0] if isinstance(args, tuple) and args else "?"
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "malformed HTTP request from %s: %s"
            record.args = (remote, " ".join(str(exc).split())[:200])
            record.exc_info, record.exc_text = None, None
        return True


_BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n"
    b"Connection: close\r\n\r\n"
)
"""The whole reply to a connection beyond ``limits.max_connections``."""


class _Busy(asyncio.Protocol):
    """A connection beyond the limit: answered 503 and closed, nothing read from it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport writes, whatever its class: uvloop's derives from none of
        # asyncio's transport classes, so an isinstance test would skip the reply.
        cast(asyncio.Transport, transport).write(_BUSY)
        transport.close()


class _CappedSite(web.TCPSite):
    """A TCP site that keeps at most ``limit`` connections open (``limits.max_connections``).

    aiohttp bounds neither connections nor file descriptors: idle keep-alive connections
    (until :data:`KEEPALIVE_TIMEOUT_S`) and slow clients each hold one, and a client that
    opens thousands starves the process of descriptors, so that every new connection,
    good ones included, is reset (tests/test_node_hostile.py). Beyond the limit a new
    connection is answered ``503`` and closed at once: the node stays reachable for the
    connections it has, and clients see why they were turned away.
    """

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, limit: int) -> None:
        super().__init__(runner, host, port)
        self._limit = limit

    async def start(self) -> None:
        """Listen, as ``TCPSite.start`` does, through the counting protocol factory."""
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        limit = self._limit

        def protocol() -> asyncio.Protocol:
            # server.connections: the handlers of the open connections (aiohttp adds
            # one when it is made and drops it when it is lost).
            if len(server.connections) >= limit:
                return _Busy()
            return server()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        if sockets and hasattr(self, "_bound_port"):  # TCPSite.port reports the bound port
            self._bound_port = int(sockets[0].getsockname()[1])


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    config: NodeConfig,
    *,
    engine: AnswerEngine | None = None,
    ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
    freeze_gc: bool = False,
) -> None:
    """Serve the node until SIGTERM/SIGINT (or ``stop`` is set), then shut down cleanly.

    Args:
        config: the node configuration.
        engine: a query engine owned by the caller (default: the node opens
            and closes its own, see :func:`~hansa.node.app.create_app`).
        ready: called with the base URL once the node accepts connections
            (default: print the ready line to stdout).
        stop: an event that ends the server when set (signals set it too).
        freeze_gc: once listening, move every object alive (modules, application,
            engine, caches loaded at start-up) out of the cyclic GC's reach
            (``gc.freeze``), so that its full collections walk only what serving
            creates. For a process that serves one node (:func:`run`).

    Raises:
        KeyFileError: the node key cannot be read.
        OSError: the address cannot be bound.
    """
    app = create_app(config, engine=engine)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=log if config.access_log else None,
        shutdown_timeout=config.limits.shutdown_timeout_s,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
    )
    http_log = logging.getLogger("aiohttp.server")
    malformed = _MalformedHttpFilter()
    http_log.addFilter(malformed)
    try:
        await runner.setup()
    except BaseException:
        http_log.removeFilter(malformed)
        raise
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    try:
        site = _CappedSite(runner, config.host, config.port, limit=config.limits.max_connections)
        await site.start()
        port = config.port
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                port = int(address[1])
                break
        url = _url(config.host, port)
        if freeze_gc:
            gc.collect()
            gc.freeze()
        state = app[NODE]
        reloads: set[asyncio.Task[bool]] = set()

        def reload() -> None:
            task = loop.create_task(state.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        handlers: list[tuple[signal.Signals, Callable[[], None]]] = [
            (signal.SIGTERM, stop.set),
            (signal.SIGINT, stop.set),
        ]
        if hasattr(signal, "SIGHUP"):
            handlers.append((signal.SIGHUP, reload))
        for sig, handler in handlers:
            try:
                loop.add_signal_handler(sig, handler)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # pragma: no cover — not on POSIX
                pass
        if ready is None:
            print(f"{READY_PREFIX}{config.city} listening on {url}", flush=True)
        else:
            ready(url)
        log.info("node %s serving on %s", config.city, url)
        await stop.wait()
        log.info("shutting down: finishing in-flight requests")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        http_log.removeFilter(malformed)
        if freeze_gc:
            # Back under the collector: what is freed at exit is then freed before it
            # (DuckDB's bindings otherwise report each frozen object as leaked).
            gc.unfreeze()
        log.info("node %s stopped", config.city)


def run(config: NodeConfig) -> None:
    """Run :func:`serve` on uvloop (the default asyncio loop where uvloop is absent).

    The process is the node's own: its cyclic GC is tuned for serving
    (:data:`GC_THRESHOLDS`, ``freeze_gc``).

    Args:
        config: the node configuration.
    """
    factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:
        import uvloop
    except ImportError:  # pragma: no cover — uvloop is a dependency except on Windows
        factory = None
    else:
        factory = uvloop.new_event_loop
    gc.set_threshold(*GC_THRESHOLDS)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(config, freeze_gc=True))


def configure_logging(level: int = logging.INFO) -> None:
    """Send the node's log lines to stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("hansa")
    root.addHandler(handler)
    root.setLevel(level)
