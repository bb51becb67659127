"""The fan-out coordinator against real nodes and small misbehaving peers on 127.0.0.1.

Real city nodes come from :func:`nodeutil.running_node`; peers that must
misbehave (sleep past the deadline, sign with a stray key, cite another
request, send garbage, reset a connection) are tiny aiohttp servers on
127.0.0.1. Nothing mocks the network layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from aiohttp import web
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from nodeutil import PURPOSE, Analyst, RunningNode, count_by_room_type, init_test_node, open_reply
from nodeutil import running_node as _running_node

from hansa.crypto import SigningKey, seal
from hansa.crypto.keyfile import read_public_key
from hansa.federation.combine import check_answer, combine_answers
from hansa.federation.fanout import (
    ENVELOPE_MEDIA_TYPE,
    VERIFY_THREAD_THRESHOLD,
    CityResult,
    CityStatus,
    FanOutResult,
    PreparedRequest,
    Target,
    build_request,
    fan_out,
    prepare_requests,
    send_prepared,
    verify_reply,
)
from hansa.federation.transport import HttpPool
from hansa.node.app import ENVELOPE_MEDIA_TYPE as NODE_ENVELOPE_MEDIA_TYPE
from hansa.node.catalog import Catalog
from hansa.node.config import NodeConfig
from hansa.protocol.codec import decode_as, encode
from hansa.protocol.envelope import decode_envelope, message_id
from hansa.protocol.errors import ErrorCode, HansaError, ProtocolError
from hansa.protocol.messages import (
    Count,
    CountState,
    Decision,
    Dimension,
    ErrorMessage,
    Group,
    Histogram,
    HistogramState,
    Mean,
    MomentsState,
    PolicyTags,
    Query,
    QueryAnswer,
    QueryRefusal,
    QueryRequest,
    ResultScope,
    SuppressedCell,
)

ANSWERING = ("amsterdam", "berlin", "copenhagen", "dublin")
REFUSING = "edinburgh"
"""A node whose dataset allows only the ``planning`` purpose."""
DEADLINE_S = 3.0
"""Comfortably above a real node's answer time on a loaded machine."""


@pytest.fixture(scope="module")
def analyst() -> Analyst:
    return Analyst.create("ana@amsterdam", seed=b"\x21" * 32)


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory, analyst: Analyst) -> dict[str, NodeConfig]:
    root = tmp_path_factory.mktemp("fanout")
    out = {
        city: init_test_node(root, city, analysts=[analyst], rows=200, seed=i + 1)
        for i, city in enumerate((*ANSWERING, REFUSING))
    }
    with Catalog(out[REFUSING].data_dir) as catalog:
        catalog.configure("listings", purposes=["planning"])
    return out


def policy(analyst: Analyst, purpose: str = PURPOSE) -> PolicyTags:
    return PolicyTags(
        purpose=purpose,
        legal_basis="test suite",
        scope=ResultScope.ALLIANCE,
        analyst=analyst.principal,
    )


def target_of(node: RunningNode) -> Target:
    return Target(node.config.city, node.url, read_public_key(node.config.key_file))


@contextlib.asynccontextmanager
async def nodes(
    configs: dict[str, NodeConfig], cities: Sequence[str]
) -> AsyncIterator[list[Target]]:
    """Run real nodes for ``cities``; yield their targets."""
    async with contextlib.AsyncExitStack() as stack:
        running = await asyncio.gather(
            *(stack.enter_async_context(_running_node(configs[c])) for c in cities)
        )
        yield [target_of(n) for n in running]


async def ask(
    analyst: Analyst,
    targets: Sequence[Target],
    *,
    quorum: int,
    deadline_s: float = DEADLINE_S,
    query: Query | None = None,
    seen: list[CityResult] | None = None,
    pool: HttpPool | None = None,
    verify_threads: int | None = None,
) -> FanOutResult:
    return await fan_out(
        query if query is not None else count_by_room_type(),
        policy(analyst),
        targets,
        signer=analyst.key,
        requester=analyst.principal,
        quorum=quorum,
        deadline_s=deadline_s,
        on_status=seen.append if seen is not None else None,
        pool=pool,
        verify_threads=verify_threads,
    )


def statuses(result: FanOutResult) -> dict[str, CityStatus]:
    return {r.city: r.status for r in result.cities}


def independently_verified(result: FanOutResult, targets: Sequence[Target]) -> list[QueryAnswer]:
    """Re-open every kept reply with the test helper, as an auditor would."""
    keys = {t.city: t.node_key for t in targets}
    answers = []
    for city in result.cities:
        if city.reply is None:
            continue
        reply = open_reply(200, city.reply, keys[city.city])
        assert isinstance(reply, QueryAnswer | QueryRefusal)
        assert reply.request_id == message_id(city.request)
        assert reply.responder == city.city
        if isinstance(reply, QueryAnswer):
            answers.append(reply)
    return answers


# --- tiny peers ---------------------------------------------------------------------------


@dataclass
class Peer:
    """A small aiohttp server posing as nodes: ``/{mode}/{city}/v1/query``."""

    url: str
    key: SigningKey
    hits: dict[str, int] = field(default_factory=dict)

    def target(self, city: str, mode: str, key: SigningKey | None = None) -> Target:
        return Target(city, f"{self.url}/{mode}/{city}", (key or self.key).public_key)


def stub_answer(request_id: bytes, request: QueryRequest, city: str, n: int) -> QueryAnswer:
    return QueryAnswer(
        request_id=request_id,
        responder=city,
        requester=request.requester,
        issued_at=request.issued_at,
        dataset=request.query.dataset,
        dataset_version="v1",
        disclosure_version=1,
        decision=Decision.ANSWERED,
        groups=(Group(key=("Entire home/apt",), states=(CountState(n),)),),
    )


@contextlib.asynccontextmanager
async def peer() -> AsyncIterator[Peer]:
    key = SigningKey.generate()
    state: Peer | None = None

    async def handle(request: web.Request) -> web.StreamResponse:
        assert state is not None
        mode = request.match_info["mode"]
        state.hits[mode] = state.hits.get(mode, 0) + 1
        body = await request.read()
        if mode == "sleep":
            await asyncio.sleep(60)
        if mode == "reset" and state.hits[mode] == 1:
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(0.05)
        if mode == "garbage":
            return web.Response(body=b"\x93not an envelope", content_type=ENVELOPE_MEDIA_TYPE)
        if mode == "error":
            error = ErrorMessage(code=ErrorCode.UNKNOWN_KEY, message="who are you")
            return web.Response(body=encode(error), status=401)
        # A stub: it does not check the requester, it only answers in shape.
        req = decode_as(decode_envelope(body).payload, QueryRequest)
        request_id = message_id(body)
        if mode == "other-request":
            request_id = hashlib.sha256(b"some other request").digest()
        city = request.match_info["city"]
        reply = stub_answer(request_id, req, city, n=len(city))
        return web.Response(body=seal(reply, key), content_type=ENVELOPE_MEDIA_TYPE)

    app = web.Application()
    app.router.add_post("/{mode}/{city}/v1/query", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        state = Peer(f"http://127.0.0.1:{port}", key)
        yield state
    finally:
        await runner.cleanup()


async def stopped_endpoint(config: NodeConfig) -> Target:
    """A real node that was started and then stopped: its port now refuses connections."""
    async with _running_node(config) as node:
        target = target_of(node)
    return target


# --- real nodes ---------------------------------------------------------------------------


async def test_all_answer_and_the_combination_is_over_the_verified_answers(
    configs: dict[str, NodeConfig], analyst: Analyst
) -> None:
    seen: list[CityResult] = []
    async with nodes(configs, ANSWERING) as targets:
        result = await ask(analyst, targets, quorum=len(targets), seen=seen)
    assert statuses(result) == dict.fromkeys(ANSWERING, CityStatus.ANSWERED)
    assert [r.city for r in result.cities] == list(ANSWERING)
    assert sorted(r.city for r in seen) == sorted(ANSWERING)
    assert result.quorum_met and result.reason is None
    answers = independently_verified(result, targets)
    assert [a.responder for a in answers] == list(ANSWERING)
    assert result.combined is not None
    assert result.combined.cities == ANSWERING
    assert result.combined == combine_answers(result.query, answers)
    # Each city had data: the combined count is the sum of the parts.
    total = sum(
        s.n for a in answers for g in a.groups for s in g.states if isinstance(s, CountState)
    )
    combined_total = sum(
        s.n for row in result.combined.rows for s in row.states if isinstance(s, CountState)
    )
    assert combined_total == total > 0


async def test_one_request_signs_the_targets_quorum_and_deadline(
    configs: dict[str, NodeConfig], analyst: Analyst
) -> None:
    async with nodes(configs, ANSWERING[:3]) as targets:
        result = await ask(analyst, targets, quorum=2, deadline_s=2.5)
    # One envelope, signed once, sent to every city (spec §7.1).
    assert len({r.request for r in result.cities}) == 1
    request = decode_as(decode_envelope(result.cities[0].request).payload, QueryRequest)
    assert request.targets == ANSWERING[:3]
    assert request.quorum == 2
    assert (request.issued_at, request.expires_at) == (result.issued_at, result.expires_at)
    assert result.expires_at - result.issued_at == 2500
    assert len(request.nonce) == 16
    assert decode_envelope(result.cities[0].request).key_id == analyst.key.key_id
    # Every city answered that one request.
    request_id = message_id(result.cities[0].request)
    assert all(r.answer is not None and r.answer.request_id == request_id for r in result.cities)


async def test_stopped_node_is_unreachable_and_the_rest_combine(
    configs: dict[str, NodeConfig], analyst: Analyst
) -> None:
    gone = await stopped_endpoint(configs["dublin"])
    async with nodes(configs, ANSWERING[:3]) as targets:
        result = await ask(analyst, [*targets, gone], quorum=3)
    assert statuses(result)["dublin"] is CityStatus.UNREACHABLE
    dublin = result.city("dublin")
    assert dublin.attempts == 3 and dublin.reply is None  # retried, then gave up
    assert result.by_status(CityStatus.ANSWERED) == ANSWERING[:3]
    assert result.quorum_met
    assert result.combined == combine_answers(result.query, independently_verified(result, targets))


async def test_policy_refusal_is_refused_with_its_code(
    configs: dict[str, NodeConfig], analyst: Analyst
) -> None:
    async with nodes(configs, (*ANSWERING, REFUSING)) as targets:
        result = await ask(analyst, targets, quorum=4)
    refused = result.city(REFUSING)
    assert refused.status is CityStatus.REFUSED
    assert refused.code is ErrorCode.PURPOSE_NOT_ALLOWED
    assert refused.reply is not None and refused.answer is None
    reply = open_reply(200, refused.reply, targets[-1].node_key)
    assert isinstance(reply, QueryRefusal) and reply.code is ErrorCode.PURPOSE_NOT_ALLOWED
    assert result.by_status(CityStatus.ANSWERED) == ANSWERING
    assert result.combined is not None and result.combined.cities == ANSWERING


async def test_quorum_not_met_lists_every_city_and_combines_nothing(
    configs: dict[str, NodeConfig], analyst: Analyst
) -> None:
    gone = await stopped_endpoint(configs["dublin"])
    async with nodes(configs, ("amsterdam", REFUSING)) as targets:
        result = await ask(analyst, [*targets, gone], quorum=2)
    assert statuses(result) == {
        "amsterdam": CityStatus.ANSWERED,
        REFUSING: CityStatus.REFUSED,
        "dublin": CityStatus.UNREACHABLE,
    }
    assert not result.quorum_met
    assert result.combined is None
    assert result.reason is not None and "quorum" in result.reason
    assert len(result.answers) == 1


async def test_node_signing_with_another_key_is_bad_signature(
    configs: dict[str, NodeConfig], analyst: Analyst
) -> None:
    async with (
        nodes(configs, ANSWERING[:2]) as targets,
        _running_node(configs["copenhagen"], signing_key=SigningKey.generate()) as rogue,
    ):
        result = await ask(analyst, [*targets, target_of(rogue)], quorum=2)
    bad = result.city("copenhagen")
    assert bad.status is CityStatus.BAD_SIGNATURE
    assert bad.code is ErrorCode.UNKNOWN_KEY
    assert bad.reply is None and bad.answer is None
    assert result.by_status(CityStatus.ANSWERED) == ANSWERING[:2]
    assert result.combined is not None and result.combined.cities == ANSWERING[:2]


# --- misbehaving peers --------------------------------------------------------------------


async def test_slow_peer_times_out_and_the_others_finish_within_the_deadline(
    configs: dict[str, NodeConfig], analyst: Analyst
) -> None:
    deadline = 2.0
    async with nodes(configs, ANSWERING[:3]) as targets, peer() as slow:
        started = time.monotonic()
        result = await ask(
            analyst, [*targets, slow.target("lisbon", "sleep")], quorum=3, deadline_s=deadline
        )
        elapsed = time.monotonic() - started
    # The peer sleeps 60 s: the coordinator returned at its deadline, not the peer's.
    assert elapsed < 30
    lisbon = result.city("lisbon")
    assert lisbon.status is CityStatus.TIMEOUT
    assert lisbon.attempts == 1  # a slow reply is never retried
    assert lisbon.latency_ms >= deadline * 1000 * 0.9
    assert result.by_status(CityStatus.ANSWERED) == ANSWERING[:3]
    assert all(result.city(c).latency_ms < deadline * 1000 for c in ANSWERING[:3])
    assert result.combined is not None and result.combined.cities == ANSWERING[:3]


async def test_misbehaving_peers_get_their_status(analyst: Analyst) -> None:
    stray = SigningKey.generate()
    async with peer() as p:
        targets = [
            p.target("lisbon", "ok"),
            p.target("madrid", "ok", key=stray),  # signed by a key the target does not name
            p.target("naples", "other-request"),  # valid signature over the wrong request
            p.target("oslo", "garbage"),
            p.target("porto", "error"),
        ]
        result = await ask(analyst, targets, quorum=1)
    assert statuses(result) == {
        "lisbon": CityStatus.ANSWERED,
        "madrid": CityStatus.BAD_SIGNATURE,
        "naples": CityStatus.BAD_SIGNATURE,
        "oslo": CityStatus.PROTOCOL_ERROR,
        "porto": CityStatus.PROTOCOL_ERROR,
    }
    assert result.city("porto").code is ErrorCode.UNKNOWN_KEY
    assert "request id" in result.city("naples").detail
    assert all(r.attempts == 1 for r in result.cities)  # none of these is retried
    assert [a.responder for a in result.answers] == ["lisbon"]
    assert result.combined == combine_answers(result.query, result.answers)


async def test_connection_reset_before_a_response_is_retried(analyst: Analyst) -> None:
    async with peer() as p:
        result = await ask(analyst, [p.target("lisbon", "reset")], quorum=1)
        assert p.hits["reset"] == 2
    lisbon = result.city("lisbon")
    assert lisbon.status is CityStatus.ANSWERED, lisbon.detail
    assert lisbon.attempts == 2


async def test_many_targets_verify_in_threads_over_one_pool(analyst: Analyst) -> None:
    n = VERIFY_THREAD_THRESHOLD + 8
    cities = [f"city{i:03d}" for i in range(n)]
    async with peer() as p:
        async with HttpPool(limit=16) as pool:
            targets = [p.target(c, "ok") for c in cities[:-1]] + [p.target(cities[-1], "garbage")]
            result = await ask(analyst, targets, quorum=n - 1, pool=pool)
            assert not pool.closed  # a caller's pool is left open
            assert pool.open_connections <= 16
    assert result.by_status(CityStatus.ANSWERED) == tuple(cities[:-1])
    assert result.city(cities[-1]).status is CityStatus.PROTOCOL_ERROR
    assert result.combined is not None
    assert [row.states for row in result.combined.rows] == [
        (CountState(sum(len(c) for c in cities[:-1])),)
    ]


# --- inputs and pure verification ---------------------------------------------------------


def test_media_type_matches_the_node() -> None:
    assert ENVELOPE_MEDIA_TYPE == NODE_ENVELOPE_MEDIA_TYPE


@pytest.mark.parametrize(
    ("cities", "quorum", "deadline_s"),
    [
        ((), 1, 1.0),
        (("a", "a"), 1, 1.0),
        (("a", "b"), 0, 1.0),
        (("a", "b"), 3, 1.0),
        (("a",), 1, 0.0),
        (("a",), 1, float("nan")),
    ],
)
async def test_bad_inputs_are_refused_before_sending(
    analyst: Analyst, cities: tuple[str, ...], quorum: int, deadline_s: float
) -> None:
    key = SigningKey.generate().public_key
    targets = [Target(c, "http://127.0.0.1:9", key) for c in cities]
    with pytest.raises(ProtocolError) as info:
        await ask(analyst, targets, quorum=quorum, deadline_s=deadline_s)
    assert info.value.code is ErrorCode.INVALID_FIELD


_NODE_KEY = SigningKey(b"\x42" * 32)
_ANALYST = Analyst.create("ana@amsterdam", seed=b"\x21" * 32)
_REQUEST = _ANALYST.seal(_ANALYST.request("lisbon", count_by_room_type()))
_REQUEST_BODY = decode_as(decode_envelope(_REQUEST).payload, QueryRequest)
_GOOD_REPLY = seal(stub_answer(message_id(_REQUEST), _REQUEST_BODY, "lisbon", 7), _NODE_KEY)
_TARGET = Target("lisbon", "http://127.0.0.1:9", _NODE_KEY.public_key)


def _classify(body: bytes, status: int = 200) -> CityStatus:
    return verify_reply(
        status,
        body,
        target=_TARGET,
        request_id=message_id(_REQUEST),
        requester=_ANALYST.principal,
        query=_REQUEST_BODY.query,
    ).status


def test_the_good_reply_is_answered() -> None:
    assert _classify(_GOOD_REPLY) is CityStatus.ANSWERED
    # The same signed bytes under a non-200 status are not read as signed.
    assert _classify(_GOOD_REPLY, status=500) is CityStatus.PROTOCOL_ERROR


def test_answer_for_another_city_or_requester_is_bad_signature() -> None:
    other_city = stub_answer(message_id(_REQUEST), _REQUEST_BODY, "lisbon", 7)
    for reply in (
        msgspec.structs.replace(other_city, responder="madrid"),
        msgspec.structs.replace(other_city, requester="eve@madrid"),
    ):
        assert _classify(seal(reply, _NODE_KEY)) is CityStatus.BAD_SIGNATURE


def test_answer_that_does_not_fit_the_query_is_a_protocol_error() -> None:
    wrong = stub_answer(message_id(_REQUEST), _REQUEST_BODY, "lisbon", 7)
    wrong = msgspec.structs.replace(wrong, dataset="other")
    assert _classify(seal(wrong, _NODE_KEY)) is CityStatus.PROTOCOL_ERROR


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_altered_reply_is_never_answered(data: st.DataObject) -> None:
    body = bytearray(_GOOD_REPLY)
    flips = data.draw(st.lists(st.integers(0, len(body) * 8 - 1), min_size=1, max_size=4))
    for bit in flips:
        body[bit // 8] ^= 1 << (bit % 8)
    cut = data.draw(st.integers(0, len(body)))
    altered = bytes(body[:cut]) + data.draw(st.binary(max_size=8))
    status = _classify(altered)
    if altered != _GOOD_REPLY:
        assert status in (CityStatus.BAD_SIGNATURE, CityStatus.PROTOCOL_ERROR)


# --- prepared requests ----------------------------------------------------------------------


class KnownNonces:
    """A ``nonce_source`` whose nonces are known: 16 bytes derived from a counter."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, size: int) -> bytes:
        self.calls.append(size)
        return hashlib.sha256(b"nonce %d" % len(self.calls)).digest()[:size]


def _prepare(
    analyst: Analyst,
    targets: Sequence[Target],
    *,
    quorum: int | None = None,
    issued_at: int = 1_767_225_600_000,
    expires_at: int = 1_767_225_630_000,
    nonce_source: Callable[[int], bytes] | None = None,
) -> list[PreparedRequest]:
    return prepare_requests(
        count_by_room_type(),
        policy(analyst),
        targets,
        signer=analyst.key,
        requester=analyst.principal,
        quorum=len(targets) if quorum is None else quorum,
        roster_version=3,
        issued_at=issued_at,
        expires_at=expires_at,
        nonce_source=KnownNonces() if nonce_source is None else nonce_source,
    )


def test_prepared_requests_are_reproducible_and_sign_one_fan_out(analyst: Analyst) -> None:
    key = SigningKey(b"\x07" * 32).public_key
    targets = [Target(c, "http://127.0.0.1:9", key) for c in ("lisbon", "madrid", "naples")]
    nonces = KnownNonces()
    prepared = _prepare(analyst, targets, nonce_source=nonces, quorum=2)
    assert nonces.calls == [16]  # one request, one nonce
    assert [p.target for p in prepared] == targets
    again = _prepare(analyst, targets, quorum=2)
    assert [p.envelope for p in again] == [p.envelope for p in prepared]  # deterministic
    for p in prepared:
        assert p.request_id == message_id(p.envelope)
        body = decode_as(decode_envelope(p.envelope).payload, QueryRequest)
        assert body == p.request
        assert body.targets == ("lisbon", "madrid", "naples") and body.quorum == 2
        assert body.roster_version == 3 and body.expires_at - body.issued_at == 30_000
    assert len({p.envelope for p in prepared}) == 1  # signed once, sent to all
    # Any other nonce gives another envelope, so ids cannot be guessed without the source.
    fresh = _prepare(analyst, targets, quorum=2, nonce_source=secrets.token_bytes)
    assert not {p.request_id for p in fresh} & {p.request_id for p in prepared}


@pytest.mark.parametrize(
    ("cities", "changes"),
    [
        ((), {}),
        (("a", "a"), {}),
        (("a", "b"), {"quorum": 3}),
        (("a", "b"), {"quorum": 0}),
        (("a",), {"expires_at": 1_767_225_600_000}),
    ],
)
def test_prepare_refuses_bad_inputs(
    analyst: Analyst, cities: tuple[str, ...], changes: dict[str, Any]
) -> None:
    key = SigningKey.generate().public_key
    targets = [Target(c, "http://127.0.0.1:9", key) for c in cities]
    with pytest.raises(ProtocolError) as info:
        _prepare(analyst, targets, **changes)
    assert info.value.code is ErrorCode.INVALID_FIELD


def test_build_request_defaults_and_refusals(analyst: Analyst) -> None:
    request = build_request(
        count_by_room_type(),
        policy(analyst),
        requester=analyst.principal,
        targets=("lisbon",),
        issued_at=1_000,
        expires_at=2_000,
    )
    assert request.targets == ("lisbon",) and request.quorum == 1
    assert request.roster_version == 0 and len(request.nonce) == 16
    bad: list[dict[str, Any]] = [
        {"targets": ("madrid", "madrid")},
        {"targets": ()},
        {"expires_at": 1_000},
        {"quorum": 2},
    ]
    for changes in bad:
        fields: dict[str, Any] = {
            "issued_at": 1_000,
            "expires_at": 2_000,
            "targets": ("lisbon",),
            **changes,
        }
        with pytest.raises(ProtocolError) as info:
            build_request(
                count_by_room_type(),
                policy(analyst),
                requester=analyst.principal,
                **fields,
            )
        assert info.value.code is ErrorCode.INVALID_FIELD


async def test_fan_out_with_a_nonce_source_sends_the_prepared_bytes(analyst: Analyst) -> None:
    async with peer() as p:
        targets = [p.target(c, "ok") for c in ("lisbon", "madrid")]
        prepared = _prepare(
            analyst, targets, issued_at=1_767_225_600_000, expires_at=1_767_225_603_000
        )
        result = await fan_out(
            count_by_room_type(),
            policy(analyst),
            targets,
            signer=analyst.key,
            requester=analyst.principal,
            quorum=2,
            deadline_s=3.0,
            roster_version=3,
            now_ms=lambda: 1_767_225_600_000,
            nonce_source=KnownNonces(),
        )
        sent = await send_prepared(prepared, deadline_s=DEADLINE_S)
    assert [r.request for r in result.cities] == [q.envelope for q in prepared]
    assert [r.request for r in sent.cities] == [q.envelope for q in prepared]
    for outcome in (result, sent):
        assert outcome.by_status(CityStatus.ANSWERED) == ("lisbon", "madrid")
        assert outcome.targets == ("lisbon", "madrid") and outcome.quorum == 2
        assert (outcome.issued_at, outcome.expires_at) == (1_767_225_600_000, 1_767_225_603_000)
        assert outcome.combined is not None
    assert sent.combined == result.combined


def test_send_prepared_refuses_requests_of_different_fan_outs(analyst: Analyst) -> None:
    key = SigningKey.generate().public_key
    targets = [Target(c, "http://127.0.0.1:9", key) for c in ("lisbon", "madrid")]
    one = _prepare(analyst, targets)
    other = _prepare(analyst, targets, quorum=1)
    # A request whose id or body does not match its envelope (built by hand).
    forged_id = [dataclasses.replace(p, request_id=bytes(32)) for p in one]
    forged_body = [dataclasses.replace(p, request=other[0].request) for p in one]
    cases = [[], [one[1], one[0]], [one[0], other[1]], one[:1], [*one, one[0]]]
    for bad in (*cases, forged_id, forged_body):
        with pytest.raises(ProtocolError) as info:
            asyncio.run(send_prepared(bad, deadline_s=1.0))
        assert info.value.code is ErrorCode.INVALID_FIELD
    with pytest.raises(ProtocolError):
        asyncio.run(send_prepared(one, deadline_s=0.0))


# --- many targets: threads, the event loop, the deadline -------------------------------------


@pytest.mark.parametrize("verify_threads", [0, 2])
async def test_many_targets_with_a_slow_one_meet_the_deadline(
    analyst: Analyst, verify_threads: int
) -> None:
    n = VERIFY_THREAD_THRESHOLD + 20
    cities = [f"city{i:03d}" for i in range(n)]
    deadline = 1.5
    async with peer() as p:
        targets = [p.target(c, "ok") for c in cities[:-1]] + [p.target(cities[-1], "sleep")]
        started = time.monotonic()
        result = await ask(
            analyst, targets, quorum=n - 1, deadline_s=deadline, verify_threads=verify_threads
        )
        elapsed = time.monotonic() - started
    assert elapsed < deadline + 10  # returned at the deadline, not the peer's 60 s
    assert result.by_status(CityStatus.ANSWERED) == tuple(cities[:-1])
    assert result.city(cities[-1]).status is CityStatus.TIMEOUT
    assert len({r.request for r in result.cities}) == 1
    request = decode_as(decode_envelope(result.cities[0].request).payload, QueryRequest)
    assert request.targets == tuple(cities)
    assert result.combined is not None
    assert result.combined == combine_answers(result.query, result.answers)


# --- the answer shape check ---------------------------------------------------------------


_MEAN_HIST = Query(
    dataset="listings",
    aggregates=(Count(), Mean("price"), Histogram("price", (0.0, 100.0, 200.0))),
    group_by=(Dimension("room_type"),),
)


def _fitting(
    groups: tuple[Group, ...] = (), suppressed: tuple[SuppressedCell, ...] = ()
) -> QueryAnswer:
    good = (
        Group(
            key=("Private room",),
            states=(CountState(3), MomentsState(3, 50.0, 8.0), HistogramState((2, 1))),
        ),
    )
    return QueryAnswer(
        request_id=b"\x00" * 32,
        responder="lisbon",
        requester="ana@amsterdam",
        issued_at=1,
        dataset="listings",
        dataset_version="v1",
        disclosure_version=1,
        decision=Decision.ANSWERED,
        groups=groups or good,
        suppressed=suppressed,
    )


_STATES = (CountState(3), MomentsState(3, 50.0, 8.0), HistogramState((2, 1)))
_MISFITS: dict[str, QueryAnswer] = {
    "dataset": msgspec.structs.replace(_fitting(), dataset="calendar"),
    "key arity": _fitting((Group(key=("Private room", 1), states=_STATES),)),
    "too few states": _fitting((Group(key=("Private room",), states=_STATES[:2]),)),
    "wrong kind": _fitting(
        (Group(key=("a",), states=(CountState(3), CountState(3), HistogramState((2, 1)))),)
    ),
    "bin count": _fitting(
        (Group(key=("a",), states=(CountState(3), _STATES[1], HistogramState((2, 1, 0)))),)
    ),
    "negative m2": _fitting(
        (Group(key=("a",), states=(CountState(3), MomentsState(3, 5.0, -1.0), _STATES[2])),)
    ),
}


def test_a_fitting_answer_passes_the_shape_check() -> None:
    check_answer(_MEAN_HIST, _fitting())
    combine_answers(_MEAN_HIST, (_fitting(),))


@pytest.mark.parametrize("name", sorted(_MISFITS))
def test_misfit_answers_fail_the_shape_check_as_they_fail_combining(name: str) -> None:
    answer = _MISFITS[name]
    with pytest.raises(ProtocolError) as shape:
        check_answer(_MEAN_HIST, answer)
    with pytest.raises(ProtocolError) as combined:
        combine_answers(_MEAN_HIST, (answer,))
    assert shape.value.code is combined.value.code is ErrorCode.INVALID_FIELD
    assert "lisbon" in shape.value.message


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(-2, 5),
    mean=st.floats(allow_nan=True, allow_infinity=True),
    m2=st.floats(-10, 10),
    bins=st.lists(st.integers(-1, 3), min_size=1, max_size=3),
    key=st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.floats(), st.text(max_size=3)),
)
def test_the_shape_check_agrees_with_a_one_answer_combination(
    n: int, mean: float, m2: float, bins: list[int], key: object
) -> None:
    # Construction skips the wire's own checks, so invalid states reach both checks.
    try:
        states = (CountState(n), MomentsState(max(n, 0), mean, m2), HistogramState(tuple(bins)))
    except ValueError:  # a rule the wire itself enforces on construction
        assume(False)
        raise
    answer = _fitting((Group(key=(key,), states=states),))  # type: ignore[arg-type]
    outcomes: list[ErrorCode | None] = []
    for check in (
        lambda: check_answer(_MEAN_HIST, answer),
        lambda: combine_answers(_MEAN_HIST, (answer,)),
    ):
        try:
            check()
        except HansaError as exc:
            outcomes.append(exc.code)
        else:
            outcomes.append(None)
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("n", [3, VERIFY_THREAD_THRESHOLD + 4])
async def test_cancelling_the_fan_out_leaves_no_request_running(analyst: Analyst, n: int) -> None:
    seen: list[CityResult] = []
    async with peer() as p:
        targets = [p.target(f"city{i:03d}", "sleep") for i in range(n)]
        task = asyncio.create_task(ask(analyst, targets, quorum=1, deadline_s=30.0, seen=seen))
        for _ in range(200):  # bounded: wait until every request reached the peer
            if p.hits.get("sleep", 0) == n:
                break
            await asyncio.sleep(0.02)
        assert p.hits.get("sleep", 0) == n
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        others = asyncio.all_tasks() - {asyncio.current_task()}
        assert not [t for t in others if "ask" in repr(t.get_coro())]
    assert seen == []  # no city was reported after the caller gave up
