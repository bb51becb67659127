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

The roster trust rules (revocation, expiry, an update below threshold, a
rollback) are exercised where the analyst and the auditor apply them: the
analyst takes targets only from a roster it verified (``verify_roster`` /
``update_chain``), and ``verify_bundle`` judges the evidence against a
pinned or trusted roster.
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
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

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
from hansa.federation.evidence import build_bundle, read_bundle, verify_bundle
from hansa.federation.fanout import CityStatus, FanOutResult, Target, fan_out
from hansa.federation.roster import Analyst as RosterAnalyst
from hansa.federation.roster import (
    Member,
    Role,
    RootKey,
    Roster,
    SignedRoster,
    decode_roster,
    roster_digest,
    sign_roster,
    unsigned,
    update_chain,
    verify_roster,
)
from hansa.node.app import create_app
from hansa.node.catalog import Catalog
from hansa.node.config import NodeConfig
from hansa.node.engine import QueryEngine
from hansa.protocol.errors import ErrorCode, FreshnessError, SignatureError
from hansa.protocol.messages import (
    Count,
    DatasetInfo,
    Dimension,
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
    """Nine city data directories, their root keys and version 1 of the roster."""

    analyst: Analyst
    configs: Mapping[str, NodeConfig]
    csvs: Mapping[str, Path]
    root_keys: Mapping[str, SigningKey]
    v1: SignedRoster
    roster: Roster

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
    root = tmp_path_factory.mktemp("alliance")
    analyst = Analyst.create("ana@amsterdam", seed=b"\x42" * 32)
    configs: dict[str, NodeConfig] = {}
    csvs: dict[str, Path] = {}
    for i, city in enumerate(CITIES):
        configs[city] = init_test_node(
            root, city, analysts=[analyst], rows=120 + 15 * i, seed=7 + i, port=_free_port()
        )
        csvs[city] = root / f"{city}-listings.csv"  # where init_test_node writes them
        assert csvs[city].is_file()
        with Catalog(configs[city].data_dir) as catalog:
            # Exact comparison with the central query: nothing suppressed.
            catalog.configure(
                DATASET,
                min_group_size=1,
                dominance_p=100.0,
                purposes=["planning"] if city == REFUSING else None,
            )
    root_keys = {city: SigningKey(bytes([i + 1]) * 32) for i, city in enumerate(CITIES)}
    now = _now_ms()
    draft = Roster(
        alliance="e2e alliance",
        version=1,
        expires_ms=now + 30 * DAY_MS,
        threshold=THRESHOLD,
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
    for city in CITIES[:THRESHOLD]:
        signed = sign_roster(signed, root_keys[city])
    roster = verify_roster(signed, None, now, pin=roster_digest(signed))
    return Alliance(analyst, configs, csvs, root_keys, signed, roster)


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
    roster_version: int | None = None,
    on_status: Any = None,
) -> FanOutResult:
    return await fan_out(
        query if query is not None else count_and_sums(),
        policy(alliance.analyst),
        targets,
        signer=alliance.analyst.key,
        requester=alliance.analyst.principal,
        quorum=quorum,
        deadline_s=DEADLINE_S,
        roster_version=alliance.roster.version if roster_version is None else roster_version,
        on_status=on_status,
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
    assert sum(n for n, _, _ in expected.values()) == sum(
        120 + 15 * CITIES.index(c) for c in cities
    )


# --- the mixed alliance ----------------------------------------------------------------


async def test_killed_slow_rogue_and_refusing_cities_each_get_their_status(
    alliance: Alliance,
) -> None:
    slow = SlowEngine(alliance.configs[SLOW].data_dir)
    prompt = {*GOOD, ROGUE, REFUSING}  # everyone who replies before the deadline
    reported: set[str] = set()

    with node_subprocess(alliance.configs[KILLED], alliance.url(KILLED)) as killed:
        killed.send_signal(signal.SIGSTOP)

        def on_status(result: Any) -> None:
            reported.add(result.city)
            if prompt <= reported and killed.poll() is None:
                # Every prompt city has replied, so every request was sent long
                # ago: KILLED's sits unread in its socket. Kill it now.
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
    answering=st.sets(st.sampled_from(GOOD), min_size=1),
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


def successor(alliance: Alliance, roster: Roster, **changes: Any) -> Roster:
    return msgspec.structs.replace(roster, version=roster.version + 1, **changes)


async def test_revoked_member_is_not_asked_and_its_old_evidence_no_longer_verifies(
    alliance: Alliance,
) -> None:
    v1 = alliance.roster
    revoked = "edinburgh"
    v2_body = successor(
        alliance,
        v1,
        members=tuple(m for m in v1.members if m.city != revoked),
        root_keys=tuple(k for k in v1.root_keys if k.city != revoked),
    )
    v2 = alliance.sign(v2_body, [c for c in CITIES[: THRESHOLD + 1] if c != revoked])
    trusted = update_chain(v1, [v2], _now_ms())
    assert trusted.version == 2 and trusted.member(revoked) is None

    async with nodes(alliance, GOOD):
        # Under v1 the city answers and its answer is evidence.
        before = await ask(alliance, alliance.targets(v1, GOOD), quorum=len(GOOD))
        # Under v2 the analyst no longer asks it: targets come from the roster only.
        remaining = [m.city for m in trusted.members if m.city in GOOD]
        after = await ask(
            alliance,
            alliance.targets(trusted, remaining),
            quorum=len(remaining),
            roster_version=2,
        )
    assert before.by_status(CityStatus.ANSWERED) == GOOD
    assert revoked not in after.targets
    assert after.by_status(CityStatus.ANSWERED) == tuple(remaining)
    assert after.combined is not None
    assert federated(after.combined) == central([alliance.csvs[c] for c in remaining])
    after_verdict = verify_bundle(build_bundle(after, v2), trusted_roster=alliance.v1)
    assert after_verdict.ok, after_verdict.failures

    # The v1 evidence re-labelled with v2 (the revoked city's answer kept) fails.
    relabelled = build_bundle(before, v2)
    verdict = verify_bundle(relabelled, trusted_roster=alliance.v1)
    assert not verdict.ok
    line = next(v for v in verdict.cities if v.city == revoked)
    assert any("member" in f for f in line.failures), line.failures


async def test_expired_roster_is_refused_by_the_analyst_and_by_the_verifier(
    alliance: Alliance,
) -> None:
    now = _now_ms()
    expired_body = msgspec.structs.replace(alliance.roster, expires_ms=now - 1)
    expired = alliance.sign(expired_body, CITIES[:THRESHOLD])
    with pytest.raises(FreshnessError) as info:
        verify_roster(expired, None, now, pin=roster_digest(expired))
    assert info.value.code is ErrorCode.EXPIRED
    # An analyst who fanned out anyway produces evidence no verifier accepts.
    async with nodes(alliance, GOOD[:2]):
        result = await ask(alliance, alliance.targets(expired_body, GOOD[:2]), quorum=2)
    assert result.by_status(CityStatus.ANSWERED) == GOOD[:2]  # nodes here are roster-less
    verdict = verify_bundle(build_bundle(result, expired), pin=roster_digest(expired))
    assert not verdict.ok
    assert any("expired" in f for f in verdict.failures), verdict.failures


def test_update_signed_below_threshold_is_refused_and_v1_stays_trusted(
    alliance: Alliance,
) -> None:
    v1 = alliance.roster
    # v2 would point amsterdam at an attacker's endpoint and key.
    attacker = SigningKey(b"\x66" * 32)
    hijacked = tuple(
        msgspec.structs.replace(
            m, endpoint="http://127.0.0.1:9", public_key=attacker.public_key.raw
        )
        if m.city == "amsterdam"
        else m
        for m in v1.members
    )
    v2 = alliance.sign(successor(alliance, v1, members=hijacked), CITIES[: THRESHOLD - 1])
    with pytest.raises(SignatureError) as info:
        verify_roster(v2, v1, _now_ms())
    assert info.value.code is ErrorCode.BAD_SIGNATURE
    with pytest.raises(SignatureError):
        update_chain(v1, [v2], _now_ms())
    # One more root signature makes the same update valid: the threshold is what was missing.
    enough = alliance.sign(decode_roster(v2.body), CITIES[:THRESHOLD])
    assert verify_roster(enough, v1, _now_ms()).version == 2
    # The analyst keeps v1: amsterdam's target is still its real node.
    assert alliance.targets(v1, ["amsterdam"])[0].endpoint == alliance.url("amsterdam")


async def test_rollback_to_an_older_roster_is_refused(alliance: Alliance) -> None:
    v1 = alliance.roster
    v2 = alliance.sign(successor(alliance, v1), CITIES[:THRESHOLD])
    trusted = verify_roster(v2, v1, _now_ms())
    with pytest.raises(FreshnessError) as info:
        verify_roster(alliance.v1, trusted, _now_ms())
    assert info.value.code is ErrorCode.ROSTER_MISMATCH
    # Evidence made under v1 is not accepted by a verifier that already trusts v2.
    async with nodes(alliance, GOOD[:2]):
        result = await ask(alliance, alliance.targets(v1, GOOD[:2]), quorum=2)
    bundle = build_bundle(result, alliance.v1)
    assert read_bundle(bundle).roster == alliance.v1
    assert verify_bundle(bundle, trusted_roster=alliance.v1).ok
    verdict = verify_bundle(bundle, trusted_roster=v2)
    assert not verdict.ok
    assert any("neither the trusted roster" in f for f in verdict.failures), verdict.failures
