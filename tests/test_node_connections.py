"""The node keeps at most ``limits.max_connections`` connections (``hansa.node.server``).

Beyond the limit a new connection is answered ``503`` and closed unread; the open
connections keep being served, and once some close new ones are accepted again.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import uvloop
from nodeutil import init_test_node

from hansa.node.config import NodeLimits
from hansa.node.server import serve

LIMIT = 4
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def _status(reader: asyncio.StreamReader) -> bytes:
    """The status line of the next reply (its head and a short body read past)."""
    async with asyncio.timeout(10):
        line = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
    return line


async def _health(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(HEALTH)
        return await _status(reader)
    finally:
        writer.close()


async def _limited(tmp_path: Path) -> None:
    """Hold the limit, be refused with 503, be served, be accepted again after closes."""
    base = init_test_node(tmp_path, "porto", rows=20)
    config = dataclasses.replace(base, limits=NodeLimits(max_connections=LIMIT))
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, ready=ready.set_result, stop=stop))
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        url = await asyncio.wait_for(ready, 60)
        port = int(url.rsplit(":", 1)[1])
        for _ in range(LIMIT):
            held.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.2)  # the node has made all of them

        # One more: refused at once with 503, nothing read, then closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _status(reader)).startswith(b"HTTP/1.1 503")
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()

        # The connections it holds are still served.
        first_reader, first_writer = held[0]
        first_writer.write(HEALTH)
        assert (await _status(first_reader)).startswith(b"HTTP/1.1 200")

        # Once two close, new connections are accepted again.
        for _, w in held[-2:]:
            w.close()
            await w.wait_closed()
        del held[-2:]
        status = b""
        for _ in range(50):  # bounded: the node notices the closes within a few loops
            status = await _health(port)
            if status.startswith(b"HTTP/1.1 200"):
                break
            await asyncio.sleep(0.05)
        assert status.startswith(b"HTTP/1.1 200")
    finally:
        for _, w in held:
            w.close()
        stop.set()
        await asyncio.wait_for(task, 60)


async def test_connections_beyond_the_limit_get_503_and_the_rest_are_served(
    tmp_path: Path,
) -> None:
    await _limited(tmp_path)


def test_the_same_on_uvloop(tmp_path: Path) -> None:
    # The node serves on uvloop, whose transports derive from none of asyncio's classes.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_limited(tmp_path))


@pytest.mark.parametrize("bad", [0, -1, 65_537])
def test_the_limit_is_validated(bad: int) -> None:
    with pytest.raises(Exception, match="max_connections"):
        NodeLimits(max_connections=bad)
