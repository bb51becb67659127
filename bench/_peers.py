"""Peer process for ``bench/fanout.py``: many fake cities, each on its own port.

Run by ``bench/fanout.py`` as ``python bench/_peers.py SPEC`` where ``SPEC`` is a
msgpack file ``{"delay_s": float, "cities": [[city, {request_id: answer}], ...]}``.
One aiohttp server (on uvloop when available) listens on one fresh
127.0.0.1 port per city, so every city is a separate TCP connection for the
coordinator, as real cities are. A request is answered by looking up the
SHA-256 of its body (its message id) among the answers signed in advance,
sleeping ``delay_s``, and returning those exact bytes: the peer spends no
signature work per request, so the coordinator is what the benchmark measures.
An unknown request gets HTTP 400.

Protocol with the parent: one JSON line ``{city: port}`` on stdout once every
port listens; the process exits when its stdin closes (the parent ended).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sys
from pathlib import Path

import msgspec
from aiohttp import web

MEDIA_TYPE = "application/vnd.hansa.envelope+msgpack"
"""The envelope content type (``hansa.federation.fanout.ENVELOPE_MEDIA_TYPE``)."""


class Spec(msgspec.Struct, frozen=True):
    """What one peer process serves."""

    delay_s: float
    cities: list[tuple[str, dict[bytes, bytes]]]


async def serve(spec: Spec) -> None:
    """Listen for every city of ``spec``; print the ports; run until stdin closes."""
    answers: dict[bytes, bytes] = {}
    for _city, by_id in spec.cities:
        answers.update(by_id)
    delay = spec.delay_s

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        answer = answers.get(hashlib.sha256(body).digest())
        await asyncio.sleep(delay)
        if answer is None:
            return web.Response(status=400, text="unknown request")
        return web.Response(body=answer, content_type=MEDIA_TYPE)

    app = web.Application()
    app.router.add_post("/v1/query", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports: dict[str, int] = {}
    for city, _ in spec.cities:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        ports[city] = sock.getsockname()[1]
        await web.SockSite(runner, sock, backlog=1024).start()
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    # Block on stdin in a thread: EOF means the parent is gone (or done).
    await loop.run_in_executor(None, sys.stdin.buffer.read)
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
