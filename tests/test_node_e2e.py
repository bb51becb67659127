"""End to end: a real ``hansa node serve`` process on 127.0.0.1, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
from nodeutil import (
    Analyst,
    count_by_room_type,
    init_test_node,
    node_process,
    open_reply,
    price_summary_by_room_type,
)

from hansa.crypto import open_envelope
from hansa.crypto.keyfile import read_public_key
from hansa.node.app import ENVELOPE_MEDIA_TYPE, AnswerEngine, EngineOutput
from hansa.node.server import serve
from hansa.protocol.envelope import message_id
from hansa.protocol.messages import Capabilities, DatasetInfo, QueryAnswer, QueryRequest


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    async with session.post(
        url + "/v1/query", data=body, headers={"Content-Type": ENVELOPE_MEDIA_TYPE}
    ) as resp:
        return resp.status, await resp.read()


def test_node_process_answers_then_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    analyst = Analyst.create("ana@austin")
    config = init_test_node(tmp_path, "austin", analysts=[analyst], rows=300, seed=9)
    with node_process(config.data_dir) as node:
        keys = {node.node_key.key_id: node.node_key}

        async def exercise() -> list[tuple[int, bytes, bytes]]:
            async with aiohttp.ClientSession() as session:
                async with session.get(node.url + "/v1/capabilities") as resp:
                    caps = open_envelope(await resp.read(), keys, Capabilities).message
                assert caps.city == "austin" and caps.node_key == node.node_key.raw
                envelopes = [
                    analyst.seal(analyst.request("austin", q))
                    for q in (count_by_room_type(), price_summary_by_room_type()) * 4
                ]
                replies = await asyncio.gather(*(_post(session, node.url, e) for e in envelopes))
                return [(s, b, e) for (s, b), e in zip(replies, envelopes, strict=True)]

        for status, body, envelope in asyncio.run(exercise()):
            reply = open_reply(status, body, node.node_key)
            assert isinstance(reply, QueryAnswer), reply
            assert reply.request_id == message_id(envelope)
        code, stderr = node.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "shutting down" in stderr
    assert "stopped" in stderr
    assert "Traceback" not in stderr


def test_node_process_stops_on_sigint_too(tmp_path: Path) -> None:
    config = init_test_node(tmp_path, "bangkok", dataset=None)
    with node_process(config.data_dir) as node:
        code, stderr = node.stop(signal.SIGINT)
    assert code == 0, stderr
    assert "stopped" in stderr


def test_demo_runs_end_to_end_with_generated_data(tmp_path: Path) -> None:
    # The demo itself starts real node processes; --synthetic keeps it independent
    # of ../shared and small.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hansa.node.demo",
            "--synthetic",
            "--rows",
            "400",
            "--data-dir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The demo's nodes enforce the alliance roster ([alliance] in node.toml), and
    # its evidence bundle must verify against the pinned roster.
    assert re.search(r"\bVALID\b", result.stdout), result.stdout
    assert re.search(r"All \d+ nodes stopped cleanly", result.stdout), result.stdout
    assert "[alliance]" in (tmp_path / "demo" / "austin" / "node.toml").read_text("utf-8")
    assert (tmp_path / "demo" / "austin" / "node.toml").is_file()
    # The roster names every city's log and witness keys (no trust on first use), and the
    # receipts verified under the log keys it names.
    from hansa.crypto.keyfile import read_public_key
    from hansa.federation.roster import decode_roster, decode_signed_roster

    signed = decode_signed_roster((tmp_path / "demo" / "roster.v1.bin").read_bytes())
    members = decode_roster(signed.body).members
    assert len(members) == 6
    for member in members:
        data_dir = tmp_path / "demo" / member.city
        assert member.log_key == read_public_key(data_dir / "log.key").raw
        assert member.witness_key == read_public_key(data_dir / "witness.key").raw
    assert "receipts: 6 cities logged the request" in result.stdout, result.stdout


class _Gate:
    """The real engine, held at a gate so a request is in flight during shutdown."""

    def __init__(self, inner: AnswerEngine) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = False

    def answer(self, request: QueryRequest) -> EngineOutput:
        self.entered.set()
        self.release.wait(timeout=10)
        return self.inner.answer(request)

    def datasets(self) -> tuple[DatasetInfo, ...]:
        return self.inner.datasets()

    def reload(self) -> None:
        self.inner.reload()

    def close(self) -> None:
        self.closed = True
        self.inner.close()


async def test_shutdown_finishes_in_flight_requests(tmp_path: Path) -> None:
    from hansa.node.engine import QueryEngine

    analyst = Analyst.create("ana@istanbul")
    config = init_test_node(tmp_path, "istanbul", analysts=[analyst], rows=200)
    engine = _Gate(QueryEngine(config.data_dir))
    stop = asyncio.Event()
    urls: list[str] = []
    server = asyncio.create_task(serve(config, engine=engine, stop=stop, ready=urls.append))
    try:
        while not urls:
            await asyncio.sleep(0.01)
            assert not server.done()
        envelope = analyst.seal(analyst.request("istanbul", count_by_room_type()))
        async with aiohttp.ClientSession() as session:
            in_flight = asyncio.create_task(_post(session, urls[0], envelope))
            assert await asyncio.to_thread(engine.entered.wait, 10)
            stop.set()  # what SIGTERM does
            await asyncio.sleep(0.2)
            assert not server.done()  # waiting for the in-flight request
            engine.release.set()
            status, body = await in_flight
        await asyncio.wait_for(server, 20)
        # The node does not close an engine it was given; its owner does.
        assert not engine.closed
    finally:
        engine.release.set()
        stop.set()
        await asyncio.wait_for(server, 20)
        engine.close()
    reply = open_reply(status, body, read_public_key(config.key_file))
    assert isinstance(reply, QueryAnswer)
    assert reply.request_id == message_id(envelope)


def test_sighup_reload_replaces_cached_answers(tmp_path: Path) -> None:
    # A served node caches the answer; after the operator tightens k and sends
    # SIGHUP, the same query is answered under the new settings, not from the cache.
    analyst = Analyst.create("ana@lisbon")
    config = init_test_node(tmp_path, "lisbon", analysts=[analyst], rows=300, seed=4)
    with node_process(config.data_dir) as node:

        async def ask() -> QueryAnswer:
            async with aiohttp.ClientSession() as session:
                envelope = analyst.seal(analyst.request("lisbon", count_by_room_type()))
                reply = open_reply(*await _post(session, node.url, envelope), node.node_key)
            assert isinstance(reply, QueryAnswer), reply
            return reply

        first, again = asyncio.run(ask()), asyncio.run(ask())
        assert again.groups == first.groups and first.groups
        toml = config.data_dir / "datasets.toml"
        text = toml.read_text(encoding="utf-8")
        edited = re.sub(r"(?m)^min_group_size = \d+", "min_group_size = 1000000", text)
        assert edited != text
        toml.write_text(edited, encoding="utf-8")
        node.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while (latest := asyncio.run(ask())).disclosure_version == first.disclosure_version:
            assert time.monotonic() < deadline, "the node did not reload"
            time.sleep(0.05)
        assert latest.disclosure_version == first.disclosure_version + 1
        assert latest.groups == () and latest.suppressed  # every cell is below k now
        code, stderr = node.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "Traceback" not in stderr
