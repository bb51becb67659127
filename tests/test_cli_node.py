"""``hansa node init | trust | show``: files written, permissions, one-line errors."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest

from hansa.crypto import SigningKey
from hansa.crypto.keyfile import is_encrypted, read_key_file, read_public_key, write_key_file
from hansa.node.cli import EXIT_ERROR, main
from hansa.node.config import load_config


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_init_writes_private_key_and_commented_toml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "melbourne"
    code, out, err = run(
        ["node", "init", "--data-dir", str(data_dir), "--city", "melbourne", "--port", "9123"],
        capsys,
    )
    assert (code, err) == (0, "")
    key_file = data_dir / "node.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) & 0o077 == 0
    assert not is_encrypted(key_file)
    public = read_public_key(key_file)
    assert public.raw.hex() in out
    assert read_key_file(key_file).public_key == public

    text = (data_dir / "node.toml").read_text(encoding="utf-8")
    doc = tomllib.loads(text)
    assert doc["node"]["city"] == "melbourne"
    assert doc["node"]["port"] == 9123
    assert sum(line.startswith("#") for line in text.splitlines()) >= 20
    config = load_config(data_dir)
    assert (config.city, config.port, config.host) == ("melbourne", 9123, "127.0.0.1")
    assert config.key_file == key_file.resolve()


def test_init_with_passphrase_env_encrypts_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HANSA_NODE_PW", "a long passphrase")
    data_dir = tmp_path / "n"
    code, _, err = run(
        [
            "node",
            "init",
            "--data-dir",
            str(data_dir),
            "--city",
            "bangkok",
            "--passphrase-env",
            "HANSA_NODE_PW",
        ],
        capsys,
    )
    assert (code, err) == (0, "")
    config = load_config(data_dir)
    assert config.key_passphrase_env == "HANSA_NODE_PW"
    assert is_encrypted(config.key_file)
    passphrase = config.passphrase()
    assert passphrase == b"a long passphrase"
    assert read_key_file(config.key_file, passphrase=passphrase).public_key == read_public_key(
        config.key_file
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--city", "Not A City"],
        ["--city", "melbourne", "--port", "99999"],
        ["--city", "melbourne", "--passphrase-env", "HANSA_SURELY_UNSET_VARIABLE"],
    ],
)
def test_init_errors_are_one_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    data_dir = tmp_path / "d"
    code, out, err = run(["node", "init", "--data-dir", str(data_dir), *argv], capsys)
    assert code == EXIT_ERROR
    assert out == ""
    assert err.startswith("hansa: error: ")
    assert err.count("\n") == 1
    assert not data_dir.exists()


def test_init_refuses_an_existing_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["node", "init", "--data-dir", str(tmp_path), "--city", "austin"]
    assert run(argv, capsys)[0] == 0
    key_before = (tmp_path / "node.key").read_bytes()
    code, _, err = run(argv, capsys)
    assert code == EXIT_ERROR
    assert "already" in err and err.count("\n") == 1
    assert (tmp_path / "node.key").read_bytes() == key_before


def test_trust_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["node", "init", "--data-dir", str(tmp_path), "--city", "istanbul"], capsys)[0] == 0
    ana = SigningKey.generate()
    bob = SigningKey.generate()
    bob_file = tmp_path / "bob.key"
    write_key_file(bob_file, bob)
    code, out, err = run(
        [
            "node",
            "trust",
            "--data-dir",
            str(tmp_path),
            "--principal",
            "ana@istanbul",
            "--key",
            ana.public_key.raw.hex(),
        ],
        capsys,
    )
    assert (code, err) == (0, "")
    assert "ana@istanbul" in out
    code, _, err = run(
        [
            "node",
            "trust",
            "--data-dir",
            str(tmp_path),
            "--principal",
            "bob@istanbul",
            "--key-file",
            str(bob_file),
        ],
        capsys,
    )
    assert (code, err) == (0, "")
    config = load_config(tmp_path)
    assert {t.principal: t.public_key for t in config.trusted} == {
        "ana@istanbul": ana.public_key,
        "bob@istanbul": bob.public_key,
    }
    code, out, err = run(["node", "show", "--data-dir", str(tmp_path)], capsys)
    assert (code, err) == (0, "")
    assert "istanbul" in out
    assert ana.public_key.raw.hex() in out and bob.public_key.raw.hex() in out
    assert "max_request_bytes" in out
    # The secret seed never appears.
    assert read_key_file(config.key_file).seed.hex() not in out


@pytest.mark.parametrize(
    "key", ["zz" * 32, "00" * 31, "01" + "00" * 31, SigningKey(b"\x05" * 32).public_key.raw.hex()]
)
def test_trust_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    assert run(["node", "init", "--data-dir", str(tmp_path), "--city", "austin"], capsys)[0] == 0
    argv = ["node", "trust", "--data-dir", str(tmp_path), "--principal", "ana@austin"]
    if key == SigningKey(b"\x05" * 32).public_key.raw.hex():
        assert run([*argv, "--key", key], capsys)[0] == 0  # first time fine; second is a duplicate
    before = (tmp_path / "node.toml").read_text(encoding="utf-8")
    code, out, err = run([*argv, "--key", key], capsys)
    assert code == EXIT_ERROR
    assert out == ""
    assert err.startswith("hansa: error: ") and err.count("\n") == 1
    assert (tmp_path / "node.toml").read_text(encoding="utf-8") == before


def test_commands_on_a_missing_node_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for sub in ("show", "serve"):
        code, out, err = run(["node", sub, "--data-dir", str(tmp_path / "nowhere")], capsys)
        assert code == EXIT_ERROR
        assert out == ""
        assert "hansa node init" in err and err.count("\n") == 1
