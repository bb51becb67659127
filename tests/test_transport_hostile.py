"""HttpPool and the fan-out against hostile or broken city nodes on 127.0.0.1.

An adversarial companion to ``test_transport.py`` (which covers the ordinary
framing, bounds and pool mechanics): every server here misbehaves on purpose,
in raw bytes written by ``asyncio.start_server`` (or a blocking TLS socket in a
thread), so the client's own network layer is never mocked. Each case checks
the same four things: a :class:`~hansa.federation.transport.TransportError`
with the right ``ErrorCode`` (or the fan-out's status for the city), bounded
time and memory, the bad connection gone (its socket really closed, counted in
``/proc/self/fd``), and the pool still usable afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from nodeutil import PURPOSE, Analyst, count_by_room_type
from test_transport import Handler, RawServer, read_request, self_signed

from hansa.crypto import SigningKey, seal
from hansa.federation.fanout import CityStatus, Target, fan_out
from hansa.federation.transport import (
    BadResponse,
    ConnectFailed,
    HttpPool,
    Response,
    TransportError,
)
from hansa.protocol.codec import decode_as
from hansa.protocol.envelope import decode_envelope, message_id
from hansa.protocol.errors import ErrorCode, HansaError
from hansa.protocol.messages import (
    CountState,
    Decision,
    Group,
    PolicyTags,
    QueryAnswer,
    QueryRequest,
    ResultScope,
)

CT = "application/octet-stream"
MAX = 64 * 1024

pytestmark = pytest.mark.timeout(60)
"""No test may hang the suite: a hang is a failure."""


# --- helpers -----------------------------------------------------------------------------


def Server(handler: Handler) -> RawServer:
    """A :class:`RawServer` for many connections that resets each one when it ends."""
    return RawServer(handler, backlog=1024, abort=True)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def replying(*replies: bytes) -> Handler:
    """Answer successive requests on a connection with ``replies``, then hold it open."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in replies:
            await read_request(reader)
            writer.write(reply)
            await writer.drain()
        await reader.read()

    return handler


def deafen(writer: asyncio.StreamWriter) -> None:
    """Stop reading from the socket: the peer's writes fill the kernel buffers, then block."""
    transport = writer.transport
    assert isinstance(transport, asyncio.ReadTransport)
    transport.pause_reading()


def sockets() -> set[str]:
    """The sockets this process holds open (``socket:[inode]`` links in /proc/self/fd)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone by now
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:"):
                out.add(link)
    return out


async def until(condition: Callable[[], bool], seconds: float = 3.0) -> None:
    """Run the loop until ``condition`` holds (bounded)."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def still_usable(pool: HttpPool) -> None:
    """The pool serves an ordinary exchange with a well-behaved server."""
    async with Server(replying(ok(b"fine"))) as good:
        resp = await pool.post(pool.endpoint(good.url), "/", b"q", CT, max_body=MAX)
        assert resp == Response(200, b"fine", None)


# --- slowloris: the fan-out's deadline bounds every city ------------------------------------


def answer_for(envelope: bytes, city: str, key: SigningKey) -> bytes:
    """A signed answer in shape to the request in ``envelope`` (what a node would send)."""
    request = decode_as(decode_envelope(envelope).payload, QueryRequest)
    answer = QueryAnswer(
        request_id=message_id(envelope),
        responder=city,
        requester=request.requester,
        issued_at=request.issued_at,
        dataset=request.query.dataset,
        dataset_version="v1",
        disclosure_version=1,
        decision=Decision.ANSWERED,
        groups=(Group(key=("Entire home/apt",), states=(CountState(7),)),),
    )
    return seal(answer, key)


TRICKLE_S = 0.05
"""Pause between the bytes a slow peer trickles."""
TRICKLE_STEPS = 600
"""Bytes a slow peer trickles at most (30 s at TRICKLE_S: far past any deadline here)."""


def city_node(key: SigningKey, trickled: dict[str, int]) -> Handler:
    """A peer answering ``/{mode}/v1/query`` well, slowly or without end, by ``mode``."""

    async def trickle(writer: asyncio.StreamWriter, mode: str, unit: bytes) -> None:
        for _ in range(TRICKLE_STEPS):
            writer.write(unit)
            await writer.drain()
            trickled[mode] = trickled.get(mode, 0) + 1
            await asyncio.sleep(TRICKLE_S)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readuntil(b"\r\n")
        mode = line.split(b" ")[1].split(b"/")[1].decode()
        if mode == "deaf":  # stops reading after the request line, never answers
            deafen(writer)
            await asyncio.sleep(TRICKLE_STEPS * TRICKLE_S)
            return
        _, body = await read_request(reader)
        if mode == "good":
            writer.write(ok(answer_for(body, "good", key)))
            await writer.drain()
            await reader.read()
        elif mode == "head":  # the header block, one byte at a time
            writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            await trickle(writer, mode, b"z")
        elif mode == "body":  # a declared length, then the body one byte at a time
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            await trickle(writer, mode, b"b")
        elif mode == "chunks":  # valid one-byte chunks, never the last one
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await trickle(writer, mode, b"1\r\nc\r\n")
        elif mode == "endless":  # chunked at full speed without end: over the bound
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"%x\r\n%s\r\n" % (65536, b"e" * 65536)
            for _ in range(1024):  # 64 MiB at most
                writer.write(piece)
                await writer.drain()

    return handler


async def test_slow_and_endless_peers_end_at_the_fan_out_deadline() -> None:
    analyst = Analyst.create("ana@amsterdam", seed=b"\x31" * 32)
    key = SigningKey.generate()
    trickled: dict[str, int] = {}
    modes = ("good", "head", "body", "chunks", "deaf", "endless")
    deadline = 1.5
    before = sockets()
    async with Server(city_node(key, trickled)) as server, HttpPool() as pool:
        targets = [Target(m, f"{server.url}/{m}", key.public_key) for m in modes]
        started = time.monotonic()
        result = await fan_out(
            count_by_room_type(),
            PolicyTags(
                purpose=PURPOSE,
                legal_basis="test suite",
                scope=ResultScope.ALLIANCE,
                analyst=analyst.principal,
            ),
            targets,
            signer=analyst.key,
            requester=analyst.principal,
            quorum=1,
            deadline_s=deadline,
            pool=pool,
        )
        elapsed = time.monotonic() - started
        status = {r.city: r.status for r in result.cities}
        # The slow peers were still sending when the deadline cut them off (they go on for
        # 30 s): the fan-out returned at its own deadline, not theirs.
        assert elapsed < TRICKLE_STEPS * TRICKLE_S / 2
        assert all(0 < trickled[m] < TRICKLE_STEPS for m in ("head", "body", "chunks"))
        assert status == {
            "good": CityStatus.ANSWERED,
            "head": CityStatus.TIMEOUT,
            "body": CityStatus.TIMEOUT,
            "chunks": CityStatus.TIMEOUT,
            "deaf": CityStatus.TIMEOUT,
            "endless": CityStatus.PROTOCOL_ERROR,
        }
        assert result.city("endless").code is ErrorCode.TOO_LARGE
        assert all(r.attempts == 1 for r in result.cities)  # none of these is retried
        assert result.city("good").latency_ms < deadline * 1000
        assert result.city("endless").latency_ms < deadline * 1000
        # Only the good city's connection is kept; every cut-off one was closed.
        assert pool.open_connections == pool.idle_connections == 1
        await until(lambda: server.open_now == 2)  # the good one and the deaf (it never reads)
        await still_usable(pool)
    await until(lambda: sockets() <= before)


# --- replies larger than the bounds ----------------------------------------------------------


def endless(head: bytes, unit: bytes, finished: list[bool]) -> Handler:
    """Write ``head`` then ``unit`` up to 32 MiB: more than the kernel buffers hold."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(head)
        for _ in range((32 << 20) // len(unit)):
            writer.write(unit)
            await writer.drain()
        finished.append(True)
        await reader.read()

    return handler


_CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "unit"),
    [
        (b"HTTP/1.1 200 OK\r\n", b"X-Many: y\r\n" * 1000),
        (b"HTTP/1.1 200 OK\r\nX-Huge: ", b"h" * 8192),
        (b"HTTP/1.1 200 ", b"r" * 8192),
        (b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 100),
        (_CHUNKED, b"1000\r\n" + b"c" * 4096 + b"\r\n"),
        (_CHUNKED + b"1;x=", b"e" * 8192),
        (_CHUNKED + b"1\r\nt\r\n0\r\nX-Trailer: ", b"t" * 8192),
        (b"HTTP/1.0 200 OK\r\n\r\n", b"d" * 8192),
    ],
    ids=[
        "header-count",
        "header-value",
        "reason-phrase",
        "interim-replies",
        "chunked-body",
        "chunk-extension",
        "trailer",
        "close-delimited-never-closed",
    ],
)
async def test_replies_without_end_fail_at_the_bound(head: bytes, unit: bytes) -> None:
    finished: list[bool] = []
    async with Server(endless(head, unit, finished)) as server, HttpPool() as pool:
        with pytest.raises(BadResponse) as info:
            await pool.post(pool.endpoint(server.url), "/", b"q", CT, max_body=MAX)
        # Over a bound, not a parse error (interim replies hit their count bound).
        assert info.value.code is ErrorCode.TOO_LARGE, info.value
        assert not finished  # the client stopped reading long before the server stopped
        assert pool.open_connections == 0
        await until(lambda: server.open_now == 0)  # the server saw the connection go
        await still_usable(pool)


async def test_bytes_past_the_declared_length_are_not_read_as_a_reply() -> None:
    finished: list[bool] = []
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    async with Server(endless(head, b"past the declared length", finished)) as server:
        async with HttpPool() as pool:
            resp = await pool.post(pool.endpoint(server.url), "/", b"q", CT, max_body=MAX)
            assert resp.body == b"past the d"
            assert not finished
            assert pool.open_connections == 0  # the rest is never read as the next reply
            await until(lambda: server.open_now == 0)
            await still_usable(pool)


async def test_tiny_chunks_do_not_multiply_the_memory_held() -> None:
    # 2-byte chunks: each kept as its own bytes object would cost ~43 bytes per 2 body
    # bytes, ~21 times max_body. The pool must hold about the body, not that.
    size = 256 * 1024
    piece = b"2\r\nab\r\n" * 4096  # 8 KiB of body per write

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(size // 8192):
            writer.write(piece)
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with Server(handler) as server, HttpPool() as pool:
        endpoint = pool.endpoint(server.url)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            resp = await pool.post(endpoint, "/", b"q", CT, max_body=size)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert resp.body == b"ab" * (size // 2)
        # The body twice (gathered, then joined) plus the server's buffers and slack;
        # kept piece by piece it was over 5 MiB.
        assert peak < 8 * size, peak


# --- framing that could carry a reply across requests (response smuggling) ---------------


@pytest.mark.parametrize(
    "first",
    [
        b"HTTP/1.1 204 No Content\r\nContent-Length: 34\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 34\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ],
    ids=["204-with-length", "304-with-length", "length", "chunked"],
)
@pytest.mark.parametrize("apart", [False, True], ids=["one-write", "later-write"])
async def test_bytes_after_a_reply_never_answer_the_next_request(first: bytes, apart: bool) -> None:
    # The server appends a whole forged reply to the first one, in the same write or a
    # moment later while the connection is idle. The next request must get its own reply
    # on a new connection, never the forged one.
    forged = ok(b"FORGED")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if server.connections > 1:
            writer.write(ok(b"real"))
            await writer.drain()
            await reader.read()
            return
        if apart:
            writer.write(first)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(forged)
        else:
            writer.write(first + forged)
        await writer.drain()
        await reader.read()

    async with Server(handler) as server, HttpPool() as pool:
        endpoint = pool.endpoint(server.url)
        resp = await pool.get(endpoint, "/", max_body=MAX)
        assert resp.body in (b"", b"ok")
        if apart:
            await until(lambda: pool.idle_connections == 0)  # dropped when the bytes came
        await asyncio.sleep(0.1)
        assert (await pool.get(endpoint, "/", max_body=MAX)).body == b"real"
        assert server.connections == 2
        assert pool.open_connections == 1


@pytest.mark.parametrize(
    "reply",
    [
        # Status 000..099: llhttp frames these like final replies; skipped as interim, their
        # body was prepended to the final reply's.
        b"HTTP/1.1 099 Odd\r\nContent-Length: 6\r\n\r\nFORGED" + ok(b"final"),
        b"HTTP/1.1 000 Odd\r\nContent-Length: 6\r\n\r\nFORGED" + ok(b"final"),
        # A real interim reply has no body, whatever it declares: "FORGED" is not HTTP.
        b"HTTP/1.1 100 Continue\r\nContent-Length: 6\r\n\r\nFORGED" + ok(b"final"),
        b"HTTP/1.1 102 Processing\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nFORGED\r\n0\r\n\r\n",
    ],
    ids=["099", "000", "100-with-length", "102-chunked"],
)
async def test_interim_replies_carry_no_body_into_the_final_one(reply: bytes) -> None:
    async with Server(replying(reply)) as server, HttpPool() as pool:
        with pytest.raises(BadResponse) as info:
            await pool.post(pool.endpoint(server.url), "/", b"q", CT, max_body=MAX)
        assert info.value.code is ErrorCode.MALFORMED
        assert pool.open_connections == 0
        await still_usable(pool)


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 -200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",  # bare LF line ends
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 0\r\n\r\n",  # obs-fold
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: x\r\n\r\n",
    ],
)
async def test_invalid_status_lines_and_framing_are_malformed(reply: bytes) -> None:
    async with Server(replying(reply)) as server, HttpPool() as pool:
        with pytest.raises(BadResponse) as info:
            await pool.post(pool.endpoint(server.url), "/", b"q", CT, max_body=MAX)
        assert info.value.code is ErrorCode.MALFORMED
        assert isinstance(info.value, HansaError)
        assert pool.open_connections == 0
        await until(lambda: server.open_now == 0)


# --- hang-ups, resets and early replies -----------------------------------------------------


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.parametrize(
    ("partial", "error"),
    [
        (b"", ConnectFailed),  # reset before any reply byte: retry-safe
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf", BadResponse),
        (b"HTTP/1.1 200 OK\r\n\r\nclose-delimited but reset", BadResponse),  # not a clean end
    ],
    ids=["before-reply", "mid-body", "close-delimited"],
)
async def test_reset_mid_reply(partial: bytes, error: type[TransportError]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(partial)
        await writer.drain()
        await asyncio.sleep(0.05)
        reset(writer)

    async with Server(handler) as server, HttpPool() as pool:
        with pytest.raises(error) as info:
            await pool.post(pool.endpoint(server.url), "/", b"q", CT, max_body=MAX)
        assert type(info.value) is error
        expected = ErrorCode.UNAVAILABLE if error is ConnectFailed else ErrorCode.MALFORMED
        assert info.value.code is expected
        assert pool.open_connections == 0
        await still_usable(pool)


async def test_cancel_mid_body_never_leaves_the_rest_for_the_next_request() -> None:
    # The request is cancelled halfway through its body; the server then finishes that
    # reply and appends another. Reused, the connection would answer the next request with
    # the old body's tail and the forged reply.
    halfway, resume = asyncio.Event(), asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if server.connections > 1:
            writer.write(ok(b"real"))
            await writer.drain()
            await reader.read()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        await writer.drain()
        halfway.set()
        await resume.wait()
        with contextlib.suppress(ConnectionError):
            writer.write(b"-half" + ok(b"FORGED"))
            await writer.drain()
        await reader.read()

    async with Server(handler) as server, HttpPool(limit=1) as pool:
        endpoint = pool.endpoint(server.url)
        task = asyncio.ensure_future(pool.get(endpoint, "/", max_body=MAX))
        await halfway.wait()
        await asyncio.sleep(0.02)  # the first half reached the parser
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        resume.set()
        assert pool.open_connections == pool.idle_connections == 0
        assert (await pool.get(endpoint, "/", max_body=MAX)).body == b"real"
        assert server.connections == 2


# --- sockets the pool no longer counts must really be closed ---------------------------------


async def test_peer_that_never_reads_a_large_request_keeps_no_socket() -> None:
    # The request does not fit in the kernel's buffers, so part of it stays in the
    # transport's write buffer. Cancelled, the connection must close at once: a graceful
    # close() waits for the peer to read the rest, i.e. forever, with the socket no longer
    # counted against the pool's limit and out of reach of pool.close().
    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        deafen(writer)
        await asyncio.sleep(30)

    async with Server(deaf) as server, HttpPool() as pool:
        before = sockets()
        task = asyncio.ensure_future(
            pool.post(pool.endpoint(server.url), "/", bytes(32 << 20), CT, max_body=MAX)
        )
        await until(lambda: server.connections == 1)
        await asyncio.sleep(0.1)  # the kernel buffers are full
        assert len(sockets() - before) == 2  # ours and the server's
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.open_connections == 0
        # The server still holds its end; ours is gone.
        await until(lambda: len(sockets() - before) == 1)
        await still_usable(pool)


async def test_early_reply_to_a_large_request_closes_the_socket_at_once() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        deafen(writer)  # and never reads the body
        await asyncio.sleep(30)

    async with Server(handler) as server, HttpPool() as pool:
        before = sockets()
        resp = await pool.post(pool.endpoint(server.url), "/", bytes(32 << 20), CT, max_body=MAX)
        assert resp.status == 413
        assert pool.open_connections == 0
        await until(lambda: len(sockets() - before) == 1)  # only the server's end is left
        await still_usable(pool)


async def test_tls_peer_that_never_answers_close_notify_keeps_no_socket(tmp_path: Path) -> None:
    # A TLS server (a blocking socket in a thread) answers once with Connection: close and
    # then never reads again, so it never answers our close_notify. asyncio's graceful TLS
    # close waits up to 30 s for it; the pool must not leave the socket open meanwhile.
    cert_file, key_file = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_file, key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    done = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            raw, _ = listener.accept()
            held.append(raw)
            raw.settimeout(10)
            tls = server_context.wrap_socket(raw, server_side=True)
            held.append(tls)
            data = b""
            while b"\r\n\r\n" not in data:
                data += tls.recv(4096)
            tls.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        done.wait(10)

    before = sockets()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        trusting = ssl.create_default_context(cafile=str(cert_file))
        async with HttpPool(ssl=trusting) as pool:
            endpoint = pool.endpoint(f"https://127.0.0.1:{port}")
            assert (await pool.post(endpoint, "/", b"q", CT, max_body=MAX)).body == b"ok"
            assert pool.open_connections == 0
            await until(lambda: len(sockets() - before) == 1)  # only the server's end is left
    finally:
        done.set()
        thread.join(10)
        for sock in (*held, listener):
            sock.close()


# --- the global limit under 500 concurrent requests ------------------------------------------


async def test_500_concurrent_requests_to_good_and_hung_peers_stay_in_the_limit() -> None:
    limit = 48
    hung = asyncio.Event()
    seen = {"open": 0, "max": 0}

    def counting(handler: Handler) -> Handler:
        async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen["open"] += 1
            seen["max"] = max(seen["max"], seen["open"])
            try:
                await handler(reader, writer)
            finally:
                seen["open"] -= 1

        return wrapped

    async def good(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(reader)
            writer.write(ok(body))
            await writer.drain()

    async def hanging(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        hung.set()
        await reader.read()  # never answers; returns when the client hangs up

    before = sockets()
    async with (
        Server(counting(good)) as fast,
        Server(counting(good)) as fast2,
        Server(counting(hanging)) as slow,
    ):
        servers = before | sockets()
        pool = HttpPool(limit=limit)

        async def one(i: int) -> bytes | str:
            server = (fast, fast2, slow)[i % 3]
            endpoint = pool.endpoint(server.url)
            try:
                async with asyncio.timeout(0.3 if server is slow else 30):
                    return (await pool.post(endpoint, "/", b"%d" % i, CT, max_body=MAX)).body
            except TimeoutError:
                return "timeout"

        results = await asyncio.gather(*(one(i) for i in range(500)))
        assert hung.is_set()
        for i, got in enumerate(results):
            assert got == ("timeout" if i % 3 == 2 else b"%d" % i), (i, got)
        assert seen["max"] <= limit
        assert pool.open_connections <= limit
        assert pool.waiting == 0
        await pool.close()
        assert pool.open_connections == pool.idle_connections == 0
        await until(lambda: seen["open"] == 0)  # every connection closed, server side too
        await until(lambda: sockets() <= servers)
    await until(lambda: sockets() <= before)


# --- a pool closed under a fan-out of hostile peers ----------------------------------------


async def test_close_during_slow_replies_ends_every_request() -> None:
    # Four slow replies hold the four slots, two more requests wait for one: close() must
    # end all six at once (PoolClosed) and close every socket.
    trickled: dict[str, int] = {}
    key = SigningKey.generate()
    async with Server(city_node(key, trickled)) as server:
        before = sockets()
        pool = HttpPool(limit=4)
        tasks = [
            asyncio.ensure_future(
                pool.post(
                    pool.endpoint(f"{server.url}/{mode}"), "/v1/query", b"q", CT, max_body=1 << 20
                )
            )
            for mode in ("head", "body", "chunks", "deaf", "head", "body")
        ]
        try:
            await until(lambda: server.connections == 4 and pool.waiting == 2)
            await asyncio.sleep(0.1)
        finally:
            await pool.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(
            isinstance(r, TransportError) and r.code is ErrorCode.UNAVAILABLE for r in results
        ), results
        assert pool.open_connections == 0
        await until(lambda: len(sockets() - before) <= 1)  # the deaf server's end only
