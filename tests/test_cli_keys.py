"""``hansa keygen`` and ``hansa key show``."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_path

from hansa.crypto.keyfile import read_key_file, read_public_key, write_key_file
from hansa.crypto.keys import SigningKey, key_id
from hansa.node.cli import EXIT_ERROR, main

PASS = "tr0ub4dor&3"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, str]:
    assert main(list(argv)) == 0
    out = capsys.readouterr().out
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    assert list(fields) == ["file", "encrypted", "public-key", "key-id", "vkey"]
    return fields


def _fail(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == EXIT_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("hansa: error: ")
    return captured.err


def _check_vkey(vkey: str, name: str, pk: bytes) -> None:
    # c2sp.org/signed-note: name+hex8(keyID)+base64(0x01 || pk); split on the
    # first two "+" only, the base64 part may contain "+".
    got_name, hex_id, b64 = vkey.split("+", 2)
    assert got_name == name
    assert base64.b64decode(b64, validate=True) == b"\x01" + pk
    assert hex_id == hashlib.sha256(name.encode() + b"\n\x01" + pk).digest()[:4].hex()


def test_keygen_unencrypted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "city.key"
    fields = _run(capsys, "keygen", "--out", str(out), "--no-passphrase")
    pk = read_public_key(out).raw
    assert fields["file"] == str(out)
    assert fields["encrypted"] == "no"
    assert fields["public-key"] == pk.hex()
    assert fields["key-id"] == key_id(pk).hex()
    _check_vkey(fields["vkey"], "city", pk)
    assert read_key_file(out).public_key.raw == pk
    if os.name == "posix":
        assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_keygen_passphrase_file_and_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "pass.txt"
    secret.write_text(PASS + "\n")  # the trailing newline is not part of it
    out = tmp_path / "node.key"
    fields = _run(
        capsys, "keygen", "--out", str(out), "--passphrase-file", str(secret),
        "--name", "city.example/log",
    )  # fmt: skip
    assert fields["encrypted"] == "yes"
    pk = bytes.fromhex(fields["public-key"])
    _check_vkey(fields["vkey"], "city.example/log", pk)
    assert read_key_file(out, passphrase=PASS.encode()).public_key.raw == pk


def test_keygen_passphrase_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HANSA_TEST_PASS", PASS)
    out = tmp_path / "env.key"
    fields = _run(capsys, "keygen", "--out", str(out), "--passphrase-env", "HANSA_TEST_PASS")
    assert fields["encrypted"] == "yes"
    assert read_key_file(out, passphrase=PASS.encode()).public_key.raw.hex() == fields["public-key"]


def test_keygen_default_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    fields = _run(capsys, "keygen", "--no-passphrase")
    assert fields["file"] == "hansa.key"
    assert fields["vkey"].startswith("hansa+")
    assert (tmp_path / "hansa.key").exists()


def test_keygen_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k.key"
    first = _run(capsys, "keygen", "--out", str(out), "--no-passphrase")
    err = _fail(capsys, "keygen", "--out", str(out), "--no-passphrase")
    assert "already exists; use --force" in err and "[KEY_FILE]" in err
    assert read_public_key(out).raw.hex() == first["public-key"]
    second = _run(capsys, "keygen", "--out", str(out), "--no-passphrase", "--force")
    assert second["public-key"] != first["public-key"]
    assert read_public_key(out).raw.hex() == second["public-key"]


def test_keygen_passphrase_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = str(tmp_path / "x.key")
    monkeypatch.delenv("HANSA_TEST_UNSET", raising=False)
    assert "HANSA_TEST_UNSET is not set" in _fail(
        capsys, "keygen", "--out", out, "--passphrase-env", "HANSA_TEST_UNSET"
    )
    monkeypatch.setenv("HANSA_TEST_EMPTY", "")
    assert "HANSA_TEST_EMPTY is empty" in _fail(
        capsys, "keygen", "--out", out, "--passphrase-env", "HANSA_TEST_EMPTY"
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert "is empty" in _fail(capsys, "keygen", "--out", out, "--passphrase-file", str(empty))
    missing = str(tmp_path / "missing.txt")
    assert "cannot read passphrase file" in _fail(
        capsys, "keygen", "--out", out, "--passphrase-file", missing
    )
    assert not (tmp_path / "x.key").exists()


def test_keygen_without_passphrase_option_needs_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    err = _fail(capsys, "keygen", "--out", str(tmp_path / "t.key"))
    assert "stdin is not a terminal" in err and "--no-passphrase" in err


def test_keygen_prompts_twice_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Tty(""))
    answers = iter([PASS, PASS + "x"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert "do not match" in _fail(capsys, "keygen", "--out", str(tmp_path / "t.key"))

    answers = iter([PASS, PASS])
    out = tmp_path / "t.key"
    assert _run(capsys, "keygen", "--out", str(out))["encrypted"] == "yes"
    assert read_key_file(out, passphrase=PASS.encode()).public_key == read_public_key(out)


@pytest.mark.parametrize("name", ["a b", "a+b", "", "tab\there"])
def test_keygen_rejects_bad_note_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    out = tmp_path / "n.key"
    err = _fail(capsys, "keygen", "--out", str(out), "--no-passphrase", "--name", name)
    assert "key name" in err and "[NOTE]" in err
    assert not out.exists()


def test_key_show_needs_no_passphrase(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = SigningKey.generate()
    path = tmp_path / "shown.key"
    write_key_file(path, key, passphrase=b"pw", opslimit=1, memlimit=8192)
    fields = _run(capsys, "key", "show", str(path))
    assert fields["encrypted"] == "yes"
    assert fields["public-key"] == key.public_key.raw.hex()
    assert fields["key-id"] == key.key_id.hex()
    _check_vkey(fields["vkey"], "shown", key.public_key.raw)


def test_key_show_vkey_known_answer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # golang/mod's PeterNeumann signer key and its vkey. The signer key is
    # PRIVATE+KEY+<name>+<keyid>+base64(0x01 || seed); the base64 may hold "+".
    doc = json.loads(shared_path("vectors", "signed_note_vectors.json").read_text())
    vector = doc["vectors"][0]
    seed = base64.b64decode(vector["signer_key"].split("+", 4)[4])[1:]
    path = tmp_path / "peter.key"
    write_key_file(path, SigningKey(seed))
    fields = _run(capsys, "key", "show", str(path), "--name", "PeterNeumann")
    assert fields["vkey"] == vector["vkey"]


def test_key_show_too_open_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "open.key"
    write_key_file(path, SigningKey.generate())
    path.chmod(0o644)
    if os.name == "posix":
        assert f"chmod 600 {path}" in _fail(capsys, "key", "show", str(path))


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.key"
    path.write_text("hansa-key v1\nkind: ed25519\n")
    path.chmod(0o600)
    proc = subprocess.run(
        [sys.executable, "-m", "hansa", "key", "show", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == EXIT_ERROR
    assert proc.stdout == ""
    assert (
        proc.stderr
        == f"hansa: error: key file {path} is truncated (no 'public-key' line) [KEY_FILE]\n"
    )
    assert "Traceback" not in proc.stderr
