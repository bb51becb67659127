"""The node's HTTP server against hostile clients, over real sockets on 127.0.0.1.

The node is :func:`hansa.node.server.serve` (the code ``hansa node serve`` runs), in this
process, or ``python -m`` in a subprocess with a low file-descriptor limit on uvloop. The
clients are raw asyncio streams and sockets, so every byte is ours: slowloris headers and
bodies, bodies that never complete or stop mid-way, lies in ``Content-Length``, oversized
chunked and compressed bodies, MessagePack with absurd counts and nesting on every route
that decodes a body, wrong methods, unknown paths, header floods, pipelining, clients
that never read, garbage rosters racing queries, absurd audit ranges and thousands of
idle connections.

Each test expects a clean HTTP error (a signed refusal where the requester is known,
spec/protocol.md §8), no ERROR line and no traceback in the node's log, and a good query
answered afterwards (:func:`hostile_node` checks the last two for every test). Time
bounds are shortened for the test by patching :data:`hansa.node.server.KEEPALIVE_TIMEOUT_S`
and ``hansa.node.app._BODY_TIMEOUT_S``; nothing here times the node (performance lives in
``bench/``): a deadline only stops a test that would otherwise hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import struct
import sys
import textwrap
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import msgspec
import pytest
from nodeutil import (
    PURPOSE,
    Analyst,
    count_by_room_type,
    init_test_node,
    node_process,
    now_ms,
    open_reply,
)

import hansa.node.app as node_app
import hansa.node.server as node_server
from hansa.crypto import PublicKey, SigningKey, open_envelope, seal_bytes
from hansa.crypto.keyfile import read_public_key, write_key_file
from hansa.crypto.merkle import root_hash
from hansa.crypto.note import Checkpoint, NoteSigner, sign_checkpoint
from hansa.federation.roster import Analyst as RosterAnalyst
from hansa.federation.roster import (
    Member,
    Role,
    RootKey,
    Roster,
    decode_signed_roster,
    encode_signed_roster,
    roster_digest,
    sign_roster,
    unsigned,
)
from hansa.node.app import (
    AUDIT_ROUTE,
    ENVELOPE_MEDIA_TYPE,
    ERROR_MEDIA_TYPE,
    ROSTER_MEDIA_TYPE,
    ROSTER_ROUTE,
    WITNESS_ADD_ROUTE,
)
from hansa.node.config import NodeConfig, configure_alliance, load_config
from hansa.protocol.codec import decode_as, encode
from hansa.protocol.envelope import PayloadType, message_id
from hansa.protocol.errors import ErrorCode
from hansa.protocol.messages import (
    AddCheckpoint,
    AuditOp,
    AuditRequest,
    AuditResponse,
    ErrorMessage,
    QueryAnswer,
    QueryRefusal,
)

CITY = "melbourne"
AUDITOR_CITY = "austin"
ANA = Analyst.create("ana@melbourne", seed=b"a" * 32)
AUDITOR_KEY = SigningKey(b"o" * 32)
ROOTS = {CITY: SigningKey(b"r" * 32), AUDITOR_CITY: SigningKey(b"s" * 32)}
DAY_MS = 86_400_000
DEADLINE_S = 10.0
"""Longest wait for anything the node owes us (only ever hit by a failing test)."""
QUERY_ROUTE = "/v1/query"
BODY_ROUTES = (QUERY_ROUTE, AUDIT_ROUTE, ROSTER_ROUTE, WITNESS_ADD_ROUTE)
CONTENT_TYPES = {
    QUERY_ROUTE: ENVELOPE_MEDIA_TYPE,
    AUDIT_ROUTE: ENVELOPE_MEDIA_TYPE,
    ROSTER_ROUTE: ROSTER_MEDIA_TYPE,
    WITNESS_ADD_ROUTE: "application/octet-stream",
}


# --- the node under attack --------------------------------------------------------------


def _roster(node_key: bytes) -> bytes:
    """Roster v1: melbourne answers (and witnesses); austin audits; ana queries."""
    roster = Roster(
        alliance="Hanse",
        version=1,
        expires_ms=now_ms() + DAY_MS,
        threshold=2,
        root_keys=tuple(RootKey(c, k.public_key.raw) for c, k in ROOTS.items()),
        members=(
            Member(CITY, "Melbourne", node_key, "http://127.0.0.1:8470", (Role.MEMBER,)),
            Member(
                AUDITOR_CITY,
                "Austin",
                AUDITOR_KEY.public_key.raw,
                "http://127.0.0.1:8471",
                (Role.MEMBER, Role.AUDITOR),
            ),
        ),
        analysts=(RosterAnalyst(ANA.principal, ANA.key.public_key.raw, CITY, (PURPOSE,)),),
        purposes=(PURPOSE,),
    )
    doc = unsigned(roster)
    for key in ROOTS.values():
        doc = sign_roster(doc, key)
    return encode_signed_roster(doc)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> NodeConfig:
    """A roster node that also witnesses (so every body-reading route is live)."""
    base = init_test_node(tmp_path_factory.mktemp("hostile"), CITY, rows=200)
    data = _roster(read_public_key(base.key_file).raw)
    configure_alliance(base.data_dir, data, roster_digest(decode_signed_roster(data)), now_ms())
    write_key_file(base.data_dir / "witness.key", SigningKey(b"w" * 32))
    toml = base.data_dir / "node.toml"
    toml.write_text(toml.read_text().replace('witness_key = ""', 'witness_key = "witness.key"'))
    return load_config(base.data_dir)


@dataclass(frozen=True)
class Node:
    """A node served by :func:`hansa.node.server.serve` in this process."""

    port: int
    node_key: PublicKey


@contextlib.asynccontextmanager
async def serving(config: NodeConfig) -> AsyncIterator[Node]:
    """Run ``serve(config)`` until the block ends."""
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(node_server.serve(config, ready=ready.set_result, stop=stop))
    try:
        url = await asyncio.wait_for(asyncio.shield(ready), 30)
        yield Node(int(url.rsplit(":", 1)[1]), read_public_key(config.key_file))
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def _assert_clean_log(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, "\n".join(f"{r.name} {r.levelname}: {r.getMessage()}" for r in bad)


@contextlib.asynccontextmanager
async def hostile_node(config: NodeConfig, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Node]:
    """A node that must answer a good query after the block and log no error or traceback."""
    caplog.set_level(logging.INFO)
    async with serving(config) as node:
        yield node
        await _assert_answers(node)
    _assert_clean_log(caplog)


@pytest.fixture
def short_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle connections and bodies time out after 1 s instead of 75 s and 30 s."""
    monkeypatch.setattr(node_server, "KEEPALIVE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(node_app, "_BODY_TIMEOUT_S", 1.0)


# --- a client that controls every byte --------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def _head(method: str, path: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _post(path: str, body: bytes, *, close: bool = True, content_type: str = "") -> bytes:
    headers = [
        ("Content-Type", content_type or CONTENT_TYPES[path]),
        ("Content-Length", str(len(body))),
    ]
    if close:
        headers.append(("Connection", "close"))
    return _head("POST", path, headers) + body


async def _read_response(reader: asyncio.StreamReader) -> Response:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), DEADLINE_S)
    return Response(int(status_line.split()[1]), headers, body)


@contextlib.asynccontextmanager
async def connection(
    node: Node,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        yield reader, writer
    finally:
        writer.transport.abort()


async def exchange(node: Node, data: bytes) -> Response:
    """Send ``data`` on a fresh connection and read one response."""
    async with connection(node) as (reader, writer):
        writer.write(data)
        return await _read_response(reader)


async def _closed_by_node(reader: asyncio.StreamReader) -> bool:
    """Whether the node closes the connection within the deadline (reading what it sends)."""
    try:
        async with asyncio.timeout(DEADLINE_S):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def _error(response: Response, status: int, *codes: ErrorCode) -> ErrorMessage:
    assert response.status == status, response
    assert response.headers["content-type"] == ERROR_MEDIA_TYPE, response
    message = decode_as(response.body, ErrorMessage)
    assert message.code in codes, message
    return message


def _good_query() -> bytes:
    request = ANA.request(CITY, count_by_room_type())
    return ANA.seal(msgspec.structs.replace(request, roster_version=1))


async def _assert_answers(node: Node) -> None:
    response = await exchange(node, _post(QUERY_ROUTE, _good_query()))
    reply = open_reply(response.status, response.body, node.node_key)
    assert isinstance(reply, QueryAnswer), reply


def _refusal(node: Node, response: Response, *codes: ErrorCode) -> QueryRefusal:
    assert response.status == 200, response
    refusal = open_envelope(response.body, {node.node_key.key_id: node.node_key}, QueryRefusal)
    assert refusal.message.code in codes, refusal.message
    return refusal.message


def _audit_envelope(op: AuditOp, **fields: object) -> bytes:
    """An auditor's signed request, encoded field by field (no constructor checks)."""
    issued = now_ms()
    values: dict[str, object] = {
        "requester": AUDITOR_CITY,
        "audience": CITY,
        "issued_at": issued,
        "expires_at": issued + 60_000,
        "nonce": os.urandom(16),
        "roster_version": 1,
        "op": op.value,
        "start": 0,
        "end": 0,
        "index": 0,
        "message_id": None,
        "old_size": 0,
        "new_size": 0,
        "hashes": [],
        **fields,
    }
    names = [f for f in AuditRequest.__struct_fields__]
    payload = msgspec.msgpack.encode(["audit-request", *(values[n] for n in names)])
    return seal_bytes(PayloadType.AUDIT_REQUEST, payload, AUDITOR_KEY)


# --- slowloris, idle and half-finished connections -------------------------------------


@pytest.mark.usefixtures("short_bounds")
async def test_idle_and_slowloris_header_connections_are_dropped_while_others_are_served(
    config: NodeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    async with hostile_node(config, caplog) as node:
        idle = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(10)]
        trickle = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(10)]
        head = _head("GET", "/healthz", [("X-Slow", "y" * 200)])

        async def drip(writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                for byte in head[:-2]:  # never the blank line that ends the headers
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)

        drips = [asyncio.create_task(drip(w)) for _, w in trickle]
        await _assert_answers(node)  # served while they hold their connections
        # aiohttp's own default keeps both kinds for 3630 s; serve() bounds them.
        closed = await asyncio.gather(*(_closed_by_node(r) for r, _ in idle + trickle))
        assert all(closed), closed
        for task in drips:
            task.cancel()
        for _, writer in idle + trickle:
            writer.transport.abort()


@pytest.mark.usefixtures("short_bounds")
@pytest.mark.parametrize("path", BODY_ROUTES)
async def test_a_body_that_never_completes_is_refused_in_bounded_time(
    config: NodeConfig, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    async with hostile_node(config, caplog) as node, connection(node) as (reader, writer):
        writer.write(
            _head(
                "POST",
                path,
                [("Content-Type", CONTENT_TYPES[path]), ("Content-Length", "100000")],
            )
            + b"\x93"
        )

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(200):  # one byte every 50 ms: slower than the 1 s bound
                    await asyncio.sleep(0.05)
                    writer.write(b"\x00")

        dripping = asyncio.create_task(drip())
        await _assert_answers(node)
        response = await _read_response(reader)  # before the fix: no reply, ever
        dripping.cancel()
        _error(response, 400, ErrorCode.MALFORMED)
        assert b"did not arrive" in decode_as(response.body, ErrorMessage).message.encode()


@pytest.mark.parametrize("path", BODY_ROUTES)
async def test_a_client_gone_mid_body_costs_no_traceback(
    config: NodeConfig, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    async with hostile_node(config, caplog) as node:
        for _ in range(3):
            async with connection(node) as (_, writer):
                writer.write(
                    _head(
                        "POST",
                        path,
                        [("Content-Type", CONTENT_TYPES[path]), ("Content-Length", "5000")],
                    )
                    + b"\x93" * 100
                )
                await writer.drain()
                await asyncio.sleep(0.05)  # the handler is waiting for the rest
        # Chunked framing broken half-way through the body.
        async with connection(node) as (reader, writer):
            writer.write(
                _head(
                    "POST",
                    path,
                    [("Content-Type", CONTENT_TYPES[path]), ("Transfer-Encoding", "chunked")],
                )
                + b"4\r\n\x93abc\r\nzz\r\n"
            )
            assert await _closed_by_node(reader)
        await asyncio.sleep(0.1)  # let the handlers of the dropped connections finish


# --- sizes: declared, chunked, compressed ----------------------------------------------


async def test_declared_lengths_far_over_the_limit_are_refused_before_reading(
    config: NodeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    async with hostile_node(config, caplog) as node:
        for path in (QUERY_ROUTE, AUDIT_ROUTE, ROSTER_ROUTE, WITNESS_ADD_ROUTE):
            for declared in (10**7, 10**12, 2**63 - 1):
                response = await exchange(
                    node,
                    _head(
                        "POST",
                        path,
                        [("Content-Type", CONTENT_TYPES[path]), ("Content-Length", str(declared))],
                    )
                    + b"\x93abc",
                )
                _error(response, 413, ErrorCode.TOO_LARGE)
        # Past what HTTP can express: a framing error, not a handler's business.
        response = await exchange(
            node, _head("POST", QUERY_ROUTE, [("Content-Length", "9" * 40)]) + b"x"
        )
        assert response.status == 400


@pytest.mark.parametrize("path", BODY_ROUTES)
async def test_chunked_bodies_beyond_the_limit_are_refused(
    config: NodeConfig, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    chunk = b"\x00" * 65536
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    async with hostile_node(config, caplog) as node, connection(node) as (reader, writer):
        writer.write(
            _head(
                "POST",
                path,
                [("Content-Type", CONTENT_TYPES[path]), ("Transfer-Encoding", "chunked")],
            )
        )
        reply = asyncio.create_task(_read_response(reader))
        with contextlib.suppress(ConnectionError):
            for _ in range(128):  # 8 MiB at most: more than any limit of the node
                if reply.done():
                    break
                writer.write(frame)
                await writer.drain()
        response = await reply
        _error(response, 413, ErrorCode.TOO_LARGE)


async def test_a_compressed_body_is_limited_after_decompression(
    config: NodeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    packer = zlib.compressobj(9)
    zeros = b"\x00" * (1 << 20)
    bomb = b"".join(packer.compress(zeros) for _ in range(256)) + packer.flush()  # 256 MiB
    assert len(bomb) < 300_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with hostile_node(config, caplog) as node:
        for path in (QUERY_ROUTE, AUDIT_ROUTE, ROSTER_ROUTE, WITNESS_ADD_ROUTE):
            response = await exchange(
                node,
                _head(
                    "POST",
                    path,
                    [
                        ("Content-Type", CONTENT_TYPES[path]),
                        ("Content-Encoding", "deflate"),
                        ("Content-Length", str(len(bomb))),
                        ("Connection", "close"),
                    ],
                )
                + bomb,
            )
            assert response.status in (400, 413), response
            message = decode_as(response.body, ErrorMessage)
            assert message.code in (ErrorCode.TOO_LARGE, ErrorCode.MALFORMED), message
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 128 * 1024, f"peak memory grew by {grown_kib} KiB"


# --- MessagePack with absurd counts and nesting -----------------------------------------

_NESTED = b"\x91" * 200_000 + b"\x01"
"""200,000 nested one-element arrays."""
_HUGE_COUNT = b"\xdd" + struct.pack(">I", 200_000) + b"\x01" * 200_000
"""An array of 200,000 items, under the size limit."""
_LYING_COUNT = b"\xdd\xff\xff\xff\xff\x01"
"""An array header claiming 4,294,967,295 items."""


def _oversized_query() -> bytes:
    """A correctly signed request whose targets list holds 20,000 cities."""
    request = ANA.request(CITY, count_by_room_type())
    fields = msgspec.msgpack.decode(encode(request))
    fields[8] = [CITY] * 20_000  # targets
    return seal_bytes(PayloadType.QUERY_REQUEST, msgspec.msgpack.encode(fields), ANA.key)


async def test_absurd_counts_and_nesting_in_every_decoded_body(
    config: NodeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    async with hostile_node(config, caplog) as node:
        rejected = (ErrorCode.MALFORMED, ErrorCode.TOO_LARGE, ErrorCode.INVALID_FIELD)
        for path in BODY_ROUTES:
            for body in (_NESTED, _HUGE_COUNT, _LYING_COUNT):
                response = await exchange(node, _post(path, body))
                _error(response, response.status, *rejected)
                assert response.status in (400, 413), response
        # Signed by a key the node knows: the refusal is signed too.
        response = await exchange(node, _post(QUERY_ROUTE, _oversized_query()))
        _refusal(node, response, ErrorCode.TOO_LARGE)
        hashes = [os.urandom(32)] * 7000  # under 256 KiB, 7 times the page limit
        envelope = _audit_envelope(AuditOp.ENVELOPES, hashes=hashes)
        assert len(envelope) < config.limits.max_request_bytes
        _refusal(node, await exchange(node, _post(AUDIT_ROUTE, envelope)), ErrorCode.TOO_LARGE)
        proof = [os.urandom(32)] * 3000  # under the 128 KiB witness body limit
        add = msgspec.msgpack.encode(["add-checkpoint", 1, proof, b"note"])
        _error(await exchange(node, _post(WITNESS_ADD_ROUTE, add)), 413, ErrorCode.TOO_LARGE)
        status = await exchange(node, _head("GET", ROSTER_ROUTE, [("Connection", "close")]))
        assert status.status == 200 and roster_digest(decode_signed_roster(status.body))


# --- HTTP-level abuse -------------------------------------------------------------------


async def test_wrong_methods_unknown_paths_and_header_floods_are_plain_http_errors(
    config: NodeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    close = [("Connection", "close")]
    async with hostile_node(config, caplog) as node:
        for method, path, status in [
            ("GET", QUERY_ROUTE, 405),
            ("DELETE", QUERY_ROUTE, 405),
            ("PUT", ROSTER_ROUTE, 405),
            ("POST", "/healthz", 405),
            ("GET", "/v1/nope", 404),
            ("GET", "/../../etc/passwd", 404),
            ("BREW", "/", 400),  # the parser knows no such method
        ]:
            response = await exchange(node, _head(method, path, close))
            assert response.status == status, (method, path, response)
        floods = [
            _head("GET", "/healthz", [(f"X-{i}", "y") for i in range(1000)]),
            _head("GET", "/healthz", [("X-Long", "a" * 100_000)]),
            _head("GET", "/" + "a" * 100_000),
            _head("GET", "/healthz", [("Content-Length", "1"), ("Content-Length", "2")]),
            _head("POST", QUERY_ROUTE, [("Content-Length", "-1")]),
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",
        ]
        for flood in floods:
            async with connection(node) as (reader, writer):
                writer.write(flood)
                head = await asyncio.wait_for(reader.read(12), DEADLINE_S)
                assert head.startswith(b"HTTP/1.") and head[9:12] == b"400", head
                assert await _closed_by_node(reader)
        await _assert_answers(node)
    warned = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert warned and all(r.levelno == logging.WARNING for r in warned)


async def test_pipelined_requests_are_answered_in_order(
    config: NodeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    async with hostile_node(config, caplog) as node, connection(node) as (reader, writer):
        first, second = _good_query(), _good_query()
        junk = first[:-1] + bytes([first[-1] ^ 1])  # a flipped signature bit
        requests = [
            _head("GET", "/healthz"),
            _post(QUERY_ROUTE, first, close=False),
            _post(QUERY_ROUTE, junk, close=False),
            _head("GET", "/nope"),
            _post(QUERY_ROUTE, second, close=False),
            *[_head("GET", "/healthz")] * 200,  # beyond aiohttp's queue of 32 messages
            _head("GET", "/v1/capabilities", [("Connection", "close")]),
        ]
        writer.write(b"".join(requests))
        responses = [await _read_response(reader) for _ in requests]
        assert [r.status for r in responses[:5]] == [200, 200, 401, 404, 200]
        for response, envelope in ((responses[1], first), (responses[4], second)):
            reply = open_reply(response.status, response.body, node.node_key)
            assert isinstance(reply, QueryAnswer) and reply.request_id == message_id(envelope)
        assert decode_as(responses[2].body, ErrorMessage).code is ErrorCode.BAD_SIGNATURE
        assert all(r.status == 200 for r in responses[5:])
        assert await _closed_by_node(reader)


async def test_clients_that_never_read_their_replies_do_not_stall_the_node(
    config: NodeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    big_audit = [_audit_envelope(AuditOp.ENTRIES, start=0, end=1000) for _ in range(20)]
    async with hostile_node(config, caplog) as node:
        stuck: list[socket.socket] = []
        try:
            for i in range(40):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", node.port))
                sock.setblocking(False)
                if i % 2:
                    data = _head("GET", "/v1/capabilities") * 300
                else:
                    data = b"".join(_post(AUDIT_ROUTE, e, close=False) for e in big_audit)
                with contextlib.suppress(BlockingIOError):
                    sock.send(data)  # as much as the kernel takes; never a read
                stuck.append(sock)
            await asyncio.sleep(0.5)
            await _assert_answers(node)
            health = await exchange(node, _head("GET", "/healthz", [("Connection", "close")]))
            assert health.status == 200
        finally:
            for sock in stuck:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # a reset, mid-reply
        await asyncio.sleep(0.2)


async def test_garbage_roster_posts_racing_queries_change_nothing(
    config: NodeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    async with hostile_node(config, caplog) as node:
        current = await exchange(node, _head("GET", ROSTER_ROUTE, [("Connection", "close")]))
        assert current.status == 200
        roster = current.body
        garbage = [
            os.urandom(2000),
            roster[:-1],
            roster[:-1] + bytes([roster[-1] ^ 1]),
            roster + b"\x00",
            _NESTED,
            _HUGE_COUNT,
            b"",
        ]

        async def post_garbage(i: int) -> None:
            response = await exchange(node, _post(ROSTER_ROUTE, garbage[i % len(garbage)]))
            assert response.status in (400, 413), response
            decode_as(response.body, ErrorMessage)

        async def query() -> None:
            response = await exchange(node, _post(QUERY_ROUTE, _good_query()))
            assert isinstance(
                open_reply(response.status, response.body, node.node_key), QueryAnswer
            )

        await asyncio.gather(*(post_garbage(i) for i in range(35)), *(query() for _ in range(15)))
        again = await exchange(node, _head("GET", ROSTER_ROUTE, [("Connection", "close")]))
        assert again.body == roster
        # Posting the same roster again is a no-op, not an error.
        same = await exchange(node, _post(ROSTER_ROUTE, roster))
        assert same.status == 200 and b"unchanged" in same.body


async def test_audit_requests_with_absurd_ranges_get_signed_refusals(
    config: NodeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    top = 2**53
    cases: list[tuple[AuditOp, dict[str, object]]] = [
        (AuditOp.ENTRIES, {"start": top - 1000, "end": top}),
        (AuditOp.ENTRIES, {"start": 10**6, "end": 10**6 + 1}),
        (AuditOp.ENTRIES, {"start": 5, "end": 5}),
        (AuditOp.ENTRIES, {"start": 9, "end": 3}),
        (AuditOp.ENTRIES, {"start": 0, "end": top}),
        (AuditOp.ENTRIES, {"start": 0, "end": top + 1}),
        (AuditOp.ENTRIES, {"start": -1, "end": 10}),
        (AuditOp.ENTRIES, {"start": 0, "end": 2**64 - 1}),
        (AuditOp.INCLUSION, {"index": top}),
        (AuditOp.INCLUSION, {"index": 1, "new_size": top}),
        (AuditOp.CONSISTENCY, {"old_size": top, "new_size": top}),
        (AuditOp.CONSISTENCY, {"old_size": 1, "new_size": top}),
        (AuditOp.CONSISTENCY, {"old_size": 0}),
        (AuditOp.RECEIPT, {"message_id": b"\x00" * 32}),
        (AuditOp.ENVELOPES, {"hashes": [b"\x00" * 32] * 1000}),
    ]
    refused = (ErrorCode.INVALID_FIELD, ErrorCode.TOO_LARGE, ErrorCode.MALFORMED)
    async with hostile_node(config, caplog) as node:
        keys = {node.node_key.key_id: node.node_key}
        for op, fields in cases:
            response = await exchange(node, _post(AUDIT_ROUTE, _audit_envelope(op, **fields)))
            assert response.status == 200, (op, fields, response)
            try:
                answer = open_envelope(response.body, keys, AuditResponse).message
            except Exception:
                _refusal(node, response, *refused)
            else:  # only a page past the end may be answered: with nothing
                assert op in (AuditOp.ENTRIES, AuditOp.ENVELOPES), (op, fields)
                assert not answer.entries and not answer.envelopes, (op, fields)


# --- thousands of idle connections against a file-descriptor limit ---------------------

_SERVE = textwrap.dedent(
    """
    import asyncio, resource, sys
    from pathlib import Path
    import uvloop
    import hansa.node.server as server
    from hansa.node.config import load_config
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    server.KEEPALIVE_TIMEOUT_S = 2.0
    server.configure_logging()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(server.serve(load_config(Path(sys.argv[1]))))
    """
)


def _http(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_thousands_of_idle_connections_exhaust_descriptors_only_until_the_idle_timeout(
    config: NodeConfig,
) -> None:
    command = (sys.executable, "-c", _SERVE, str(config.data_dir))
    with node_process(config.data_dir, command=command) as node:
        proc, port = node.proc, int(node.url.rsplit(":", 1)[1])
        held: list[socket.socket] = []
        try:
            for _ in range(2000):  # far beyond the node's 256 descriptors
                sock = socket.socket()
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect(("127.0.0.1", port))
                held.append(sock)
            time.sleep(0.5)
            assert proc.poll() is None, "the node died"
            # The node drops the idle connections after its keep-alive timeout (2 s here)
            # and then serves again, although the attacker still holds its sockets.
            deadline = time.monotonic() + 3 * DEADLINE_S
            reply = b""
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    reply = _http(port, _post(QUERY_ROUTE, _good_query()))
                    if reply.startswith(b"HTTP/1.1 200"):
                        break
                time.sleep(0.5)
            assert reply.startswith(b"HTTP/1.1 200"), reply[:100]
            body = reply.split(b"\r\n\r\n", 1)[1]
            assert isinstance(open_reply(200, body, read_public_key(config.key_file)), QueryAnswer)
        finally:
            for sock in held:
                sock.close()
        proc.send_signal(15)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    log = err.decode(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_the_production_bounds_are_finite() -> None:
    # aiohttp itself bounds neither a body (no limit) nor an idle connection (3630 s).
    assert 0 < node_server.KEEPALIVE_TIMEOUT_S <= 120
    assert 0 < node_app._BODY_TIMEOUT_S <= 60


async def test_a_witness_body_in_several_segments_is_read_to_its_end(
    config: NodeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    # A checkpoint of a log this witness does not follow: 404 once the body is decoded,
    # 400 MALFORMED when only its first segment was read (before the fix).
    paris = NoteSigner("hansa/Hanse/paris", SigningKey(b"p" * 32))
    note = sign_checkpoint(Checkpoint(paris.name, 1, root_hash([b"one"])), paris)
    body = encode(AddCheckpoint(old_size=0, proof=(os.urandom(32),) * 40, checkpoint=note))
    async with hostile_node(config, caplog) as node:
        whole = await exchange(node, _post(WITNESS_ADD_ROUTE, body))
        async with connection(node) as (reader, writer):
            message = _post(WITNESS_ADD_ROUTE, body)
            cut = len(message) - len(body) + 100
            writer.write(message[:cut])
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(message[cut:])
            split = await _read_response(reader)
        assert whole.status == split.status, (whole, split)
        assert decode_as(whole.body, ErrorMessage) == decode_as(split.body, ErrorMessage)
        assert whole.status != 400, whole
