"""End to end: an alliance of real city nodes on 127.0.0.1, one fan-out, one combined answer.

The analyst side is the real :func:`hansa.federation.fanout.fan_out`; the
targets (endpoint and node key) come from a threshold-signed alliance roster
(:mod:`hansa.federation.roster`); the evidence is a real bundle checked with
:func:`hansa.federation.evidence.verify_bundle`. Nodes are the real
application (``create_app`` behind an aiohttp runner) and, for the city that
is killed mid-query, a real ``hansa node serve`` subprocess.

The cities of the alliance and what each does in the mixed fan-out:

- five ordinary cities answer;
- ``KILLED`` is a node process stopped with SIGSTOP before the fan-out, so
  the kernel accepts the connection and our request waits in its socket;
  once every other prompt city has replied it is SIGKILLed with the request
  in flight: the connection is reset, the retries are refused, it is
  unreachable;
- ``SLOW``'s engine takes longer than the deadline: timeout;
- ``ROGUE`` signs its answers with a key the roster does not name: bad signature;
- ``REFUSING`` allows only the ``planning`` purpose on its data: a signed refusal.

Every combined result is compared with the central computation: DuckDB SQL
over the union of the answering cities' CSV files, written independently of
the node's engine. Suppression is switched off on the test datasets (minimum
group size 1, dominance 100 %) so that the comparison is exact.

Every node is pinned to the alliance roster (``[alliance]`` in
``node.toml``, :func:`hansa.node.config.configure_alliance`) and has no
``[[trusted]]`` key: the roster alone says who may query. The roster trust
rules (a revoked member, an expired roster, an update signed below the
threshold, a rollback) are exercised on live nodes through ``POST
/v1/roster``, at the analyst (targets only from a roster it verified with
``update_chain``) and at the auditor (``verify_bundle`` against a trusted
roster). Those tests get a fresh five-city alliance each, since a roster
update is persisted in the nodes' data directories.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import duckdb
import msgspec
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nodeutil import Analyst, init_test_node

from hansa.crypto import PublicKey, SigningKey
from hansa.crypto.keyfile import read_public_key
from hansa.federation.combine import CombinedResult
from hansa.federation.evidence import build_bundle, verify_bundle
from hansa.federation.fanout import CityResult, CityStatus, FanOutResult, Target, fan_out
from hansa.federation.roster import Analyst as RosterAnalyst
from hansa.federation.roster import (
    Member,
    Role,
    RootKey,
    Roster,
    SignedRoster,
    decode_signed_roster,
    encode_signed_roster,
    roster_digest,
    sign_roster,
    unsigned,
    update_chain,
    verify_roster,
)
from hansa.node.app import ROSTER_MEDIA_TYPE, create_app
from hansa.node.catalog import Catalog
from hansa.node.config import NodeConfig, configure_alliance
from hansa.node.engine import QueryEngine
from hansa.protocol.codec import decode_as
from hansa.protocol.errors import ErrorCode, FreshnessError, SignatureError
from hansa.protocol.messages import (
    Count,
    DatasetInfo,
    Dimension,
    ErrorMessage,
    Filter,
    FilterOp,
    PolicyTags,
    Query,
    QueryRequest,
    ResultScope,
    Sum,
)

GOOD: Final = ("amsterdam", "berlin", "copenhagen", "dublin", "edinburgh")
KILLED: Final = "frankfurt"
SLOW: Final = "genoa"
ROGUE: Final = "hamburg"
REFUSING: Final = "innsbruck"
CITIES: Final = (*GOOD, KILLED, SLOW, ROGUE, REFUSING)
THRESHOLD: Final = 5
"""Root signatures a roster version needs (of the nine cities' root keys)."""
PURPOSE: Final = "research"
DATASET: Final = "listings"
DEADLINE_S: Final = 4.0
"""Well above a real node's answer time on a loaded 2-core machine; the slow
city's engine waits for much longer than this."""
SLOW_ENGINE_WAIT_S: Final = 30.0
DAY_MS: Final = 86_400_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _free_port() -> int:
    # The roster names each node's endpoint, so ports are chosen before the
    # roster is written (the OS picks a free one and we release it).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the alliance ----------------------------------------------------------------------


@dataclass(frozen=True)
class Alliance:
    """City data directories pinned to version 1 of a roster, and the cities' root keys."""

    analyst: Analyst
    configs: Mapping[str, NodeConfig]
    csvs: Mapping[str, Path]
    root_keys: Mapping[str, SigningKey]
    v1: SignedRoster
    roster: Roster

    @property
    def cities(self) -> tuple[str, ...]:
        """The member cities of version 1, in order."""
        return tuple(self.configs)

    def url(self, city: str) -> str:
        """The endpoint the roster names for ``city``."""
        return f"http://127.0.0.1:{self.configs[city].port}"

    def targets(self, roster: Roster, cities: Sequence[str]) -> list[Target]:
        """Targets for ``cities``, taken only from ``roster`` (endpoint and node key)."""
        out = []
        for city in cities:
            member = roster.member(city)
            assert member is not None, f"{city} is not in roster v{roster.version}"
            out.append(Target(city, member.endpoint, PublicKey(member.public_key)))
        return out

    def sign(self, roster: Roster, signers: Sequence[str]) -> SignedRoster:
        """Sign ``roster`` with the root keys of ``signers``."""
        signed = unsigned(roster)
        for city in signers:
            signed = sign_roster(signed, self.root_keys[city])
        return signed

    def successor(self, roster: Roster, signers: Sequence[str], **changes: Any) -> SignedRoster:
        """The next version of ``roster`` with ``changes``, signed by ``signers``."""
        return self.sign(
            msgspec.structs.replace(roster, version=roster.version + 1, **changes), signers
        )


def build_alliance(
    root: Path,
    cities: Sequence[str],
    *,
    threshold: int,
    min_participants: int = 2,
    expires_ms: int | None = None,
    refusing: Sequence[str] = (),
) -> Alliance:
    """Create one node per city, write roster v1, and pin every node to it.

    The nodes have no ``[[trusted]]`` keys: the roster is their only authority.
    ``refusing`` cities allow only the ``planning`` purpose on their data.
    """
    analyst = Analyst.create("ana@amsterdam", seed=b"\x42" * 32)
    configs: dict[str, NodeConfig] = {}
    csvs: dict[str, Path] = {}
    for i, city in enumerate(cities):
        configs[city] = init_test_node(
            root, city, rows=rows_of(city), seed=7 + i, port=_free_port()
        )
        csvs[city] = root / f"{city}-listings.csv"  # where init_test_node writes them
        assert csvs[city].is_file()
        with Catalog(configs[city].data_dir) as catalog:
            # Exact comparison with the central query: nothing suppressed.
            catalog.configure(
                DATASET,
                min_group_size=1,
                dominance_p=100.0,
                purposes=["planning"] if city in refusing else None,
            )
    root_keys = {city: SigningKey(bytes([i + 1]) * 32) for i, city in enumerate(cities)}
    now = _now_ms()
    draft = Roster(
        alliance="e2e alliance",
        version=1,
        expires_ms=now + 30 * DAY_MS if expires_ms is None else expires_ms,
        threshold=threshold,
        root_keys=tuple(RootKey(c, k.public_key.raw) for c, k in root_keys.items()),
        members=_members(configs),
        analysts=(
            RosterAnalyst(
                principal=analyst.principal,
                public_key=analyst.key.public_key.raw,
                home_city="amsterdam",
                purposes=(PURPOSE,),
            ),
        ),
        purposes=("planning", PURPOSE),
    )
    signed = unsigned(draft)
    for city in cities[:threshold]:
        signed = sign_roster(signed, root_keys[city])
    pin = roster_digest(signed)
    roster = verify_roster(signed, None, now, pin=pin)
    data = encode_signed_roster(signed)
    for city in cities:
        configs[city] = configure_alliance(
            configs[city].data_dir, data, pin, now, min_participants=min_participants
        )
    return Alliance(analyst, configs, csvs, root_keys, signed, roster)


def rows_of(city: str) -> int:
    """How many listings ``city`` has (distinct per city, so a lost city shows)."""
    return 120 + 15 * CITIES.index(city)


def _members(configs: Mapping[str, NodeConfig]) -> tuple[Member, ...]:
    return tuple(
        Member(
            city=city,
            name=city.title(),
            public_key=read_public_key(config.key_file).raw,
            endpoint=f"http://127.0.0.1:{config.port}",
            roles=(Role.MEMBER,),
        )
        for city, config in configs.items()
    )


@pytest.fixture(scope="module")
def alliance(tmp_path_factory: pytest.TempPathFactory) -> Alliance:
    """All nine cities; read-only for the tests that use it (no roster updates)."""
    return build_alliance(
        tmp_path_factory.mktemp("alliance"), CITIES, threshold=THRESHOLD, refusing=[REFUSING]
    )


@pytest.fixture
def small(tmp_path: Path) -> Alliance:
    """A fresh alliance of the five ordinary cities (threshold 3), for roster updates."""
    return build_alliance(tmp_path, GOOD, threshold=3)


# --- nodes -----------------------------------------------------------------------------


class SlowEngine:
    """A real engine that takes longer than any deadline of these tests to answer.

    ``release`` ends the wait early so that the node shuts down promptly.
    """

    def __init__(self, data_dir: Path) -> None:
        self.inner = QueryEngine(data_dir)
        self.release = threading.Event()
        self.calls = 0

    def answer(self, request: QueryRequest) -> Any:
        self.calls += 1
        self.release.wait(SLOW_ENGINE_WAIT_S)
        return self.inner.answer(request)

    def datasets(self) -> tuple[DatasetInfo, ...]:
        return self.inner.datasets()

    def reload(self) -> None:
        self.inner.reload()

    def close(self) -> None:
        self.release.set()
        self.inner.close()


@contextlib.asynccontextmanager
async def serve(config: NodeConfig, **kwargs: Any) -> AsyncIterator[None]:
    """Serve the real node application on its configured port of 127.0.0.1."""
    app = create_app(config, **kwargs)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", config.port).start()
        yield
    finally:
        await runner.cleanup()


def established_connections(port: int) -> int:
    """Count established TCP connections to ``port`` on 127.0.0.1 (-1: unknown).

    Read from ``/proc/net/tcp``: a connection the kernel accepted for a
    stopped process is established even though nobody has read it yet.
    """
    table = Path("/proc/net/tcp")
    if not table.is_file():
        return -1
    local = f"0100007F:{port:04X}"
    count = 0
    for line in table.read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1] == local and fields[3] == "01":
            count += 1
    return count


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def node_subprocess(config: NodeConfig, url: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``hansa node serve`` for ``config`` (its configured port) until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hansa", "node", "serve", "--data-dir", str(config.data_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not _healthy(url):
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"node exited with {proc.returncode}: {err[-1000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("node subprocess did not become healthy in 30 s")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@contextlib.asynccontextmanager
async def nodes(
    alliance: Alliance,
    cities: Sequence[str],
    per_city: Mapping[str, Mapping[str, Any]] | None = None,
) -> AsyncIterator[None]:
    """Serve ``cities`` in-process, each with its ``per_city`` ``create_app`` arguments."""
    async with contextlib.AsyncExitStack() as stack:
        for city in cities:
            await stack.enter_async_context(
                serve(alliance.configs[city], **(per_city or {}).get(city, {}))
            )
        yield


# --- asking and the central computation ------------------------------------------------


def policy(analyst: Analyst, purpose: str = PURPOSE) -> PolicyTags:
    return PolicyTags(
        purpose=purpose,
        legal_basis="federation end-to-end test",
        scope=ResultScope.ALLIANCE,
        analyst=analyst.principal,
    )


def count_and_sums(filters: Sequence[Filter] = ()) -> Query:
    """Listings, total price and total availability by room type."""
    return Query(
        dataset=DATASET,
        aggregates=(Count(), Sum("price"), Sum("availability_365")),
        filters=tuple(filters),
        group_by=(Dimension("room_type"),),
    )


async def ask(
    alliance: Alliance,
    targets: Sequence[Target],
    *,
    quorum: int,
    query: Query | None = None,
    roster_version: int = 1,
    on_status: Callable[[CityResult], None] | None = None,
    analyst: Analyst | None = None,
    now_ms: Callable[[], int] = _now_ms,
) -> FanOutResult:
    """Fan ``query`` (default :func:`count_and_sums`) out with the real coordinator."""
    who = alliance.analyst if analyst is None else analyst
    return await fan_out(
        query if query is not None else count_and_sums(),
        policy(who),
        targets,
        signer=who.key,
        requester=who.principal,
        quorum=quorum,
        deadline_s=DEADLINE_S,
        roster_version=roster_version,
        on_status=on_status,
        now_ms=now_ms,
    )


Totals = dict[str, tuple[int, int, int]]
"""Room type -> (listings, total price, total availability)."""


def central(csvs: Sequence[Path], where: str = "TRUE", bound: int | None = None) -> Totals:
    """The same question asked of the union of the raw rows, in plain SQL.

    ``where`` is a fixed condition of this file that may use ``$bound``.
    """
    sql = (
        "SELECT room_type, count(*), sum(price), sum(availability_365) "
        f"FROM read_csv($files) WHERE {where} GROUP BY room_type"
    )
    params: dict[str, object] = {"files": [str(p) for p in csvs]}
    if bound is not None:
        params["bound"] = bound
    with duckdb.connect() as con:
        rows = con.execute(sql, params).fetchall()
    return {str(r[0]): (int(r[1]), int(r[2] or 0), int(r[3] or 0)) for r in rows}


def federated(combined: CombinedResult) -> Totals:
    out: Totals = {}
    for row in combined.rows:
        assert row.released and not row.suppressed
        n, price, days = row.values
        assert isinstance(n, int) and isinstance(price, int) and isinstance(days, int)
        out[str(row.key[0])] = (n, price, days)
    return out


def statuses(result: FanOutResult) -> dict[str, CityStatus]:
    return {r.city: r.status for r in result.cities}


# --- all answer ------------------------------------------------------------------------


async def test_six_real_nodes_all_answer_and_the_combination_is_the_central_answer(
    alliance: Alliance,
) -> None:
    cities = (*GOOD, KILLED)  # KILLED is a node subprocess here, and answers
    with node_subprocess(alliance.configs[KILLED], alliance.url(KILLED)):
        async with nodes(alliance, GOOD):
            result = await ask(alliance, alliance.targets(alliance.roster, cities), quorum=6)
    assert statuses(result) == dict.fromkeys(cities, CityStatus.ANSWERED)
    assert result.quorum_met and result.combined is not None
    assert result.combined.cities == tuple(sorted(cities))
    expected = central([alliance.csvs[c] for c in cities])
    assert federated(result.combined) == expected
    assert sum(n for n, _, _ in expected.values()) == sum(rows_of(c) for c in cities)


# --- the mixed alliance ----------------------------------------------------------------


async def test_killed_slow_rogue_and_refusing_cities_each_get_their_status(
    alliance: Alliance,
) -> None:
    slow = SlowEngine(alliance.configs[SLOW].data_dir)
    prompt = {*GOOD, ROGUE, REFUSING}  # everyone who replies before the deadline
    reported: set[str] = set()
    in_flight: list[int] = []

    with node_subprocess(alliance.configs[KILLED], alliance.url(KILLED)) as killed:
        killed.send_signal(signal.SIGSTOP)

        def on_status(result: CityResult) -> None:
            reported.add(result.city)
            if prompt <= reported and killed.poll() is None:
                # Every prompt city has replied, so every request was sent long
                # ago: KILLED's sits unread in its socket. Kill it now.
                in_flight.append(established_connections(alliance.configs[KILLED].port))
                killed.kill()

        try:
            async with nodes(
                alliance,
                (*GOOD, SLOW, ROGUE, REFUSING),
                {
                    SLOW: {"engine": slow},
                    ROGUE: {"signing_key": SigningKey(b"\x99" * 32)},
                },
            ):
                started = time.monotonic()
                result = await ask(
                    alliance,
                    alliance.targets(alliance.roster, CITIES),
                    quorum=len(GOOD),
                    on_status=on_status,
                )
                elapsed = time.monotonic() - started
                slow.release.set()
        finally:
            slow.close()
        assert killed.wait(timeout=10) == -signal.SIGKILL

    assert statuses(result) == {
        **dict.fromkeys(GOOD, CityStatus.ANSWERED),
        KILLED: CityStatus.UNREACHABLE,
        SLOW: CityStatus.TIMEOUT,
        ROGUE: CityStatus.BAD_SIGNATURE,
        REFUSING: CityStatus.REFUSED,
    }, {r.city: r.detail for r in result.cities}
    assert result.city(KILLED).attempts >= 2  # reset in flight, then retried and refused
    if in_flight[0] >= 0:  # where the kernel's socket table is readable (Linux)
        assert in_flight[0] >= 1, "the killed node held no connection of ours"
    assert slow.calls == 1  # the slow city did get the query, it was just too slow
    assert result.city(ROGUE).code is ErrorCode.UNKNOWN_KEY
    assert result.city(REFUSING).code is ErrorCode.PURPOSE_NOT_ALLOWED
    # Everything was settled by the deadline (the slow engine waits 30 s).
    assert elapsed < DEADLINE_S + 2.0
    assert all(r.latency_ms <= DEADLINE_S * 1000 + 500 for r in result.cities)
    # The combined answer is over exactly the five that answered.
    assert result.quorum_met and result.combined is not None
    assert result.combined.cities == GOOD
    assert federated(result.combined) == central([alliance.csvs[c] for c in GOOD])

    # The evidence of this fan-out verifies against the pinned roster, city by city.
    bundle = build_bundle(result, alliance.v1)
    verdict = verify_bundle(bundle, pin=roster_digest(alliance.v1))
    assert verdict.ok, verdict.failures
    assert verdict.answered == len(GOOD)
    lines = {line.city: (line.status, line.signed) for line in verdict.cities}
    assert lines == {
        **dict.fromkeys(GOOD, ("answered", True)),
        KILLED: ("unreachable", False),
        SLOW: ("timeout", False),
        ROGUE: ("bad_signature", False),
        REFUSING: ("refused", True),
    }


# --- the property: combined = central over the answering cities --------------------------


@contextlib.contextmanager
def threaded_alliance(alliance: Alliance, cities: Sequence[str]) -> Iterator[None]:
    """Serve ``cities`` from a background event loop (hypothesis drives sync tests)."""
    loop = asyncio.new_event_loop()
    ready: concurrent.futures.Future[None] = concurrent.futures.Future()
    stop = asyncio.Event()

    async def run() -> None:
        try:
            async with nodes(alliance, cities):
                ready.set_result(None)
                await stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    try:
        ready.result(timeout=60)
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        loop.close()


@pytest.fixture
def serving(alliance: Alliance) -> Iterator[Alliance]:
    """The five ordinary cities, served for one test (every hypothesis example)."""
    with threaded_alliance(alliance, GOOD):
        yield alliance


FILTERS: Final = {
    "none": (None, "TRUE"),
    "price >=": (FilterOp.GE, "price >= $bound"),
    "minimum_nights <=": (FilterOp.LE, "minimum_nights <= $bound"),
}


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    answering=st.sets(st.sampled_from(GOOD), min_size=2),  # [alliance] min_participants = 2
    filter_name=st.sampled_from(sorted(FILTERS)),
    bound=st.integers(min_value=1, max_value=400),
)
def test_property_combined_equals_central_over_the_answering_cities(
    serving: Alliance, answering: set[str], filter_name: str, bound: int
) -> None:
    cities = [c for c in GOOD if c in answering]
    op, where = FILTERS[filter_name]
    column = filter_name.split()[0]
    filters = () if op is None else (Filter(column, op, (bound,)),)
    result = asyncio.run(
        ask(
            serving,
            serving.targets(serving.roster, cities),
            quorum=len(cities),
            query=count_and_sums(filters),
        )
    )
    assert result.by_status(CityStatus.ANSWERED) == tuple(cities), [r.detail for r in result.cities]
    assert result.combined is not None
    assert federated(result.combined) == central(
        [serving.csvs[c] for c in cities], where, None if op is None else bound
    )


# --- roster trust: revocation, expiry, below threshold, rollback ---------------------------


# --- roster trust on live nodes: revocation, expiry, below threshold, rollback --------------


async def post_roster(url: str, signed: SignedRoster) -> tuple[int, bytes]:
    """``POST /v1/roster`` to one node; return (HTTP status, body)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/v1/roster",
            data=encode_signed_roster(signed),
            headers={"Content-Type": ROSTER_MEDIA_TYPE},
        ) as resp,
    ):
        return resp.status, await resp.read()


async def roster_of(url: str) -> SignedRoster:
    """``GET /v1/roster``: the signed roster the node trusts now."""
    async with aiohttp.ClientSession() as session, session.get(url + "/v1/roster") as resp:
        assert resp.status == 200
        return decode_signed_roster(await resp.read())


def refused_error(status: int, body: bytes, code: ErrorCode) -> None:
    assert status == 400, body
    assert decode_as(body, ErrorMessage).code is code


def codes(result: FanOutResult) -> dict[str, tuple[CityStatus, ErrorCode | None]]:
    return {r.city: (r.status, r.code) for r in result.cities}


async def test_revoked_member_is_refused_as_a_target_and_the_rest_combine(small: Alliance) -> None:
    v1 = small.roster
    revoked = "edinburgh"
    rest = tuple(c for c in GOOD if c != revoked)
    v2 = small.successor(
        v1,
        ["amsterdam", "berlin", "copenhagen"],  # 3 of v1's root keys and 3 of v2's own
        members=tuple(m for m in v1.members if m.city != revoked),
        root_keys=tuple(k for k in v1.root_keys if k.city != revoked),
    )
    async with nodes(small, GOOD):
        before = await ask(small, small.targets(v1, GOOD), quorum=len(GOOD))
        for city in rest:  # the revoked city's node is not told; it is out
            status, body = await post_roster(small.url(city), v2)
            assert status == 200, body
        # The analyst learns v2 from a node and trusts it only after checking the chain.
        trusted = update_chain(v1, [await roster_of(small.url("amsterdam"))], _now_ms())
        assert trusted.version == 2 and trusted.member(revoked) is None

        # A stale target list still naming the revoked city: the members refuse
        # (a target outside the roster), the revoked city holds only v1.
        stale = await ask(
            small,
            [*small.targets(trusted, rest), *small.targets(v1, [revoked])],
            quorum=len(rest),
            roster_version=2,
        )
        after = await ask(small, small.targets(trusted, rest), quorum=len(rest), roster_version=2)

    assert before.by_status(CityStatus.ANSWERED) == GOOD
    assert codes(stale) == dict.fromkeys(GOOD, (CityStatus.REFUSED, ErrorCode.ROSTER_MISMATCH))
    assert stale.combined is None and not stale.quorum_met
    assert after.by_status(CityStatus.ANSWERED) == rest
    assert after.combined is not None
    assert federated(after.combined) == central([small.csvs[c] for c in rest])
    assert verify_bundle(build_bundle(after, v2), trusted_roster=small.v1).ok
    # Old evidence re-labelled with v2 (the revoked city's answer kept) fails on that city.
    verdict = verify_bundle(build_bundle(before, v2), trusted_roster=small.v1)
    assert not verdict.ok
    line = next(v for v in verdict.cities if v.city == revoked)
    assert any(f.startswith("member") for f in line.failures), line.failures


async def test_expired_roster_node_refuses_and_the_renewed_cities_combine(tmp_path: Path) -> None:
    # v1 expires in ten minutes; every clock below (nodes and analyst) runs a day
    # ahead, when four cities have taken up the renewed v2 and one has not.
    alliance = build_alliance(tmp_path, GOOD, threshold=3, expires_ms=_now_ms() + 600_000)
    v1 = alliance.roster
    offset = DAY_MS

    def clock() -> int:
        return _now_ms() + offset

    stale, renewed = GOOD[-1], GOOD[:-1]
    v2 = alliance.successor(
        v1, ["amsterdam", "berlin", "copenhagen"], expires_ms=clock() + 30 * DAY_MS
    )
    with pytest.raises(FreshnessError) as info:  # the analyst cannot use v1 any more
        verify_roster(alliance.v1, None, clock(), pin=roster_digest(alliance.v1))
    assert info.value.code is ErrorCode.EXPIRED
    trusted = update_chain(v1, [v2], clock())  # but may walk to the renewed v2
    async with nodes(alliance, GOOD, {city: {"clock_ms": clock} for city in GOOD}):
        for city in renewed:
            status, body = await post_roster(alliance.url(city), v2)
            assert status == 200, body
        result = await ask(
            alliance,
            alliance.targets(trusted, GOOD),
            quorum=len(renewed),
            roster_version=2,
            now_ms=clock,
        )
    assert codes(result) == {
        **dict.fromkeys(renewed, (CityStatus.ANSWERED, None)),
        stale: (CityStatus.REFUSED, ErrorCode.EXPIRED),
    }, {r.city: r.detail for r in result.cities}
    assert result.combined is not None
    assert federated(result.combined) == central([alliance.csvs[c] for c in renewed])
    assert verify_bundle(build_bundle(result, v2), trusted_roster=alliance.v1).ok
    # Evidence whose roster had expired when the requests were issued does not verify.
    verdict = verify_bundle(build_bundle(result, alliance.v1), pin=roster_digest(alliance.v1))
    assert not verdict.ok
    assert any("expired" in f for f in verdict.failures), verdict.failures


async def test_update_signed_below_threshold_is_refused_and_v1_stays_in_force(
    small: Alliance,
) -> None:
    v1 = small.roster
    mallory = Analyst.create("mallory@amsterdam", seed=b"\x66" * 32)
    # v2 would let mallory query; only two of the three required root keys signed it.
    v2 = small.successor(
        v1,
        ["amsterdam", "berlin"],
        analysts=(
            *v1.analysts,
            RosterAnalyst(mallory.principal, mallory.key.public_key.raw, "amsterdam", (PURPOSE,)),
        ),
    )
    with pytest.raises(SignatureError) as info:
        update_chain(v1, [v2], _now_ms())
    assert info.value.code is ErrorCode.BAD_SIGNATURE
    async with nodes(small, GOOD):
        for city in GOOD:
            refused_error(*await post_roster(small.url(city), v2), ErrorCode.BAD_SIGNATURE)
            assert await roster_of(small.url(city)) == small.v1
        intruder = await ask(
            small, small.targets(v1, GOOD), quorum=1, roster_version=2, analyst=mallory
        )
        result = await ask(small, small.targets(v1, GOOD), quorum=len(GOOD))
    # Mallory's key is in no roster a node trusts: every city rejects it unsigned.
    assert codes(intruder) == dict.fromkeys(
        GOOD, (CityStatus.PROTOCOL_ERROR, ErrorCode.UNKNOWN_KEY)
    )
    assert intruder.combined is None
    assert result.by_status(CityStatus.ANSWERED) == GOOD
    assert result.combined is not None
    assert federated(result.combined) == central([small.csvs[c] for c in GOOD])
    # One more root signature is all that was missing.
    enough = sign_roster(v2, small.root_keys["copenhagen"])
    assert verify_roster(enough, v1, _now_ms()).version == 2


async def test_rollback_to_an_older_roster_is_refused(small: Alliance) -> None:
    v1 = small.roster
    v2 = small.successor(v1, ["amsterdam", "berlin", "copenhagen"])
    lagging, updated = GOOD[-1], GOOD[:-1]
    async with nodes(small, GOOD):
        old = await ask(small, small.targets(v1, GOOD), quorum=len(GOOD))
        for city in updated:
            assert (await post_roster(small.url(city), v2))[0] == 200
            # Rolling a node back to v1 is refused; it keeps v2.
            refused_error(*await post_roster(small.url(city), small.v1), ErrorCode.ROSTER_MISMATCH)
            assert await roster_of(small.url(city)) == v2
        trusted = update_chain(v1, [v2], _now_ms())
        with pytest.raises(FreshnessError) as info:  # nor does the analyst go back
            verify_roster(small.v1, trusted, _now_ms())
        assert info.value.code is ErrorCode.ROSTER_MISMATCH
        result = await ask(
            small, small.targets(trusted, GOOD), quorum=len(updated), roster_version=2
        )
    assert old.by_status(CityStatus.ANSWERED) == GOOD
    # The city that has not taken up v2 yet refuses a v2 request; the rest combine.
    assert codes(result) == {
        **dict.fromkeys(updated, (CityStatus.ANSWERED, None)),
        lagging: (CityStatus.REFUSED, ErrorCode.ROSTER_MISMATCH),
    }
    assert result.combined is not None
    assert federated(result.combined) == central([small.csvs[c] for c in updated])
    # Evidence made under v1 is not accepted by an auditor who already trusts v2.
    bundle = build_bundle(old, small.v1)
    assert verify_bundle(bundle, trusted_roster=small.v1).ok
    verdict = verify_bundle(bundle, trusted_roster=v2)
    assert not verdict.ok
    assert any("neither the trusted roster" in f for f in verdict.failures), verdict.failures
