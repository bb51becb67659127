"""The node's HTTP routes against a real server on 127.0.0.1 (create_app + AppRunner).

Every bad request gets the right code, as a signed refusal when the requester
is identified and as an unsigned error otherwise, and the node keeps serving.
No route ever returns raw rows.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import re
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nodeutil import (
    DATASET,
    Analyst,
    RunningNode,
    ThreadedNode,
    count_by_room_type,
    init_test_node,
    now_ms,
    open_reply,
    price_summary_by_room_type,
    running_node,
    threaded_node,
)

from hansa.crypto import open_envelope, seal_bytes
from hansa.crypto.keyfile import read_public_key
from hansa.node.app import ENVELOPE_MEDIA_TYPE, AnswerEngine, EngineOutput, unsigned_status
from hansa.node.config import NodeConfig, NodeLimits, load_config
from hansa.node.engine import CacheInfo, QueryEngine
from hansa.node.metrics import Counter, Histogram, NodeMetrics
from hansa.protocol.codec import decode_as, encode
from hansa.protocol.envelope import (
    PayloadType,
    decode_envelope,
    encode_envelope,
    message_id,
)
from hansa.protocol.errors import ErrorCode, HansaError
from hansa.protocol.messages import (
    Capabilities,
    ColumnRole,
    Count,
    CountState,
    DatasetInfo,
    Dimension,
    ErrorMessage,
    Filter,
    FilterOp,
    Query,
    QueryAnswer,
    QueryRefusal,
    QueryRequest,
)

CITY = "melbourne"
ROWS = 400


@pytest.fixture(scope="module")
def analyst() -> Analyst:
    return Analyst.create("ana@melbourne", seed=b"\x11" * 32)


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory, analyst: Analyst) -> NodeConfig:
    root = tmp_path_factory.mktemp("routes")
    return init_test_node(root, CITY, analysts=[analyst], rows=ROWS, seed=3)


@pytest.fixture(scope="module")
def listing_rows(node_dir: NodeConfig) -> list[dict[str, str]]:
    path = node_dir.data_dir.parent / f"{CITY}-listings.csv"
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def answer_of(reply: object) -> QueryAnswer:
    assert isinstance(reply, QueryAnswer), reply
    return reply


# --- good queries ---------------------------------------------------------------------


async def test_good_query_is_answered_and_verifies(
    node_dir: NodeConfig, analyst: Analyst, listing_rows: list[dict[str, str]]
) -> None:
    async with running_node(node_dir) as node:
        assert node.node_key == read_public_key(node_dir.key_file)
        envelope = analyst.seal(analyst.request(CITY, count_by_room_type()))
        status, body = await node.post(envelope)
        assert status == 200
        # Verifies under the node's published key, and only under it.
        opened = open_envelope(body, {node.node_key.key_id: node.node_key}, QueryAnswer)
        answer = opened.message
        assert answer.request_id == message_id(envelope)
        assert (answer.responder, answer.requester, answer.dataset) == (
            CITY,
            analyst.principal,
            DATASET,
        )
        room_types = {row["room_type"] for row in listing_rows}
        released = {g.key[0]: g.states[0] for g in answer.groups}
        assert set(released) | {c.key[0] for c in answer.suppressed} <= room_types
        for room_type, state in released.items():
            expected = sum(1 for row in listing_rows if row["room_type"] == room_type)
            assert state == CountState(n=expected)


async def test_quantile_query_is_answered(node_dir: NodeConfig, analyst: Analyst) -> None:
    async with running_node(node_dir) as node:
        reply = await node.query(analyst.seal(analyst.request(CITY, price_summary_by_room_type())))
        answer = answer_of(reply)
        assert answer.groups
        assert all(len(g.states) == 3 for g in answer.groups)


async def test_capabilities_verify_and_are_cached(node_dir: NodeConfig) -> None:
    async with running_node(node_dir) as node:
        status, body, content_type = await node.get("/v1/capabilities")
        assert (status, content_type) == (200, ENVELOPE_MEDIA_TYPE)
        caps = open_envelope(body, {node.node_key.key_id: node.node_key}, Capabilities).message
        assert caps.city == CITY
        assert caps.node_key == node.node_key.raw
        (info,) = [d for d in caps.datasets if d.name == DATASET]
        roles = {c.name: c.role for c in info.columns}
        assert roles["room_type"] is ColumnRole.DIMENSION
        assert roles["price"] is ColumnRole.MEASURE
        # Identifying columns are never offered as dimensions (hidden ones are not even listed).
        assert roles.get("host_name", ColumnRole.HIDDEN) in (
            ColumnRole.IDENTIFIER,
            ColumnRole.HIDDEN,
        )
        assert roles.get("id", ColumnRole.HIDDEN) in (ColumnRole.IDENTIFIER, ColumnRole.HIDDEN)
        assert "research" in info.disclosure.purposes
        again = await node.get("/v1/capabilities")
        assert again[1] == body  # cached: the same signed bytes


class _ChangingDatasets:
    """A real engine whose published dataset list can be swapped (capability cache test)."""

    def __init__(self, inner: AnswerEngine) -> None:
        self.inner = inner
        self.extra: tuple[DatasetInfo, ...] = ()

    def answer(self, request: QueryRequest) -> EngineOutput:
        return self.inner.answer(request)

    def datasets(self) -> tuple[DatasetInfo, ...]:
        return self.inner.datasets() + self.extra

    def reload(self) -> None:
        self.inner.reload()

    def close(self) -> None:
        self.inner.close()


def _open_engine(config: NodeConfig) -> AnswerEngine:
    from hansa.node.engine import QueryEngine

    return QueryEngine(config.data_dir, timeout_s=5.0)


async def test_capabilities_are_resigned_when_datasets_change(node_dir: NodeConfig) -> None:
    engine = _ChangingDatasets(_open_engine(node_dir))
    try:
        async with running_node(node_dir, engine=engine) as node:
            first = (await node.get("/v1/capabilities"))[1]
            (info,) = engine.inner.datasets()
            engine.extra = (msgspec.structs.replace(info, name="listings_copy"),)
            second = (await node.get("/v1/capabilities"))[1]
            assert second != first
            keys = {node.node_key.key_id: node.node_key}
            caps = open_envelope(second, keys, Capabilities).message
            assert {d.name for d in caps.datasets} == {DATASET, "listings_copy"}
    finally:
        engine.close()


# --- bad requests -----------------------------------------------------------------------


def _tampered(analyst: Analyst) -> bytes:
    env = decode_envelope(analyst.seal(analyst.request(CITY, count_by_room_type())))
    payload = bytearray(env.payload)
    payload[-1] ^= 0x01  # flip one bit of the signed body
    return encode_envelope(msgspec.structs.replace(env, payload=bytes(payload)))


def _bad_identifier(name: str) -> Query:
    # Struct construction does not apply the schema's patterns; the node's strict
    # decoder must (the request is signed, so the refusal is too).
    return Query(dataset=DATASET, aggregates=(Count(),), group_by=(Dimension(name),))


def bad_cases(analyst: Analyst, stranger: Analyst) -> list[tuple[str, bytes, str, int, set[int]]]:
    """(name, body, content type, expected HTTP status, acceptable codes)."""
    a = analyst
    now = now_ms()
    good = count_by_room_type()
    replayed = a.seal(a.request(CITY, good))
    nonce = b"\x42" * 16
    env = ENVELOPE_MEDIA_TYPE
    return [
        ("tampered", _tampered(a), env, 401, {ErrorCode.BAD_SIGNATURE}),
        (
            "unknown key",
            stranger.seal(stranger.request(CITY, good)),
            env,
            401,
            {ErrorCode.UNKNOWN_KEY},
        ),
        ("oversized", b"\x00" * (300 * 1024), env, 413, {ErrorCode.TOO_LARGE}),
        ("malformed msgpack", b"\xc1\xc1 not msgpack", env, 400, {ErrorCode.MALFORMED}),
        ("empty body", b"", env, 400, {ErrorCode.MALFORMED}),
        ("wrong content type", replayed, "application/json", 415, {ErrorCode.MALFORMED}),
        (
            "expired",
            a.seal(a.request(CITY, good, issued_at=now - 120_000, validity_ms=60_000)),
            env,
            200,
            {ErrorCode.EXPIRED},
        ),
        (
            "future-dated",
            a.seal(a.request(CITY, good, issued_at=now + 600_000)),
            env,
            200,
            {ErrorCode.NOT_YET_VALID},
        ),
        (
            "validity too long",
            a.seal(a.request(CITY, good, validity_ms=3_600_000)),
            env,
            200,
            {ErrorCode.VALIDITY_TOO_LONG},
        ),
        ("first of a replay", replayed, env, 200, {0}),
        # A byte-identical repeat gets the answer already released (spec §8.3 repeats).
        ("repeated envelope", replayed, env, 200, {0}),
        ("nonce reuse 1", a.seal(a.request(CITY, good, nonce=nonce)), env, 200, {0}),
        (
            "nonce reuse 2",  # other bytes (validity), same (requester, nonce)
            a.seal(a.request(CITY, good, nonce=nonce, validity_ms=59_000)),
            env,
            200,
            {ErrorCode.REPLAYED},
        ),
        (
            "wrong audience",
            # Signed for other cities only: this node is not among the targets.
            a.seal(a.request("cape-town", good, targets=("cape-town", "lagos"))),
            env,
            200,
            {ErrorCode.WRONG_AUDIENCE},
        ),
        (
            "requester not bound to key",
            a.seal(a.request(CITY, good, requester="bob@melbourne")),
            env,
            200,
            {ErrorCode.REQUESTER_NOT_ALLOWED},
        ),
        (
            "signed garbage body",
            seal_bytes(PayloadType.QUERY_REQUEST, b"\x93\x01\x02\x03", a.key),
            env,
            200,
            {ErrorCode.MALFORMED},
        ),
        (
            "wrong payload type",
            seal_bytes(PayloadType.CAPABILITIES, encode(a.request(CITY, good)), a.key),
            env,
            200,
            {ErrorCode.UNKNOWN_PAYLOAD_TYPE},
        ),
        (
            "unknown dataset",
            a.seal(a.request(CITY, Query(dataset="nope", aggregates=(Count(),)))),
            env,
            200,
            {ErrorCode.UNKNOWN_DATASET},
        ),
        (
            "unknown column",
            a.seal(a.request(CITY, _bad_identifier("no_such_column"))),
            env,
            200,
            {ErrorCode.UNKNOWN_COLUMN},
        ),
        (
            "wrong literal type",
            a.seal(
                a.request(
                    CITY,
                    Query(
                        dataset=DATASET,
                        aggregates=(Count(),),
                        filters=(Filter("price", FilterOp.GT, ("expensive",)),),
                    ),
                )
            ),
            env,
            200,
            {ErrorCode.TYPE_MISMATCH},
        ),
        (
            "identifier as group-by",
            a.seal(a.request(CITY, _bad_identifier("host_name"))),
            env,
            200,
            {ErrorCode.COLUMN_ROLE_FORBIDDEN},
        ),
        (
            "identifier id as group-by",
            a.seal(a.request(CITY, _bad_identifier("id"))),
            env,
            200,
            {ErrorCode.COLUMN_ROLE_FORBIDDEN},
        ),
        (
            "sql metacharacters in group-by",
            a.seal(a.request(CITY, _bad_identifier('room_type"; DROP TABLE listings; --'))),
            env,
            200,
            {ErrorCode.INVALID_FIELD},
        ),
        (
            "sql metacharacters in dataset",
            a.seal(a.request(CITY, Query(dataset="listings; SELECT 1", aggregates=(Count(),)))),
            env,
            200,
            {ErrorCode.INVALID_FIELD},
        ),
        (
            "purpose not allowed",
            a.seal(a.request(CITY, good, purpose="marketing")),
            env,
            200,
            {ErrorCode.PURPOSE_NOT_ALLOWED},
        ),
    ]


@pytest.fixture(scope="module")
def stranger() -> Analyst:
    return Analyst.create("eve@elsewhere", seed=b"\x66" * 32)


async def test_every_bad_request_gets_its_code_and_the_node_keeps_serving(
    node_dir: NodeConfig, analyst: Analyst, stranger: Analyst
) -> None:
    cases = bad_cases(analyst, stranger)
    async with running_node(node_dir) as node:
        for name, body, content_type, status, codes in cases:
            got_status, got = await node.post(body, content_type=content_type)
            assert got_status == status, (name, got_status, got[:200])
            if status == 200:
                # Signed by the node: the requester was identified.
                keys = {node.node_key.key_id: node.node_key}
                if codes == {0}:
                    assert open_envelope(got, keys, QueryAnswer).message.groups, name
                    continue
                refusal = open_envelope(got, keys, QueryRefusal).message
                assert refusal.code in codes, (name, refusal)
                assert refusal.request_id == message_id(body), name
                assert refusal.requester == analyst.principal, name
                assert refusal.responder == CITY
            else:
                error = msgspec.msgpack.decode(got, type=ErrorMessage)
                assert error.code in codes, (name, error)
        # After all of that, a good query is still answered...
        reply = await node.query(analyst.seal(analyst.request(CITY, count_by_room_type())))
        assert answer_of(reply).groups
        # ...and the node's counters saw every request.
        metrics = node.state.metrics
        total = sum(
            metrics.requests.value("/v1/query", outcome, code)
            for outcome in ("answered", "repeated", "refused", "rejected")
            for code in ["none", *(c.name for c in ErrorCode)]
        )
        assert total == len(cases) + 1
        assert metrics.verification_failures.value("BAD_SIGNATURE") == 1
        assert metrics.verification_failures.value("UNKNOWN_KEY") == 1


SINGLE_CASES = [
    "tampered",
    "unknown key",
    "oversized",
    "malformed msgpack",
    "empty body",
    "wrong content type",
    "expired",
    "future-dated",
    "validity too long",
    "wrong audience",
    "requester not bound to key",
    "signed garbage body",
    "wrong payload type",
    "unknown dataset",
    "unknown column",
    "wrong literal type",
    "identifier as group-by",
    "identifier id as group-by",
    "sql metacharacters in group-by",
    "sql metacharacters in dataset",
    "purpose not allowed",
]


@pytest.mark.parametrize("name", SINGLE_CASES)
async def test_bad_requests_one_by_one(
    node_dir: NodeConfig, analyst: Analyst, stranger: Analyst, name: str
) -> None:
    by_name = {case[0]: case for case in bad_cases(analyst, stranger)}
    _, body, content_type, status, codes = by_name[name]
    async with running_node(node_dir) as node:
        got_status, got = await node.post(body, content_type=content_type)
        assert got_status == status, name
        if status == 200:
            keys = {node.node_key.key_id: node.node_key}
            assert open_envelope(got, keys, QueryRefusal).message.code in codes, name
        else:
            assert msgspec.msgpack.decode(got, type=ErrorMessage).code in codes, name
        assert answer_of(
            await node.query(analyst.seal(analyst.request(CITY, count_by_room_type())))
        ).groups


async def test_sql_metacharacters_in_a_literal_are_just_a_value(
    node_dir: NodeConfig, analyst: Analyst
) -> None:
    query = Query(
        dataset=DATASET,
        aggregates=(Count(),),
        filters=(Filter("room_type", FilterOp.EQ, ("x' OR '1'='1",)),),
        group_by=(Dimension("room_type"),),
    )
    async with running_node(node_dir) as node:
        answer = answer_of(await node.query(analyst.seal(analyst.request(CITY, query))))
        assert answer.groups == () and answer.suppressed == ()


# --- engine failures become signed refusals ----------------------------------------------


class _Wrapped:
    """The real engine with a hook before each answer (blocking, failing, slow)."""

    def __init__(self, inner: AnswerEngine) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail: BaseException | None = None
        self.block = False

    def answer(self, request: QueryRequest) -> EngineOutput:
        self.entered.set()
        if self.block:
            self.release.wait(timeout=10)
        if self.fail is not None:
            raise self.fail
        return self.inner.answer(request)

    def datasets(self) -> tuple[DatasetInfo, ...]:
        return self.inner.datasets()

    def reload(self) -> None:
        self.inner.reload()

    def close(self) -> None:
        self.inner.close()


def _config(config: NodeConfig, **limits: Any) -> NodeConfig:
    return NodeConfig(
        data_dir=config.data_dir,
        city=config.city,
        key_file=config.key_file,
        trusted=config.trusted,
        limits=NodeLimits(**limits),
    )


async def _refusal(node: RunningNode, body: bytes) -> QueryRefusal:
    status, got = await node.post(body)
    assert status == 200
    return open_envelope(got, {node.node_key.key_id: node.node_key}, QueryRefusal).message


async def test_overload_is_a_signed_unavailable_refusal(
    node_dir: NodeConfig, analyst: Analyst
) -> None:
    engine = _Wrapped(_open_engine(node_dir))
    engine.block = True
    config = _config(node_dir, max_concurrent_queries=1, max_queued_queries=0)
    try:
        async with running_node(config, engine=engine) as node:
            first = asyncio.ensure_future(
                node.query(analyst.seal(analyst.request(CITY, count_by_room_type())))
            )
            assert await asyncio.to_thread(engine.entered.wait, 10)
            refusal = await _refusal(
                node, analyst.seal(analyst.request(CITY, count_by_room_type()))
            )
            assert refusal.code is ErrorCode.UNAVAILABLE
            engine.release.set()
            assert answer_of(await first).groups
            engine.block = False
            assert answer_of(
                await node.query(analyst.seal(analyst.request(CITY, count_by_room_type())))
            ).groups
    finally:
        engine.release.set()
        engine.close()


async def test_engine_overrun_is_a_signed_timeout(node_dir: NodeConfig, analyst: Analyst) -> None:
    engine = _Wrapped(_open_engine(node_dir))
    engine.block = True
    config = _config(node_dir, query_timeout_s=0.05)
    try:
        async with running_node(config, engine=engine) as node:
            refusal = await _refusal(
                node, analyst.seal(analyst.request(CITY, count_by_room_type()))
            )
            assert refusal.code is ErrorCode.QUERY_TIMEOUT
            engine.release.set()
    finally:
        engine.release.set()
        engine.close()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RuntimeError("secret /etc/path and row 4242"), ErrorCode.INTERNAL),
        (HansaError("engine budget", ErrorCode.RESOURCE_LIMIT), ErrorCode.RESOURCE_LIMIT),
        (HansaError("local only", ErrorCode.CONFIG), ErrorCode.INTERNAL),
    ],
)
async def test_engine_errors_map_to_codes_without_secrets(
    node_dir: NodeConfig, analyst: Analyst, error: BaseException, code: ErrorCode
) -> None:
    engine = _Wrapped(_open_engine(node_dir))
    engine.fail = error
    try:
        async with running_node(node_dir, engine=engine) as node:
            refusal = await _refusal(
                node, analyst.seal(analyst.request(CITY, count_by_room_type()))
            )
            assert refusal.code is code
            if code is ErrorCode.INTERNAL:
                assert "secret" not in refusal.reason and "4242" not in refusal.reason
            engine.fail = None
            assert answer_of(
                await node.query(analyst.seal(analyst.request(CITY, count_by_room_type())))
            ).groups
    finally:
        engine.close()


# --- no raw rows, on any route -----------------------------------------------------------


def _raw_values(rows: list[dict[str, str]]) -> list[bytes]:
    """Identifying values of the generated listings, as they could appear on the wire."""
    needles: set[bytes] = set()
    for row in rows:
        for column in ("name", "host_name", "license"):
            value = row.get(column, "")
            if len(value) >= 8:
                needles.add(value.encode())
        for column in ("id", "host_id"):
            value = row.get(column, "")
            if value.isdigit() and int(value) >= 10**6:
                needles.add(value.encode())
                needles.add(msgspec.msgpack.encode(int(value)))
    return sorted(needles)


async def test_no_route_returns_raw_rows(
    node_dir: NodeConfig, analyst: Analyst, listing_rows: list[dict[str, str]]
) -> None:
    needles = _raw_values(listing_rows)
    assert len(needles) > ROWS  # the check has teeth: names, hosts and ids
    bodies: list[bytes] = []
    async with running_node(node_dir) as node:
        good = analyst.seal(analyst.request(CITY, price_summary_by_room_type()))
        payloads = [
            b"",
            good,
            analyst.seal(analyst.request(CITY, _bad_identifier("host_name"))),
            analyst.seal(analyst.request(CITY, _bad_identifier("neighbourhood"))),
        ]
        paths = set()
        for route in node.app.router.routes():
            info = route.resource.get_info() if route.resource is not None else {}
            path = str(info.get("path") or info.get("formatter") or "")
            paths.add(path)
            for body in payloads:
                for method in ("GET", "POST"):
                    async with node.session.request(
                        method,
                        node.url + path,
                        data=body,
                        headers={"Content-Type": ENVELOPE_MEDIA_TYPE},
                    ) as resp:
                        bodies.append(await resp.read())
        assert paths >= {"/v1/query", "/v1/capabilities", "/healthz", "/metrics"}
    assert any(b for b in bodies)
    for body in bodies:
        for needle in needles:
            assert needle not in body, needle


# --- health and metrics --------------------------------------------------------------------


async def test_health_and_metrics(node_dir: NodeConfig, analyst: Analyst) -> None:
    async with running_node(node_dir) as node:
        status, body, content_type = await node.get("/healthz")
        assert (status, content_type) == (200, "application/json")
        assert json.loads(body) == {"ok": True, "city": CITY}
        await node.query(analyst.seal(analyst.request(CITY, count_by_room_type())))
        await node.post(b"junk")
        status, body, content_type = await node.get("/metrics")
        assert (status, content_type) == (200, "text/plain")
        text = body.decode()
    sample = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"\n]*"(,[a-z_]+="[^"\n]*")*\})? \S+$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert 'hansa_requests_total{route="/v1/query",outcome="answered",code="none"} 1' in text
    assert 'hansa_requests_total{route="/v1/query",outcome="rejected",code="MALFORMED"} 1' in text
    assert "hansa_query_duration_seconds_count 2" in text
    assert 'hansa_query_duration_seconds_bucket{le="+Inf"} 2' in text
    assert "hansa_replay_cache_entries 1" in text
    assert "hansa_witness_equivocation_alarms 0" in text


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram("t_seconds", "test", buckets=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    lines = h.render()
    assert 't_seconds_bucket{le="0.1"} 2' in lines
    assert 't_seconds_bucket{le="1"} 3' in lines
    assert 't_seconds_bucket{le="+Inf"} 4' in lines
    assert "t_seconds_count 4" in lines
    with pytest.raises(ValueError):
        Histogram("bad", "bad", buckets=(1.0, 0.5))


def test_counter_labels_are_escaped() -> None:
    c = Counter("c_total", "help", ("l",))
    c.inc('a"b\\c\nd')
    assert c.render()[-1] == 'c_total{l="a\\"b\\\\c\\nd"} 1'
    with pytest.raises(ValueError):
        c.inc("x", amount=-1)
    with pytest.raises(ValueError):
        c.inc()
    assert NodeMetrics().render().endswith("\n")
    # The witness alarm gauge reads the live count (issue 5: alarm as a metric).
    alarms = [0.0]
    metrics = NodeMetrics(witness_alarms=lambda: alarms[0])
    assert "hansa_witness_equivocation_alarms 0" in metrics.render()
    alarms[0] = 2.0
    assert "hansa_witness_equivocation_alarms 2" in metrics.render()


# --- fuzzing a live node -----------------------------------------------------------------


@pytest.fixture(scope="module")
def live_node(
    node_dir: NodeConfig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedNode]:
    # A copy of the data directory: an audit log has one writer (spec §16.2), and
    # other tests start nodes on node_dir while this one runs.
    copy = tmp_path_factory.mktemp("live") / CITY
    shutil.copytree(node_dir.data_dir, copy, ignore=shutil.ignore_patterns("audit.sqlite*"))
    with threaded_node(load_config(copy)) as node:
        yield node


def _check_reply(node: ThreadedNode, status: int, body: bytes) -> ErrorCode | None:
    """Every reply is a signed refusal/answer (200) or an unsigned error (4xx): never a crash."""
    reply = open_reply(status, body, node.node_key)
    if isinstance(reply, ErrorMessage):
        assert status == unsigned_status(reply.code) or (status, reply.code) == (
            415,
            ErrorCode.MALFORMED,
        )
        return reply.code
    assert status == 200
    return reply.code if isinstance(reply, QueryRefusal) else None


@given(st.binary(max_size=2048))
def test_random_bytes_never_break_the_node(live_node: ThreadedNode, data: bytes) -> None:
    status, body = live_node.post(data)
    code = _check_reply(live_node, status, body)
    assert code is not None  # random bytes are never answered


@given(st.data())
def test_bit_flipped_requests_are_never_answered(
    live_node: ThreadedNode, analyst: Analyst, data: st.DataObject
) -> None:
    envelope = bytearray(analyst.seal(analyst.request(CITY, count_by_room_type())))
    flips = data.draw(
        st.lists(st.integers(0, len(envelope) * 8 - 1), min_size=1, max_size=3, unique=True)
    )
    for bit in flips:
        envelope[bit // 8] ^= 1 << (bit % 8)
    status, body = live_node.post(bytes(envelope))
    assert _check_reply(live_node, status, body) is not None
    # The node is still healthy: an intact request is answered.
    good = analyst.seal(analyst.request(CITY, count_by_room_type()))
    status, body = live_node.post(good)
    assert isinstance(open_reply(status, body, live_node.node_key), QueryAnswer)


# --- cached answers, keep-alive, quiet hot path ----------------------------------------------


def _cache_info(node: RunningNode) -> CacheInfo:
    engine = node.state.engine
    assert isinstance(engine, QueryEngine)
    return engine.cache_info()


async def test_a_cached_answer_is_still_verified_replay_checked_and_freshly_signed(
    node_dir: NodeConfig, analyst: Analyst
) -> None:
    async with running_node(node_dir) as node:
        keys = {node.node_key.key_id: node.node_key}
        envelopes = [analyst.seal(analyst.request(CITY, count_by_room_type())) for _ in range(3)]
        bodies = [(await node.post(envelope))[1] for envelope in envelopes]
        info = _cache_info(node)
        assert info.hits >= 2 and info.entries >= 1
        answers = [open_envelope(body, keys, QueryAnswer).message for body in bodies]
        # One computation, three answers: each for its own request, each signed anew.
        assert [a.request_id for a in answers] == [message_id(e) for e in envelopes]
        assert len({decode_envelope(body).signature for body in bodies}) == 3
        assert answers[1].groups == answers[0].groups == answers[2].groups
        # Checks before the cache still apply to a query whose answer is cached: a
        # byte-identical repeat gets the very answer already released (spec §8.3), and
        # the same nonce in other bytes is a replay.
        status, again = await node.post(envelopes[1])
        assert status == 200 and again == bodies[1]
        first = decode_as(decode_envelope(envelopes[1]).payload, QueryRequest)
        reused = analyst.seal(msgspec.structs.replace(first, expires_at=first.expires_at - 1))
        refusal = await _refusal(node, reused)
        assert refusal.code is ErrorCode.REPLAYED
        status, _ = await node.post(_tampered(analyst))
        assert status == 401
        denied = analyst.seal(analyst.request(CITY, count_by_room_type(), purpose="marketing"))
        assert (await _refusal(node, denied)).code is ErrorCode.PURPOSE_NOT_ALLOWED
        stale = analyst.seal(
            analyst.request(CITY, count_by_room_type(), issued_at=now_ms() - 3_600_000)
        )
        assert (await _refusal(node, stale)).code in (ErrorCode.EXPIRED, ErrorCode.NOT_YET_VALID)


async def test_answers_share_one_keep_alive_connection(
    node_dir: NodeConfig, analyst: Analyst
) -> None:
    async with running_node(node_dir) as node:
        port = int(node.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(3):
                body = analyst.seal(analyst.request(CITY, count_by_room_type()))
                writer.write(
                    b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    + f"Content-Type: {ENVELOPE_MEDIA_TYPE}\r\n".encode()
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200 ")
                headers = dict(
                    line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if line
                )
                assert headers.get("Connection", "keep-alive").lower() != "close"
                reply = await reader.readexactly(int(headers["Content-Length"]))
                assert isinstance(open_reply(200, reply, node.node_key), QueryAnswer)
        finally:
            writer.close()
            await writer.wait_closed()


async def test_no_log_lines_on_the_query_hot_path(
    node_dir: NodeConfig, analyst: Analyst, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_node(node_dir) as node:
        await node.query(analyst.seal(analyst.request(CITY, count_by_room_type())))
        caplog.clear()
        for _ in range(5):
            answer_of(await node.query(analyst.seal(analyst.request(CITY, count_by_room_type()))))
        # Start-up and shutdown may log; answering may not.
        noisy = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert noisy == []
