"""End to end: a real ``hansa node serve`` process on 127.0.0.1, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
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
from hansa.node.app import ENVELOPE_MEDIA_TYPE
from hansa.protocol.envelope import message_id
from hansa.protocol.messages import Capabilities, QueryAnswer


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
    assert "Verified 3/3 replies" in result.stdout
    assert "All 3 nodes stopped cleanly" in result.stdout
    assert (tmp_path / "demo" / "austin" / "node.toml").is_file()
