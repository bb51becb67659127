"""``hansa note verify`` end to end (in-process, plus one real subprocess)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from hansa.crypto.keys import SigningKey
from hansa.crypto.note import CosignatureSigner, NoteSigner, sign_note
from hansa.node.cli import EXIT_ERROR, EXIT_VERIFY_FAILED, main

TEXT = "Città di Hansa\naudit log head\n"
SIGNER = NoteSigner("city1.example/log", SigningKey(b"\x01" * 32))
OTHER = NoteSigner("city2.example/log", SigningKey(b"\x02" * 32))


@pytest.fixture
def note_file(tmp_path: Path) -> Path:
    path = tmp_path / "note.txt"
    path.write_bytes(sign_note(TEXT, [SIGNER]))
    return path


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hansa:")
    return lines[0]


def test_good_note_prints_text_and_exits_zero(
    note_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["note", "verify", "--vkey", SIGNER.vkey, str(note_file)]) == 0
    out, err = capsys.readouterr()
    assert out == TEXT
    assert err == ""


def test_note_from_stdin(
    note_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(note_file.read_bytes())))
    assert main(["note", "verify", "--vkey", SIGNER.vkey]) == 0
    assert capsys.readouterr().out == TEXT
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(note_file.read_bytes())))
    assert main(["note", "verify", "--vkey", SIGNER.vkey, "-"]) == 0
    assert capsys.readouterr().out == TEXT


def test_several_vkeys_and_vkey_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    note = tmp_path / "two.txt"
    note.write_bytes(sign_note(TEXT, [OTHER, SIGNER]))
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# trusted logs\n\n  {OTHER.vkey}  \n{SIGNER.vkey}\n", "utf-8")
    assert main(["note", "verify", "--vkey", f"@{keys}", str(note)]) == 0
    assert capsys.readouterr().out == TEXT
    assert main(["note", "verify", "--vkey", OTHER.vkey, "--vkey", SIGNER.vkey, str(note)]) == 0
    assert capsys.readouterr().out == TEXT


def test_wrong_key_fails_verification(note_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["note", "verify", "--vkey", OTHER.vkey, str(note_file)]) == EXIT_VERIFY_FAILED
    out, err = capsys.readouterr()
    assert out == ""
    assert "not signed by any known key" in _one_error_line(err)


def test_cosigner_key_of_same_name_does_not_verify(
    note_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    as_cosigner = CosignatureSigner(SIGNER.name, SigningKey(b"\x01" * 32))
    rc = main(["note", "verify", "--vkey", as_cosigner.vkey, str(note_file)])
    assert rc == EXIT_VERIFY_FAILED
    _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda b: b.replace(b"audit", b"audjt"),
        lambda b: b.replace(b"\n\n", b"\n"),
        lambda b: b[:-5] + b"\n",
        lambda b: b.replace(b"\n", b"\r\n"),
        lambda b: b"",
        lambda b: b"\xff" * 10,
    ],
)
def test_tampered_or_malformed_note_fails(
    tamper: object, note_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert callable(tamper)
    note_file.write_bytes(tamper(note_file.read_bytes()))
    assert main(["note", "verify", "--vkey", SIGNER.vkey, str(note_file)]) == EXIT_VERIFY_FAILED
    out, err = capsys.readouterr()
    assert out == ""
    assert "note does not verify" in _one_error_line(err)


def test_known_key_with_bad_signature_fails_even_if_another_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = sign_note(TEXT, [SIGNER])
    forged_line = sign_note("other\n", [OTHER]).split(b"\n\n", 1)[1]
    note = tmp_path / "forged.txt"
    note.write_bytes(good + forged_line)
    args = ["note", "verify", "--vkey", SIGNER.vkey, "--vkey", OTHER.vkey, str(note)]
    assert main(args) == EXIT_VERIFY_FAILED
    assert OTHER.name in _one_error_line(capsys.readouterr().err)
    assert main(["note", "verify", "--vkey", SIGNER.vkey, str(note)]) == 0


@pytest.mark.parametrize(
    "vkey",
    [
        "not-a-vkey",
        "name+00000000+AA==",
        SIGNER.vkey.replace(SIGNER.key_id.hex(), "00000000"),
        SIGNER.vkey[:-2],
        "n+deadbeef+AQEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_malformed_vkey_is_an_error(
    vkey: str, note_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["note", "verify", "--vkey", vkey, str(note_file)]) == EXIT_ERROR
    out, err = capsys.readouterr()
    assert out == ""
    _one_error_line(err)


def test_vkey_file_errors(
    tmp_path: Path, note_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{SIGNER.vkey}\n# comment\nnonsense\n", "utf-8")
    assert main(["note", "verify", "--vkey", f"@{bad}", str(note_file)]) == EXIT_ERROR
    assert f"{bad}:3:" in _one_error_line(capsys.readouterr().err)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n", "utf-8")
    assert main(["note", "verify", "--vkey", f"@{empty}", str(note_file)]) == EXIT_ERROR
    assert "no vkey" in _one_error_line(capsys.readouterr().err)
    missing = tmp_path / "missing.txt"
    assert main(["note", "verify", "--vkey", f"@{missing}", str(note_file)]) == EXIT_ERROR
    assert "missing.txt" in _one_error_line(capsys.readouterr().err)


def test_missing_note_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.txt"
    assert main(["note", "verify", "--vkey", SIGNER.vkey, str(missing)]) == EXIT_ERROR
    out, err = capsys.readouterr()
    assert out == ""
    assert "nope.txt" in _one_error_line(err)


def test_usage_errors_exit_two(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["note"], ["note", "verify"], ["note", "bogus"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_subprocess_has_no_traceback(note_file: Path, tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "hansa", "note", "verify", "--vkey", SIGNER.vkey, str(note_file)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == TEXT.encode("utf-8")
    bad = subprocess.run(
        [sys.executable, "-m", "hansa", "note", "verify", "--vkey", OTHER.vkey],
        input=note_file.read_bytes(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == EXIT_VERIFY_FAILED
    assert bad.stdout == b""
    assert b"Traceback" not in bad.stderr
    assert len(bad.stderr.splitlines()) == 1
