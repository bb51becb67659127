"""Peer process for ``bench/fanout.py``: many fake cities, each on its own port.

Run by ``bench/fanout.py`` as ``python bench/_peers.py SPEC`` where ``SPEC`` is a
msgpack file ``{"delay_s": float, "cities": [[city, {request_id: answer}], ...]}``.
One aiohttp server (on uvloop when available) listens on one fresh
127.0.0.1 port per city, so every city is a separate TCP connection for the
coordinator, as real cities are. A request is answered by looking up the
SHA-256 of its body (its message id) among that city's answers signed in advance,
sleeping ``delay_s``, and returning those exact bytes: the peer spends no
signature work per request, so the coordinator is what the benchmark measures.
An unknown request gets HTTP 400.

The ``aiohttp`` server also serves ``GET /v1/ws`` for ``bench/fanout.py
--transport-compare``: a WebSocket on which every binary frame is a request
envelope, answered (after the same delay, in order on that connection) by one
binary frame holding the pre-signed answer; an unknown request gets a text frame
``unknown request``. This route exists only in the benchmark (spec §10.4: v1
specifies HTTP only).

Two servers, the same behaviour: ``aiohttp`` (an ``aiohttp.web`` application)
and ``lean`` (the default: a bare ``asyncio.Protocol`` speaking just enough
HTTP/1.1 for this benchmark: keep-alive, ``Content-Length`` bodies, one request
at a time per connection). The peers share the coordinator's cores on a
development machine, so every cycle a peer spends is taken from the client
being measured; the lean server spends fewer, which measures the coordinator
more and the peers less (both clients gain; the parent picks with
``--peer-server``).

Protocol with the parent: one JSON line ``{city: port}`` on stdout once every
port listens; the process exits when its stdin closes (the parent ended).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import socket
import sys
from pathlib import Path
from typing import cast

import msgspec
from aiohttp import WSMsgType, web

MEDIA_TYPE = "application/vnd.hansa.envelope+msgpack"
"""The envelope content type (``hansa.federation.fanout.ENVELOPE_MEDIA_TYPE``)."""
WS_PATH = "/v1/ws"
"""The benchmark-only WebSocket route (``--transport-compare``)."""


class Spec(msgspec.Struct, frozen=True):
    """What one peer process serves."""

    delay_s: float
    cities: list[tuple[str, dict[bytes, bytes]]]
    server: str = "lean"


def take_request(buffer: bytearray) -> bytes | None:
    """Remove the first complete HTTP/1.1 request from ``buffer``; return its body.

    Enough HTTP for a benchmark peer: the head ends at the first blank line and the
    body is ``Content-Length`` bytes (none when absent). ``None`` while incomplete.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    at = head.find(b"\r\ncontent-length:")
    size = 0
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        size = int(head[at + 17 : stop if stop > 0 else len(head)])
    if len(buffer) < end + 4 + size:
        return None
    body = bytes(buffer[end + 4 : end + 4 + size])
    del buffer[: end + 4 + size]
    return body


class LeanPeer(asyncio.Protocol):
    """One connection of the lean server: parse a POST, answer after the delay."""

    def __init__(self, answers: dict[bytes, bytes], delay: float) -> None:
        self.answers = answers
        self.delay = delay
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the transport (a pending reply is dropped)."""
        self.transport = None

    def data_received(self, data: bytes) -> None:
        """Answer every complete request in the buffer."""
        self.buffer += data
        while (body := take_request(self.buffer)) is not None:
            answer = self.answers.get(hashlib.sha256(body).digest())
            asyncio.get_running_loop().call_later(self.delay, self._reply, answer)

    def _reply(self, answer: bytes | None) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if answer is None:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 15\r\n\r\nunknown request"
            )
            return
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (MEDIA_TYPE.encode(), len(answer), answer)
        )


async def serve_lean(spec: Spec) -> dict[str, int]:
    """Listen with the lean server on one port per city; return the ports.

    Each port answers with its own city's answers: every city gets the same
    request (spec §7.1), so the request id alone does not say which city's
    signed answer to send.
    """
    loop = asyncio.get_running_loop()
    ports: dict[str, int] = {}
    for city, by_id in spec.cities:
        server = await loop.create_server(
            functools.partial(LeanPeer, by_id, spec.delay_s), "127.0.0.1", 0, backlog=1024
        )
        ports[city] = server.sockets[0].getsockname()[1]
    return ports


async def serve(spec: Spec) -> None:
    """Listen for every city of ``spec``; print the ports; run until stdin closes."""
    by_port: dict[int, dict[bytes, bytes]] = {}
    delay = spec.delay_s

    def answers(request: web.Request) -> dict[bytes, bytes]:
        """The answers of the city whose port the request came in on."""
        assert request.transport is not None
        return by_port.get(request.transport.get_extra_info("sockname")[1], {})

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        answer = answers(request).get(hashlib.sha256(body).digest())
        await asyncio.sleep(delay)
        if answer is None:
            return web.Response(status=400, text="unknown request")
        return web.Response(body=answer, content_type=MEDIA_TYPE)

    async def handle_ws(request: web.Request) -> web.WebSocketResponse:
        # One reply per binary frame, in order: the client correlates by position.
        ws = web.WebSocketResponse(compress=False, max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        mine = answers(request)
        async for msg in ws:
            if msg.type is not WSMsgType.BINARY:
                break
            answer = mine.get(hashlib.sha256(msg.data).digest())
            await asyncio.sleep(delay)
            if answer is None:
                await ws.send_str("unknown request")
            else:
                await ws.send_bytes(answer)
        return ws

    runner: web.AppRunner | None = None
    if spec.server == "lean":
        ports = await serve_lean(spec)
    else:
        app = web.Application()
        app.router.add_post("/v1/query", handle)
        app.router.add_get(WS_PATH, handle_ws)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        ports = {}
        for city, by_id in spec.cities:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            ports[city] = sock.getsockname()[1]
            by_port[ports[city]] = by_id
            await web.SockSite(runner, sock, backlog=1024).start()
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    # Block on stdin in a thread: EOF means the parent is gone (or done).
    await loop.run_in_executor(None, sys.stdin.buffer.read)
    if runner is not None:
        await runner.cleanup()


def main() -> None:
    """Entry point: ``python bench/_peers.py SPEC``."""
    spec = msgspec.msgpack.decode(Path(sys.argv[1]).read_bytes(), type=Spec)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve(spec))
    else:
        uvloop.run(serve(spec))


if __name__ == "__main__":
    main()
