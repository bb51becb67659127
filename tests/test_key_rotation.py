"""Key rotation: ``hansa node rotate-key``, the ``key_rotated`` log entries, ``alliance set-key``.

A node logs every key it signs with (node, log, witness) the first time it starts with it,
and a changed key as ``key_rotated`` from the key the log last recorded (spec §16.2), so
an auditor can tell which key was in force when.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from nodeutil import init_test_node, running_node

from hansa.crypto import SigningKey
from hansa.crypto.keyfile import read_key_file, read_public_key, write_key_file
from hansa.federation.roster import (
    Member,
    Role,
    RootKey,
    Roster,
    decode_roster,
    decode_signed_roster,
    encode_signed_roster,
    sign_roster,
    unsigned,
)
from hansa.node.auditlog import KeyRotated, decode_entry
from hansa.node.cli import main
from hansa.node.config import NodeConfig
from hansa.protocol.auditleaf import KEY_ROLE_LOG, KEY_ROLE_NODE

CITY = "melbourne"
ZERO = bytes(32)


def _rotations(leaves: list[bytes]) -> list[KeyRotated]:
    entries = [decode_entry(leaf) for leaf in leaves]
    return [e for e in entries if isinstance(e, KeyRotated)]


async def _logged_rotations(config: NodeConfig) -> tuple[list[KeyRotated], bytes]:
    """Start the node, return its key_rotated entries and the node key it serves with."""
    async with running_node(config) as node:
        audit = node.state.audit
        assert audit is not None
        leaves = audit.leaves(0, audit.size)
        return _rotations(leaves), node.node_key.key_id


async def test_first_start_logs_its_keys_and_a_rotation_is_logged_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = init_test_node(tmp_path, CITY, rows=50)
    first_key = read_public_key(config.key_file)
    log_key = read_public_key(config.path(config.audit.log_key_file))

    first, serving = await _logged_rotations(config)
    assert serving == first_key.key_id
    assert {(e.role, e.old_key_id, e.new_key_id) for e in first} == {
        (KEY_ROLE_NODE, ZERO, first_key.key_id),
        (KEY_ROLE_LOG, ZERO, log_key.key_id),
    }

    # An unchanged restart logs nothing new.
    again, _ = await _logged_rotations(config)
    assert again == first

    assert main(["node", "rotate-key", "--data-dir", str(config.data_dir)]) == 0
    out = capsys.readouterr().out
    new_key = read_public_key(config.key_file)
    assert new_key.raw != first_key.raw
    assert new_key.raw.hex() in out and "hansa alliance set-key" in out

    # The old key is kept, as private as the node key itself.
    kept = sorted((config.key_file.parent / "retired").iterdir())
    assert len(kept) == 1
    assert stat.S_IMODE(kept[0].stat().st_mode) == 0o600
    assert read_key_file(kept[0]).public_key.raw == first_key.raw

    rotated, serving = await _logged_rotations(config)
    assert serving == new_key.key_id
    assert rotated[: len(first)] == first
    (change,) = rotated[len(first) :]
    assert (change.role, change.old_key_id, change.new_key_id) == (
        KEY_ROLE_NODE,
        first_key.key_id,
        new_key.key_id,
    )
    again, _ = await _logged_rotations(config)
    assert again == rotated


def test_rotation_keeps_the_passphrase_protection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HANSA_TEST_PASSPHRASE", "correct horse battery staple")
    data_dir = tmp_path / "node"
    assert (
        main(
            [
                "node",
                "init",
                "--data-dir",
                str(data_dir),
                "--city",
                CITY,
                "--passphrase-env",
                "HANSA_TEST_PASSPHRASE",
            ]
        )
        == 0
    )
    assert main(["node", "rotate-key", "--data-dir", str(data_dir)]) == 0
    passphrase = b"correct horse battery staple"
    key_file = data_dir / "node.key"
    read_key_file(key_file, passphrase=passphrase)  # encrypted with the same passphrase
    with pytest.raises(Exception, match="passphrase"):
        read_key_file(key_file)
    monkeypatch.delenv("HANSA_TEST_PASSPHRASE")
    # Without the passphrase nothing is rotated: one readable line, non-zero exit.
    before = key_file.read_bytes()
    assert main(["node", "rotate-key", "--data-dir", str(data_dir)]) != 0
    assert key_file.read_bytes() == before


# --- hansa alliance set-key ----------------------------------------------------------------


def _roster_file(path: Path, keys: dict[str, SigningKey], root: dict[str, SigningKey]) -> Path:
    roster = Roster(
        alliance="Hanse",
        version=1,
        expires_ms=4_102_444_800_000,
        threshold=2,
        root_keys=tuple(RootKey(c, k.public_key.raw) for c, k in root.items()),
        members=tuple(
            Member(c, c.title(), k.public_key.raw, f"http://127.0.0.1:{8470 + i}", (Role.MEMBER,))
            for i, (c, k) in enumerate(keys.items())
        ),
        analysts=(),
        purposes=("housing",),
    )
    doc = unsigned(roster)
    for key in root.values():
        doc = sign_roster(doc, key)
    path.write_bytes(encode_signed_roster(doc))
    return path


def test_alliance_set_key_names_the_new_node_key_in_the_next_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = {c: SigningKey.generate() for c in ("lisbon", "madrid")}
    root = {c: SigningKey.generate() for c in keys}
    current = _roster_file(tmp_path / "v1.roster", keys, root)
    new = SigningKey.generate()
    key_file = tmp_path / "new.key"
    write_key_file(key_file, new)
    out = tmp_path / "v2.roster"
    argv = ["alliance", "set-key", str(current), "--out", str(out), "--city", "lisbon"]
    assert main([*argv, "--key", str(key_file)]) == 0
    before = decode_roster(decode_signed_roster(current.read_bytes()).body)
    after = decode_roster(decode_signed_roster(out.read_bytes()).body)
    assert after.version == before.version + 1
    lisbon, madrid = after.member("lisbon"), after.member("madrid")
    assert lisbon is not None and madrid is not None
    assert lisbon.public_key == new.public_key.raw
    old_lisbon = before.member("lisbon")
    assert old_lisbon is not None
    assert (lisbon.endpoint, lisbon.roles, lisbon.name) == (
        old_lisbon.endpoint,
        old_lisbon.roles,
        old_lisbon.name,
    )
    assert madrid == before.member("madrid")
    assert after.root_keys == before.root_keys  # governance keys are not node keys
    capsys.readouterr()

    # Unknown city and an unchanged key are refused with one line.
    write_key_file(tmp_path / "madrid.key", keys["madrid"])
    other = tmp_path / "v2b.roster"
    base = ["alliance", "set-key", str(current), "--out", str(other)]
    assert main([*base, "--city", "rome", "--key", str(key_file)]) != 0
    assert main([*base, "--city", "madrid", "--key", str(tmp_path / "madrid.key")]) != 0
    err = capsys.readouterr().err
    assert "not a member" in err and "already names this key" in err
    assert "Traceback" not in err
    assert not other.exists()
