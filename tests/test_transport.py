"""HttpPool against real servers on 127.0.0.1: aiohttp.web ones and raw byte scripts.

Raw servers (:class:`RawServer`, ``asyncio.start_server``) write hand-made
bytes, so framing, malformed replies and hang-ups are exact; they also count
the connections they see. Nothing mocks the network layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import itertools
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from hansa.federation.transport import (
    BadResponse,
    ConnectFailed,
    Endpoint,
    HttpPool,
    InvalidEndpoint,
    PoolClosed,
    Response,
    TransportError,
)
from hansa.protocol.errors import ConfigError, ErrorCode, HansaError

CT = "application/vnd.hansa.envelope+msgpack"
MAX = 1 << 20

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

pytestmark = pytest.mark.timeout(60)
"""No test may hang the suite: a hang is a failure."""


# --- helpers -----------------------------------------------------------------------------


class RawServer:
    """``asyncio.start_server`` on 127.0.0.1 that counts connections and runs ``handler``.

    ``abort``: end each connection with a reset instead of a graceful close (the hostile
    tests count file descriptors, which a close waiting on the client would keep open).
    """

    def __init__(self, handler: Handler, *, backlog: int = 100, abort: bool = False) -> None:
        self.handler = handler
        self.backlog = backlog
        self.abort = abort
        self.connections = 0
        self.open_now = 0
        self.max_open = 0
        self.requests: list[bytes] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, backlog=self.backlog
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Cancelled by __aexit__ only. Ending normally spares asyncio.streams (3.11) a
            # logged "exception()" call on a cancelled task.
            pass
        finally:
            self.open_now -= 1
            if self.abort:
                writer.transport.abort()
            else:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            self.tasks.discard(task)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Read one request; return its head (without the blank line) and body."""
    head = (await reader.readuntil(b"\r\n\r\n"))[:-4]
    size = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            size = int(value)
    return head, await reader.readexactly(size)


def header(head: bytes, name: bytes) -> bytes | None:
    """The value of a header field in a request head."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def replying(*replies: bytes, then_close: bool = False) -> Handler:
    """A handler answering successive requests on a connection with ``replies`` in turn."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in replies:
            await read_request(reader)
            writer.write(reply)
            await writer.drain()
        if not then_close:
            await reader.read()  # hold the connection until the client hangs up

    return handler


def ok(body: bytes, extra: bytes = b"") -> bytes:
    """A 200 with ``Content-Length``."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def chunked(body: bytes, sizes: list[int]) -> bytes:
    """``body`` in the chunked coding, in chunks of ``sizes`` (cycled), then the last chunk."""
    out = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
    at, k = 0, 0
    while at < len(body):
        size = max(1, sizes[k % len(sizes)]) if sizes else len(body)
        piece = body[at : at + size]
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        at += len(piece)
        k += 1
    out.append(b"0\r\n\r\n")
    return b"".join(out)


@contextlib.asynccontextmanager
async def serve_app(
    app: web.Application, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """Serve an aiohttp application on 127.0.0.1:0; yield the port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        yield next(a[1] for a in runner.addresses if isinstance(a, tuple))
    finally:
        await runner.cleanup()


def echo_app(peers: list[object] | None = None) -> web.Application:
    """POST /echo returns the body and the Host header; GET /hello a text."""

    async def echo(request: web.Request) -> web.Response:
        if peers is not None:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            peers.append(peer)
        return web.Response(
            body=await request.read(),
            content_type="application/octet-stream",
            headers={"X-Host": request.headers.get("Host", ""), "X-CT": request.content_type},
        )

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_post("/base/echo", echo)
    app.router.add_post("/echo", echo)
    app.router.add_get("/hello", hello)
    return app


def unused_port() -> int:
    """A port that was bound and closed again: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (bounded: 2 s)."""
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


# --- endpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "base", "host_header"),
    [
        ("http://127.0.0.1:8701", "http", "127.0.0.1", 8701, "", b"127.0.0.1:8701"),
        ("https://City.Example:443/base/", "https", "city.example", 443, "/base", b"city.example"),
        ("http://city.example/a/b", "http", "city.example", 80, "/a/b", b"city.example"),
        ("https://city.example:8443", "https", "city.example", 8443, "", b"city.example:8443"),
        ("http://[::1]:8080/x", "http", "::1", 8080, "/x", b"[::1]:8080"),
        ("https://[2001:db8::1]", "https", "2001:db8::1", 443, "", b"[2001:db8::1]"),
    ],
)
def test_endpoint_parse(
    url: str, scheme: str, host: str, port: int, base: str, host_header: bytes
) -> None:
    endpoint = Endpoint.parse(url)
    assert (endpoint.scheme, endpoint.host, endpoint.port, endpoint.base_path) == (
        scheme,
        host,
        port,
        base,
    )
    assert endpoint.host_header == host_header
    assert endpoint.tls == (scheme == "https")
    assert Endpoint.parse(endpoint.url) == endpoint


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://city.example",
        "city.example:80",
        "http://",
        "http://:80",
        "http://city.example:0",
        "http://city.example:65536",
        "http://city.example:port",
        "http://user:pw@city.example",
        "http://city.example/?q=1",
        "http://city.example/#frag",
        "http://city.example/a b",
        "http://city\n.example",
        "http://city.example/\r\nX-Evil: 1",
        "http://cité.example",
        "http://city_exa$mple",
        "http://[::1",
        "http://[fe80::1%25eth0]:80",
    ],
)
def test_endpoint_parse_rejects(url: str) -> None:
    with pytest.raises(InvalidEndpoint) as info:
        Endpoint.parse(url)
    assert info.value.code is ErrorCode.INVALID_FIELD
    assert isinstance(info.value, HansaError)


def test_endpoint_constructor_validates() -> None:
    with pytest.raises(InvalidEndpoint):
        Endpoint("http", "Bad Host", 80)
    with pytest.raises(InvalidEndpoint):
        Endpoint("http", "city.example", 80, "no-slash")
    with pytest.raises(InvalidEndpoint):
        Endpoint("gopher", "city.example", 70)
    assert Endpoint("http", "city.example", 80).url == "http://city.example"


def test_pool_endpoint_is_cached_and_bounds_are_checked() -> None:
    pool = HttpPool()
    assert pool.endpoint("http://127.0.0.1:1") is pool.endpoint("http://127.0.0.1:1")
    with pytest.raises(InvalidEndpoint):
        pool.endpoint("nope")
    with pytest.raises(ConfigError):
        HttpPool(limit=0)
    with pytest.raises(ConfigError):
        HttpPool(connect_timeout=0)


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("no-slash", CT), ("/a b", CT), ("/x\r\nEvil: 1", CT), ("/ok", "a/b\r\nEvil: 1"), ("/ok", "")],
)
async def test_bad_path_or_content_type_is_refused_before_connecting(
    path: str, content_type: str
) -> None:
    async with HttpPool() as pool:
        endpoint = pool.endpoint(f"http://127.0.0.1:{unused_port()}")
        with pytest.raises(InvalidEndpoint):
            await pool.post(endpoint, path, b"x", content_type, max_body=MAX)
        assert pool.open_connections == 0


# --- keep-alive, limits, GET ---------------------------------------------------------------


async def test_keep_alive_reuses_one_connection() -> None:
    peers: list[object] = []
    async with serve_app(echo_app(peers)) as port, HttpPool() as pool:
        endpoint = pool.endpoint(f"http://127.0.0.1:{port}/base")
        for i in range(20):
            body = b"request %d" % i
            resp = await pool.post(endpoint, "/echo", body, CT, max_body=MAX)
            assert resp == Response(200, body, "application/octet-stream")
        assert len(peers) == 20
        assert len(set(peers)) == 1, "every request should reuse the one connection"
        assert pool.open_connections == 1
        assert pool.idle_connections == 1


async def test_host_and_content_type_headers_are_sent() -> None:
    async with serve_app(echo_app()) as port, HttpPool() as pool:
        endpoint = pool.endpoint(f"http://127.0.0.1:{port}")
        seen: list[bytes] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head, _ = await read_request(reader)
            seen.append(head)
            writer.write(ok(b"x"))
            await writer.drain()

        async with RawServer(handler) as raw:
            await pool.post(pool.endpoint(raw.url + "/p"), "/q?a=1", b"abc", CT, max_body=MAX)
        assert seen[0].startswith(b"POST /p/q?a=1 HTTP/1.1\r\n")
        assert header(seen[0], b"host") == b"127.0.0.1:%d" % raw.port
        assert header(seen[0], b"content-type") == CT.encode()
        assert header(seen[0], b"content-length") == b"3"
        # and aiohttp agrees on what it received
        resp = await pool.post(endpoint, "/echo", b"", "text/plain", max_body=MAX)
        assert resp.status == 200 and resp.body == b""


async def test_get() -> None:
    async with serve_app(echo_app()) as port, HttpPool() as pool:
        endpoint = pool.endpoint(f"http://127.0.0.1:{port}")
        resp = await pool.get(endpoint, "/hello", max_body=MAX)
        assert resp.status == 200
        assert resp.body == b"hello"
        assert resp.content_type == "text/plain; charset=utf-8"
        missing = await pool.get(endpoint, "/missing", max_body=MAX)
        assert missing.status == 404
        assert pool.open_connections == 1


def slow_echo(delay: float) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(reader)
            await asyncio.sleep(delay)
            writer.write(ok(body))
            await writer.drain()

    return handler


async def test_limit_bounds_simultaneous_connections() -> None:
    async with RawServer(slow_echo(0.01)) as server, HttpPool(limit=3) as pool:
        endpoint = pool.endpoint(server.url)
        bodies = [b"%d" % i for i in range(30)]
        replies = await asyncio.gather(
            *(pool.post(endpoint, "/", body, CT, max_body=MAX) for body in bodies)
        )
        assert [r.body for r in replies] == bodies
        assert server.max_open == 3  # the limit is reached and never passed
        assert server.connections == 3
        assert pool.open_connections == 3
        assert pool.waiting == 0


async def test_limit_across_origins_hands_slots_over() -> None:
    async with (
        RawServer(slow_echo(0.005)) as a,
        RawServer(slow_echo(0.005)) as b,
        HttpPool(limit=2) as pool,
    ):
        targets = [pool.endpoint(a.url), pool.endpoint(b.url)]
        seen_open: list[int] = []

        async def one(i: int) -> bytes:
            resp = await pool.post(targets[i % 2], "/", b"%d" % i, CT, max_body=MAX)
            seen_open.append(pool.open_connections)
            return resp.body

        bodies = await asyncio.gather(*(one(i) for i in range(24)))
        assert bodies == [b"%d" % i for i in range(24)]
        assert max(seen_open) <= 2
        assert pool.open_connections <= 2
        # an idle connection to a gives its slot to a request for b
        await pool.post(targets[0], "/", b"a", CT, max_body=MAX)
        before = b.connections
        async with HttpPool(limit=1) as small:
            await small.post(small.endpoint(a.url), "/", b"a", CT, max_body=MAX)
            assert small.idle_connections == 1
            await small.post(small.endpoint(b.url), "/", b"b", CT, max_body=MAX)
            assert small.open_connections == 1
            assert b.connections == before + 1


# --- framing -----------------------------------------------------------------------------


async def test_chunked_body_and_reuse() -> None:
    body = bytes(range(256)) * 40
    reply = chunked(body, [1, 100, 3000, 7])
    async with RawServer(replying(reply, reply)) as server, HttpPool() as pool:
        endpoint = pool.endpoint(server.url)
        for _ in range(2):
            resp = await pool.post(endpoint, "/", b"q", CT, max_body=MAX)
            assert resp.body == body
            assert resp.content_type is None
        assert server.connections == 1


async def test_close_delimited_body() -> None:
    body = b"until the end" * 1000
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body
    async with RawServer(replying(reply, then_close=True)) as server, HttpPool() as pool:
        resp = await pool.post(pool.endpoint(server.url), "/", b"q", CT, max_body=MAX)
        assert resp == Response(200, body, "text/plain")
        assert pool.open_connections == 0


@pytest.mark.parametrize(
    "reply",
    [
        ok(b"bye", b"Connection: close\r\n"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nbye",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nbye",
        ok(b"bye") + b"HTTP/1.1 200 OK\r\n",  # bytes nobody asked for
    ],
    ids=["connection-close", "http-1.0", "http-1.0-keep-alive", "trailing-bytes"],
)
async def test_connection_not_reused(reply: bytes) -> None:
    # The server keeps its side open: only the client decides not to reuse.
    async with RawServer(replying(reply)) as server, HttpPool() as pool:
        endpoint = pool.endpoint(server.url)
        for _ in range(2):
            resp = await pool.post(endpoint, "/", b"q", CT, max_body=MAX)
            assert resp.body == b"bye"
            assert pool.idle_connections == 0
        assert server.connections == 2
        assert pool.open_connections == 0


async def test_interim_responses_are_skipped() -> None:
    reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX: y\r\n\r\n" + ok(
        b"final", b"Content-Type: a/b\r\n"
    )
    async with RawServer(replying(reply, reply)) as server, HttpPool() as pool:
        endpoint = pool.endpoint(server.url)
        for _ in range(2):
            assert await pool.post(endpoint, "/", b"q", CT, max_body=MAX) == Response(
                200, b"final", "a/b"
            )
        assert server.connections == 1


async def test_status_without_body() -> None:
    replies = (b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 304 Not Modified\r\n\r\n")
    async with RawServer(replying(*replies)) as server, HttpPool() as pool:
        endpoint = pool.endpoint(server.url)
        assert (await pool.get(endpoint, "/", max_body=0)).status == 204
        assert (await pool.get(endpoint, "/", max_body=0)).status == 304
        assert server.connections == 1


async def test_not_modified_with_a_content_length_has_no_body() -> None:
    reply = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5000\r\n\r\n"
    async with RawServer(replying(reply, ok(b"next"))) as server, HttpPool() as pool:
        endpoint = pool.endpoint(server.url)
        assert await pool.get(endpoint, "/", max_body=0) == Response(304, b"", None)
        assert (await pool.get(endpoint, "/", max_body=10)).body == b"next"
        assert server.connections == 1


async def test_early_reply_while_the_request_is_still_sent_is_not_reused() -> None:
    # The server answers after the head and reads no body: the rest of our body is still
    # queued, and on a reused connection the server would read it as the next request.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(60)

    async with RawServer(handler) as server, HttpPool() as pool:
        resp = await pool.post(pool.endpoint(server.url), "/", bytes(32 << 20), CT, max_body=MAX)
        assert resp.status == 413
        assert pool.idle_connections == 0
        assert pool.open_connections == 0


# --- bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_oversized_body(framing: str) -> None:
    body = b"z" * 1000
    if framing == "length":
        reply = ok(body)
    elif framing == "chunked":
        reply = chunked(body, [100])
    else:
        reply = b"HTTP/1.1 200 OK\r\n\r\n" + body
    # Every connection answers twice (a close-delimited one once); the client must not come
    # back on the failed connection.
    handler = replying(reply, then_close=True) if framing == "close" else replying(reply, reply)
    async with RawServer(handler) as server, HttpPool() as pool:
        endpoint = pool.endpoint(server.url)
        if framing != "close":
            exact = await pool.post(endpoint, "/", b"q", CT, max_body=1000)
            assert exact.body == body
        with pytest.raises(BadResponse) as info:
            await pool.post(endpoint, "/", b"q", CT, max_body=999)
        assert info.value.code is ErrorCode.TOO_LARGE
        assert pool.open_connections == 0
        assert pool.idle_connections == 0
        resp = await pool.post(endpoint, "/", b"q", CT, max_body=1000)
        assert resp.body == body
        assert server.connections == 2


async def test_declared_length_fails_before_the_body_arrives() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
        await writer.drain()
        await reader.read()  # never sends the body

    async with RawServer(handler) as server, HttpPool() as pool:
        with pytest.raises(BadResponse) as info:
            await pool.post(pool.endpoint(server.url), "/", b"q", CT, max_body=MAX)
        assert info.value.code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (b"HTTX/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", ErrorCode.MALFORMED),
        (b"RTSP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", ErrorCode.MALFORMED),
        (b"garbage\r\n\r\n", ErrorCode.MALFORMED),
        (b"HTTP/1.1 2000 OK\r\n\r\n", ErrorCode.MALFORMED),
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", ErrorCode.MALFORMED),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", ErrorCode.MALFORMED),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", ErrorCode.MALFORMED),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            ErrorCode.MALFORMED,
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx", ErrorCode.MALFORMED),
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 0\r\n\r\n",
            ErrorCode.MALFORMED,
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", ErrorCode.MALFORMED),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", ErrorCode.MALFORMED),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 9 + ok(b""), ErrorCode.TOO_LARGE),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 11 + b"\r\n", ErrorCode.TOO_LARGE),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 2000 + b"\r\n\r\n", ErrorCode.TOO_LARGE),
    ],
)
async def test_malformed_reply(reply: bytes, code: ErrorCode) -> None:
    async with (
        RawServer(replying(reply)) as server,
        HttpPool(max_headers=10, max_head=1024) as pool,
    ):
        with pytest.raises(BadResponse) as info:
            await pool.post(pool.endpoint(server.url), "/", b"q", CT, max_body=MAX)
        assert info.value.code is code
        assert isinstance(info.value, TransportError)
        assert pool.open_connections == 0


async def test_head_bound_counts_bytes_split_across_reads() -> None:
    # The header block arrives in small writes: the bound holds across reads too.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX: ")
        for _ in range(40):
            writer.write(b"y" * 100)
            await writer.drain()
            await asyncio.sleep(0)
        await reader.read()

    async with RawServer(handler) as server, HttpPool(max_head=1024) as pool:
        with pytest.raises(BadResponse) as info:
            await pool.post(pool.endpoint(server.url), "/", b"q", CT, max_body=MAX)
        assert info.value.code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n",
        b"HTTP/1.1 200 OK\r\nContent-",
        b"HTTP/1.",
    ],
)
async def test_server_closes_mid_response(partial: bytes) -> None:
    async with RawServer(replying(partial, then_close=True)) as server, HttpPool() as pool:
        with pytest.raises(BadResponse, match="mid-response"):
            await pool.post(pool.endpoint(server.url), "/", b"q", CT, max_body=MAX)
        assert pool.open_connections == 0


# --- connection failures -------------------------------------------------------------------


async def test_connection_refused() -> None:
    async with HttpPool() as pool:
        with pytest.raises(ConnectFailed) as info:
            await pool.post(
                pool.endpoint(f"http://127.0.0.1:{unused_port()}"), "/", b"q", CT, max_body=MAX
            )
        assert info.value.code is ErrorCode.UNAVAILABLE
        assert isinstance(info.value.__cause__, OSError)
        assert pool.open_connections == 0


async def test_fresh_connection_closed_without_reply_is_a_connection_failure() -> None:
    # The fan-out retries it (spec §10.1: connection failures before a response).
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # then hang up without a word

    async with RawServer(handler) as server, HttpPool() as pool:
        with pytest.raises(ConnectFailed, match="without responding"):
            await pool.post(pool.endpoint(server.url), "/", b"q", CT, max_body=MAX)


async def test_stale_idle_connection_is_skipped_transparently() -> None:
    # Documented behaviour: when the server's close of an idle connection has reached the
    # client before the next request, the pool opens a new connection and the request succeeds.
    async with RawServer(replying(ok(b"one"), then_close=True)) as server, HttpPool() as pool:
        endpoint = pool.endpoint(server.url)
        assert (await pool.post(endpoint, "/", b"q", CT, max_body=MAX)).body == b"one"
        await until(lambda: pool.idle_connections == 0)
        assert pool.open_connections == 0
        assert (await pool.post(endpoint, "/", b"q", CT, max_body=MAX)).body == b"one"
        assert server.connections == 2


async def test_idle_connection_past_keepalive_is_not_reused() -> None:
    async with RawServer(slow_echo(0)) as server, HttpPool(keepalive_s=0.05) as pool:
        endpoint = pool.endpoint(server.url)
        await pool.post(endpoint, "/", b"1", CT, max_body=MAX)
        await pool.post(endpoint, "/", b"2", CT, max_body=MAX)
        assert server.connections == 1
        await asyncio.sleep(0.1)
        assert (await pool.post(endpoint, "/", b"3", CT, max_body=MAX)).body == b"3"
        assert server.connections == 2
        assert pool.open_connections == 1


async def test_reused_connection_closed_before_reply_is_connect_failed() -> None:
    # The race the pool cannot see coming: the server drops the keep-alive connection as the
    # next request crosses it. No response byte arrived: ConnectFailed, the caller retries.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"one"))
        await writer.drain()
        await read_request(reader)  # then close without replying

    async with RawServer(handler) as server, HttpPool() as pool:
        endpoint = pool.endpoint(server.url)
        await pool.post(endpoint, "/", b"q", CT, max_body=MAX)
        with pytest.raises(ConnectFailed, match="reused"):
            await pool.post(endpoint, "/", b"q", CT, max_body=MAX)
        assert pool.open_connections == 0
        assert (await pool.post(endpoint, "/", b"q", CT, max_body=MAX)).body == b"one"
        assert server.connections == 2


async def test_connect_timeout() -> None:
    # A listener whose accept queue is full drops further SYNs: the connect never completes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
                fillers.append(filler)
            async with HttpPool(connect_timeout=0.2) as pool:
                with pytest.raises(ConnectFailed) as info:
                    await pool.post(
                        pool.endpoint(f"http://127.0.0.1:{port}"), "/", b"q", CT, max_body=MAX
                    )
                assert isinstance(info.value.__cause__, TimeoutError)
                assert pool.open_connections == 0
        finally:
            for filler in fillers:
                filler.close()


# --- cancellation and close ------------------------------------------------------------


def held(release: asyncio.Event, received: asyncio.Event) -> Handler:
    """Answer each request only once ``release`` is set; signal each request received."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            received.set()
            await release.wait()
            writer.write(ok(b"late"))
            await writer.drain()

    return handler


async def test_cancel_mid_request_frees_the_slot() -> None:
    release, received = asyncio.Event(), asyncio.Event()
    async with RawServer(held(release, received)) as server, HttpPool(limit=1) as pool:
        endpoint = pool.endpoint(server.url)
        task = asyncio.ensure_future(pool.post(endpoint, "/", b"q", CT, max_body=MAX))
        await received.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.open_connections == 0
        assert pool.idle_connections == 0
        release.set()
        resp = await asyncio.wait_for(pool.post(endpoint, "/", b"q", CT, max_body=MAX), 5)
        assert resp.body == b"late"
        assert server.connections == 2  # the cancelled connection was not reused


async def test_cancel_while_queued_for_a_slot() -> None:
    release, received = asyncio.Event(), asyncio.Event()
    async with RawServer(held(release, received)) as server, HttpPool(limit=1) as pool:
        endpoint = pool.endpoint(server.url)
        first = asyncio.ensure_future(pool.post(endpoint, "/", b"1", CT, max_body=MAX))
        await received.wait()
        queued = asyncio.ensure_future(pool.post(endpoint, "/", b"2", CT, max_body=MAX))
        await until(lambda: pool.waiting == 1)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert pool.waiting == 0
        release.set()
        assert (await first).body == b"late"
        assert pool.open_connections == 1
        assert (await pool.post(endpoint, "/", b"3", CT, max_body=MAX)).body == b"late"
        assert server.connections == 1


async def test_queued_request_gets_the_released_connection() -> None:
    release, received = asyncio.Event(), asyncio.Event()
    async with RawServer(held(release, received)) as server, HttpPool(limit=1) as pool:
        endpoint = pool.endpoint(server.url)
        first = asyncio.ensure_future(pool.post(endpoint, "/", b"1", CT, max_body=MAX))
        await received.wait()
        second = asyncio.ensure_future(pool.post(endpoint, "/", b"2", CT, max_body=MAX))
        await until(lambda: pool.waiting == 1)
        release.set()
        assert [(await first).body, (await second).body] == [b"late", b"late"]
        assert server.connections == 1


async def test_close_fails_in_flight_and_queued_requests() -> None:
    release, received = asyncio.Event(), asyncio.Event()
    async with RawServer(held(release, received)) as server:
        pool = HttpPool(limit=2)
        endpoint = pool.endpoint(server.url)
        tasks = [
            asyncio.ensure_future(pool.post(endpoint, "/", b"%d" % i, CT, max_body=MAX))
            for i in range(3)
        ]
        await until(lambda: pool.waiting == 1 and server.open_now == 2)
        await pool.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, PoolClosed) for r in results), results
        assert pool.closed
        assert pool.open_connections == 0
        await pool.close()  # idempotent
        with pytest.raises(PoolClosed):
            await pool.post(endpoint, "/", b"x", CT, max_body=MAX)
        release.set()
        await until(lambda: server.open_now == 0)  # the connections really closed


async def test_close_closes_idle_connections() -> None:
    async with RawServer(slow_echo(0)) as server:
        async with HttpPool() as pool:
            endpoint = pool.endpoint(server.url)
            await asyncio.gather(
                *(pool.post(endpoint, "/", b"q", CT, max_body=MAX) for _ in range(3))
            )
            assert pool.idle_connections == 3
        assert pool.open_connections == 0
        await until(lambda: server.open_now == 0)


# --- TLS ---------------------------------------------------------------------------------


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for IP 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hansa test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_tls(tmp_path: Path) -> None:
    cert_file, key_file = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_file, key_file)
    trusting = ssl.create_default_context(cafile=str(cert_file))
    async with serve_app(echo_app(), server_context) as port:
        url = f"https://127.0.0.1:{port}"
        async with HttpPool(ssl=trusting) as pool:
            endpoint = pool.endpoint(url)
            for _ in range(3):
                resp = await pool.post(endpoint, "/echo", b"secret", CT, max_body=MAX)
                assert (resp.status, resp.body) == (200, b"secret")
            assert pool.open_connections == 1
        async with HttpPool() as untrusting:  # the system trust store does not know it
            with pytest.raises(ConnectFailed) as info:
                await untrusting.post(untrusting.endpoint(url), "/echo", b"x", CT, max_body=MAX)
            assert isinstance(info.value.__cause__, ssl.SSLError)
            assert untrusting.open_connections == 0
        async with HttpPool(ssl=trusting) as plain:  # http to a TLS port: not HTTP
            with pytest.raises(TransportError):
                await plain.post(
                    plain.endpoint(f"http://127.0.0.1:{port}"), "/echo", b"x", CT, max_body=MAX
                )


# --- the event loop the node runs on ------------------------------------------------------


def test_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        body = b"u" * 70000
        async with (
            RawServer(replying(ok(body), chunked(body, [999]))) as server,
            HttpPool() as pool,
        ):
            endpoint = pool.endpoint(server.url)
            assert (await pool.post(endpoint, "/", b"q", CT, max_body=MAX)).body == body
            assert (await pool.post(endpoint, "/", b"q", CT, max_body=MAX)).body == body
            assert server.connections == 1

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


# --- property: exact bytes whatever the framing and the splits -------------------------


@given(
    size=st.integers(0, 200 * 1024),
    seed=st.integers(0, 2**32 - 1),
    framing=st.sampled_from(["length", "chunked", "close"]),
    cuts=st.lists(st.integers(0, 210 * 1024), max_size=12),
    chunk_sizes=st.lists(st.integers(1, 64 * 1024), min_size=1, max_size=6),
)
def test_body_survives_any_framing_and_split(
    size: int, seed: int, framing: str, cuts: list[int], chunk_sizes: list[int]
) -> None:
    body = random.Random(seed).randbytes(size)
    if framing == "length":
        reply = ok(body)
    elif framing == "chunked":
        reply = chunked(body, chunk_sizes)
    else:
        reply = b"HTTP/1.1 200 OK\r\nContent-Type: x/y\r\n\r\n" + body
    points = sorted({c % (len(reply) + 1) for c in cuts} | {0, len(reply)})
    pieces = [reply[a:b] for a, b in itertools.pairwise(points)]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0)
        if framing != "close":
            await reader.read()

    async def main() -> Response:
        async with RawServer(handler) as server, HttpPool() as pool:
            return await pool.post(pool.endpoint(server.url), "/", b"q", CT, max_body=size)

    resp = asyncio.run(main())
    assert resp.status == 200
    assert resp.body == body


async def test_trailers_and_chunk_framing_are_bounded() -> None:
    # Trailer fields are not body: without a bound, llhttp gathers a trailer value in
    # memory until it ends. A 4 MB trailer after a 10-byte body is refused as too large.
    async def huge_trailer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n")
        writer.write(b"0\r\nX-Pad: ")
        for _ in range(64):
            writer.write(b"p" * 65536)
            await writer.drain()
        writer.write(b"\r\n\r\n")
        await writer.drain()

    async with RawServer(huge_trailer) as server, HttpPool() as pool:
        with pytest.raises(BadResponse) as info:
            await pool.post(pool.endpoint(server.url), "/", b"q", CT, max_body=MAX)
        assert info.value.code is ErrorCode.TOO_LARGE
        assert "trailers" in info.value.message

    # Legitimate framing passes: 2,000 one-byte chunks and a small trailer.
    body = bytes(i % 256 for i in range(2000))

    async def tiny_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        framed = b"".join(b"1\r\n" + body[i : i + 1] + b"\r\n" for i in range(len(body)))
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed)
        writer.write(b"0\r\nX-Checksum: abc\r\n\r\n")
        await writer.drain()

    async with RawServer(tiny_chunks) as server, HttpPool() as pool:
        reply = await pool.post(pool.endpoint(server.url), "/", b"q", CT, max_body=MAX)
        assert reply.body == body
