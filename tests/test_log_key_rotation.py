"""Replacing the audit log key: the node still opens its log, and checks what the old key signed.

A node checks every stored checkpoint's signature when it opens its log (spec §16.2). The
checkpoints signed before the current log key came into force are checked under the log
keys ``hansa node rotate-key --key log`` kept under ``retired/``; those no kept key signed
(a key discarded after a compromise) open as unchecked, their roots matching the stored
leaves. A checkpoint signed after the current key came into force must verify under it.
"""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from nodeutil import init_test_node, running_node

from hansa.crypto.keyfile import read_key_file, read_public_key, write_key_file
from hansa.crypto.keys import SigningKey
from hansa.crypto.note import NoteSigner, NoteVerifier
from hansa.node.auditlog import AuditLog, InconsistentLogError, KeyRotated, decode_entry
from hansa.node.cli import main
from hansa.node.config import AUDIT_FILE, NodeConfig
from hansa.protocol.auditleaf import KEY_ROLE_LOG
from hansa.protocol.errors import ConfigError

CITY = "lisbon"


async def _run_once(config: NodeConfig) -> tuple[str, list[int]]:
    """Start and stop the node (its shutdown signs a checkpoint); its origin and unchecked."""
    async with running_node(config) as node:
        audit = node.state.audit
        assert audit is not None
        return node.state.origin, list(audit.unchecked_checkpoints)


def _open(config: NodeConfig, origin: str, key: SigningKey, retired: list[SigningKey]) -> AuditLog:
    return AuditLog.open(
        config.data_dir / AUDIT_FILE,
        origin,
        verifier=NoteVerifier(origin, key.public_key),
        retired=[NoteVerifier(origin, k.public_key) for k in retired],
    )


def _log_rotations(audit: AuditLog) -> list[tuple[int, KeyRotated]]:
    out = []
    for index, leaf in enumerate(audit.leaves(0, audit.size)):
        entry = decode_entry(leaf)
        if isinstance(entry, KeyRotated) and entry.role == KEY_ROLE_LOG:
            out.append((index, entry))
    return out


async def test_rotate_key_log_keeps_the_old_key_and_the_node_checks_its_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = init_test_node(tmp_path, CITY, rows=40)
    log_file = config.path(config.audit.log_key_file)
    old = read_key_file(log_file)
    origin, unchecked = await _run_once(config)
    assert unchecked == []

    assert main(["node", "rotate-key", "--data-dir", str(config.data_dir), "--key", "log"]) == 0
    out = capsys.readouterr().out
    new = read_key_file(log_file)
    assert new.public_key.raw != old.public_key.raw
    assert new.public_key.raw.hex() in out and "--log-key" in out
    (kept,) = sorted((log_file.parent / "retired").glob("log-*.key"))
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert read_public_key(kept).raw == old.public_key.raw
    assert read_key_file(config.key_file) is not None  # the node key is untouched

    # The node starts (its old checkpoints verify under the kept key) and logs the change.
    _, unchecked = await _run_once(config)
    assert unchecked == []
    with _open(config, origin, new, [old]) as audit:
        rotations = _log_rotations(audit)
        assert [(e.old_key_id, e.new_key_id) for _, e in rotations] == [
            (bytes(32), old.public_key.key_id),
            (old.public_key.key_id, new.public_key.key_id),
        ]
        sizes = sorted(c.size for c in audit.checkpoints())
        since = rotations[-1][0]
        assert any(s <= since for s in sizes) and any(s > since for s in sizes)
        assert audit.unchecked_checkpoints == []


async def test_a_log_key_replaced_without_keeping_the_old_one_still_opens(
    tmp_path: Path,
) -> None:
    config = init_test_node(tmp_path, CITY, rows=40)
    log_file = config.path(config.audit.log_key_file)
    origin, _ = await _run_once(config)
    with AuditLog.open(config.data_dir / AUDIT_FILE, origin) as audit:
        before = sorted(c.size for c in audit.checkpoints())
    assert before
    # The operator discards a compromised key and puts a fresh one in its place.
    write_key_file(log_file, SigningKey.generate(), overwrite=True)
    _, unchecked = await _run_once(config)
    assert unchecked == before  # opened: their roots match the leaves; listed, not hidden
    _, unchecked = await _run_once(config)
    assert unchecked == before  # the new key's own checkpoints do verify


async def test_a_checkpoint_after_the_rotation_signed_by_the_retired_key_is_refused(
    tmp_path: Path,
) -> None:
    config = init_test_node(tmp_path, CITY, rows=40)
    log_file = config.path(config.audit.log_key_file)
    old = read_key_file(log_file)
    origin, _ = await _run_once(config)
    assert main(["node", "rotate-key", "--data-dir", str(config.data_dir), "--key", "log"]) == 0
    new = read_key_file(log_file)
    await _run_once(config)  # logs the rotation, signs with the new key

    # Someone holding the retired key adds a checkpoint over the tree after the rotation.
    with _open(config, origin, new, [old]) as audit:
        forged_size = audit.size
        audit.append_many([KeyRotated(1, new.public_key.key_id, new.public_key.key_id, "x")])
        audit.checkpoint(NoteSigner(origin, old))
    with pytest.raises(InconsistentLogError, match=f"checkpoint {forged_size + 1}"):
        _open(config, origin, new, [old])
    # The retired key as the current one is refused outright.
    with pytest.raises(ConfigError, match="retired"):
        _open(config, origin, old, [])


def test_rotate_key_witness_without_a_witness_key_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = init_test_node(tmp_path, CITY, rows=10)
    before = config.key_file.read_bytes()
    argv = ["node", "rotate-key", "--data-dir", str(config.data_dir), "--key", "witness"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "witness key" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert config.key_file.read_bytes() == before


async def test_a_retired_log_key_put_back_is_refused_at_start(tmp_path: Path) -> None:
    config = init_test_node(tmp_path, CITY, rows=20)
    log_file = config.path(config.audit.log_key_file)
    await _run_once(config)
    assert main(["node", "rotate-key", "--data-dir", str(config.data_dir), "--key", "log"]) == 0
    await _run_once(config)
    (kept,) = sorted((log_file.parent / "retired").glob("log-*.key"))
    log_file.write_bytes(kept.read_bytes())  # e.g. a backup restored over the new key
    with pytest.raises(ConfigError, match="retired"):
        async with running_node(config):
            pass
    # The command line says it in one line and exits non-zero, serving nothing.
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "hansa", "node", "serve", "--data-dir", str(config.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "retired" in proc.stderr and "Traceback" not in proc.stderr
    assert "listening" not in proc.stdout


def test_a_log_without_key_history_accepts_retired_keys_but_nothing_unchecked(
    tmp_path: Path,
) -> None:
    origin = "example.org/hansa/lisbon"
    db = tmp_path / "legacy.sqlite"
    old, new, other = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    with AuditLog.open(db, origin) as audit:  # a log that never recorded its keys
        audit.append_many([KeyRotated(1, bytes(32), bytes(32), "node")])
        audit.checkpoint(NoteSigner(origin, old))

    def opened(retired: list[SigningKey]) -> AuditLog:
        return AuditLog.open(
            db,
            origin,
            verifier=NoteVerifier(origin, new.public_key),
            retired=[NoteVerifier(origin, k.public_key) for k in retired],
        )

    with opened([other, old]) as audit:
        assert audit.unchecked_checkpoints == []
    with pytest.raises(InconsistentLogError):
        opened([other])
