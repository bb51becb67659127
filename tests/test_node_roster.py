"""A city node enforcing the alliance roster (spec §8.2, §15.1).

Real nodes on 127.0.0.1 (``tests/nodeutil.py``) trusting rosters built with
``hansa.federation.roster``: who may query, for which purpose, against which
roster version and participants, and rotation/revocation at run time through
``POST /v1/roster``, SIGHUP (``NodeState.reload``) and ``hansa node roster
install``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nodeutil import (
    DATASET,
    PURPOSE,
    Analyst,
    RunningNode,
    count_by_room_type,
    init_test_node,
    now_ms,
    running_node,
)

from hansa.crypto.keyfile import read_public_key
from hansa.crypto.keys import SigningKey
from hansa.federation.roster import (
    Analyst as RosterAnalyst,
)
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
)
from hansa.node import cli
from hansa.node._cli_node import init_node, install_roster_file
from hansa.node.app import ENVELOPE_MEDIA_TYPE, ERROR_MEDIA_TYPE, ROSTER_MEDIA_TYPE, create_app
from hansa.node.config import (
    NodeConfig,
    add_trusted_key,
    configure_alliance,
    load_config,
    load_roster_store,
    parse_config,
    render_config,
)
from hansa.protocol.codec import decode_as
from hansa.protocol.errors import ConfigError, ErrorCode
from hansa.protocol.messages import ErrorMessage, QueryAnswer, QueryRefusal

CITY = "melbourne"
OTHER = "austin"
DAY_MS = 86_400_000

ANA = Analyst.create("ana@melbourne", seed=b"a" * 32)
BOB = Analyst.create("bob@melbourne", seed=b"b" * 32)


@dataclass
class Alliance:
    """Root keys of two member cities and the rosters signed so far."""

    node_key: bytes
    root: dict[str, SigningKey] = field(
        default_factory=lambda: {CITY: SigningKey(b"r" * 32), OTHER: SigningKey(b"s" * 32)}
    )
    other_node: SigningKey = field(default_factory=lambda: SigningKey(b"o" * 32))

    def roster(
        self,
        version: int,
        *,
        analysts: Sequence[Analyst] = (ANA, BOB),
        expires_ms: int | None = None,
        members: Sequence[str] = (CITY, OTHER),
        alliance: str = "Hanse",
    ) -> Roster:
        keys = {CITY: self.node_key, OTHER: self.other_node.public_key.raw}
        purposes = {ANA.principal: (PURPOSE,), BOB.principal: ("planning",)}
        return Roster(
            alliance=alliance,
            version=version,
            expires_ms=now_ms() + DAY_MS if expires_ms is None else expires_ms,
            threshold=2,
            root_keys=tuple(RootKey(c, self.root[c].public_key.raw) for c in (CITY, OTHER)),
            members=tuple(
                Member(c, c.title(), keys[c], f"http://127.0.0.1:{8470 + i}", (Role.MEMBER,))
                for i, c in enumerate(members)
            ),
            analysts=tuple(
                RosterAnalyst(a.principal, a.key.public_key.raw, CITY, purposes[a.principal])
                for a in analysts
            ),
            purposes=(PURPOSE, "planning"),
        )

    def signed(self, roster: Roster, signers: Sequence[str] = (CITY, OTHER)) -> bytes:
        doc: SignedRoster = unsigned(roster)
        for city in signers:
            doc = sign_roster(doc, self.root[city])
        return encode_signed_roster(doc)


def _pin(data: bytes) -> bytes:
    return roster_digest(decode_signed_roster(data))


def _setup(
    tmp_path: Path, *, min_participants: int = 1, dataset: str | None = DATASET
) -> tuple[NodeConfig, Alliance, bytes]:
    """A melbourne node (no [[trusted]] keys) pinned to roster v1."""
    base = init_test_node(tmp_path, CITY, rows=200, dataset=dataset)
    alliance = Alliance(read_public_key(base.key_file).raw)
    v1 = alliance.signed(alliance.roster(1))
    config = configure_alliance(
        base.data_dir, v1, _pin(v1), now_ms(), min_participants=min_participants
    )
    return config, alliance, v1


def _request(
    analyst: Analyst,
    *,
    roster_version: int = 1,
    targets: Sequence[str] = (CITY,),
    quorum: int = 1,
    purpose: str = PURPOSE,
    requester: str | None = None,
    issued_at: int | None = None,
) -> bytes:
    req = analyst.request(
        CITY, count_by_room_type(), purpose=purpose, requester=requester, issued_at=issued_at
    )
    req = msgspec.structs.replace(
        req, roster_version=roster_version, targets=tuple(targets), quorum=quorum
    )
    return analyst.seal(req)


async def _refused(node: RunningNode, envelope: bytes, code: ErrorCode) -> QueryRefusal:
    reply = await node.query(envelope)
    assert isinstance(reply, QueryRefusal), reply
    assert reply.code is code, reply
    return reply


async def _post_roster(
    node: RunningNode, data: bytes, content_type: str = ROSTER_MEDIA_TYPE
) -> tuple[int, bytes]:
    return await node.post(data, content_type=content_type, path="/v1/roster")


def _error(status: int, body: bytes, expected_status: int, code: ErrorCode) -> None:
    assert status == expected_status, body
    message = decode_as(body, ErrorMessage)
    assert message.code is code, message


async def _current_roster(node: RunningNode) -> bytes:
    status, body, content_type = await node.get("/v1/roster")
    assert status == 200 and content_type == ROSTER_MEDIA_TYPE
    return body


# --- who may query ------------------------------------------------------------------


async def test_analyst_named_by_the_roster_is_answered(tmp_path: Path) -> None:
    config, _, v1 = _setup(tmp_path)
    async with running_node(config) as node:
        reply = await node.query(_request(ANA))
        assert isinstance(reply, QueryAnswer), reply
        assert reply.requester == ANA.principal
        assert await _current_roster(node) == v1


async def test_roster_replaces_the_trusted_list(tmp_path: Path) -> None:
    # A key that is only in [[trusted]] (not in the roster) is unknown once a roster governs.
    carol = Analyst.create("carol@melbourne")
    config, _, _ = _setup(tmp_path)
    config = add_trusted_key(config.data_dir, carol.principal, carol.key.public_key.raw.hex())
    async with running_node(config) as node:
        status, body = await node.post(_request(carol))
        _error(status, body, 401, ErrorCode.UNKNOWN_KEY)


async def test_key_not_in_roster_is_unknown(tmp_path: Path) -> None:
    config, _, _ = _setup(tmp_path)
    stranger = Analyst.create("eve@melbourne")
    async with running_node(config) as node:
        async with node.session.post(
            node.url + "/v1/query",
            data=_request(stranger),
            headers={"Content-Type": ENVELOPE_MEDIA_TYPE},
        ) as resp:
            assert resp.content_type == ERROR_MEDIA_TYPE
            _error(resp.status, await resp.read(), 401, ErrorCode.UNKNOWN_KEY)
        # The node keeps serving the roster's analysts.
        assert isinstance(await node.query(_request(ANA)), QueryAnswer)


async def test_requester_must_be_the_key_holder(tmp_path: Path) -> None:
    config, _, _ = _setup(tmp_path)
    async with running_node(config) as node:
        await _refused(
            node, _request(ANA, requester=BOB.principal), ErrorCode.REQUESTER_NOT_ALLOWED
        )


async def test_purpose_not_allowed_for_the_analyst(tmp_path: Path) -> None:
    config, _, _ = _setup(tmp_path)
    async with running_node(config) as node:
        # bob may only query for "planning"; "research" is ana's.
        refusal = await _refused(node, _request(BOB), ErrorCode.PURPOSE_NOT_ALLOWED)
        assert BOB.principal in refusal.reason


async def test_wrong_roster_version_is_a_mismatch(tmp_path: Path) -> None:
    config, _, _ = _setup(tmp_path)
    async with running_node(config) as node:
        for version in (0, 2):
            refusal = await _refused(
                node, _request(ANA, roster_version=version), ErrorCode.ROSTER_MISMATCH
            )
            assert "version 1" in refusal.reason


async def test_target_outside_the_roster_is_a_mismatch(tmp_path: Path) -> None:
    config, _, _ = _setup(tmp_path)
    async with running_node(config) as node:
        refusal = await _refused(
            node, _request(ANA, targets=(CITY, "lisbon")), ErrorCode.ROSTER_MISMATCH
        )
        assert "lisbon" in refusal.reason


async def test_quorum_below_min_participants(tmp_path: Path) -> None:
    config, _, _ = _setup(tmp_path, min_participants=2)
    assert config.alliance.min_participants == 2
    async with running_node(config) as node:
        await _refused(node, _request(ANA), ErrorCode.QUORUM_TOO_SMALL)
        await _refused(node, _request(ANA, targets=(CITY, OTHER)), ErrorCode.QUORUM_TOO_SMALL)
        reply = await node.query(_request(ANA, targets=(CITY, OTHER), quorum=2))
        assert isinstance(reply, QueryAnswer), reply


async def test_min_participants_applies_without_a_roster(tmp_path: Path) -> None:
    base = init_test_node(tmp_path, CITY, analysts=[ANA], rows=200)
    path = base.data_dir / "node.toml"
    path.write_text(
        path.read_text("utf-8").replace("min_participants = 1", "min_participants = 3"), "utf-8"
    )
    config = load_config(base.data_dir)
    assert not config.alliance.has_roster
    async with running_node(config) as node:
        # Roster-less: roster_version is not checked, the [[trusted]] key is the authority.
        await _refused(
            node,
            _request(ANA, roster_version=0, targets=(CITY, OTHER), quorum=2),
            ErrorCode.QUORUM_TOO_SMALL,
        )
        status, _ = await node.post(b"", content_type=ROSTER_MEDIA_TYPE, path="/v1/roster")
        assert status == 404
        assert (await node.get("/v1/roster"))[0] == 404


# --- rotation and revocation at run time --------------------------------------------


async def test_revoked_analyst_is_refused_without_restart(tmp_path: Path) -> None:
    config, alliance, _ = _setup(tmp_path)
    v2 = alliance.signed(alliance.roster(2, analysts=(BOB,)))
    async with running_node(config) as node:
        assert isinstance(await node.query(_request(ANA)), QueryAnswer)
        status, body = await _post_roster(node, v2)
        assert status == 200, body
        assert json.loads(body)["version"] == 2
        status, body = await node.post(_request(ANA, roster_version=2))
        _error(status, body, 401, ErrorCode.UNKNOWN_KEY)
        assert await _current_roster(node) == v2
        # Posting the current roster again changes nothing.
        status, body = await _post_roster(node, v2)
        assert status == 200 and json.loads(body)["outcome"] == "unchanged"
    # Persisted: a restarted node walks the chain from the v1 pin to v2.
    assert (config.data_dir / "roster.bin").read_bytes() == v2
    restarted = load_config(config.data_dir)
    async with running_node(restarted) as node:
        assert await _current_roster(node) == v2
        status, _ = await node.post(_request(ANA, roster_version=2))
        assert status == 401


async def test_update_below_threshold_is_refused_and_old_roster_stays(tmp_path: Path) -> None:
    config, alliance, v1 = _setup(tmp_path)
    weak = alliance.signed(alliance.roster(2, analysts=(BOB,)), signers=(CITY,))
    async with running_node(config) as node:
        status, body = await _post_roster(node, weak)
        _error(status, body, 400, ErrorCode.BAD_SIGNATURE)
        assert await _current_roster(node) == v1
        assert isinstance(await node.query(_request(ANA)), QueryAnswer)
    assert (config.data_dir / "roster.bin").read_bytes() == v1


async def test_rollback_to_an_older_roster_is_refused(tmp_path: Path) -> None:
    config, alliance, v1 = _setup(tmp_path)
    v2 = alliance.signed(alliance.roster(2))
    async with running_node(config) as node:
        assert (await _post_roster(node, v2))[0] == 200
        status, body = await _post_roster(node, v1)
        _error(status, body, 400, ErrorCode.ROSTER_MISMATCH)
        assert await _current_roster(node) == v2
        assert isinstance(await node.query(_request(ANA, roster_version=2)), QueryAnswer)


async def test_other_alliance_and_skipped_version_are_refused(tmp_path: Path) -> None:
    config, alliance, v1 = _setup(tmp_path)
    foreign = alliance.signed(alliance.roster(2, alliance="Other"))
    skipped = alliance.signed(alliance.roster(3))
    async with running_node(config) as node:
        for data in (foreign, skipped):
            status, body = await _post_roster(node, data)
            _error(status, body, 400, ErrorCode.ROSTER_MISMATCH)
        status, body = await _post_roster(node, b"\x93garbage")
        assert status == 400
        status, body = await _post_roster(node, v1, content_type="application/octet-stream")
        assert status == 415
        assert await _current_roster(node) == v1


async def test_expired_roster_refuses_until_a_newer_one_is_installed(tmp_path: Path) -> None:
    config, alliance, _ = _setup(tmp_path)
    clock = [now_ms()]
    async with running_node(config, clock_ms=lambda: clock[0]) as node:
        clock[0] += 2 * DAY_MS  # v1 expires after one day
        refusal = await _refused(node, _request(ANA, issued_at=clock[0]), ErrorCode.EXPIRED)
        assert "roster" in refusal.reason
        # A newer roster that is itself expired is refused too.
        stale = alliance.signed(alliance.roster(2, expires_ms=clock[0] - 1))
        status, body = await _post_roster(node, stale)
        _error(status, body, 400, ErrorCode.EXPIRED)
        fresh = alliance.signed(alliance.roster(2, expires_ms=clock[0] + DAY_MS))
        assert (await _post_roster(node, fresh))[0] == 200
        reply = await node.query(_request(ANA, roster_version=2, issued_at=clock[0]))
        assert isinstance(reply, QueryAnswer), reply


async def test_node_with_an_expired_roster_starts_and_refuses(tmp_path: Path) -> None:
    config, _, _ = _setup(tmp_path)
    later = now_ms() + 3 * DAY_MS
    async with running_node(config, clock_ms=lambda: later) as node:
        await _refused(node, _request(ANA, issued_at=later), ErrorCode.EXPIRED)


async def test_sighup_reload_takes_up_an_offline_install(tmp_path: Path) -> None:
    config, alliance, v1 = _setup(tmp_path)
    v2 = alliance.signed(alliance.roster(2, analysts=(BOB,)))
    async with running_node(config) as node:
        assert install_roster_file(config.data_dir, v2) == 2
        assert await _current_roster(node) == v1  # not yet: no signal
        assert await node.state.reload()
        assert await _current_roster(node) == v2
        status, _ = await node.post(_request(ANA, roster_version=2))
        assert status == 401
        # A file rolled back behind the node's back is not taken up.
        (config.data_dir / "roster.bin").write_bytes(v1)
        assert not await node.state.reload()
        assert await _current_roster(node) == v2


@pytest.fixture(scope="module")
def junk_target(tmp_path_factory: pytest.TempPathFactory) -> tuple[NodeConfig, bytes]:
    config, _, v1 = _setup(tmp_path_factory.mktemp("junk"), dataset=None)
    return config, v1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.lists(st.binary(max_size=300), min_size=1, max_size=8))
def test_junk_roster_posts_never_change_the_roster(
    junk_target: tuple[NodeConfig, bytes], junk: list[bytes]
) -> None:
    config, v1 = junk_target

    async def run() -> None:
        async with running_node(config) as node:
            for data in junk:
                status, body = await _post_roster(node, data)
                assert status == 400, body
                assert decode_as(body, ErrorMessage).code.on_wire
            assert await _current_roster(node) == v1
            assert (await node.get("/healthz"))[0] == 200

    asyncio.run(run())


# --- configuration and command line ---------------------------------------------------


def test_alliance_table_is_validated(tmp_path: Path) -> None:
    text = render_config(city=CITY)
    assert "min_participants = 1" in text
    assert not parse_config(text, tmp_path).alliance.has_roster
    bad = {
        'roster = "roster.bin"': "together",
        f'pin = "{"ab" * 32}"': "together",
        'roster = "roster.bin"\npin = "xyz"': "64 hex digits",
    }
    for lines, expected in bad.items():
        with pytest.raises(ConfigError, match=expected):
            parse_config(text.replace("[alliance]\n", f"[alliance]\n{lines}\n"), tmp_path)
    with pytest.raises(ConfigError, match="min_participants"):
        parse_config(text.replace("min_participants = 1", "min_participants = 0"), tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config(text.replace("[alliance]\n", "[alliance]\nquorum = 2\n"), tmp_path)


def test_first_roster_must_match_pin_and_name_the_city(tmp_path: Path) -> None:
    base = init_test_node(tmp_path, CITY, dataset=None)
    alliance = Alliance(read_public_key(base.key_file).raw)
    v1 = alliance.signed(alliance.roster(1))
    with pytest.raises(ConfigError, match="pinned"):
        configure_alliance(base.data_dir, v1, b"\x00" * 32, now_ms())
    expired = alliance.signed(alliance.roster(1, expires_ms=now_ms() - 1))
    with pytest.raises(ConfigError, match="expired"):
        configure_alliance(base.data_dir, expired, _pin(expired), now_ms())
    weak = alliance.signed(alliance.roster(1), signers=(OTHER,))
    with pytest.raises(ConfigError, match="signature"):
        configure_alliance(base.data_dir, weak, _pin(weak), now_ms())
    assert not load_config(base.data_dir).alliance.has_roster
    # A city the roster does not name is refused before anything is created.
    with pytest.raises(ConfigError, match="not a member"):
        init_node(tmp_path / "sydney", city="sydney", roster=v1, pin=_pin(v1))
    assert not (tmp_path / "sydney").exists()
    configure_alliance(base.data_dir, v1, _pin(v1), now_ms())
    with pytest.raises(ConfigError, match="already names a roster"):
        configure_alliance(base.data_dir, v1, _pin(v1), now_ms())


def test_broken_chain_is_a_config_error(tmp_path: Path) -> None:
    config, alliance, _ = _setup(tmp_path)
    v2 = alliance.signed(alliance.roster(2))
    install_roster_file(config.data_dir, v2)
    stored = load_roster_store(config.data_dir, config.alliance)
    assert stored is not None and stored.version == 2
    for path in (config.data_dir / "rosters").glob("*.bin"):
        path.unlink()
    with pytest.raises(ConfigError, match="pinned"):
        load_roster_store(config.data_dir, config.alliance)


def test_cli_init_with_roster_and_roster_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The roster names the node key, which init makes: init without a roster,
    # then configure it, then install v2 through the command line.
    data_dir = tmp_path / "node"
    assert cli.main(["node", "init", "--data-dir", str(data_dir), "--city", CITY]) == 0
    alliance = Alliance(read_public_key(data_dir / "node.key").raw)
    v1 = alliance.signed(alliance.roster(1))
    v2 = alliance.signed(alliance.roster(2))
    (tmp_path / "v1.bin").write_bytes(v1)
    (tmp_path / "v2.bin").write_bytes(v2)
    # install needs a configured roster first.
    argv = ["node", "roster", "install", "--data-dir", str(data_dir), str(tmp_path / "v2.bin")]
    assert cli.main(argv) != 0
    # init refuses a roster without its pin, and a wrong pin.
    fresh = tmp_path / "fresh"
    args = ["node", "init", "--data-dir", str(fresh), "--city", CITY, "--roster"]
    assert cli.main([*args, str(tmp_path / "v1.bin")]) != 0
    assert cli.main([*args, str(tmp_path / "v1.bin"), "--pin", "00" * 32]) != 0
    assert not (fresh / "node.toml").exists()
    # An existing node takes its first roster with 'roster set' (pinned).
    set_argv = ["node", "roster", "set", "--data-dir", str(data_dir), str(tmp_path / "v1.bin")]
    assert cli.main([*set_argv, "--pin", "00" * 32]) != 0
    assert not load_config(data_dir).alliance.has_roster
    assert cli.main([*set_argv, "--pin", _pin(v1).hex(), "--min-participants", "2"]) == 0
    config = load_config(data_dir)
    assert config.alliance.has_roster and config.alliance.min_participants == 2
    # A second 'set' is refused: updates go through 'install' (threshold-checked).
    assert cli.main([*set_argv, "--pin", _pin(v1).hex()]) != 0
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "version 2" in capsys.readouterr().out
    assert (data_dir / "roster.bin").read_bytes() == v2
    # Installing it again is a rollback.
    assert cli.main(argv) != 0


def test_cli_init_with_a_pinned_roster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # Membership is by city id: a second directory for the same city may pin the
    # roster built around the first one's key (spec §15.1 membership).
    first = tmp_path / "first"
    assert cli.main(["node", "init", "--data-dir", str(first), "--city", CITY]) == 0
    alliance = Alliance(read_public_key(first / "node.key").raw)
    v1 = alliance.signed(alliance.roster(1))
    (tmp_path / "v1.bin").write_bytes(v1)
    second = tmp_path / "second"
    argv = [
        "node",
        "init",
        "--data-dir",
        str(second),
        "--city",
        CITY,
        "--roster",
        str(tmp_path / "v1.bin"),
        "--pin",
        _pin(v1).hex(),
        "--min-participants",
        "2",
    ]
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "roster pin" in capsys.readouterr().out
    config = load_config(second)
    assert config.alliance.has_roster and config.alliance.min_participants == 2
    stored = load_roster_store(second, config.alliance)
    assert stored is not None and stored.data == v1
    assert cli.main(["node", "show", "--data-dir", str(second)]) == 0
    assert "ignored" in capsys.readouterr().out
    # ... but its operator is warned that its replies will not verify.
    with caplog.at_level(logging.WARNING, logger="hansa.node"):
        create_app(config)
    assert "another node key" in caplog.text
