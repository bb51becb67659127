"""``hansa alliance``: roster files end to end through the command line."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hansa.crypto.keyfile import write_key_file
from hansa.crypto.keys import SigningKey
from hansa.federation.roster import (
    Role,
    decode_roster,
    decode_signed_roster,
    roster_digest,
    signed_by,
    verify_roster,
)
from hansa.node import _cli_alliance, cli
from hansa.node.cli import EXIT_ERROR, EXIT_VERIFY_FAILED, main

CITIES = ("amsterdam", "berlin", "cape-town")


@pytest.fixture(autouse=True)
def _alliance_registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run through the real ``main``, registering the group if cli.py does not yet."""
    original = cli.build_parser

    def build() -> argparse.ArgumentParser:
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "alliance" not in sub.choices:
            _cli_alliance.register(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)
    yield


def _key(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.key"
    write_key_file(path, SigningKey.generate())
    return path


def _ok(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, str]:
    code = main(["alliance", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return dict(line.split(": ", 1) for line in captured.out.splitlines() if ": " in line)


def _fail(capsys: pytest.CaptureFixture[str], expected: int, *argv: str) -> str:
    assert main(["alliance", *argv]) == expected
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("hansa: ")
    return captured.err


def _init(tmp: Path, capsys: pytest.CaptureFixture[str], threshold: int = 2) -> Path:
    out = tmp / "roster-1.bin"
    members = [
        arg
        for i, city in enumerate(CITIES)
        for arg in ("--member", f"{city}=http://127.0.0.1:{9000 + i}:{_key(tmp, city)}")
    ]
    fields = _ok(
        capsys, "init", "--name", "Hanse", "--out", str(out), "--threshold", str(threshold),
        "--expires-days", "30", "--purpose", "research", *members,
    )  # fmt: skip
    assert fields["version"] == "1"
    assert fields["signatures"] == f"0 of threshold {threshold}"
    return out


def test_init_sign_verify_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r1 = _init(tmp_path, capsys)
    roster = decode_roster(decode_signed_roster(r1.read_bytes()).body)
    assert [m.city for m in roster.members] == list(CITIES)
    assert roster.member("berlin") is not None
    assert roster.member("berlin").endpoint == "http://127.0.0.1:9001"  # type: ignore[union-attr]
    assert roster.threshold == 2 and len(roster.root_keys) == 3

    err = _fail(capsys, EXIT_VERIFY_FAILED, "verify", str(r1))
    assert "0 valid signature(s)" in err and "BAD_SIGNATURE" in err

    _ok(capsys, "sign", str(r1), "--key", str(tmp_path / "amsterdam.key"))
    _fail(capsys, EXIT_VERIFY_FAILED, "verify", str(r1))
    fields = _ok(capsys, "sign", str(r1), "--key", str(tmp_path / "berlin.key"))
    assert fields["signatures"] == "2 of threshold 2"

    signed = decode_signed_roster(r1.read_bytes())
    fields = _ok(capsys, "verify", str(r1), "--pin", roster_digest(signed).hex())
    assert fields["verdict"] == "OK"
    assert fields["version"] == "1"
    assert fields["signed-by"].startswith("amsterdam, berlin")
    assert verify_roster(signed, None, time.time_ns() // 1_000_000).alliance == "Hanse"
    _fail(capsys, EXIT_VERIFY_FAILED, "verify", str(r1), "--pin", "00" * 32)

    assert main(["alliance", "show", str(r1)]) == 0
    out = capsys.readouterr().out
    assert "Hanse" in out and "cape-town" in out and "http://127.0.0.1:9002" in out
    assert "2 valid of threshold 2" in out


def test_sign_refuses_a_key_that_is_not_a_root_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r1 = _init(tmp_path, capsys)
    stranger = _key(tmp_path, "stranger")
    err = _fail(capsys, EXIT_ERROR, "sign", str(r1), "--key", str(stranger))
    assert "not a root key" in err and "UNKNOWN_KEY" in err


def _published(tmp: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    r1 = _init(tmp, capsys)
    for city in CITIES[:2]:
        _ok(capsys, "sign", str(r1), "--key", str(tmp / f"{city}.key"))
    return r1


def test_add_member_rotation_and_revocation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r1 = _published(tmp_path, capsys)
    r2 = tmp_path / "roster-2.bin"
    dakar = _key(tmp_path, "dakar")
    fields = _ok(
        capsys, "add-member", str(r1), "--out", str(r2), "--city", "dakar",
        "--endpoint", "https://dakar.example/hansa", "--key", str(dakar),
        "--roles", "member,witness", "--root-key", str(dakar), "--name", "Dakar",
    )  # fmt: skip
    assert fields["version"] == "2"
    assert fields["signatures"] == "0 of threshold 2"
    v2 = decode_roster(decode_signed_roster(r2.read_bytes()).body)
    dakar_member = v2.member("dakar")
    assert dakar_member is not None and dakar_member.roles == (Role.MEMBER, Role.WITNESS)

    # Signed only by the new root key and one old one: below version 1's threshold.
    _ok(capsys, "sign", str(r2), "--key", str(dakar))
    _ok(capsys, "sign", str(r2), "--key", str(tmp_path / "cape-town.key"))
    err = _fail(capsys, EXIT_VERIFY_FAILED, "verify", str(r2), "--trusted", str(r1))
    assert "version 1's" in err
    _ok(capsys, "sign", str(r2), "--key", str(tmp_path / "amsterdam.key"))
    fields = _ok(capsys, "verify", str(r2), "--trusted", str(r1))
    assert fields["version"] == "2" and fields["verdict"] == "OK"
    # Rollback: version 1 after version 2 is refused.
    err = _fail(capsys, EXIT_VERIFY_FAILED, "verify", str(r1), "--trusted", str(r2))
    assert "rollback" in err and "ROSTER_MISMATCH" in err

    # Revoke berlin in version 3; then its key is gone from every lookup.
    r3 = tmp_path / "roster-3.bin"
    fields = _ok(capsys, "remove-member", str(r2), "--out", str(r3), "--city", "berlin")
    assert fields["version"] == "3"
    for city in ("amsterdam", "cape-town"):
        _ok(capsys, "sign", str(r3), "--key", str(tmp_path / f"{city}.key"))
    fields = _ok(capsys, "verify", str(r1), str(r2), str(r3))
    assert fields["version"] == "3"
    v3 = decode_roster(decode_signed_roster(r3.read_bytes()).body)
    assert v3.member("berlin") is None
    assert [k.city for k in v3.root_keys] == ["amsterdam", "cape-town", "dakar"]
    # Skipping version 2 is refused.
    err = _fail(capsys, EXIT_VERIFY_FAILED, "verify", str(r3), "--trusted", str(r1))
    assert "skips" in err


def test_editing_a_draft_keeps_its_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r1 = _init(tmp_path, capsys)
    _ok(capsys, "sign", str(r1), "--key", str(tmp_path / "amsterdam.key"))  # below threshold
    ana = _key(tmp_path, "ana")
    fields = _ok(
        capsys, "add-analyst", str(r1), "--out", str(r1), "--principal", "ana@amsterdam",
        "--key", str(ana), "--home-city", "amsterdam", "--purposes", "research,planning",
    )  # fmt: skip
    assert fields["version"] == "1"
    signed = decode_signed_roster(r1.read_bytes())
    assert signed.signatures == ()  # the old signature covered other bytes
    roster = decode_roster(signed.body)
    assert roster.purposes == ("research", "planning")
    assert roster.allows_purpose("ana@amsterdam", "planning")
    _ok(capsys, "remove-analyst", str(r1), "--out", str(r1), "--principal", "ana@amsterdam")
    assert decode_roster(decode_signed_roster(r1.read_bytes()).body).analysts == ()


def test_rotation_signature_by_previous_root_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r1 = _published(tmp_path, capsys)
    r2 = tmp_path / "roster-2.bin"
    # Removing a root-key holder below the threshold needs an explicit threshold.
    err = _fail(
        capsys, EXIT_ERROR, "remove-member", str(r1), "--out", str(r2), "--city", "berlin",
        "--threshold", "3",
    )  # fmt: skip
    assert "threshold" in err
    _ok(capsys, "remove-member", str(r1), "--out", str(r2), "--city", "berlin", "--threshold", "1")
    # berlin's key is no root key of version 2, but version 1's keys sign the rotation.
    err = _fail(capsys, EXIT_ERROR, "sign", str(r2), "--key", str(tmp_path / "berlin.key"))
    assert "not a root key" in err
    _ok(capsys, "sign", str(r2), "--key", str(tmp_path / "berlin.key"), "--previous", str(r1))
    _ok(capsys, "sign", str(r2), "--key", str(tmp_path / "amsterdam.key"))
    fields = _ok(capsys, "verify", str(r2), "--trusted", str(r1))
    assert fields["signed-by"] == "amsterdam (1 of threshold 1)"
    signed = decode_signed_roster(r2.read_bytes())
    roster = decode_roster(signed.body)
    assert len(signed_by(signed, roster.root_key_ids)) == 1


def test_expired_roster_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r1 = _published(tmp_path, capsys)
    r2 = tmp_path / "roster-2.bin"
    _ok(
        capsys, "add-member", str(r1), "--out", str(r2), "--city", "dakar",
        "--endpoint", "http://127.0.0.1:9009", "--key", str(_key(tmp_path, "dakar")),
        "--expires-days", "0",
    )  # fmt: skip
    for city in CITIES[:2]:
        _ok(capsys, "sign", str(r2), "--key", str(tmp_path / f"{city}.key"))
    err = _fail(capsys, EXIT_VERIFY_FAILED, "verify", str(r2), "--trusted", str(r1))
    assert "expired" in err and "EXPIRED" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--member", "amsterdam=ftp://x.example:{key}"], "endpoint"),
        (["--member", "amsterdam"], "CITY=ENDPOINT:KEYFILE"),
        (["--member", "Bad City=http://x.example:{key}"], "city id"),
        (["--member", "amsterdam=http://x.example:/nonexistent.key"], "does not exist"),
        (["--member", "amsterdam=http://x.example:{key}", "--threshold", "2"], "threshold"),
    ],
)
def test_init_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    key = _key(tmp_path, "k")
    args = [a.replace("{key}", str(key)) for a in argv]
    if "--threshold" not in args:
        args += ["--threshold", "1"]
    err = _fail(
        capsys, EXIT_ERROR, "init", "--name", "H", "--out", str(tmp_path / "r.bin"),
        "--expires-days", "1", *args,
    )  # fmt: skip
    assert needle in err


def test_not_a_roster_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x93not a roster")
    err = _fail(capsys, EXIT_ERROR, "show", str(junk))
    assert "not a roster file" in err
    err = _fail(capsys, EXIT_VERIFY_FAILED, "verify", str(junk))
    assert "MALFORMED" in err
    _fail(capsys, EXIT_ERROR, "show", str(tmp_path / "missing.bin"))


def test_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r1 = _init(tmp_path, capsys)
    key = _key(tmp_path, "k")
    argv = [
        "init", "--name", "H", "--out", str(r1), "--threshold", "1", "--expires-days", "1",
        "--member", f"amsterdam=http://127.0.0.1:1:{key}",
    ]  # fmt: skip
    assert "already exists" in _fail(capsys, EXIT_ERROR, *argv)
    _ok(capsys, *argv, "--force")


def test_init_with_roles_and_witness_quorum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.bin"
    members = [
        arg
        for city in CITIES
        for arg in ("--member", f"{city}=http://127.0.0.1:1:{_key(tmp_path, city)}")
    ]
    _ok(
        capsys, "init", "--name", "H", "--out", str(out), "--threshold", "1",
        "--expires-days", "1", *members, "--roles", "berlin=member,witness",
        "--roles", "cape-town=witness,auditor", "--witness-quorum", "1",
    )  # fmt: skip
    roster = decode_roster(decode_signed_roster(out.read_bytes()).body)
    assert roster.witness_quorum == 1
    witnesses = {roster.holders[kid].principal for kid in roster.keys_for_role(Role.WITNESS)}
    assert witnesses == {"berlin", "cape-town"}
    assert len(roster.keys_for_role(Role.AUDITOR)) == 1
    err = _fail(
        capsys, EXIT_ERROR, "init", "--name", "H", "--out", str(out), "--force",
        "--threshold", "1", "--expires-days", "1", *members, "--roles", "dakar=witness",
    )  # fmt: skip
    assert "no --member" in err

    # Two witnesses cannot require two cosignatures: each one's own log has one other.
    err = _fail(
        capsys, EXIT_ERROR, "init", "--name", "H", "--out", str(out), "--force",
        "--threshold", "1", "--expires-days", "1", *members, "--roles", "berlin=member,witness",
        "--roles", "cape-town=witness", "--witness-quorum", "2",
    )  # fmt: skip
    assert "witness quorum 2" in err and "does not witness itself" in err


def _members(tmp: Path) -> list[str]:
    return [
        arg
        for i, city in enumerate(CITIES)
        for arg in ("--member", f"{city}=http://127.0.0.1:{9000 + i}:{_key(tmp, city)}")
    ]


def test_log_and_witness_keys_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hansa.crypto.keyfile import read_public_key

    logs = {city: _key(tmp_path, f"{city}-log") for city in CITIES}
    witness = _key(tmp_path, "berlin-witness")
    members = _members(tmp_path)
    out = tmp_path / "r1.bin"
    _ok(
        capsys, "init", "--name", "H", "--out", str(out), "--threshold", "1",
        "--expires-days", "1", *members, "--roles", "berlin=member,witness",
        "--log-key", f"amsterdam={logs['amsterdam']}", "--log-key", f"berlin={logs['berlin']}",
        "--witness-key", f"berlin={witness}",
    )  # fmt: skip
    roster = decode_roster(decode_signed_roster(out.read_bytes()).body)
    amsterdam, berlin, cape_town = (roster.member(c) for c in CITIES)
    assert amsterdam is not None and berlin is not None and cape_town is not None
    assert amsterdam.log_key == read_public_key(logs["amsterdam"]).raw
    assert berlin.log_key == read_public_key(logs["berlin"]).raw
    assert berlin.witness_key == read_public_key(witness).raw
    assert amsterdam.witness_key is None and cape_town.log_key is None
    assert main(["alliance", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    log_id = read_public_key(logs["berlin"]).key_id.hex()[:16]
    assert log_id in shown and read_public_key(witness).key_id.hex()[:16] in shown
    assert "trusted on first use" in shown and "cape-town" in shown.rsplit("first use", 1)[1]

    # add-member with both keys; set-key rotates a log key alone, then a witness key.
    _ok(capsys, "sign", str(out), "--key", str(tmp_path / "amsterdam.key"))
    r2 = tmp_path / "r2.bin"
    dakar_log, dakar_witness = _key(tmp_path, "dakar-log"), _key(tmp_path, "dakar-witness")
    _ok(
        capsys, "add-member", str(out), "--out", str(r2), "--city", "dakar",
        "--endpoint", "https://dakar.example", "--key", str(_key(tmp_path, "dakar")),
        "--roles", "member,witness", "--log-key", str(dakar_log),
        "--witness-key", str(dakar_witness),
    )  # fmt: skip
    dakar = decode_roster(decode_signed_roster(r2.read_bytes()).body).member("dakar")
    assert dakar is not None
    assert (dakar.log_key, dakar.witness_key) == (
        read_public_key(dakar_log).raw,
        read_public_key(dakar_witness).raw,
    )
    rotated = _key(tmp_path, "berlin-log-2")
    fields = _ok(
        capsys, "set-key", str(r2), "--out", str(r2), "--city", "berlin",
        "--log-key", str(rotated),
    )  # fmt: skip
    assert fields["version"] == "2"  # r2 is a draft: its version stays
    after = decode_roster(decode_signed_roster(r2.read_bytes()).body)
    new_berlin = after.member("berlin")
    assert new_berlin is not None
    assert new_berlin.log_key == read_public_key(rotated).raw
    assert (new_berlin.public_key, new_berlin.witness_key) == (
        berlin.public_key,
        berlin.witness_key,
    )
    # The same key again, no key at all, a witness key for a non-witness: refused.
    err = _fail(
        capsys, EXIT_ERROR, "set-key", str(r2), "--out", str(r2), "--city", "berlin",
        "--log-key", str(rotated),
    )  # fmt: skip
    assert "already names this key" in err and "as its log key" in err
    err = _fail(capsys, EXIT_ERROR, "set-key", str(r2), "--out", str(r2), "--city", "berlin")
    assert "at least one of" in err
    err = _fail(
        capsys, EXIT_ERROR, "set-key", str(r2), "--out", str(r2), "--city", "cape-town",
        "--witness-key", str(_key(tmp_path, "cape-witness")),
    )  # fmt: skip
    assert "witness role" in err
    err = _fail(
        capsys, EXIT_ERROR, "init", "--name", "H", "--out", str(out), "--force",
        "--threshold", "1", "--expires-days", "1", *members,
        "--witness-key", f"amsterdam={witness}",
    )  # fmt: skip
    assert "witness role" in err
    err = _fail(
        capsys, EXIT_ERROR, "init", "--name", "H", "--out", str(out), "--force",
        "--threshold", "1", "--expires-days", "1", *members,
        "--log-key", f"dakar={dakar_log}",
    )  # fmt: skip
    assert "no --member" in err
